"""Exact ranks of subsets and compositions (combinatorial number system).

A K-subset {c_0 < c_1 < ... < c_{K-1}} of range(n) has the rank
    sum_i C(c_i, i + 1)          in [0, C(n, K)),
so a support of K tokens out of V costs exactly log2 C(V, K) bits once all ranks of a batch are
packed into one mixed-radix integer (see packing.py).

A composition of ell into K non-negative parts is a (K-1)-subset of the ell + K - 1 "stars and
bars" slots (the bars), or equivalently the ell-subset of slots holding stars; we rank whichever of
the two subsets is smaller, which keeps dense QS (K = V, ell = 100) cheap. Compositions into
positive parts are compositions of ell - K into non-negative parts (b - 1).

Everything is Python ints: exact for V = 151,936 and K in the hundreds.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

_LN2 = math.log(2.0)


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def rank_subset(elements: Sequence[int], n: int) -> int:
    """Rank of a strictly increasing sequence of ints in range(n) among subsets of its size.

    Subsets larger than n // 2 are ranked through their complement (same count, fewer terms).
    """
    k = len(elements)
    if k > n // 2:
        return rank_subset(_complement(elements, n), n)
    rank = 0
    for i, c in enumerate(elements):
        rank += math.comb(int(c), i + 1)
    return rank


def unrank_subset(rank: int, k: int, n: int) -> list[int]:
    """Inverse of rank_subset: the k-subset of range(n) (increasing) with the given rank."""
    if not 0 <= k <= n:
        raise ValueError(f"subset size {k} outside [0, {n}]")
    total = math.comb(n, k)
    if not 0 <= rank < total:
        raise ValueError(f"subset rank outside [0, C({n}, {k}))")
    if k > n // 2:
        return _complement(unrank_subset(rank, n - k, n), n)
    out = [0] * k
    hi = n  # the element at position i-1 is < hi
    for i in range(k, 0, -1):
        c, value = _largest_c(rank, i, hi)
        out[i - 1] = c
        rank -= value
        hi = c
    return out


def _largest_c(rank: int, i: int, hi: int) -> tuple[int, int]:
    """Largest c in [i-1, hi) with C(c, i) <= rank, and C(c, i).

    The caller guarantees rank < C(hi, i). A float guess from C(c, i) ~ (c - (i-1)/2)^i / i! lands
    within a step or two; neighbours are reached by exact ratio updates of one binomial
    (C(c+1, i) = C(c, i) (c+1) / (c+1-i)), far cheaper than a fresh math.comb per probe.
    """
    if rank <= 0:
        return i - 1, 0
    guess = int(math.exp((math.log(rank) + math.lgamma(i + 1)) / i) + (i - 1) / 2.0)
    c = min(max(guess, i - 1), hi - 1)
    val = math.comb(c, i)
    for _ in range(_MAX_WALK):
        if val > rank:
            val = val * (c - i) // c
            c -= 1
        elif c + 1 < hi:
            nxt = val * (c + 1) // (c + 1 - i) if val else 1  # C(i, i) = 1
            if nxt > rank:
                return c, val
            c, val = c + 1, nxt
        else:
            return c, val
    c = _gallop_c(rank, i, hi, c)  # the guess was far off (tiny i or rank); rare
    return c, math.comb(c, i)


_MAX_WALK = 24


def _gallop_c(rank: int, i: int, hi: int, c: int) -> int:
    step = 1
    if math.comb(c, i) <= rank:
        lo = c
        while lo + step < hi and math.comb(lo + step, i) <= rank:
            lo += step
            step *= 2
        return _bisect_c(rank, i, lo, min(lo + step, hi))
    up = c
    while up - step > i - 1 and math.comb(up - step, i) > rank:
        up -= step
        step *= 2
    return _bisect_c(rank, i, max(up - step, i - 1), up)


def _bisect_c(rank: int, i: int, lo: int, hi: int) -> int:
    """Largest c in [lo, hi) with C(c, i) <= rank, given C(lo, i) <= rank < C(hi, i)."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if math.comb(mid, i) <= rank:
            lo = mid
        else:
            hi = mid
    return lo


def _complement(elements: Sequence[int], n: int) -> list[int]:
    mask = np.ones(n, dtype=bool)
    mask[np.asarray(elements, dtype=np.int64)] = False
    return np.flatnonzero(mask).tolist()


def num_subsets(n: int, k: int) -> int:
    return math.comb(n, k)


def num_compositions(total: int, parts: int, positive: bool = False) -> int:
    """Compositions of total into `parts` parts (non-negative, or positive if `positive`)."""
    if parts <= 0:
        return 1 if total == 0 else 0
    if positive:
        return math.comb(total - 1, parts - 1) if total >= parts else 0
    return math.comb(total + parts - 1, parts - 1)


def rank_composition(counts: Sequence[int], positive: bool = False) -> int:
    """Rank of `counts` among compositions of sum(counts) into len(counts) parts."""
    counts = [int(c) for c in counts]
    if positive:
        if min(counts, default=1) < 1:
            raise ValueError("positive composition has a zero part")
        counts = [c - 1 for c in counts]
    total, parts = sum(counts), len(counts)
    if parts <= 1:
        return 0
    slots = total + parts - 1
    return rank_subset(_slots(counts, bars=parts - 1 <= total), slots)


def unrank_composition(rank: int, total: int, parts: int, positive: bool = False) -> list[int]:
    """Inverse of rank_composition."""
    if parts <= 0:
        raise ValueError("a composition needs at least one part")
    base = total - parts if positive else total
    if base < 0:
        raise ValueError(f"cannot split {total} into {parts} positive parts")
    if parts == 1:
        if rank != 0:
            raise ValueError("composition rank out of range")
        counts = [base]
    else:
        slots = base + parts - 1
        use_bars = parts - 1 <= base
        chosen = unrank_subset(rank, parts - 1 if use_bars else base, slots)
        counts = _counts_from_slots(chosen, base, parts, bars=use_bars)
    return [c + 1 for c in counts] if positive else counts


def _slots(counts: list[int], bars: bool) -> list[int]:
    """Positions of the bars (or of the stars) in the stars-and-bars string of `counts`."""
    out: list[int] = []
    pos = 0
    for j, c in enumerate(counts):
        if not bars:
            out.extend(range(pos, pos + c))
        pos += c
        if j < len(counts) - 1:
            if bars:
                out.append(pos)
            pos += 1
    return out


def _counts_from_slots(chosen: list[int], total: int, parts: int, bars: bool) -> list[int]:
    if bars:
        counts, prev = [], -1
        for b in chosen:
            counts.append(b - prev - 1)
            prev = b
        counts.append(total + parts - 1 - prev - 1)
        return counts
    # Stars: a star at slot s lies in part (number of bars before s) = s - (stars before s).
    counts = [0] * parts
    for idx, s in enumerate(chosen):
        counts[s - idx] += 1
    return counts


def log2_comb(n: int, k: int) -> float:
    """log2 C(n, k) as a float, for bit accounting (exact enough for reporting)."""
    if k < 0 or k > n:
        return float("-inf")
    return _log_comb(n, k) / _LN2
