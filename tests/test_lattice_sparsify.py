"""Lattice quantization (common/lattice.py) against a literal Algorithm 2, and the sparsifiers
(common/sparsify.py) against full-sort oracles.

quantize must equal, entry for entry, the naive oracle below: plain Python loops doing exactly
what docs/DESIGN.md section 3 / paper Algorithm 2 say (b' = floor(ell*q + 1/2); while sum != ell move one
count of the entry with the largest (too many) / smallest (too few) zeta = b' - ell*q, ties to the
lower index). The only numpy call in the oracle is the normalising sum, so that both sides divide
by the same float (the algorithm starts from the renormalised q). Comparisons are exact (no
tolerance); dropped masses are compared to 1e-12 absolute.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import lattice, sparsify

FIXED = settings(derandomize=True, deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])


def oracle_quantize(probs, ell: int) -> list[int]:
    """Algorithm 2, literally, one 1-step at a time with zeta recomputed after every step."""
    total = float(np.sum(np.asarray(probs, dtype=np.float64)))
    scaled = [ell * (float(x) / total) for x in probs]
    b = [math.floor(s + 0.5) for s in scaled]
    while sum(b) != ell:
        zeta = [b[i] - scaled[i] for i in range(len(b))]
        best = 0
        for i in range(1, len(b)):
            if sum(b) > ell and zeta[i] > zeta[best]:
                best = i
            elif sum(b) < ell and zeta[i] < zeta[best]:
                best = i
        b[best] += -1 if sum(b) > ell else 1
    return b


_prob_entry = st.one_of(
    st.just(0.0),
    st.integers(0, 12).map(float),  # exact ties and exact .5 rounding boundaries
    st.sampled_from([0.5, 0.25, 0.125, 1e-300, 1e-9, 1.0 / 3.0]),
    st.floats(0.0, 1.0, allow_nan=False, allow_subnormal=False),
)
_probs = st.lists(_prob_entry, min_size=1, max_size=40).filter(lambda xs: sum(xs) > 0)


@FIXED
@given(_probs, st.integers(1, 300))
def test_quantize_matches_literal_algorithm_2(probs, ell):
    """Random un-normalised weights with zeros, exact ties, exact halves, K > ell and ell = 1:
    quantize == oracle exactly; int64, same length, non-negative, sums to ell."""
    counts = lattice.quantize(np.asarray(probs), ell)
    assert counts.dtype == np.int64 and counts.shape == (len(probs),)
    assert counts.tolist() == oracle_quantize(probs, ell)
    assert counts.min() >= 0 and int(counts.sum()) == ell


@FIXED
@given(_probs, st.integers(1, 300))
def test_quantize_is_close_and_keeps_zeros(probs, ell):
    """Every count is within 1 of ell*q (|b - ell*q| < 1), and a zero probability never gets a count."""
    p = np.asarray(probs)
    counts = lattice.quantize(p, ell)
    scaled = ell * (p / p.sum())
    assert np.all(np.abs(counts - scaled) < 1.0)
    assert np.all(counts[p == 0] == 0)


@pytest.mark.parametrize(
    "probs,ell,expected",
    [
        ([1, 1, 1], 2, [0, 1, 1]),  # too many, all zeta equal: the lowest index loses one
        ([1, 1, 1], 1, [1, 0, 0]),  # too few, all zeta equal: the lowest index gains one
        ([1, 1, 1, 1], 2, [0, 0, 1, 1]),  # exact halves round up, then the two lowest lose one
        ([1, 1, 1, 1], 6, [1, 1, 2, 2]),  # 1.5 -> 2 each (8), the two lowest drop back
        ([0, 1, 0, 1], 3, [0, 1, 0, 2]),  # zeros stay zero; tie between the two ones
        ([0.5, 0.5], 1, [0, 1]),  # ell = 1, both round to 1, lowest index loses
        ([3.0], 7, [7]),  # K = 1 takes everything, any scale
        ([0.7, 0.2, 0.1], 1, [1, 0, 0]),
        ([2, 2, 2, 2, 2, 2, 2, 2, 2, 2], 3, [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]),  # K > ell
    ],
)
def test_quantize_worked_examples(probs, ell, expected):
    """Hand-worked Algorithm 2 outputs, in particular the lower-index tie rule in both directions."""
    assert lattice.quantize(np.asarray(probs, dtype=np.float64), ell).tolist() == expected
    assert oracle_quantize(probs, ell) == expected


def test_quantize_is_scale_invariant_for_exact_scales():
    """Multiplying the weights by a power of two does not change the counts (un-normalised input)."""
    rng = np.random.default_rng(7)
    for _ in range(50):
        p = rng.dirichlet(np.full(20, 0.3))
        for ell in (1, 10, 100):
            base = lattice.quantize(p, ell)
            for scale in (2.0**-30, 0.5, 8.0, 2.0**40):
                assert np.array_equal(lattice.quantize(p * scale, ell), base)


def test_quantize_large_random_against_oracle():
    """Dirichlet vectors (K = 300, peaked and flat) at ell in {1, 17, 100, 1000}: exact match."""
    rng = np.random.default_rng(11)
    for conc in (0.05, 1.0, 50.0):
        p = rng.dirichlet(np.full(300, conc))
        for ell in (1, 17, 100, 1000):
            assert lattice.quantize(p, ell).tolist() == oracle_quantize(p.tolist(), ell)


@pytest.mark.parametrize(
    "probs,ell",
    [([], 10), ([[0.5, 0.5]], 10), ([0.5, 0.5], 0), ([0.5, 0.5], -3), ([0.5, 0.5], 2.5), ([0.0, 0.0], 10),
     ([0.5, -0.1], 10), ([np.nan, 1.0], 10), ([np.inf, 1.0], 10)],
)
def test_quantize_rejects_bad_input(probs, ell):
    """Empty, 2-D, ell < 1 or non-integer, zero sum, negative, NaN or inf input: ValueError."""
    with pytest.raises(ValueError):
        lattice.quantize(np.asarray(probs, dtype=np.float64), ell)


def test_dequantize_is_the_exact_rational():
    """dequantize(b, ell) is float64 b / ell, bit-identical to numpy's own division."""
    counts = np.array([0, 1, 33, 66], dtype=np.int64)
    out = lattice.dequantize(counts, 100)
    assert out.dtype == np.float64
    assert out.tobytes() == (counts.astype(np.float64) / 100.0).tobytes()
    assert lattice.dequantize([3], 3).tolist() == [1.0]


# ---------------------------------------------------------------------------------------------
# sparsifiers


def oracle_top_k(q, k) -> list[int]:
    order = sorted(range(len(q)), key=lambda i: (-q[i], i))
    return sorted(order[:k])


_q = st.lists(st.integers(0, 6), min_size=1, max_size=60).filter(lambda xs: sum(xs) > 0).map(
    lambda xs: (np.asarray(xs, dtype=np.float64) / sum(xs))
)


@FIXED
@given(_q, st.data())
def test_top_k_matches_full_sort_oracle(q, data):
    """top_k == the k smallest (-q, id) in a full sort: many exact ties, which go to the lower
    token id; tokens int64 strictly increasing; dropped mass = sum of q outside, to 1e-12."""
    k = data.draw(st.integers(1, q.size))
    s = sparsify.top_k(q, k)
    assert s.tokens.dtype == np.int64
    assert s.tokens.tolist() == oracle_top_k(q.tolist(), k)
    mask = np.ones(q.size, bool)
    mask[s.tokens] = False
    assert s.dropped_mass == pytest.approx(float(q[mask].sum()), abs=1e-12)
    assert 0.0 <= s.dropped_mass <= 1.0


def test_top_k_ties_go_to_lower_id():
    """All-equal q: top-3 is {0, 1, 2}; a tie straddling the boundary keeps the lower ids."""
    assert sparsify.top_k(np.full(10, 0.1), 3).tokens.tolist() == [0, 1, 2]
    q = np.array([0.1, 0.2, 0.1, 0.2, 0.1, 0.3])
    assert sparsify.top_k(q, 4).tokens.tolist() == [0, 1, 3, 5]


@pytest.mark.parametrize("k", [1, 8, 300, 5000])
@pytest.mark.parametrize("conc", [0.01, 0.05, 1.0])
def test_top_k_large_vocabulary(k, conc):
    """V = 151,936 Dirichlet q (peaked to flat), K from 1 to 5000: equals the stable descending
    argsort oracle; dropped mass to 1e-9."""
    rng = np.random.default_rng(3)
    q = rng.dirichlet(np.full(151_936, conc))
    s = sparsify.top_k(q, k)
    expected = np.sort(np.argsort(-q, kind="stable")[:k])
    assert np.array_equal(s.tokens, expected)
    assert s.dropped_mass == pytest.approx(1.0 - q[expected].sum(), abs=1e-9)


@pytest.mark.parametrize("v,k", [(1000, 10), (1000, 999), (64, 16), (7, 3)])
def test_top_k_flat_and_plateau_distributions(v, k):
    """Uniform q (every value tied) and a plateau of ties straddling the K boundary behind a few
    large values: the lower ids win; matches the full-sort oracle."""
    flat = np.full(v, 1.0 / v)
    assert sparsify.top_k(flat, k).tokens.tolist() == list(range(k))
    plateau = np.full(v, 0.5 / (v - 2))
    plateau[[v - 1, v // 2]] = 0.25
    assert sparsify.top_k(plateau, k).tokens.tolist() == oracle_top_k(plateau.tolist(), k)


@pytest.mark.parametrize("k", [0, -1, 11])
def test_top_k_rejects_bad_k(k):
    """k outside [1, V]: ValueError."""
    with pytest.raises(ValueError):
        sparsify.top_k(np.full(10, 0.1), k)


@FIXED
@given(_q, st.one_of(st.sampled_from([0.0, -1.0, 2.0, 1.0]), st.floats(0.0, 1.0)))
def test_threshold_support_and_never_empty(q, beta):
    """threshold = {x : q(x) >= beta}; when that is empty, exactly the argmax (lowest id on ties);
    never empty; dropped mass = sum outside, to 1e-12."""
    s = sparsify.threshold(q, beta)
    expected = [i for i in range(q.size) if q[i] >= beta]
    if not expected:
        expected = [min(i for i in range(q.size) if q[i] == q.max())]
    assert s.tokens.tolist() == expected
    assert s.tokens.size >= 1
    mask = np.ones(q.size, bool)
    mask[s.tokens] = False
    assert s.dropped_mass == pytest.approx(float(q[mask].sum()), abs=1e-12)


def test_threshold_above_max_keeps_argmax():
    """beta above every probability: the support is the argmax alone, dropped = 1 - max q."""
    q = np.array([0.3, 0.1, 0.3, 0.3])
    s = sparsify.threshold(q, 0.9)
    assert s.tokens.tolist() == [0]
    assert s.dropped_mass == pytest.approx(0.7, abs=1e-12)


def test_threshold_nonpositive_beta_keeps_everything_with_zero_dropped_mass():
    """beta <= 0 keeps the whole vocabulary and reports 0 dropped mass up to float rounding
    (1e-12; the fact Theorem 2 relies on)."""
    q = np.random.default_rng(5).dirichlet(np.full(1000, 0.05))
    for beta in (0.0, -1e-9, -3.0):
        s = sparsify.threshold(q, beta)
        assert s.tokens.size == 1000 and 0.0 <= s.dropped_mass <= 1e-12


def test_dense_and_token_only():
    """dense keeps all ids with 0 dropped mass; token_only keeps the argmax (lowest id on ties)."""
    q = np.array([0.2, 0.4, 0.4])
    d = sparsify.dense(q)
    assert d.tokens.tolist() == [0, 1, 2] and 0.0 <= d.dropped_mass <= 1e-12
    t = sparsify.token_only(q)
    assert t.tokens.tolist() == [1] and t.dropped_mass == pytest.approx(0.6, abs=1e-12)


def _top_k_by_sort(q, k):
    """Reference: stable sort by (-q, id): the k most probable, ties to the lower id."""
    order = np.lexsort((np.arange(q.size), -q))
    return np.sort(order[:k])


@pytest.mark.parametrize("case", ["one-hot", "few-hot", "ties-at-zero", "dense", "dense-with-zeros"])
def test_top_k_matches_a_full_sort_on_degenerate_distributions(case):
    from common.sparsify import top_k

    rng = np.random.default_rng(7)
    v = 5000
    q = np.zeros(v)
    if case == "one-hot":
        q[1234] = 1.0
    elif case == "few-hot":
        q[[7, 900, 4000]] = [0.5, 0.3, 0.2]
    elif case == "ties-at-zero":
        q[[10, 20, 30, 40]] = 0.25
    elif case == "dense":
        q = rng.dirichlet(np.ones(v))
    else:
        q[rng.choice(v, 300, replace=False)] = rng.dirichlet(np.ones(300))
    for k in (1, 2, 3, 4, 8, 64, 400):
        assert np.array_equal(top_k(q, k).tokens, _top_k_by_sort(q, k)), (case, k)


def test_quant_loss_keeps_the_largest_values_padded_with_zeros():
    from common.planner import TOP, QuantLoss

    ql = QuantLoss()
    q = np.zeros(3000)
    q[[5, 6]] = [0.75, 0.25]
    ql.seen(q)
    rng = np.random.default_rng(1)
    d = rng.dirichlet(np.ones(3000) * 0.1)
    ql.seen(d)
    assert np.array_equal(ql._tops[0], np.concatenate([[0.75, 0.25], np.zeros(TOP - 2)]))
    assert np.allclose(ql._tops[1], np.sort(d)[::-1][:TOP])
