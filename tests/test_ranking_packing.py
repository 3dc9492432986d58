"""Exact ranking (common/ranking.py) and mixed-radix packing (common/packing.py).

Properties checked:
- rank/unrank of subsets and compositions are inverse bijections onto range(count): exhaustively
  for small sizes, by hypothesis for V = 151,936 with K up to ~300 (and K > V/2, ranked through the
  complement), for dense-QS compositions (ell = 100 into V parts) and positive compositions;
- a batch written with MixedRadixWriter reads back field by field, costs exactly
  ceil(log2(prod radices)) bits and ceil(bits / 8) bytes, and the reader refuses truncated,
  trailing, surplus or out-of-range data with PackingError.
All hypothesis runs are derandomized (fixed examples), so the suite is reproducible.
"""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import ranking
from common.packing import MixedRadixReader, MixedRadixWriter, PackingError, log2_int

QWEN_V = 151_936

FIXED = settings(derandomize=True, deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])


def _compositions(total: int, parts: int, positive: bool = False):
    """All compositions of total into `parts` parts, by brute force (the oracle)."""
    lo = 1 if positive else 0
    for c in itertools.product(range(lo, total + 1), repeat=parts):
        if sum(c) == total:
            yield list(c)


# ---------------------------------------------------------------------------------------------
# subsets


@pytest.mark.parametrize("n", range(0, 11))
def test_subset_rank_is_a_bijection_onto_range_exhaustive(n):
    """For every n <= 10 and k <= n: the ranks of all k-subsets are exactly range(C(n, k)), and
    unrank(rank(S)) == S (covers both the direct and the complement branch, k > n // 2)."""
    for k in range(0, n + 1):
        ranks = []
        for subset in itertools.combinations(range(n), k):
            r = ranking.rank_subset(list(subset), n)
            assert ranking.unrank_subset(r, k, n) == list(subset)
            ranks.append(r)
        assert sorted(ranks) == list(range(math.comb(n, k))) == list(range(ranking.num_subsets(n, k)))


def test_subset_rank_is_colex_order_for_small_k():
    """For k <= n // 2 the rank is the combinatorial number system sum C(c_i, i + 1), i.e. the
    colexicographic position (checked against the formula written out, n = 12, k = 4)."""
    n, k = 12, 4
    for subset in itertools.combinations(range(n), k):
        assert ranking.rank_subset(list(subset), n) == sum(math.comb(c, i + 1) for i, c in enumerate(subset))


@st.composite
def _subset(draw, n_values, k_max):
    n = draw(n_values)
    k = draw(st.integers(0, min(k_max, n)))
    elems = draw(st.lists(st.integers(0, n - 1), min_size=k, max_size=k, unique=True))
    return n, sorted(elems)


@FIXED
@given(_subset(st.just(QWEN_V), 300))
def test_subset_round_trip_qwen_vocabulary(case):
    """Any K-subset (K <= 300) of the 151,936-token vocabulary ranks into [0, C(V, K)) and
    unranks back to itself exactly."""
    n, elems = case
    r = ranking.rank_subset(elems, n)
    assert 0 <= r < math.comb(n, len(elems))
    assert ranking.unrank_subset(r, len(elems), n) == elems


@FIXED
@given(st.integers(1, 300), st.data())
def test_subset_unrank_then_rank_qwen_vocabulary(k, data):
    """Any rank in [0, C(V, K)) (including 0 and the last one) unranks to a strictly increasing
    K-subset of range(V) whose rank is that number (V = 151,936)."""
    total = math.comb(QWEN_V, k)
    r = data.draw(st.one_of(st.just(0), st.just(total - 1), st.integers(0, total - 1)))
    elems = ranking.unrank_subset(r, k, QWEN_V)
    assert len(elems) == k
    assert all(0 <= a < b < QWEN_V for a, b in zip(elems, elems[1:])) and 0 <= elems[0] and elems[-1] < QWEN_V
    assert ranking.rank_subset(elems, QWEN_V) == r


@FIXED
@given(st.integers(2, 400), st.data())
def test_subset_round_trip_large_k_complement(n, data):
    """K > n/2 (ranked through the complement): rank in [0, C(n, K)), round trip exact, and the
    whole-set / near-whole-set cases included."""
    k = data.draw(st.integers(n // 2 + 1, n))
    elems = sorted(data.draw(st.lists(st.integers(0, n - 1), min_size=k, max_size=k, unique=True)))
    r = ranking.rank_subset(elems, n)
    assert 0 <= r < math.comb(n, k)
    assert ranking.unrank_subset(r, k, n) == elems


def test_subset_near_whole_qwen_vocabulary():
    """K = V - 3 and K = V of the Qwen vocabulary (the dense end) round trip."""
    for missing in ([], [0, 77_000, QWEN_V - 1]):
        elems = sorted(set(range(QWEN_V)) - set(missing))
        r = ranking.rank_subset(elems, QWEN_V)
        assert 0 <= r < math.comb(QWEN_V, len(elems))
        assert ranking.unrank_subset(r, len(elems), QWEN_V) == elems


@pytest.mark.parametrize(
    "rank,k,n",
    [(-1, 2, 10), (math.comb(10, 2), 2, 10), (0, 11, 10), (0, -1, 10), (math.comb(QWEN_V, 5), 5, QWEN_V)],
)
def test_unrank_subset_rejects_out_of_range(rank, k, n):
    """unrank_subset raises ValueError (not IndexError) for a rank outside [0, C(n, k)) or k outside [0, n]."""
    with pytest.raises(ValueError):
        ranking.unrank_subset(rank, k, n)


# ---------------------------------------------------------------------------------------------
# compositions


@pytest.mark.parametrize("positive", [False, True])
@pytest.mark.parametrize("total,parts", [(t, p) for t in range(0, 8) for p in range(1, 6)])
def test_composition_rank_is_a_bijection_exhaustive(total, parts, positive):
    """Every composition of total (<= 7) into parts (<= 5) parts, non-negative or positive: ranks
    are exactly range(num_compositions), and unrank inverts rank (both stars and bars branches)."""
    comps = list(_compositions(total, parts, positive))
    assert len(comps) == ranking.num_compositions(total, parts, positive=positive)
    ranks = []
    for c in comps:
        r = ranking.rank_composition(c, positive=positive)
        assert ranking.unrank_composition(r, total, parts, positive=positive) == c
        ranks.append(r)
    assert sorted(ranks) == list(range(len(comps)))


@FIXED
@given(st.lists(st.integers(0, 60), min_size=1, max_size=300))
def test_composition_round_trip_nonnegative(counts):
    """Arbitrary non-negative compositions (up to 300 parts): rank in range, round trip exact."""
    total, parts = sum(counts), len(counts)
    r = ranking.rank_composition(counts)
    assert 0 <= r < ranking.num_compositions(total, parts)
    assert ranking.unrank_composition(r, total, parts) == counts


@FIXED
@given(st.lists(st.integers(1, 60), min_size=1, max_size=200))
def test_composition_round_trip_positive(counts):
    """Positive compositions (the drop_zeros encoding): rank in [0, C(ell-1, K-1)), round trip."""
    total, parts = sum(counts), len(counts)
    r = ranking.rank_composition(counts, positive=True)
    assert 0 <= r < ranking.num_compositions(total, parts, positive=True) == math.comb(total - 1, parts - 1)
    assert ranking.unrank_composition(r, total, parts, positive=True) == counts


@FIXED
@given(st.integers(1, 200), st.integers(1, 250), st.booleans(), st.data())
def test_composition_unrank_then_rank(total, parts, positive, data):
    """Any rank in [0, num_compositions) unranks to a composition of `total` into `parts`
    (non-negative, or all >= 1 when positive) that ranks back to the same number."""
    if positive and parts > total:
        assert ranking.num_compositions(total, parts, positive=True) == 0
        with pytest.raises(ValueError):
            ranking.unrank_composition(0, total, parts, positive=True)
        return
    count = ranking.num_compositions(total, parts, positive=positive)
    r = data.draw(st.one_of(st.just(0), st.just(count - 1), st.integers(0, count - 1)))
    c = ranking.unrank_composition(r, total, parts, positive=positive)
    assert len(c) == parts and sum(c) == total and min(c) >= (1 if positive else 0)
    assert ranking.rank_composition(c, positive=positive) == r


@settings(derandomize=True, deadline=None, max_examples=10)
@given(st.lists(st.integers(0, QWEN_V - 1), min_size=1, max_size=100, unique=True), st.data())
def test_composition_dense_qs_qwen(positions, data):
    """Dense QS: ell = 100 spread over V = 151,936 parts (mostly zeros) round trips; the rank
    lies in [0, C(ell + V - 1, V - 1))."""
    counts = [0] * QWEN_V
    left = 100
    for i, pos in enumerate(positions):
        c = left if i == len(positions) - 1 else data.draw(st.integers(0, left))
        counts[pos] += c
        left -= c
    assert sum(counts) == 100
    r = ranking.rank_composition(counts)
    assert 0 <= r < math.comb(100 + QWEN_V - 1, QWEN_V - 1)
    assert ranking.unrank_composition(r, 100, QWEN_V) == counts


def test_composition_errors():
    """A zero part in a positive composition, a rank out of range, no parts, or more positive
    parts than the total: ValueError."""
    with pytest.raises(ValueError):
        ranking.rank_composition([2, 0, 1], positive=True)
    with pytest.raises(ValueError):
        ranking.unrank_composition(ranking.num_compositions(10, 3), 10, 3)
    with pytest.raises(ValueError):
        ranking.unrank_composition(1, 10, 1)
    with pytest.raises(ValueError):
        ranking.unrank_composition(0, 10, 0)
    with pytest.raises(ValueError):
        ranking.unrank_composition(0, 2, 3, positive=True)


def test_counts_and_log2_comb():
    """num_subsets / num_compositions match math.comb; log2_comb matches log2 of the exact
    binomial to 1e-9 relative (and is -inf outside 0 <= k <= n)."""
    assert ranking.num_subsets(QWEN_V, 10) == math.comb(QWEN_V, 10)
    assert ranking.num_compositions(100, 10) == math.comb(109, 9)
    assert ranking.num_compositions(100, 10, positive=True) == math.comb(99, 9)
    assert ranking.num_compositions(0, 0) == 1 and ranking.num_compositions(3, 0) == 0
    assert ranking.num_compositions(3, 5, positive=True) == 0
    for n, k in [(10, 3), (QWEN_V, 1), (QWEN_V, 300), (50_257, 10), (150, 75)]:
        exact = log2_int(math.comb(n, k))
        assert ranking.log2_comb(n, k) == pytest.approx(exact, rel=1e-9, abs=1e-9)
    assert ranking.log2_comb(5, 6) == float("-inf") and ranking.log2_comb(5, -1) == float("-inf")


# ---------------------------------------------------------------------------------------------
# mixed-radix packing


@st.composite
def _fields(draw, max_fields=40):
    radix = st.one_of(
        st.just(1),
        st.integers(1, 16),
        st.integers(1, 1 << 64),
        st.integers(1, 1 << 2000),
        st.sampled_from([256, 1 << 8, 1 << 64, math.comb(QWEN_V, 300)]),
    )
    radices = draw(st.lists(radix, min_size=0, max_size=max_fields))
    values = []
    for r in radices:
        values.append(draw(st.one_of(st.just(0), st.just(r - 1), st.integers(0, r - 1))))
    return radices, values


def _write(radices, values) -> MixedRadixWriter:
    w = MixedRadixWriter()
    for v, r in zip(values, radices):
        w.write(v, r)
    return w


def _read_all(data: bytes, radices) -> list[int]:
    rd = MixedRadixReader(data)
    out = [rd.read(r) for r in radices]
    rd.finish()
    return out


@FIXED
@given(_fields())
def test_mixed_radix_round_trip(fields):
    """Random radices (radix 1, tiny, 64-bit, 2000-bit, C(V, 300)) and values incl. 0 and r - 1:
    the reader returns the written values; capacity = prod radices; bits = ceil(log2 capacity);
    bytes = ceil(bits / 8); log2_capacity within 1e-9 of the exact value."""
    radices, values = fields
    w = _write(radices, values)
    cap = math.prod(radices)
    assert w.capacity == cap
    assert w.bits == (cap - 1).bit_length()
    assert cap <= 2**w.bits and (w.bits == 0 or 2 ** (w.bits - 1) < cap)
    data = w.to_bytes()
    assert len(data) == (w.bits + 7) // 8
    assert w.to_int() < cap and int.from_bytes(data, "little") == w.to_int()
    assert w.log2_capacity == pytest.approx(math.log2(cap) if cap < 2**1000 else log2_int(cap), abs=1e-9)
    assert _read_all(data, radices) == values


@FIXED
@given(_fields())
def test_mixed_radix_truncated_bytes_rejected(fields):
    """Dropping the last (most significant) byte of a non-empty payload raises PackingError
    (from a read or from finish), never returns values."""
    radices, values = fields
    data = _write(radices, values).to_bytes()
    if not data:
        return
    with pytest.raises(PackingError):
        _read_all(data[:-1], radices)


@FIXED
@given(_fields(), st.integers(0, 255))
def test_mixed_radix_extra_byte_rejected(fields, extra):
    """One surplus byte (zero or not) after a valid payload raises PackingError at finish."""
    radices, values = fields
    data = _write(radices, values).to_bytes() + bytes([extra])
    with pytest.raises(PackingError):
        _read_all(data, radices)


@FIXED
@given(_fields(), st.data())
def test_mixed_radix_value_beyond_capacity_rejected(fields, data):
    """An integer of the right byte length but >= prod radices (trailing data inside the last
    byte) raises PackingError: every accepted payload is the encoding of exactly one message."""
    radices, _ = fields
    cap = math.prod(radices)
    nbytes = ((cap - 1).bit_length() + 7) // 8
    if 256**nbytes == cap:
        return  # no spare integers of this length
    n = data.draw(st.integers(cap, 256**nbytes - 1))
    with pytest.raises(PackingError):
        _read_all(n.to_bytes(nbytes, "little"), radices)


def test_mixed_radix_exhaustive_bijection_small():
    """For radices (3, 1, 5, 2, 7): every integer < 210 decodes, the decoded fields re-encode to
    the same bytes, every integer in [210, 256) is refused; 210 distinct field tuples in all."""
    radices = [3, 1, 5, 2, 7]
    seen = set()
    for n in range(256):
        data = n.to_bytes(1, "little")
        if n < 210:
            vals = _read_all(data, radices)
            assert _write(radices, vals).to_bytes() == data
            seen.add(tuple(vals))
        else:
            with pytest.raises(PackingError):
                _read_all(data, radices)
    assert len(seen) == 210


def test_mixed_radix_empty_and_radix_one():
    """Zero fields or only radix-1 fields cost 0 bits and b''; a non-empty payload for them is refused."""
    for radices in ([], [1, 1, 1]):
        w = _write(radices, [0] * len(radices))
        assert w.bits == 0 and w.to_bytes() == b""
        assert _read_all(b"", radices) == [0] * len(radices)
        with pytest.raises(PackingError):
            _read_all(b"\x00", radices)


def test_mixed_radix_field_order_is_little_end_first():
    """The first field is the least significant digit: N = f0 + r0 * (f1 + r1 * f2)."""
    w = _write([10, 7, 3], [4, 5, 2])
    assert w.to_int() == 4 + 10 * (5 + 7 * 2)


@pytest.mark.parametrize("value,radix", [(3, 3), (-1, 3), (0, 0), (0, -5)])
def test_writer_rejects_value_outside_radix(value, radix):
    """The writer refuses value outside [0, radix) or radix < 1 with ValueError."""
    with pytest.raises(ValueError):
        MixedRadixWriter().write(value, radix)


def test_reader_rejects_bad_radix_and_runaway_fields():
    """A radix < 1 is a PackingError; reading more fields than the bytes can hold fails at the
    read that outgrows them (bounded work on corrupt payloads)."""
    with pytest.raises(PackingError):
        MixedRadixReader(b"\x01").read(0)
    rd = MixedRadixReader(b"\xff\xff")
    rd.read(256)
    rd.read(256)
    with pytest.raises(PackingError):
        rd.read(2)


def test_log2_int():
    """log2_int agrees with math.log2 for small ints and with bit_length for huge powers of two."""
    for n in [1, 2, 3, 1000, 2**53 + 1]:
        assert log2_int(n) == pytest.approx(math.log2(n), rel=1e-12)
    assert log2_int(2**5000) == pytest.approx(5000.0, abs=1e-9)
    assert log2_int(3 * 2**4000) == pytest.approx(4000 + math.log2(3), abs=1e-9)
    assert log2_int(0) == float("-inf")
