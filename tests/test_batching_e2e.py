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
        stats = on.running.verifier.batch_stats()
    with LocalCloud("tiny", batch_window_ms=0, calibrate=False) as off:
        assert off.running.verifier.batch_stats() is None
        assert off.running.round_executor is None
        plain = generate_all(off, run_generation)
    assert batched == plain
    assert all(len(t) == 24 for t in batched)
    assert stats.passes > 0 and stats.max_items >= 2, stats
