"""cloud.verifier.Verifier with a fake (table) target model: whole rounds, no torch, no gRPC."""

from __future__ import annotations

import itertools
import json
import logging
import time
from dataclasses import replace

import numpy as np
import pytest
from scipy import stats

from cloud.verifier import SessionError, TargetInfo, Verifier, VerifierConfig
from common import codec
from common.logs import JsonFormatter
from common.metrics import MAX_POSITION, Metrics, RoundStats
from common.rejection import target_probs
from common.schemes import SchemeConfig, describe, draw
from common.stats import PARTS, RoundRecord

V = 6
_rng = np.random.default_rng(42)
TARGET_LOGITS = _rng.normal(0, 1.5, size=(V, V))  # next-token logits given the previous token
DRAFT_LOGITS = TARGET_LOGITS + _rng.normal(0, 1.0, size=(V, V))


class TableLM:
    """Logits depend on the previous token only; counts calls to check one pass per round."""

    def __init__(self, table: np.ndarray) -> None:
        self.table = table
        self.calls = 0

    def logits(self, context, want):
        self.calls += 1
        return np.stack([self.table[t] for t in context[len(context) - want :]]).astype(np.float32)


def make_verifier(clock=time.monotonic, **cfg) -> Verifier:
    info = TargetInfo("table", V, "fp", ())
    return Verifier(info, lambda: TableLM(TARGET_LOGITS), VerifierConfig(**cfg), clock=clock)


def open_msg(seed: int, temperature: float, scheme="topk", k=3, ell=20, max_drafts=4, context=(0,)):
    cfg = SchemeConfig(scheme, V, k=k, ell=ell)
    req = codec.OpenRequest(list(context), codec.Sampling(temperature, 0, 1.0, seed), cfg, "fp", max_drafts)
    return req, cfg


def first_tokens(seed: int, temperature: float, n_out: int, n_drafts: int) -> list[int]:
    """Generate n_out tokens with drafts from the (quantized) draft table; returns them."""
    v = make_verifier()
    msg, cfg = open_msg(seed, temperature)
    s = v.open(msg)
    rng = np.random.default_rng([seed, 99])
    out: list[int] = []
    while len(out) < n_out:
        ctx = list(s.context)
        drafts = []
        for _ in range(n_drafts):
            q = target_probs(DRAFT_LOGITS[ctx[-1]].astype(np.float64), temperature)
            d = draw(describe(q, cfg), cfg.ell, rng)
            drafts.append(d)
            ctx.append(d.token)
        batch = codec.pack_batch(len(s.context), drafts, cfg)
        before = len(s.context)
        v.verify(s, batch)
        out.extend(s.context[before:])
    return out[:n_out]


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_joint_of_first_three_tokens_is_the_target_chain(temperature):
    """Joint law of (x1, x2, x3) equals p(x1|0) p(x2|x1) p(x3|x2): chi-square p > 1e-3, N = 4000."""
    n = 4000
    p = target_probs(TARGET_LOGITS, temperature)  # [V, V], row = previous token
    counts: dict[tuple, int] = {}
    for seed in range(n):
        key = tuple(first_tokens(seed, temperature, 3, n_drafts=2))
        counts[key] = counts.get(key, 0) + 1
    cells = list(itertools.product(range(V), repeat=3))
    exp = np.array([p[0, a] * p[a, b] * p[b, c] for a, b, c in cells]) * n
    obs = np.array([counts.get(c, 0) for c in cells], dtype=float)
    big = exp >= 5
    o = np.append(obs[big], obs[~big].sum())
    e = np.append(exp[big], exp[~big].sum())
    assert stats.chisquare(o, e * o.sum() / e.sum()).pvalue > 1e-3


def test_t0_is_greedy_chain():
    p = target_probs(TARGET_LOGITS, 0.0)
    toks = first_tokens(0, 0.0, 8, n_drafts=3)
    prev = 0
    for t in toks:
        assert t == int(np.argmax(p[prev]))
        prev = t


def test_one_forward_pass_per_round_and_context_bookkeeping():
    v = make_verifier()
    msg, cfg = open_msg(1, 1.0)
    s = v.open(msg)
    q = target_probs(DRAFT_LOGITS[0].astype(np.float64), 1.0)
    d = draw(describe(q, cfg), cfg.ell, np.random.default_rng(0))
    r = v.verify(s, codec.pack_batch(1, [d], cfg))
    assert s.lm.calls == 1
    assert r.position == len(s.context) == 1 + r.accepted + 1


def test_limits_lru_ttl_and_errors():
    v = make_verifier(max_sessions=2, session_ttl_s=1000)
    a = v.open(open_msg(0, 1.0)[0])
    b = v.open(open_msg(1, 1.0)[0])
    v.get(a.id)  # a is now the most recently used
    v.open(open_msg(2, 1.0)[0])  # evicts b
    with pytest.raises(SessionError) as e:
        v.get(b.id)
    assert e.value.code == "NOT_FOUND"
    assert v.get(a.id) is a
    bad, _ = open_msg(0, 1.0, context=())
    with pytest.raises(codec.PayloadError, match="empty"):  # the servicer answers INVALID_ARGUMENT
        codec.decode_open(codec.encode_open(bad), V)
    mismatch = replace(open_msg(0, 1.0)[0], vocab_fingerprint="other")
    with pytest.raises(SessionError) as e:
        v.open(mismatch)
    assert e.value.code == "FAILED_PRECONDITION"


def test_sessions_expire_after_the_ttl_of_the_injected_clock():
    now = [100.0]
    v = make_verifier(clock=lambda: now[0], session_ttl_s=10.0)
    s = v.open(open_msg(0, 1.0)[0])
    now[0] += 10.0  # exactly the TTL: still alive, and get() refreshes it
    assert v.get(s.id) is s
    now[0] += 10.5
    with pytest.raises(SessionError) as e:
        v.get(s.id)
    assert e.value.code == "NOT_FOUND" and v.active_sessions == 0


def test_bad_batch_closes_only_that_session():
    v = make_verifier()
    s1 = v.open(open_msg(0, 1.0)[0])
    s2 = v.open(open_msg(1, 1.0)[0])
    cfg = SchemeConfig("topk", V, k=3, ell=20)
    bad = replace(codec.pack_batch(1, [], cfg), num_drafts=2)
    with pytest.raises(SessionError) as e:
        v.verify(s1, bad)
    assert e.value.code == "INVALID_ARGUMENT"
    with pytest.raises(SessionError):
        v.get(s1.id)
    assert v.get(s2.id) is s2
    assert v.verify(s2, codec.pack_batch(1, [], cfg)).position == 2


def test_metrics_exporter_counts_rounds():
    m = Metrics()
    m.observe("topk", RoundStats(drafted=4, accepted=2, payload_bytes=30, formula_bits=200.0, wire_bytes=70,
                                 latency_ms={"verify": 12.0, "total": 40.0}, beta=0.02))
    m.observe("topk", RoundStats(drafted=3, accepted=3, payload_bytes=20, formula_bits=150.0))
    g = m.registry.get_sample_value
    assert g("sqs_batches_total", {"sparsifier": "topk"}) == 2
    assert g("sqs_draft_tokens_total", {"sparsifier": "topk"}) == 7
    assert g("sqs_accepted_tokens_total", {"sparsifier": "topk"}) == 5
    assert g("sqs_resampled_tokens_total", {"sparsifier": "topk"}) == 1
    assert g("sqs_bonus_tokens_total", {"sparsifier": "topk"}) == 1
    assert g("sqs_uplink_formula_bits_total", {"sparsifier": "topk"}) == 350.0
    assert g("sqs_batch_latency_seconds_count", {"sparsifier": "topk", "part": "verify"}) == 1
    assert g("sqs_conformal_threshold", {"sparsifier": "topk"}) == 0.02
    drafted = {j: g("sqs_drafted_by_position_total", {"sparsifier": "topk", "position": str(j)}) for j in (1, 2, 3, 4)}
    accepted = {j: g("sqs_accepted_by_position_total", {"sparsifier": "topk", "position": str(j)}) for j in (1, 2, 3)}
    assert drafted == {1: 2, 2: 2, 3: 2, 4: 1} and accepted == {1: 2, 2: 2, 3: 1}
    assert g("sqs_accepted_by_position_total", {"sparsifier": "topk", "position": "4"}) is None


def test_metrics_positions_past_the_cap_share_one_label():
    m = Metrics()
    m.observe("topk", RoundStats(drafted=MAX_POSITION + 5, accepted=MAX_POSITION + 2, payload_bytes=1, formula_bits=1.0))
    m.observe("topk", RoundStats(drafted=0, accepted=0, payload_bytes=0, formula_bits=0.0, plain=3))  # no positions
    g = m.registry.get_sample_value
    later = {"sparsifier": "topk", "position": f"{MAX_POSITION + 1}+"}
    assert g("sqs_drafted_by_position_total", later) == 5 and g("sqs_accepted_by_position_total", later) == 2
    assert g("sqs_drafted_by_position_total", {"sparsifier": "topk", "position": str(MAX_POSITION)}) == 1
    positions = {s.labels["position"] for f in m.registry.collect() if f.name == "sqs_drafted_by_position"
                 for s in f.samples if s.name.endswith("_total")}
    assert len(positions) == MAX_POSITION + 1


def samples(m: Metrics) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in m.registry.collect() for s in f.samples
            if not s.name.endswith("_created")}


def test_the_edge_record_counts_as_the_record_does():
    kw = dict(drafted=5, accepted=1, payload_bytes=33, formula_bits=210.0, wire_bytes=80,
              latency_ms={p: 3.0 for p in PARTS}, beta=0.01, plain=0)
    a = Metrics()
    a.observe("conformal", RoundStats(**kw))
    rec = RoundRecord(drafted=5, accepted=1, formula_bits=210.0, honest_bits=220.0, payload_bytes=33,
                      message_bytes=40, uplink_wire_bytes=80, downlink_wire_bytes=20, draft_ms=3.0, uplink_ms=3.0,
                      verify_ms=3.0, downlink_ms=3.0, total_ms=3.0, beta=0.01, predicted_ms=2.0)
    c = Metrics()
    c.observe_record("conformal", rec)
    plan = {k: v for k, v in samples(c).items() if k[0].startswith("sqs_plan_")}
    assert {k: v for k, v in samples(c).items() if k not in plan} == samples(a)
    assert plan[("sqs_plan_draft_len_sum", (("sparsifier", "conformal"),))] == 5
    assert plan[("sqs_plan_time_error_ratio_count", (("sparsifier", "conformal"),))] == 1


def test_session_logs_are_json_with_session_id_and_no_prompt(caplog):
    caplog.set_level(logging.INFO, logger="sqs.cloud")
    v = make_verifier()
    s = v.open(open_msg(0, 1.0, context=(3, 1, 4))[0])
    records = [r for r in caplog.records if r.name == "sqs.cloud"]
    assert records, "opening a session logs at INFO"
    line = json.loads(JsonFormatter().format(records[-1]))
    assert line["level"] == "INFO" and s.id in line["msg"] and "3, 1, 4" not in line["msg"]
