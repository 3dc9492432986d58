"""A seed fixes the output whatever the plan (issue 24): the invariant scheme and Gumbel-max plain
steps through the real edge runtime and gRPC cloud on the tiny pair.

At T = 1 with a seed, token_ids equal plain decoding's (draft_len 0) token for token for every
draft length 1..8, the auto plan, pipelining on and off, cross-session batching on and off, a cloud
restarted mid-generation, a different drafter (a perturbed copy of the tiny draft), and
`reproducible` over any sparsifier. The first two output tokens follow the target's joint law
(chi-square). The math alone is tests/test_gumbel.py.
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
from scipy import stats

from cloud.inprocess import LocalCloud
from common.rejection import target_probs
from edge.client import ClientConfig
from edge.runtime import EdgeRuntime
from tests.survive_tools import FAST_RETRY, RestartingCloud, target

PROMPT = "The quick brown fox"
N = 24


def run(runtime: EdgeRuntime, seed: int, **options) -> list[int]:
    config = runtime.draft_config({"temperature": 1.0, "seed": seed, **options})
    return runtime.generate(runtime.encode(PROMPT), config, max_new_tokens=N).token_ids


@pytest.fixture(scope="module")
def perturbed_engine(draft_engine):
    """The tiny draft with every weight perturbed: another drafter over the same vocabulary."""
    import copy

    import torch

    from sqs_models.cached_lm import CachedLM

    model = copy.deepcopy(draft_engine.model.model)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * p.std().nan_to_num(0.0) * torch.randn(p.shape, generator=g))
    return dataclasses.replace(draft_engine, new_lm=lambda: CachedLM(model, draft_engine.vocab_size))


def test_every_plan_gives_plain_decodings_tokens(cloud, draft_engine, perturbed_engine):
    rt = EdgeRuntime(draft_engine, ClientConfig(cloud.address))
    other = EdgeRuntime(perturbed_engine, ClientConfig(cloud.address))
    for seed in (3, 4):
        plain = run(rt, seed, draft_len=0)
        assert len(plain) == N
        for draft_len in range(1, 9):
            assert run(rt, seed, sparsifier="invariant", draft_len=draft_len) == plain, draft_len
        for pipeline_off in (False, True):
            assert run(rt, seed, sparsifier="invariant", no_pipeline=pipeline_off) == plain  # auto plan
        assert run(other, seed, sparsifier="invariant", draft_len=4) == plain
        for sparsifier in ("topk", "conformal", "dense"):
            assert run(rt, seed, sparsifier=sparsifier, reproducible=True) == plain, sparsifier


def test_batching_on_and_off_and_concurrent_sessions_keep_the_tokens(draft_engine):
    outs = {}
    for window in (0.0, 5.0):
        with LocalCloud("tiny", batch_window_ms=window) as c:
            rt = EdgeRuntime(draft_engine, ClientConfig(c.address))
            got: dict[int, list[int]] = {}

            def one(seed: int) -> None:
                got[seed] = run(rt, seed, sparsifier="invariant", draft_len=3)

            threads = [threading.Thread(target=one, args=(s,)) for s in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            outs[window] = got
            plain = {s: run(rt, s, draft_len=0) for s in range(4)}
        assert got == plain
    assert outs[0.0] == outs[5.0]


def test_a_cloud_restarted_mid_generation_keeps_the_tokens(draft_engine):
    target()
    restarting = RestartingCloud(lambda session: session.rounds == 3)
    try:
        rt = EdgeRuntime(draft_engine, ClientConfig(restarting.address, **FAST_RETRY))
        disturbed = rt.generate(rt.encode(PROMPT), rt.draft_config(
            {"temperature": 1.0, "seed": 9, "sparsifier": "invariant", "draft_len": 2}), max_new_tokens=N)
        assert restarting.stopped.is_set() and disturbed.stats.reopens >= 1
        opened = restarting.clouds[1].running.metrics.registry.get_sample_value
        assert opened("sqs_sessions_opened_total", {"how": "reopen"}) >= 1  # the new cloud counts the re-open
        assert disturbed.token_ids == run(rt, 9, draft_len=0)
    finally:
        restarting.stop()


def test_first_two_tokens_follow_the_targets_joint_law(cloud, draft_engine):
    """Invariant drafts of length 2: chi-square of (t1, t2) over 500 seeds against p(t1) p(t2 | t1)."""
    from cloud.server import load_target

    _, new_lm = load_target("tiny")
    lm = new_lm()
    ids = draft_engine.tokenizer.encode(PROMPT)
    p1 = target_probs(lm.logits(ids, want=1)[0].astype(np.float64), 1.0)
    top = np.argsort(-p1)[:6]  # the likely first tokens; the rest pooled
    p2 = {int(t): target_probs(lm.logits(ids + [int(t)], want=1)[0].astype(np.float64), 1.0) for t in top}
    rt = EdgeRuntime(draft_engine, ClientConfig(cloud.address))
    n = 500
    cells: dict[tuple, int] = {}
    for seed in range(n):
        config = rt.draft_config({"temperature": 1.0, "seed": seed, "sparsifier": "invariant", "draft_len": 2})
        t1, t2 = rt.generate(ids, config, max_new_tokens=2).token_ids
        key = (t1, int(np.argsort(-p2[t1])[:3].tolist().index(t2)) if t1 in p2 and t2 in
               np.argsort(-p2[t1])[:3] else -1) if t1 in p2 else ("rest",)
        cells[key] = cells.get(key, 0) + 1
    expected: dict[tuple, float] = {("rest",): 1 - p1[top].sum()}
    for t in top:
        order = np.argsort(-p2[int(t)])[:3]
        for j, t2 in enumerate(order):
            expected[(int(t), j)] = p1[t] * p2[int(t)][t2]
        expected[(int(t), -1)] = p1[t] * (1 - p2[int(t)][order].sum())
    keys = [k for k in expected if expected[k] * n >= 5]
    obs = np.array([cells.get(k, 0) for k in keys] + [n - sum(cells.get(k, 0) for k in keys)], dtype=float)
    exp = np.array([expected[k] * n for k in keys] + [n * (1 - sum(expected[k] for k in keys))])
    chi2 = ((obs - exp) ** 2 / np.maximum(exp, 1e-9)).sum()
    assert stats.chi2.sf(chi2, len(keys)) > 1e-3, (obs, exp)
