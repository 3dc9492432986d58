"""loadtest/edge_batching.py: the simulated edges' draft steps batched across clients of a load test.
The rows equal each LM's own (a shared pass changes only GEMM shapes), steps that are ready together
share passes, a bad call fails its own edge only, and a load test with it on gives plain decoding's
tokens at T = 0 (what the cloud commits does not depend on the drafts)."""
from __future__ import annotations

import threading

import numpy as np
import pytest

pytest.importorskip("torch")

from loadtest.config import LoadTestConfig  # noqa: E402
from loadtest.edge_batching import SharedDraftPasses  # noqa: E402
from loadtest.runner import run_load_test  # noqa: E402
from sqs_models.engines import load_engine  # noqa: E402


def test_concurrent_steps_share_passes_with_each_lms_own_rows():
    eng = load_engine("tiny", "draft", engine="torch")
    passes = SharedDraftPasses(eng, clients=4, window_ms=200.0)
    lms = [passes.new_lm() for _ in range(4)]
    contexts = [[1, 2, 3 + i, 4] for i in range(4)]
    out: dict[int, np.ndarray] = {}

    def step(i: int) -> None:
        out[i] = lms[i].logits(contexts[i], 2)

    threads = [threading.Thread(target=step, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    s = passes.stats
    assert s.items == 4 and s.passes < 4  # steps ready together went into shared passes
    for i in range(4):
        alone = eng.new_lm().logits(contexts[i], 2)
        np.testing.assert_allclose(out[i], alone, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        lms[0].logits([1, 2], 5)  # more rows than the context: this edge's error, raised to it
    assert lms[1].logits(contexts[1] + [5], 1).shape[0] == 1  # the others go on


def test_bad_settings_are_refused():
    eng = load_engine("tiny", "draft", engine="torch")
    with pytest.raises(ValueError):
        SharedDraftPasses(eng, clients=0, window_ms=5.0)
    with pytest.raises(ValueError):
        SharedDraftPasses(eng, clients=2, window_ms=0.0)
    with pytest.raises(ValueError):
        LoadTestConfig(edge_batch_window_ms=-1.0).validate()


def test_a_load_test_with_batched_edges_commits_plain_decodings_tokens_at_t0():
    base = dict(clients=(3,), requests=6, duration_s=60, warmup=0, max_new_tokens=8, seed=7, progress=False,
                draft_model="tiny", target_model="tiny", temperature=0.0, draft_len=3)
    alone = run_load_test(LoadTestConfig(**base))
    shared = run_load_test(LoadTestConfig(**base, edge_batch_window_ms=5.0))
    assert shared.to_dict()["config"]["edge_batch_window_ms"] == 5.0
    by_prompt = lambda rep: {(r.prompt_index, tuple(r.token_ids)) for r in rep.levels[0].records}  # noqa: E731
    assert all(r.ok for r in shared.levels[0].records) and shared.levels[0].summary()["drafted"] > 0
    assert by_prompt(shared) == by_prompt(alone)
    # the record says how the edges' steps shared passes
    e = shared.levels[0].summary()["edge_batching"]
    assert e["passes"] > 0 and sum(e["passes_by_steps"].values()) == e["passes"]
    assert e["steps"] == sum(k * v for k, v in e["passes_by_steps"].items()) >= e["passes"]
    assert e["steps_per_pass"] == pytest.approx(e["steps"] / e["passes"]) and 1 <= e["max_steps_per_pass"] <= 3
    assert "simulated edges' draft passes (steps per pass, warm-up included): N=3: " in shared.table()
    assert alone.levels[0].summary()["edge_batching"] is None
