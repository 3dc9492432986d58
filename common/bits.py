"""Bit accounting per draft token: the paper's formulas beside what is actually packed.

Paper (eq. 1, 2, 5): b = support bits + log2 C(ell + K - 1, K - 1);
support bits are log2 C(V, K) for K-SQS and ceil(log2 V) + ceil(log2 V) for C-SQS (the paper's
count, which undercounts the subset for K > 1). Formula bits leave out the draft token itself.
The honest count is sum of log2 of the radices that batch_format really packs (support size where
it varies, subset rank, composition rank, token index); see batch_format.draft_radices.
"""

from __future__ import annotations

import math

from common.ranking import log2_comb
from common.schemes import Scheme, SchemeConfig


def values_bits(ell: int, k: int) -> float:
    """log2 C(ell + K - 1, K - 1): compositions of ell into K non-negative parts (eq. 2)."""
    return log2_comb(ell + k - 1, k - 1)


def formula_bits(config: SchemeConfig, k: int) -> float:
    """The paper's bits for one draft with support size k (no token index)."""
    v, ell, s = config.vocab_size, config.ell, config.scheme
    if s in (Scheme.TOPK, Scheme.TOKEN):
        return log2_comb(v, k) + values_bits(ell, k)
    if s == Scheme.INVARIANT:
        return log2_comb(v, 1)  # the token id
    if s == Scheme.CONFORMAL:
        return 2 * math.ceil(math.log2(v)) + values_bits(ell, k)
    if s == Scheme.DENSE:
        return values_bits(ell, v)
    if s == Scheme.FP16_TOPK:
        return log2_comb(v, k) + 16 * k
    if s == Scheme.FP32:
        return 32.0 * v
    return 0.0
