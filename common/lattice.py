"""Sparse lattice quantization (paper Appendix A.1, Algorithm 2).

The retained probabilities are mapped to integer counts b with sum(b) = ell; the quantized
distribution is q_hat = b / ell, an exact rational that edge and cloud rebuild bit-identically.
"""

from __future__ import annotations

import numpy as np


def quantize(probs: np.ndarray, ell: int) -> np.ndarray:
    """Counts b (int64, same length as probs, sum == ell) for the renormalised probs.

    probs: 1-D float array [K], non-negative, any positive sum. ell: resolution, >= 1.
    b'[i] = floor(ell*q[i] + 1/2); if sum(b') != ell the |sum - ell| entries with the largest
    rounding excess zeta = b' - ell*q (too many) or the smallest (too few) move by one, ties
    broken by the lower index. Counts never go negative: with too many, at least 2*(sum - ell)
    entries have zeta > 0, hence b' >= 1.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 1 or p.size == 0:
        raise ValueError("quantize needs a non-empty 1-D array")
    if int(ell) != ell or ell < 1:
        raise ValueError(f"ell must be a positive integer, got {ell!r}")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError("probabilities must be finite and non-negative")
    total = p.sum()
    if not total > 0:
        raise ValueError("probabilities must have a positive sum")
    scaled = ell * (p / total)
    counts = np.floor(scaled + 0.5).astype(np.int64)
    excess = int(counts.sum()) - int(ell)
    if excess != 0:
        zeta = counts - scaled
        index = np.arange(p.size)
        if excess > 0:
            order = np.lexsort((index, -zeta))  # largest zeta first, lower index first
            counts[order[:excess]] -= 1
        else:
            order = np.lexsort((index, zeta))  # smallest zeta first, lower index first
            counts[order[:-excess]] += 1
    return counts


def dequantize(counts: np.ndarray, ell: int) -> np.ndarray:
    """q_hat = counts / ell as float64 [K]: the one rebuild both sides use."""
    return np.asarray(counts, dtype=np.int64).astype(np.float64) / float(ell)
