"""Gumbel-max sampling on shared keyed noise and drafter-invariant verification (common/gumbel.py).

Exactness by chi-square against the exact law (fixed seeds, p-value > 1e-3); invariance by token
equality with plain Gumbel decoding for any drafter and any plan (exact by construction, so token
equality is the right check at every temperature here); the agreement probability against the
paper's bound (1 - TV) / (1 + TV) and rejection sampling's 1 - TV on the same pairs.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from common.gumbel import gumbel_token, uniforms, uniforms_at, verify_invariant


def chi2_p(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    mask = expected >= 5
    chi2 = (((counts - expected) ** 2 / np.where(mask, expected, 1))[mask]).sum()
    return float(stats.chi2.sf(chi2, mask.sum() - 1))


def test_random_access_to_the_noise_equals_the_whole_stream():
    full = uniforms(9, 1234, 151_936)
    idx = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 4097, 77_777, 151_935])
    assert np.array_equal(uniforms_at(9, 1234, idx), full[idx])
    assert not np.array_equal(uniforms(9, 1235, 16), uniforms(9, 1234, 16))  # keyed by position
    assert not np.array_equal(uniforms(10, 1234, 16), uniforms(9, 1234, 16))  # and by seed


def test_the_lazy_noise_is_iid_uniform():
    """The block layout (a block's minimum and its id first, the rest above it) must give i.i.d.
    uniforms: each id's marginal is uniform, and within a block every id is equally likely to hold
    the least value and any rank (exchangeable); ids past a block boundary too."""
    ids = np.array([0, 1, 63, 64, 65, 127, 151_935])
    u = np.stack([uniforms_at(5, pos, ids) for pos in range(3000)])  # [positions, ids]
    for j in range(ids.size):
        assert stats.kstest(u[:, j], "uniform").pvalue > 1e-3, ids[j]
    block = np.stack([uniforms(5, pos, 128) for pos in range(3000)])  # two whole blocks
    for lo in (0, 64):
        ranks = np.argsort(np.argsort(block[:, lo:lo + 64], axis=1), axis=1)[:, [0, 17, 63]]
        for r in ranks.T:  # the rank of a fixed id among its block: uniform over 0..63
            assert chi2_p(np.bincount(r, minlength=64).astype(float), np.full(64, 1 / 64)) > 1e-3
    assert abs(np.corrcoef(block[:, 63], block[:, 64])[0, 1]) < 0.08  # neighbours across a boundary


@pytest.mark.parametrize("v", [65, 1000, 151_936])
def test_reading_few_blocks_finds_the_whole_races_winner(v):
    """gumbel_token opens only the blocks that can win; it must return exactly the winner of the
    race over all V uniforms, for peaked and flat laws, with zero-mass tokens and ties in p."""
    rng = np.random.default_rng(v)
    for i in range(60):
        p = 1 / np.arange(1, v + 1) ** rng.uniform(0.3, 2.5)  # Zipf-like, heavy head to nearly flat
        p = p[rng.permutation(v)]
        if i % 3 == 0:
            p[rng.integers(v, size=v // 3)] = 0.0
        if i % 4 == 0:
            p[rng.integers(v, size=8)] = p.max()  # ties for the largest p
        p /= p.sum()
        u = uniforms(i, 10 + i, v)
        ids = np.flatnonzero(p > 0)
        whole = int(ids[np.argmin(-np.log1p(-u[ids]) / p[ids])])
        assert gumbel_token(p, i, 10 + i) == whole, i


@pytest.mark.parametrize("v", [7, 300])  # 7: the noise read at the support only; 300: as one array
def test_gumbel_token_is_an_exact_draw(v):
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(v) * (1.0 if v < 10 else 0.3))
    p[3] = 0.0  # a token without mass is never drawn
    p /= p.sum()
    counts = np.bincount([gumbel_token(p, 42, pos) for pos in range(8_000)], minlength=v)
    assert counts[3] == 0
    if v > 10:  # pool the tail so every cell has enough expected counts
        order = np.argsort(-p)
        head = order[:20]
        counts = np.append(counts[head], counts.sum() - counts[head].sum())
        p = np.append(p[head], 1 - p[head].sum())
    assert chi2_p(counts.astype(float), p) > 1e-3


def test_a_one_token_support_needs_no_noise():
    p = np.zeros(151_936)
    p[4711] = 1.0
    assert gumbel_token(p, 1, 2) == 4711
    with pytest.raises(ValueError):
        gumbel_token(np.zeros(4), 1, 2)


# --- a synthetic bigram model: the target p(. | previous token) and drafters q ----------------------

V = 6
_rng = np.random.default_rng(3)
TARGET = _rng.dirichlet(np.ones(V), size=V)  # [prev, next]
DRAFTS = [_rng.dirichlet(np.ones(V), size=V), TARGET * 0.5 + _rng.dirichlet(np.ones(V), size=V) * 0.5,
          np.eye(V)[_rng.integers(V, size=V)]]  # three drafters, the last a deterministic one


def plain(seed: int, start: int, n: int) -> list[int]:
    out, prev = [], start
    for pos in range(1, n + 1):
        prev = gumbel_token(TARGET[prev], seed, pos)
        out.append(prev)
    return out


def speculative(seed: int, start: int, n: int, draft: np.ndarray, plan: np.random.Generator) -> list[int]:
    """Rounds of a random length each: draft by Gumbel-max of q, verify_invariant against p."""
    ctx = [start]
    while len(ctx) - 1 < n:
        L = int(plan.integers(0, 5))
        drafts, prev = [], ctx[-1]
        for j in range(L):
            prev = gumbel_token(draft[prev], seed, len(ctx) + j)
            drafts.append(prev)
        rows = np.stack([TARGET[t] for t in [ctx[-1]] + drafts])  # p after each context prefix
        accepted, token = verify_invariant(drafts, rows, seed, len(ctx))
        ctx += drafts[:accepted] + [token]
    return ctx[1:n + 1]


@pytest.mark.parametrize("d", range(len(DRAFTS)))
def test_output_is_plain_decodings_whatever_the_drafter_and_plan(d):
    for seed in range(60):
        assert speculative(seed, 0, 12, DRAFTS[d], np.random.default_rng(seed + 1000)) == plain(seed, 0, 12)


def test_joint_law_of_two_output_tokens_is_the_targets():
    counts = np.zeros((V, V))
    for seed in range(6_000):
        a, b = speculative(seed, 2, 2, DRAFTS[1], np.random.default_rng(seed))
        counts[a, b] += 1
    exact = TARGET[2][:, None] * TARGET  # P(a) P(b | a)
    assert chi2_p(counts.ravel(), exact.ravel()) > 1e-3


def test_agreement_is_at_least_the_papers_bound():
    """Five random pairs (V = 100): agreement within sampling error of [(1-TV)/(1+TV), 1-TV]."""
    rng = np.random.default_rng(100)
    v, n = 100, 6000
    for _ in range(5):
        p = rng.dirichlet(np.ones(v) * 0.5)
        q = 0.6 * p + 0.4 * rng.dirichlet(np.ones(v) * 0.5)
        tv = 0.5 * np.abs(p - q).sum()
        agree = np.mean([gumbel_token(p, 7, i) == gumbel_token(q, 7, i) for i in range(n)])
        sigma = np.sqrt(agree * (1 - agree) / n)
        assert agree >= (1 - tv) / (1 + tv) - 4 * sigma, (agree, tv)
        assert agree <= 1 - tv + 4 * sigma, (agree, tv)  # no coupling beats the maximal one
