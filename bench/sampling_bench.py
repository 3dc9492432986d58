"""Sampling microbenchmark: the cloud's per-token numpy work at T > 0, side by side in one run.

For Zipf-like laws over the whole vocabulary (bench/codec_bench.zipf_dists: peaked to flat), the ms
of one call of:

* ``target_probs``: float32 logits [1, V] -> p (float64), at T = 1 and T = 0.7;
* ``gumbel_token``: one Gumbel-max draw reading the lazy block layout (common/gumbel.py);
* the whole-vocabulary race it replaced: one Philox stream of V uniforms per position
  (numpy's Philox, keyed as the previous layout was), the most probable token's bound, the race
  over the survivors; the same work as before, on other noise, so the token differs but not the cost.

Times are the median over the laws of the best of ``repeats`` calls each, on this core.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from bench.codec_bench import zipf_dists
from common.gumbel import gumbel_token
from common.rejection import target_probs


@dataclass
class SamplingRow:
    what: str
    vocab: int
    ms: float


def _best_ms(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def whole_vocabulary_race(p: np.ndarray, seed: int, position: int) -> int:
    """The previous gumbel_token's dense path: V Philox uniforms, then the race under the bound."""
    key = np.array([seed & 0xFFFF_FFFF_FFFF_FFFF, ((position & 0xFFFF_FFFF) << 24) | 0x6DB1E5], dtype=np.uint64)
    u = np.random.Generator(np.random.Philox(key=key)).random(p.size)
    t = int(np.argmax(p))
    bound = float(-np.log1p(-u[t]) / p[t])
    near = np.flatnonzero(u <= p * (bound * (1.0 + 1e-9)))
    near = near[p[near] > 0]
    return int(near[int(np.argmin(-np.log1p(-u[near]) / p[near]))])


def run(vocab: int = 151_936, n: int = 32, repeats: int = 5, seed: int = 0) -> list[SamplingRow]:
    """One row per operation: the median ms over n laws (best of `repeats` calls each)."""
    laws = zipf_dists(vocab, n, seed)
    logits = [np.log(p).astype(np.float32)[None, :] for p in laws]
    timed: dict[str, list[float]] = {k: [] for k in ("target_probs T=1", "target_probs T=0.7",
                                                    "gumbel_token (lazy blocks)",
                                                    "whole-vocabulary race (one Philox stream)")}
    for i, (p, z) in enumerate(zip(laws, logits)):
        timed["target_probs T=1"].append(_best_ms(lambda: target_probs(z, 1.0), repeats))
        timed["target_probs T=0.7"].append(_best_ms(lambda: target_probs(z, 0.7), repeats))
        timed["gumbel_token (lazy blocks)"].append(_best_ms(lambda: gumbel_token(p, seed, i), repeats))
        timed["whole-vocabulary race (one Philox stream)"].append(
            _best_ms(lambda: whole_vocabulary_race(p, seed, i), repeats))
    return [SamplingRow(k, vocab, float(np.median(v))) for k, v in timed.items()]


def format_rows(rows: list[SamplingRow]) -> str:
    lines = [f"{'operation':44} {'V':>8} {'ms':>8}"]
    lines += [f"{r.what:44} {r.vocab:>8} {r.ms:>8.3f}" for r in rows]
    return "\n".join(lines)
