"""The round planner, the stop rule, acceptance learning and the cost model with synthetic costs
(pure: numpy only)."""

from __future__ import annotations

import numpy as np
import pytest

from common.acceptance import AcceptanceModel, QuantLoss, tv_distance, tv_loss
from common.costmodel import CostModel, Costs, LinkEstimate, PassTimes
from common.planner import Planner, PlannerConfig, best_length, expected_tokens
from common.stoprule import StopRule


def costs(step=100.0, ratio9=1.0, draft=10.0, rtt=50.0, ms_per_byte=0.0) -> Costs:
    """A target whose pass over r rows costs step * (1 + (ratio9 - 1) * (r - 1) / 8)."""
    return Costs(draft, rtt, ms_per_byte, lambda r: step * (1 + (ratio9 - 1) * (r - 1) / 8))


def trained(rate: float, n: int = 400, c: float = 0.8) -> AcceptanceModel:
    acc = AcceptanceModel()
    rng = np.random.default_rng(0)
    for _ in range(n):
        hits = int(rng.random() < rate)
        acc.observe([c], [0.0], accepted=hits)  # one draft: accepted or rejected
        acc.seen(c)
    return acc


def planner(bits=20.0, **kw) -> Planner:
    return Planner(PlannerConfig(k_menu=(4,), ell_menu=(32,), **kw), lambda k, ell: bits)


def test_expected_tokens_and_best_length_by_enumeration():
    assert expected_tokens([]) == 1.0
    assert expected_tokens([0.5, 0.5]) == pytest.approx(1.75)
    c = costs(ratio9=2.0)
    n, e, t = best_length(0.8, c, bits=16.0, limit=12, start=(1.0, c.fixed_ms, 1.0))
    rates = [expected_tokens([0.8] * L) / (c.fixed_ms + L * c.draft_ms + c.pass_ms(L + 1)) for L in range(13)]
    assert n == int(np.argmax(rates)) and e / t == pytest.approx(max(rates))


def test_plain_decoding_when_verify_costs_six_steps_and_acceptance_is_low():
    p = planner()
    plan = p.plan(costs(ratio9=6.0, rtt=5.0), trained(0.3), QuantLoss(), budget_bits=5000, remaining_tokens=64)
    assert not plan.speculate and plan.max_drafts == 0


def test_long_plan_when_verify_is_flat_and_acceptance_high():
    plan = planner().plan(costs(ratio9=1.0), trained(0.9), QuantLoss(), budget_bits=5000, remaining_tokens=64)
    assert plan.speculate
    n, _, _ = best_length(plan.acceptance, costs(ratio9=1.0), 20.0, plan.max_drafts, start=(1.0, 50.0, 1.0))
    assert n >= 8


@pytest.mark.parametrize("ratio9", [1.0, 2.0])
def test_shorter_plan_as_the_rtt_falls(ratio9):
    """The speculative length the plan settles on falls with the RTT (a longer round amortises it)."""
    lengths = []
    for rtt in (400.0, 50.0, 1.0):
        c = costs(ratio9=ratio9, rtt=rtt, draft=20.0)
        n, _, _ = best_length(0.75, c, 20.0, 32, start=(1.0, c.fixed_ms, 1.0))
        lengths.append(n)
    assert lengths[0] >= lengths[1] >= lengths[2] and lengths[0] > lengths[2]


def test_plain_steps_beat_short_rounds_on_a_long_rtt():
    """On a 400 ms RTT, 16 plain steps per round (16 tokens in 2 s: 8 tokens/s) beat speculation at
    0.75 acceptance (about 3.8 tokens in 0.7 s: 5.4 tokens/s); on a 1 ms RTT speculation wins."""
    acc = trained(0.75)
    assert not planner().plan(costs(rtt=400.0, draft=20.0), acc, QuantLoss(), 5000, 64).speculate
    assert planner().plan(costs(rtt=1.0, draft=20.0), acc, QuantLoss(), 5000, 64).speculate


@pytest.mark.parametrize("bits", [1.0, 300.0, 1300.0, 4999.0, 6000.0])
def test_plan_never_exceeds_the_budget(bits):
    plan = planner(bits=bits).plan(costs(), trained(0.95), QuantLoss(), budget_bits=5000, remaining_tokens=64)
    if plan.speculate:
        assert plan.max_drafts * bits <= 5000
    else:
        assert bits > 5000 or plan.max_drafts == 0


def test_plain_rounds_amortise_the_rtt_and_respect_remaining_tokens():
    p = planner()
    c = costs(step=100.0, rtt=200.0)
    plain = p.plain(c, remaining_tokens=64)
    assert plain.plain_steps + 1 == 16  # 200 ms / (5% of 100 ms) = 40 steps, capped at 16
    assert p.plain(c, remaining_tokens=3).plain_steps == 2
    assert p.plain(costs(step=100.0, rtt=0.0), remaining_tokens=64).plain_steps == 0


def test_probe_round_while_plain_decoding_wins():
    p = planner(probe_tokens=8)
    c, acc = costs(ratio9=8.0, rtt=0.0), trained(0.2)
    plans = [p.plan(c, acc, QuantLoss(), 5000, 64) for _ in range(12)]
    probes = [x for x in plans if x.speculate]
    assert probes and all(x.probe and x.max_drafts == 1 for x in probes)
    assert sum(not x.speculate for x in plans) >= 8


def test_a_streamed_generation_probes_first_then_plain_stretches_double_from_eight():
    """Where plain decoding looks better at the start, the first round is a probe (the acceptance is
    the prior's guess); streamed plain rounds then run 8, 16, 32 tokens between probes while the
    probes lose, and the interval falls back to 8 once speculation wins."""
    p = planner()
    p.streaming = True
    p.probe_first()
    c, acc = costs(ratio9=8.0, rtt=0.0), trained(0.2)
    plans = [p.plan(c, acc, QuantLoss(), 5000, 1000) for _ in range(6)]
    shape = [-1 if x.speculate else x.plain_steps + 1 for x in plans]
    assert shape == [-1, 8, -1, 16, -1, 32]
    assert all(x.probe for x in plans if x.speculate)
    good = trained(0.95)
    win = p.plan(costs(ratio9=1.0, rtt=0.0), good, QuantLoss(), 5000, 1000)
    assert win.speculate and not win.probe and p.probe_every == 8


def test_measured_speculative_rounds_slower_than_plain_steps_overrule_the_model():
    """The model predicts speculation wins (acceptance 0.9, cheap rows); rounds measured at fewer
    tokens per ms than a plain step (1.5 tokens in 400 ms against 100 ms a step) switch the plan to
    plain after realized_min_rounds rounds, and rounds measured fast switch it back."""
    p = planner()
    c, acc = costs(ratio9=1.2, rtt=0.0), trained(0.9)
    assert p.plan(c, acc, QuantLoss(), 5000, 64).speculate
    for _ in range(p.config.realized_min_rounds - 1):
        p.observe(2, 400.0, speculative=True)
        assert p.plan(c, acc, QuantLoss(), 5000, 64).speculate  # too few rounds to overrule
    p.observe(2, 400.0, speculative=True)
    assert not p.plan(c, acc, QuantLoss(), 5000, 64).speculate
    p.observe(10, 1000.0, speculative=False)  # plain rounds measured as the model says: plain stays
    assert not p.plan(c, acc, QuantLoss(), 5000, 64).speculate
    for _ in range(3):
        p.observe(6, 150.0, speculative=True)
    assert p.plan(c, acc, QuantLoss(), 5000, 64).speculate


def test_slow_speculative_rounds_are_held_against_measured_plain_rounds_not_the_model():
    """Under load a plain step waits for the shared pass too: speculative rounds that realize
    less than the model's plain step (1.5 tokens in 400 ms against 100 ms a step) but more than the
    plain rounds measured beside them (10 tokens in 4 s) are not overruled."""
    p = planner()
    c, acc = costs(ratio9=1.2, rtt=0.0), trained(0.9)
    for _ in range(p.config.realized_min_rounds):
        p.observe(2, 400.0, speculative=True)
    assert not p.plan(c, acc, QuantLoss(), 5000, 64).speculate  # no plain round measured: the model's rate
    p.observe(10, 4000.0, speculative=False)
    assert p.plan(c, acc, QuantLoss(), 5000, 64).speculate


def test_k_and_ell_follow_the_distribution():
    """One-hot q (T = 0): K = 1 describes it exactly and costs least. Flat q: a larger K pays."""
    bits = lambda k, ell: 17.0 * k + 3.0 * ell / 8  # noqa: E731 - synthetic, increasing in both
    p = Planner(PlannerConfig(), bits)
    one_hot, flat = QuantLoss(), QuantLoss()
    rng = np.random.default_rng(1)
    for _ in range(8):
        q = np.zeros(1000)
        q[rng.integers(1000)] = 1.0
        one_hot.seen(q)
        f = rng.dirichlet(np.full(1000, 0.05))
        flat.seen(f)
    acc = trained(0.9)
    assert p.plan(costs(), acc, one_hot, 5000, 64).description.k == 1
    assert p.plan(costs(ms_per_byte=0.001), acc, flat, 5000, 64).description.k > 1


def test_tv_loss_matches_a_direct_computation():
    rng = np.random.default_rng(2)
    q = np.sort(rng.dirichlet(np.ones(50)))[::-1]
    from common.lattice import quantize

    for k, ell in [(1, 4), (5, 10), (50, 1000)]:
        q_hat = np.zeros(50)
        q_hat[:k] = quantize(q[:k], ell) / ell
        assert tv_loss(q, k, ell) == pytest.approx(0.5 * np.abs(q - q_hat).sum())


def test_round_stops_when_one_more_draft_does_not_pay():
    c = costs(ratio9=1.0, draft=30.0, rtt=10.0)
    plan = planner().plan(c, trained(0.9), QuantLoss(), 5000, 64)
    r = StopRule(c, plan)
    assert r.more()
    r.add(0.9, 20.0)
    assert not r.keep(0.0, 20.0)  # a draft certain to be rejected is never worth sending
    for _ in range(plan.max_drafts - 1):
        r.add(0.9, 20.0)
    assert not r.more()  # the plan's cap


def test_acceptance_model_learns_confidence():
    acc = AcceptanceModel()
    rng = np.random.default_rng(3)
    for _ in range(2000):
        c = rng.random()
        acc.observe([c], [0.0], accepted=int(rng.random() < c))
    for c in (0.15, 0.55, 0.95):
        assert acc.predict(c) == pytest.approx(c, abs=0.1)


def test_pass_times_median_interpolation_and_extrapolation():
    t = PassTimes()
    for ms in (100, 101, 5000, 99):  # an outlier does not move the median
        t.add(1, ms)
    t.add(9, 200)
    assert t.predict(1) == pytest.approx(100.5)
    assert t.predict(5) == pytest.approx(150.25)
    assert t.predict(17) == pytest.approx(200 + 8 * 99.5 / 8)
    one = PassTimes()
    one.add(2, 40)
    assert one.predict(4) == pytest.approx(80)
    assert PassTimes().predict(3) == 0.0


def test_pass_times_as_measured_keeps_the_dips_the_default_flattens():
    """Repacked llama.cpp (RESULTS 0i): 4 rows cheaper than 3, 16 than 13."""
    t = PassTimes()
    for rows, ms in {1: 157, 3: 375, 4: 227, 13: 676, 16: 532}.items():
        t.add(rows, ms)
    assert t.predict(4, monotone=False) == 227 and t.predict(16, monotone=False) == 532
    assert t.predict(4) == 375 and t.predict(16) == 676  # the default: more rows never cheaper
    assert t.predict(2, monotone=False) == pytest.approx(266.0) and t.predict(14, monotone=False) == pytest.approx(628.0)


def test_link_estimate_recovers_rtt_and_rate():
    link = LinkEstimate()
    rng = np.random.default_rng(4)
    for _ in range(32):
        b = rng.integers(40, 2000)
        link.add(b, 50.0 + b * 0.125 + rng.normal(0, 0.5))  # 64 kbit/s = 0.125 ms per byte
    est = link.estimate()
    assert est.rtt_ms == pytest.approx(50.0, abs=2.0) and est.ms_per_byte == pytest.approx(0.125, rel=0.05)


def test_cost_model_from_rounds():
    cm = CostModel()
    cm.passes.seed([1, 9], [100.0, 300.0])
    cm.draft.add(12.0)
    for L, b in [(4, 120), (8, 400), (2, 60), (6, 260)]:
        cm.observe_round(rows=L + 1, plain_steps=0, forward_ms=100 + 25 * L, cloud_ms=105 + 25 * L,
                         round_trip_ms=105 + 25 * L + 40 + b * 0.01, uplink_bytes=b, payload_bytes=b - 30)
    c = cm.costs()
    assert c.draft_ms == 12.0 and c.ms_per_byte == pytest.approx(0.01, rel=1e-6)
    assert c.fixed_ms == pytest.approx(40 + 30 * 0.01 + 5.0, rel=1e-6)
    assert c.pass_ms(5) == pytest.approx(200.0)


def test_position_level_acceptance_and_curve():
    from common.stats import GenerationStats, RoundRecord

    st = GenerationStats()
    for drafted, accepted in [(4, 4), (4, 1), (2, 0), (0, 0)]:
        st.add(RoundRecord(drafted, accepted, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0))
    d = st.summary()
    assert st.tested == 4 + 2 + 1 and d["position_acceptance_rate"] == pytest.approx(5 / 7)
    assert d["acceptance_rate"] == pytest.approx(5 / 10)
    assert d["per_position_acceptance"] == pytest.approx([2 / 3, 1 / 2, 1.0, 1.0])
