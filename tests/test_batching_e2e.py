"""Cross-session batching through gRPC: sqs-cloud in process with --batch-window-ms on and off.

Four edges generate concurrently; at T = 0 (tiny fp32 pair) each gets exactly the tokens it gets
from an unbatched cloud, with zero errors, and the batched cloud really shared its passes.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("torch")

from cloud.inprocess import LocalCloud  # noqa: E402

PROMPTS = ["def f(x):", "Hello, world", "import numpy as np\nimport torch", "a"]


def generate_all(cloud: LocalCloud, run_generation, temperature: float = 0.0) -> list[list[int]]:
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        futs = [pool.submit(run_generation, cloud.address, p, max_new_tokens=24, temperature=temperature, seed=i)
                for i, p in enumerate(PROMPTS)]
        return [list(f.result(120).token_ids) for f in futs]


def test_batched_cloud_gives_every_edge_the_unbatched_tokens(run_generation):
    with LocalCloud("tiny", batch_window_ms=50, calibrate=False) as on:
        batched = generate_all(on, run_generation)
        stats = on.running.verifier.pass_stats()
    with LocalCloud("tiny", batch_window_ms=0, calibrate=False) as off:
        assert off.running.verifier.pass_stats() is None
        assert off.running.round_executor is None
        plain = generate_all(off, run_generation)
    assert batched == plain
    assert all(len(t) == 24 for t in batched)
    assert stats.passes > 0 and stats.max_items >= 2, stats


@pytest.mark.parametrize("window_ms", [2.0, 0.0])
def test_loadtest_reports_the_in_process_clouds_batching(window_ms):
    from loadtest.runner import LoadTestConfig, run_load_test

    report = run_load_test(LoadTestConfig(clients=(3,), requests=3, warmup=0, max_new_tokens=8, draft_len=2,
                                          batch_window_ms=window_ms, progress=False))
    s = report.levels[0].summary()
    assert s["ok"] == 3 and s["errors"] == 0
    b = s["cloud_batching"]
    if window_ms:
        assert b["passes"] > 0 and b["rounds"] >= b["passes"] and b["sessions_per_pass"] >= 1.0
        assert "cloud batching: window 2 ms" in report.header()
    else:
        assert b is None and "cloud batching off" in report.header()
    assert "sess/pass" in report.table()
