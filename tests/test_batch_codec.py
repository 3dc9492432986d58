"""Batch payloads (common/batch_format.py), bit accounting (common/bits.py) and the protobuf codec
(common/codec.py).

Checked:
- pack -> unpack and encode_batch -> SerializeToString -> FromString -> decode_batch return the sent
  drafts exactly (token, support, q_hat bitwise, counts, float values bitwise) for every scheme and
  drop_zeros variant at V = 50, and at V = 151,936;
- drop_zeros gives the same q_hat over the full vocabulary; bit accounting is honest (packed bits
  >= honest bits >= the radices' log2 sum, payload bytes = ceil(bits / 8)) and the paper's formula
  bits reproduce docs/DESIGN.md section 6;
- every malformed or inconsistent payload or open request raises PayloadError (a ValueError) with a
  non-empty reason, never IndexError/AssertionError; fuzzing decode_batch with arbitrary bytes and
  mutated valid payloads only ever yields PayloadError or well-formed drafts.
Hypothesis runs are derandomized; numpy Generators are seeded.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import bits, codec, ranking
from common.batch_format import PayloadError, draft_bits, draft_radices, pack, unpack
from common.packing import MixedRadixWriter, log2_int
from common.pb.v1 import sqs_pb2 as pb
from common.schemes import MAX_RANKED_SUPPORT, Draft, Scheme, SchemeConfig, describe, draw, draw_invariant

QWEN_V = 151_936
FIXED = settings(derandomize=True, deadline=None, max_examples=80, suppress_health_check=[HealthCheck.too_slow])
DRAFTING = [s for s in Scheme if s != Scheme.NONE]


# ---------------------------------------------------------------------------------------------
# helpers


def random_q(rng: np.random.Generator, v: int) -> np.ndarray:
    """A draft distribution of one of several shapes: peaked, flat, with exact zeros, one-hot."""
    kind = int(rng.integers(4))
    if kind == 0:
        return rng.dirichlet(np.full(v, 0.05))
    if kind == 1:
        return rng.dirichlet(np.full(v, 5.0))
    if kind == 2:
        q = rng.dirichlet(np.full(v, 0.5))
        q[rng.random(v) < 0.5] = 0.0
        if q.sum() == 0:
            q[0] = 1.0
        return q / q.sum()
    q = np.zeros(v)
    q[int(rng.integers(v))] = 1.0
    return q


def make_drafts(config: SchemeConfig, rng, n: int, beta: float | None = 0.02) -> list[Draft]:
    if config.scheme == Scheme.INVARIANT:  # the token alone, drawn on the shared noise
        return [draw_invariant(random_q(rng, config.vocab_size), 7, i) for i in range(n)]
    return [draw(describe(random_q(rng, config.vocab_size), config, beta=beta), config.ell, rng) for _ in range(n)]


def assert_same_drafts(got: list[Draft], sent: list[Draft]) -> None:
    assert len(got) == len(sent)
    for g, s in zip(got, sent):
        assert g.token == s.token and type(g.token) is int
        assert g.support.dtype == np.int64 and np.array_equal(g.support, s.support)
        assert g.probs.dtype == np.float64 and g.probs.tobytes() == s.probs.tobytes()  # bitwise
        if s.counts is None:
            assert g.counts is None
        else:
            assert g.counts.dtype == np.int64 and np.array_equal(g.counts, s.counts)
        if s.values is None:
            assert g.values is None
        else:
            assert g.values.tobytes() == np.asarray(s.values).tobytes()


def full_q_hat(d: Draft, v: int) -> np.ndarray:
    out = np.zeros(v)
    out[d.support] = d.probs
    return out


def assert_well_formed(drafts: list[Draft], config: SchemeConfig) -> None:
    """What any accepted payload must decode to, whatever its bytes were."""
    for d in drafts:
        k = d.support.size
        assert 1 <= k <= config.max_support
        assert np.all(np.diff(d.support) > 0) and d.support[0] >= 0 and d.support[-1] < config.vocab_size
        assert d.token in d.support.tolist() and full_q_hat(d, config.vocab_size)[d.token] > 0
        assert np.all(d.probs >= 0) and d.probs.sum() == pytest.approx(1.0)
        if config.scheme.lattice:
            assert int(d.counts.sum()) == config.ell and d.counts.min() >= (1 if config.drop_zeros else 0)


@st.composite
def small_config(draw_):
    scheme = draw_(st.sampled_from(DRAFTING))
    v = 50
    lattice = scheme.lattice
    return SchemeConfig(
        scheme,
        vocab_size=v,
        k=draw_(st.integers(1, v)),
        ell=draw_(st.sampled_from([1, 2, 7, 100, 255])) if lattice else 100,
        drop_zeros=draw_(st.booleans()) if lattice else False,
    )


# ---------------------------------------------------------------------------------------------
# round trips


@FIXED
@given(small_config(), st.integers(0, 6), st.sampled_from([0.0, 0.005, 0.02, 0.1, 0.6]), st.integers(0, 2**32 - 1))
def test_pack_unpack_round_trip_every_scheme_small_vocab(config, n, beta, seed):
    """V = 50, every scheme, drop_zeros on/off, ell in {1, 2, 7, 100, 255}, 0..6 drafts from
    random (peaked, flat, zero-holding, one-hot) q: unpack(pack(drafts)) == drafts exactly, and the
    payload holds exactly ceil(mixed-radix bits / 8) bytes."""
    rng = np.random.default_rng(seed)
    drafts = make_drafts(config, rng, n, beta=beta)
    packed = pack(drafts, config)
    assert_same_drafts(unpack(n, packed.payload, packed.raw, config), drafts)
    mixed_bits = packed.packed_bits - 8 * len(packed.raw)
    assert len(packed.payload) == (mixed_bits + 7) // 8


@pytest.mark.parametrize(
    "config,beta",
    [
        (SchemeConfig("topk", QWEN_V, k=1), None),
        (SchemeConfig("topk", QWEN_V, k=8), None),
        (SchemeConfig("topk", QWEN_V, k=64, ell=1000), None),
        (SchemeConfig("topk", QWEN_V, k=300), None),
        (SchemeConfig("topk", QWEN_V, k=32, drop_zeros=True), None),
        (SchemeConfig("conformal", QWEN_V, ell=100), 1e-3),
        (SchemeConfig("conformal", QWEN_V, ell=100, drop_zeros=True), 1e-4),
        (SchemeConfig("dense", QWEN_V, ell=100), None),
        (SchemeConfig("token", QWEN_V), None),
        (SchemeConfig("fp16-topk", QWEN_V, k=16), None),
    ],
    ids=lambda x: f"{x.scheme.value}-k{x.k}-ell{x.ell}-dz{int(x.drop_zeros)}" if isinstance(x, SchemeConfig) else str(x),
)
def test_pack_unpack_round_trip_qwen_vocab(config, beta):
    """V = 151,936 (Qwen2.5): 3 drafts of peaked q (Dirichlet 0.01 and 0.1) round trip exactly,
    also through the protobuf codec (SerializeToString / FromString)."""
    rng = np.random.default_rng(config.k + config.ell)
    drafts = []
    for conc in (0.01, 0.1, 0.01):
        q = rng.dirichlet(np.full(QWEN_V, conc))
        drafts.append(draw(describe(q, config, beta=beta), config.ell, rng))
    packed = pack(drafts, config)
    assert_same_drafts(unpack(3, packed.payload, packed.raw, config), drafts)
    msg, _ = codec.encode_batch("s", 17, drafts, config)
    assert_same_drafts(codec.decode_batch(pb.DraftBatch.FromString(msg.SerializeToString()), config, 3), drafts)


@FIXED
@given(small_config(), st.integers(0, 5), st.integers(0, 2**32 - 1), st.text(max_size=20), st.integers(0, 2**32 - 1))
def test_codec_round_trip_through_protobuf_bytes(config, n, seed, session_id, position):
    """encode_batch -> SerializeToString -> FromString -> decode_batch returns the drafts exactly
    and keeps session_id, position and num_drafts; the message carries PackedBatch's bytes."""
    rng = np.random.default_rng(seed)
    drafts = make_drafts(config, rng, n)
    msg, packed = codec.encode_batch(session_id, position, drafts, config)
    wire = pb.DraftBatch.FromString(msg.SerializeToString())
    assert (wire.session_id, wire.position, wire.num_drafts) == (session_id, position, n)
    assert wire.packed == packed.payload and wire.raw == packed.raw
    assert_same_drafts(codec.decode_batch(wire, config, max_drafts=n), drafts)


def test_fp32_round_trip_and_scheme_none():
    """fp32 (dense float32 values in raw, 4 V bytes per draft) round trips at V = 1000; scheme none
    sends an empty batch that decodes to no drafts."""
    cfg = SchemeConfig("fp32", 1000)
    rng = np.random.default_rng(1)
    drafts = make_drafts(cfg, rng, 2)
    msg, packed = codec.encode_batch("x", 0, drafts, cfg)
    assert len(packed.raw) == 2 * 4 * 1000
    assert_same_drafts(codec.decode_batch(pb.DraftBatch.FromString(msg.SerializeToString()), cfg, 2), drafts)
    none = SchemeConfig("none", 1000)
    msg, packed = codec.encode_batch("x", 5, [], none)
    assert packed.payload == b"" and packed.raw == b"" and packed.packed_bits == 0
    assert codec.decode_batch(msg, none, max_drafts=0) == []


@pytest.mark.parametrize("scheme", list(Scheme))
def test_open_request_round_trip(scheme):
    """encode_open -> bytes -> decode_open gives back the same request for every scheme."""
    lattice = scheme.lattice
    cfg = SchemeConfig(scheme, 1000, k=12, ell=64, drop_zeros=lattice)
    req = codec.OpenRequest(
        context=[0, 5, 999], sampling=codec.Sampling(0.7, 40, 0.9, 123), scheme=cfg,
        vocab_fingerprint="f" * 64, max_drafts=32, client_session_id="abc",
    )
    msg = pb.OpenSessionRequest.FromString(codec.encode_open(req).SerializeToString())
    got = codec.decode_open(msg, target_vocab_size=1000)
    assert got.context == req.context and got.max_drafts == 32 and got.client_session_id == "abc"
    assert got.scheme == cfg and got.vocab_fingerprint == req.vocab_fingerprint
    assert got.sampling.temperature == pytest.approx(0.7) and got.sampling.top_p == pytest.approx(0.9)
    assert (got.sampling.top_k, got.sampling.seed) == (40, 123)


# ---------------------------------------------------------------------------------------------
# drop_zeros and bit accounting


@FIXED
@given(st.sampled_from(["topk", "conformal", "dense"]), st.integers(0, 2**32 - 1), st.data())
def test_drop_zeros_gives_the_same_q_hat(scheme, seed, data):
    """The zero-drop variant describes exactly the same q_hat over the full vocabulary (bitwise),
    its support has no zero count, and its counts are the non-zero counts of the plain variant."""
    v = 50
    k = data.draw(st.integers(1, v))
    ell = data.draw(st.sampled_from([1, 5, 20, 100]))
    beta = data.draw(st.sampled_from([0.0, 0.01, 0.05, 0.3]))
    q = random_q(np.random.default_rng(seed), v)
    plain = describe(q, SchemeConfig(scheme, v, k=k, ell=ell), beta=beta)
    dz = describe(q, SchemeConfig(scheme, v, k=k, ell=ell, drop_zeros=True), beta=beta)
    assert full_q_hat(dz, v).tobytes() == full_q_hat(plain, v).tobytes()
    assert dz.counts.min() >= 1
    assert np.array_equal(dz.counts, plain.counts[plain.counts > 0])


@FIXED
@given(st.integers(0, 2**32 - 1), st.sampled_from([1, 5, 20, 100, 300]), st.sampled_from([0.0, 1e-3, 0.01, 0.05, 0.5]))
def test_drop_zeros_never_costs_more_bits_conformal(seed, ell, beta):
    """C-SQS (support size already varies): packing with drop_zeros never needs more bits than
    without, for the same q and threshold (V = 50 and V = 200)."""
    rng = np.random.default_rng(seed)
    for v in (50, 200):
        q = random_q(rng, v)
        out = []
        for dz in (False, True):
            cfg = SchemeConfig("conformal", v, ell=ell, drop_zeros=dz)
            out.append(pack([draw(describe(q, cfg, beta=beta), ell, np.random.default_rng(0))], cfg).packed_bits)
        assert out[1] <= out[0]


def test_drop_zeros_saves_bits_on_peaked_qwen_drafts():
    """Typical regime (V = 151,936, top-32, ell = 100, peaked q: many zero counts): drop_zeros
    packs 8 drafts into strictly fewer bits, with the same q_hat."""
    rng = np.random.default_rng(3)
    qs = [rng.dirichlet(np.full(QWEN_V, 0.01)) for _ in range(8)]
    result = []
    for dz in (False, True):
        cfg = SchemeConfig("topk", QWEN_V, k=32, ell=100, drop_zeros=dz)
        g = np.random.default_rng(0)
        result.append(pack([draw(describe(q, cfg), 100, g) for q in qs], cfg).packed_bits)
    assert result[1] < result[0]


@pytest.mark.parametrize("scheme,v,k,ell", [("topk", 50, 8, 100), ("topk", 151936, 32, 100), ("topk", 50, 1, 7),
                                           ("dense", 20, 1, 300)])
def test_drop_zeros_overhead_without_zero_counts_is_at_most_the_size_field(scheme, v, k, ell):
    """q uniform over the retained tokens (no count is zero): zero-drop has nothing to drop, and its
    packing of one draft costs at most the support-size field, log2 min(Kmax, ell) bits, more than the
    plain one (the positive composition saves part of it back). The typical regime, with many zero
    counts, saves a lot: see test_drop_zeros_saves_bits_on_peaked_qwen_drafts."""
    q = np.zeros(v)
    q[: (k if scheme == "topk" else v)] = 1.0
    q /= q.sum()
    out = []
    for dz in (False, True):
        cfg = SchemeConfig(scheme, v, k=k, ell=ell, drop_zeros=dz)
        d = draw(describe(q, cfg), ell, np.random.default_rng(0))
        assert d.counts.min() >= 1
        out.append(pack([d], cfg).honest_bits)
    size_field = math.log2(SchemeConfig(scheme, v, k=k, ell=ell, drop_zeros=True).max_support)
    assert out[1] <= out[0] + size_field + 1e-9, f"drop_zeros {out[1]} bits > plain {out[0]} + {size_field}"


@FIXED
@given(small_config(), st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_bit_accounting_is_honest(config, n, seed):
    """packed_bits = mixed-radix bits + 8 * raw bytes >= honest_bits > packed_bits - 1;
    honest_bits = sum of draft_bits (log2 of every radix packed, + raw) to 1e-6; formula_bits =
    sum of bits.formula_bits; for top-K / token the honest bits are the formula plus log2 K (the
    draft-token index) per draft."""
    rng = np.random.default_rng(seed)
    drafts = make_drafts(config, rng, n)
    packed = pack(drafts, config)
    ks = [int(d.support.size) for d in drafts]
    assert packed.packed_bits >= packed.honest_bits - 1e-9
    assert packed.honest_bits > packed.packed_bits - 1 - 1e-9
    assert packed.honest_bits == pytest.approx(sum(draft_bits(config, k)[0] for k in ks), rel=1e-9, abs=1e-6)
    assert packed.formula_bits == pytest.approx(sum(bits.formula_bits(config, k) for k in ks), rel=1e-12)
    assert packed.payload_bytes == len(packed.payload) + len(packed.raw)
    radices = [r for k in ks for r in draft_radices(config, k)]
    assert 8 * len(packed.payload) >= math.ceil(sum(log2_int(r) for r in radices) - 1e-9)
    # Oracle: log2 of the exact product of every radix written, plus the raw bits.
    assert packed.honest_bits == pytest.approx(log2_int(math.prod(radices)) + 8 * len(packed.raw), rel=1e-9, abs=1e-6)
    if config.scheme in (Scheme.TOPK, Scheme.TOKEN) and not config.drop_zeros:
        for k in ks:
            honest, formula = draft_bits(config, k)
            assert honest == pytest.approx(formula + math.log2(k), abs=1e-6)


@pytest.mark.parametrize(
    "scheme,k,expected",
    [("fp32", 8, 1_608_224.0), ("dense", 8, 1037), ("topk", 1, 15.6), ("topk", 4, 75.3), ("topk", 10, 176.3), ("topk", 32, 481.9)],
)
def test_formula_bits_reproduce_design_table(scheme, k, expected):
    """docs/DESIGN.md section 6 (GPT-Neo V = 50,257, ell = 100): formula bits per draft token to the
    table's precision (0.05 bits; dense QS to 0.5, fp32 exact)."""
    cfg = SchemeConfig(scheme, 50_257, k=k, ell=100)
    got = bits.formula_bits(cfg, k if scheme == "topk" else 50_257)
    assert got == pytest.approx(expected, abs=0.5 if scheme == "dense" else 0.05)


def test_formula_bits_support_term_dominates_k10():
    """docs/DESIGN.md section 6: with K = 10 the support term is ~134 of the ~176 bits."""
    cfg = SchemeConfig("topk", 50_257, k=10, ell=100)
    assert ranking.log2_comb(50_257, 10) == pytest.approx(134, abs=0.5)
    assert bits.formula_bits(cfg, 10) - ranking.log2_comb(50_257, 10) == pytest.approx(bits.values_bits(100, 10))


# ---------------------------------------------------------------------------------------------
# bad payloads


def _reason(exc_info) -> str:
    assert isinstance(exc_info.value, ValueError)
    assert str(exc_info.value).strip(), "PayloadError without a reason"
    return str(exc_info.value)


def _valid(config: SchemeConfig, n: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    drafts = make_drafts(config, rng, n)
    return drafts, pack(drafts, config)


BAD_CASE_CONFIGS = [
    SchemeConfig("topk", 50, k=5, ell=20),
    SchemeConfig("conformal", 50, ell=20),
    SchemeConfig("conformal", 50, ell=20, drop_zeros=True),
    SchemeConfig("dense", 50, ell=7),
    SchemeConfig("token", 50),
    SchemeConfig("fp16-topk", 50, k=4),
    SchemeConfig("fp32", 50),
    SchemeConfig("topk", QWEN_V, k=300, ell=100),
]
_ids = [f"{c.scheme.value}-V{c.vocab_size}-dz{int(c.drop_zeros)}" for c in BAD_CASE_CONFIGS]


@pytest.mark.parametrize("config", BAD_CASE_CONFIGS, ids=_ids)
def test_truncated_or_extended_packed_bytes_rejected(config):
    """A valid 3-draft payload with 1..8 of its last bytes cut, or with one byte appended:
    PayloadError with a reason. (A wrong num_drafts is not always detectable: 3 token-scheme
    drafts at V = 50 fit in the same 3 bytes as 4 drafts whose last token is 0.)"""
    _, packed = _valid(config)
    variants = [(3, packed.payload[:-cut]) for cut in range(1, min(8, len(packed.payload)) + 1)]
    variants += [(3, packed.payload + b"\x00"), (3, packed.payload + b"\x01")]
    for n, payload in variants:
        with pytest.raises(PayloadError) as e:
            unpack(n, payload, packed.raw, config)
        _reason(e)


def test_zero_probability_draft_token_rejected():
    """Hand-built with the writer: a top-K lattice draft whose token index points at a zero count
    (support [1, 4, 7], counts [5, 0, 0], index 1) is refused with PayloadError."""
    cfg = SchemeConfig("topk", 10, k=3, ell=5)
    w = MixedRadixWriter()
    for value, radix in zip(
        [ranking.rank_subset([1, 4, 7], 10), ranking.rank_composition([5, 0, 0]), 1], draft_radices(cfg, 3)
    ):
        w.write(value, radix)
    with pytest.raises(PayloadError) as e:
        unpack(1, w.to_bytes(), b"", cfg)
    assert "zero" in _reason(e)
    w2 = MixedRadixWriter()  # same fields with index 0: accepted
    for value, radix in zip(
        [ranking.rank_subset([1, 4, 7], 10), ranking.rank_composition([5, 0, 0]), 0], draft_radices(cfg, 3)
    ):
        w2.write(value, radix)
    (d,) = unpack(1, w2.to_bytes(), b"", cfg)
    assert d.token == 1 and d.counts.tolist() == [5, 0, 0]


def test_every_integer_decodes_to_a_valid_draft_or_payload_error_exhaustive():
    """Top-K V = 6, K = 2, ell = 3, one draft: the 120 integers below prod(radices) decode to
    counts summing to ell with a positive-probability token, or (index on a zero count) raise
    PayloadError; every larger 1-byte value is refused. The accepted ones are exactly the
    15 supports x (compositions, index with count > 0) = 15 * 6 = 90 distinct drafts: counts that
    do not sum to ell cannot be expressed at all."""
    cfg = SchemeConfig("topk", 6, k=2, ell=3)
    assert math.prod(draft_radices(cfg, 2)) == 120
    ok = set()
    for n in range(256):
        try:
            (d,) = unpack(1, bytes([n]), b"", cfg)
        except PayloadError as e:
            assert str(e)
            continue
        assert n < 120
        assert_well_formed([d], cfg)
        ok.add((tuple(d.support), tuple(d.counts), d.token))
    assert len(ok) == 90


def test_support_size_beyond_limit_rejected():
    """C-SQS at V = 151,936: a support-size field of 10000 (> MAX_RANKED_SUPPORT, < V - limit) is
    refused before any big-int work, with PayloadError."""
    cfg = SchemeConfig("conformal", QWEN_V, ell=100)
    w = MixedRadixWriter()
    w.write(9999, cfg.max_support)
    payload = w.to_bytes() + b"\xff" * 40000
    with pytest.raises(PayloadError) as e:
        unpack(1, payload, b"", cfg)
    assert str(MAX_RANKED_SUPPORT) in _reason(e)


def _fp_payload(cfg: SchemeConfig, values: np.ndarray, support: list[int], index: int):
    w = MixedRadixWriter()
    for value, radix in zip([ranking.rank_subset(support, cfg.vocab_size), index], draft_radices(cfg, len(support))):
        w.write(value, radix)
    dtype = "<f2" if cfg.scheme == Scheme.FP16_TOPK else "<f4"
    return w.to_bytes(), np.asarray(values, dtype=dtype).tobytes()


@pytest.mark.parametrize(
    "values,index,raw_edit",
    [
        ([np.nan, 0.5, 0.5], 1, None),
        ([0.5, -0.25, 0.75], 0, None),
        ([np.inf, 0.5, 0.5], 1, None),
        ([0.0, 0.0, 0.0], 0, None),
        ([0.0, 0.5, 0.5], 0, None),  # zero-probability token
        ([0.2, 0.3, 0.5], 0, "truncate"),
        ([0.2, 0.3, 0.5], 0, "trailing"),
        ([0.2, 0.3, 0.5], 0, "empty"),
    ],
)
@pytest.mark.parametrize("scheme", ["fp16-topk", "fp32"])
def test_bad_raw_float_values_rejected(values, index, raw_edit, scheme):
    """Float baselines: NaN, negative, inf, all-zero values, a zero value at the draft token, raw
    bytes truncated, with trailing bytes, or missing: PayloadError with a reason."""
    v = 3 if scheme == "fp32" else 10
    cfg = SchemeConfig(scheme, v, k=3)
    support = [0, 1, 2] if scheme == "fp32" else [2, 5, 9]
    payload, raw = _fp_payload(cfg, values, support, index)
    raw = {None: raw, "truncate": raw[:-1], "trailing": raw + b"\x00\x00", "empty": b""}[raw_edit]
    with pytest.raises(PayloadError) as e:
        unpack(1, payload, raw, cfg)
    _reason(e)
    msg = pb.DraftBatch(session_id="s", num_drafts=1, packed=payload, raw=raw)
    with pytest.raises(PayloadError):
        codec.decode_batch(msg, cfg, max_drafts=4)


@pytest.mark.parametrize(
    "config,num,packed,raw,max_drafts",
    [
        (SchemeConfig("topk", 50, k=5), 5, b"", b"", 4),  # num_drafts > max_drafts
        (SchemeConfig("topk", 50, k=5), 2**32 - 1, b"\x01" * 64, b"", 1024),  # absurd count
        (SchemeConfig("topk", 50, k=5), 1, b"\x07" * 100_000, b"", 8),  # absurd length
        (SchemeConfig("topk", 50, k=5), 1, b"", b"", 8),  # missing payload
        (SchemeConfig("topk", 50, k=5), 0, b"\x00", b"", 8),  # bytes for no drafts
        (SchemeConfig("topk", 50, k=5), 1, b"\x01" * 8, b"\x00" * 8, 8),  # raw on a lattice scheme
        (SchemeConfig("fp32", 50), 1, b"", b"\x00" * (4 * 50 * 1 + 4), 8),  # raw beyond 4 V n bytes
        (SchemeConfig("fp16-topk", 50, k=4), 0, b"", b"\x00\x3c", 8),  # raw for no drafts
        (SchemeConfig("none", 50), 1, b"", b"", 8),  # scheme none with drafts
        (SchemeConfig("none", 50), 0, b"\x01", b"", 8),  # scheme none with packed bytes
        (SchemeConfig("none", 50), 0, b"", b"\x01", 8),  # scheme none with raw bytes
    ],
)
def test_decode_batch_rejects_inconsistent_messages(config, num, packed, raw, max_drafts):
    """num_drafts above the session's max, absurd counts or lengths, bytes where none belong,
    raw values on a lattice scheme or beyond 4 V bytes per draft, scheme none with content:
    PayloadError with a reason."""
    msg = pb.DraftBatch(session_id="s", position=3, num_drafts=num, packed=packed, raw=raw)
    with pytest.raises(PayloadError) as e:
        codec.decode_batch(pb.DraftBatch.FromString(msg.SerializeToString()), config, max_drafts)
    _reason(e)


@pytest.mark.parametrize("config", [SchemeConfig("topk", 50, k=5), SchemeConfig("fp16-topk", 50, k=3)], ids=["topk", "fp16"])
def test_decode_batch_rejects_valid_batch_above_max_drafts(config):
    """A well-formed 3-draft batch is refused with PayloadError when the session allows only 2
    drafts (and accepted with 3)."""
    drafts, _ = _valid(config, n=3)
    msg, _ = codec.encode_batch("s", 0, drafts, config)
    with pytest.raises(PayloadError) as e:
        codec.decode_batch(msg, config, max_drafts=2)
    assert "max_drafts" in _reason(e)
    assert_same_drafts(codec.decode_batch(msg, config, max_drafts=3), drafts)


def _open_msg(**over) -> pb.OpenSessionRequest:
    cfg = SchemeConfig("topk", 1000, k=8, ell=100)
    req = codec.OpenRequest([1, 2, 3], codec.Sampling(0.8, 0, 1.0, 7), cfg, "fp", 16)
    msg = codec.encode_open(req)
    for path, value in over.items():
        obj = msg
        *parents, leaf = path.split("__")
        for p in parents:
            obj = getattr(obj, p)
        if leaf == "context_token_ids":
            del obj.context_token_ids[:]
            obj.context_token_ids.extend(value)
        else:
            setattr(obj, leaf, value)
    return msg


@pytest.mark.parametrize(
    "over",
    [
        dict(context_token_ids=[]),
        dict(context_token_ids=[1, 1000]),
        dict(context_token_ids=[4_000_000_000]),
        dict(vocab_size=1),
        dict(vocab_size=0),
        dict(vocab_size=1001),
        dict(sampling__temperature=-0.5),
        dict(sampling__temperature=float("nan")),
        dict(sampling__temperature=float("inf")),
        dict(sampling__temperature=1e6),
        dict(sampling__top_p=1.5),
        dict(sampling__top_p=-0.1),
        dict(sampling__top_p=float("nan")),
        dict(sampling__top_k=1001),
        dict(scheme__scheme=0),
        dict(scheme__scheme=99),
        dict(scheme__ell=0),
        dict(scheme__ell=1 << 20),
        dict(scheme__k=1001),
        dict(scheme__scheme=pb.SCHEME_FP32, scheme__drop_zeros=True),
        dict(max_drafts=1025),
        dict(vocab_fingerprint="x" * 129),
        dict(client_session_id="y" * 129),
    ],
    ids=lambda d: ",".join(f"{k}={v!r}"[:40] for k, v in d.items()),
)
def test_decode_open_rejects_bad_requests(over):
    """Empty context, out-of-vocab context token, vocab_size < 2 or above the target's, bad
    temperature (negative, NaN, inf, huge), bad top_p (> 1, < 0, NaN), top_k > V, unspecified or
    unknown scheme, ell 0 or too large, k > V, drop_zeros on a float scheme, too many drafts, long
    strings: PayloadError with a reason (through protobuf bytes)."""
    msg = pb.OpenSessionRequest.FromString(_open_msg(**over).SerializeToString())
    with pytest.raises(PayloadError) as e:
        codec.decode_open(msg, target_vocab_size=1000)
    _reason(e)


def test_decode_open_accepts_the_baseline_request():
    """The unmodified request used by the rejection cases decodes (so each case fails for its own
    reason); top_p 0 means off."""
    got = codec.decode_open(_open_msg(), target_vocab_size=1000)
    assert got.scheme.k == 8 and got.context == [1, 2, 3]
    assert codec.decode_open(_open_msg(sampling__top_p=0.0), 1000).sampling.top_p == 1.0


@pytest.mark.parametrize("case", ["counts-sum", "token-outside-support"])
def test_pack_refuses_inconsistent_drafts(case):
    """The encoder must not send something other than the draft it was given: a draft whose
    counts sum to 11 with ell = 10, or whose token is not in its support, raises ValueError in
    pack(). Observed: counts [3, 3, 5] are packed and decode as [3, 3, 4]; token 6 with support
    [1, 5, 9] decodes as token 9."""
    cfg = SchemeConfig("topk", 10, k=3, ell=10)
    if case == "counts-sum":
        d = Draft(5, np.array([1, 5, 9]), np.array([0.3, 0.3, 0.5]), counts=np.array([3, 3, 5]))
    else:
        d = Draft(6, np.array([1, 5, 9]), np.array([0.3, 0.3, 0.4]), counts=np.array([3, 3, 4]))
    with pytest.raises(ValueError):
        pack([d], cfg)


@pytest.mark.parametrize("scheme", ["topk", "fp16-topk"])
def test_every_accepted_topk_config_can_send_a_batch(scheme):
    """A session that decode_open accepts must be able to send a batch: top-K with K = 5000 at
    V = 151,936 is accepted, but describe() returns 4096 tokens and pack() raises
    'scheme topk sends 5000 support entries, draft has 4096' (the cloud would equally refuse
    K = 5000 in unpack). Either the config must be refused up front or the batch must go through."""
    msg = _open_msg(vocab_size=QWEN_V, scheme__k=5000, **{"scheme__scheme": pb.SCHEME_TOPK if scheme == "topk" else pb.SCHEME_FP16_TOPK})
    try:
        cfg = codec.decode_open(msg, target_vocab_size=QWEN_V).scheme
    except PayloadError:
        return  # refused up front: fine
    rng = np.random.default_rng(0)
    d = draw(describe(rng.dirichlet(np.full(QWEN_V, 0.1)), cfg), cfg.ell, rng)
    packed = pack([d], cfg)
    assert_same_drafts(unpack(1, packed.payload, packed.raw, cfg), [d])


# ---------------------------------------------------------------------------------------------
# fuzzing


FUZZ_CONFIGS = BAD_CASE_CONFIGS + [
    SchemeConfig("none", 50),
    SchemeConfig("dense", 50, ell=100, drop_zeros=True),
    SchemeConfig("topk", 6, k=2, ell=3),
    SchemeConfig("conformal", QWEN_V, ell=100, drop_zeros=True),
]


@settings(derandomize=True, deadline=None, max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(FUZZ_CONFIGS),
    st.one_of(st.integers(0, 4), st.integers(0, 2**32 - 1)),
    st.binary(max_size=120),
    st.one_of(st.just(b""), st.binary(max_size=64)),
    st.integers(0, 1024),
)
def test_fuzz_decode_batch_only_raises_payload_error(config, num, packed, raw, max_drafts):
    """Arbitrary bytes, counts and limits: decode_batch either returns num_drafts well-formed
    drafts (support strictly increasing in range, token in support with q_hat > 0, counts summing
    to ell) or raises PayloadError with a reason; nothing else escapes."""
    msg = pb.DraftBatch(session_id="f", num_drafts=num, packed=packed, raw=raw)
    try:
        drafts = codec.decode_batch(msg, config, max_drafts)
    except PayloadError as e:
        assert str(e)
        return
    assert len(drafts) == num
    assert_well_formed(drafts, config)


@settings(derandomize=True, deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(FUZZ_CONFIGS[:-1]), st.integers(0, 2**32 - 1), st.data())
def test_fuzz_mutated_valid_payloads(config, seed, data):
    """A valid batch with one bit flipped, bytes cut or inserted, or raw bytes corrupted decodes to
    well-formed drafts or raises PayloadError; nothing else escapes."""
    if config.scheme == Scheme.NONE:
        drafts, packed = [], pack([], config)
    else:
        drafts, packed = _valid(config, n=2, seed=seed % 1000)
    payload, raw = bytearray(packed.payload), bytearray(packed.raw)
    op = data.draw(st.sampled_from(["flip", "cut", "insert", "raw"]))
    target = raw if op == "raw" and raw else payload
    if op in ("flip", "raw") and target:
        i = data.draw(st.integers(0, len(target) - 1))
        target[i] ^= 1 << data.draw(st.integers(0, 7))
    elif op == "cut" and target:
        i = data.draw(st.integers(0, len(target) - 1))
        del target[i : i + data.draw(st.integers(1, 4))]
    else:
        target.insert(data.draw(st.integers(0, len(target))), data.draw(st.integers(0, 255)))
    msg = pb.DraftBatch(num_drafts=len(drafts), packed=bytes(payload), raw=bytes(raw))
    try:
        got = codec.decode_batch(msg, config, max_drafts=8)
    except PayloadError as e:
        assert str(e)
        return
    assert_well_formed(got, config)


@settings(derandomize=True, deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.integers(0, 2**32 - 1), max_size=5),
    st.integers(0, 2**32 - 1),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.integers(0, 2**32 - 1),
    st.integers(0, 12),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.booleans(),
    st.integers(0, 2**32 - 1),
)
def test_fuzz_decode_open_only_raises_payload_error(ctx, vocab, temp, top_p, top_k, scheme, k, ell, dz, max_drafts):
    """Arbitrary field values in an OpenSessionRequest: decode_open returns a request whose
    scheme is a valid SchemeConfig within the target vocabulary (1000), or raises PayloadError."""
    msg = pb.OpenSessionRequest(
        context_token_ids=ctx, vocab_size=vocab, max_drafts=max_drafts,
        sampling=pb.SamplingParams(temperature=temp, top_p=top_p, top_k=top_k),
        scheme=pb.SchemeParams(scheme=scheme, k=k, ell=ell, drop_zeros=dz),
    )
    try:
        got = codec.decode_open(msg, target_vocab_size=1000)
    except PayloadError as e:
        assert str(e)
        return
    assert 2 <= got.scheme.vocab_size <= 1000 and got.context and max(got.context) < got.scheme.vocab_size
    assert 0 <= got.sampling.temperature <= codec.MAX_TEMPERATURE and 0 < got.sampling.top_p <= 1
    assert got.max_drafts <= codec.MAX_DRAFTS
