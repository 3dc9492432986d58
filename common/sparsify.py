"""Sparsifiers: which tokens of the draft distribution q are described to the cloud.

Every sparsifier returns the support in increasing token order (the order the ranking and the
packing rely on) and the dropped mass sum_{x not in S} q(x), which the conformal controller uses.
q is a 1-D float array over the vocabulary [V], non-negative, summing to 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Support:
    tokens: np.ndarray  # int64 [K], strictly increasing token ids
    dropped_mass: float  # sum of q outside the support, in [0, 1]


def _support(q: np.ndarray, tokens: np.ndarray) -> Support:
    kept = float(q[tokens].sum(dtype=np.float64))  # q sums to 1: no pass over the vocabulary
    return Support(tokens=tokens.astype(np.int64, copy=False), dropped_mass=max(0.0, 1.0 - kept))


def top_k(q: np.ndarray, k: int) -> Support:
    """The k most probable tokens; ties at the boundary go to the lower token id.

    One comparison pass keeps the candidates q >= 1/(4k) (at most 4k of them, since q sums to 1);
    when at least k qualify the top k are among them, and the partial selection runs on those
    alone. A flat q falls back to a partial selection over the vocabulary; never a full sort.
    """
    v = q.shape[0]
    if not 1 <= k <= v:
        raise ValueError(f"top-k needs 1 <= k <= V, got k={k}, V={v}")
    if k == v:
        return _support(q, np.arange(v, dtype=np.int64))
    cand = np.flatnonzero(q >= 1.0 / (4 * k))
    if cand.size >= k:
        vals = q[cand]
        kth = np.partition(vals, vals.size - k)[vals.size - k]  # the k-th largest value
        above = cand[vals > kth]
        ties = cand[vals == kth][: k - above.size]  # cand is increasing: lower ids first
    else:
        # A flat or a nearly one-hot q (T = 0: one token has all the mass). Select among the nonzero
        # entries only: a partition over ~V equal zeros is ~10x slower than over distinct values.
        nz = np.flatnonzero(q > 0)
        if nz.size > k:
            vals = q[nz]
            kth = np.partition(vals, vals.size - k)[vals.size - k]
            above = nz[vals > kth]
            ties = nz[vals == kth][: k - above.size]
        else:  # every nonzero token, then zero ones: ties at 0 go to the lower token ids
            above = nz
            ties = np.flatnonzero(q == 0)[: k - nz.size]
    return _support(q, np.union1d(above, ties))


def threshold(q: np.ndarray, beta: float) -> Support:
    """{x : q(x) >= beta}; never empty: when nothing reaches beta the argmax alone is kept."""
    tokens = np.flatnonzero(q >= beta)
    if tokens.size == 0:
        tokens = np.array([int(np.argmax(q))], dtype=np.int64)  # argmax: lowest id on ties
    return _support(q, tokens)


def dense(q: np.ndarray) -> Support:
    """The whole vocabulary (dense QS, K = V)."""
    return _support(q, np.arange(q.shape[0], dtype=np.int64))


def token_only(q: np.ndarray) -> Support:
    """K = 1: a one-hot draft at the argmax (lossless, low acceptance)."""
    return top_k(q, 1)
