"""The one TV formula (common/acceptance.py) and learning from a verdict (Drafter.learn).

tv_distance must give, bit for bit, what the drafter and the planner each computed inline before
it existed (the naive formulas are kept here as oracles), and equal the TV of the dense
distributions. Drafter.learn must leave the drafter exactly as the three calls it replaces did
(threshold rollback, acceptance observation, cost observation with the round's measurements).
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from common.acceptance import tv_distance, tv_loss
from common.costmodel import Costs
from common.lattice import quantize
from common.schemes import Scheme, SchemeConfig, describe
from common.stats import RoundRecord
from edge.drafter import DraftConfig, Drafter

V = 300


def _drafter_tv(kept: np.ndarray, q_hat: np.ndarray) -> float:
    """The drafter's inline TV(q, q_hat) before tv_distance."""
    return 0.5 * (float(np.abs(kept - q_hat).sum()) + max(0.0, 1.0 - float(kept.sum())))


def _planner_tv_loss(top: np.ndarray, k: int, ell: int) -> float:
    """The planner's inline tv_loss before tv_distance (no clamp on the dropped mass)."""
    kept = top[: max(1, k)]
    mass = float(kept.sum())
    if mass <= 0:
        return 1.0
    q_hat = quantize(kept, ell) / ell
    return 0.5 * ((1.0 - mass) + float(np.abs(kept - q_hat).sum()))


def _q(rng: np.random.Generator, case: str) -> np.ndarray:
    if case == "one-hot":
        q = np.zeros(V)
        q[17] = 1.0
        return q
    if case == "peaked":
        return rng.dirichlet(np.full(V, 0.02))
    return rng.dirichlet(np.ones(V))


@pytest.mark.parametrize("case", ["one-hot", "peaked", "flat"])
@pytest.mark.parametrize("scheme, extra", [
    ("topk", {}), ("topk", {"drop_zeros": True}), ("fp16-topk", {}), ("token", {}), ("conformal", {}), ("dense", {}),
])
def test_tv_distance_is_the_drafters_formula_and_the_dense_tv(case, scheme, extra):
    rng = np.random.default_rng(zlib.crc32(f"{case}/{scheme}/{extra}".encode()))
    for _ in range(5):
        q = _q(rng, case)
        cfg = SchemeConfig(scheme, V, k=8, ell=20, **extra)
        d = describe(q, cfg, beta=0.01 if cfg.scheme == Scheme.CONFORMAL else None)
        kept = q[d.support]
        assert tv_distance(kept, d.probs) == _drafter_tv(kept, d.probs)  # bit for bit
        dense = np.zeros(V)
        dense[d.support] = d.probs
        assert tv_distance(kept, d.probs) == pytest.approx(0.5 * np.abs(q - dense).sum(), abs=1e-12)


def test_tv_loss_is_the_planners_formula_and_never_negative():
    rng = np.random.default_rng(5)
    clamped = 0
    for _ in range(400):
        top = np.sort(rng.dirichlet(np.ones(5)))[::-1]
        for k, ell in [(1, 4), (3, 16), (5, 64), (5, 1 << 20)]:
            old, new = _planner_tv_loss(top, k, ell), tv_loss(top, k, ell)
            if float(top[:k].sum()) <= 1.0:
                assert new == old  # bit for bit
            else:  # the kept float sum rounded above 1: the old formula counted negative dropped mass
                clamped += 1
                assert new - old == pytest.approx(0.0, abs=1e-15)
            assert new >= 0.0
    assert clamped  # the case exists (so the clamp is tested)
    assert tv_loss(np.zeros(4), 2, 8) == 1.0  # no mass kept: all of it lost


# -- learning from a verdict ----------------------------------------------------------------------
class _TableLM:
    def __init__(self, table: np.ndarray) -> None:
        self.table = table

    def logits(self, context, want):
        return np.stack([self.table[t] for t in context[len(context) - want:]]).astype(np.float32)


_TABLE = np.random.default_rng(7).normal(0, 1.5, size=(6, 6))


def _drafter(scheme: str) -> Drafter:
    cfg = DraftConfig(SchemeConfig(scheme, 6, k=3, ell=20), temperature=1.0, seed=3, ell_auto=True)
    d = Drafter(_TableLM(_TABLE), cfg)
    d.warm([0, 1])
    d.calibrate([1, 2, 9], [10.0, 11.0, 14.0])
    d.costs.costs = lambda: Costs(1.0, 20.0, 0.0, lambda r: 10.0)  # the plans do not depend on the clock
    return d


def _record(drafted: int, accepted: int, plain: int, wire: int, forward_us: int) -> RoundRecord:
    """As edge/generate.py builds it from a verdict (forward_ms = v.forward_us / 1e3)."""
    return RoundRecord(drafted, accepted, 0.0, 0.0, payload_bytes=12 + drafted, message_bytes=20 + drafted,
                       uplink_wire_bytes=wire, downlink_wire_bytes=40, draft_ms=3.0, uplink_ms=7.5, verify_ms=21.0,
                       downlink_ms=6.25, total_ms=37.75, plain=plain, forward_ms=forward_us / 1e3)


def _state(d: Drafter) -> tuple:
    a, c = d.acceptance, d.costs
    link = c.link.estimate()
    return (d.beta, d.controller.counted_positions if d.controller else None, a._hits.tolist(), a._n.tolist(),
            a.tested, c.passes.table(), c.cloud_overhead.value, c.framing.value, link.rtt_ms, link.ms_per_byte)


@pytest.mark.parametrize("scheme", ["topk", "conformal"])
def test_learn_is_settle_then_observe_round(scheme):
    """learn() against the three calls edge/generate.py made per round before it, with the values it
    passed (forward_ms = v.forward_us / 1e3, uplink bytes = wire bytes or else message bytes)."""
    one, other = _drafter(scheme), _drafter(scheme)
    context = [0, 1]
    for accepted, plain, wire, forward_us in [(1, 0, 90, 17_713), (9, 0, 0, 19_001), (0, 0, 130, 16_250), (0, 3, 70, 41_333)]:
        b1 = one.draft(context, max_drafts=0 if plain else 4)
        b2 = other.draft(context, max_drafts=0 if plain else 4)
        n = len(b1.drafts)
        assert [x.token for x in b1.drafts] == [x.token for x in b2.drafts]
        rec = _record(n, min(accepted, n), plain, wire, forward_us)
        one.learn(b1, rec, carry=False)
        # the calls learn() replaces
        if other.controller:
            other.controller.settle(rec.accepted, n, carry=False)
        if b2.drafts:
            other.acceptance.observe(b2.confidences, b2.tv_losses, rec.accepted)
        other.costs.observe_round(
            rows=n + 1, plain_steps=plain, forward_ms=forward_us / 1e3, cloud_ms=rec.verify_ms,
            round_trip_ms=rec.uplink_ms + rec.verify_ms + rec.downlink_ms,
            uplink_bytes=rec.uplink_wire_bytes or rec.message_bytes, payload_bytes=rec.payload_bytes,
        )
        assert _state(one) == _state(other)
        context = context + [x.token for x in b1.drafts[: rec.accepted]] + [int(rec.accepted) % 6]


def test_learn_refuses_a_record_of_another_batch():
    d = _drafter("topk")
    batch = d.draft([0, 1], max_drafts=3)
    with pytest.raises(ValueError):
        d.learn(batch, _record(len(batch.drafts) + 1, 0, 0, 80, 15_000), carry=False)


def test_a_row_drafted_past_a_streamed_round_serves_the_next_draft_only_on_its_exact_context():
    """Drafter.step_past(ctx) guesses the cloud's next token and drafts the row after it; the next
    draft() starting at exactly ctx + [guess] uses that row instead of a pass of its own, and draws
    the same batch as without it (same rng keys, same row); any other context is drafted as usual."""
    calls: list[tuple[int, ...]] = []

    class Counting(_TableLM):
        def logits(self, context, want):
            calls.append(tuple(context))
            return super().logits(context, want)

    def drafter() -> Drafter:
        cfg = DraftConfig(SchemeConfig("topk", 6, k=3, ell=20), temperature=1.0, seed=3, max_draft_len=3)
        return Drafter(Counting(_TABLE), cfg)

    ctx = [0, 1, 2]
    d = drafter()
    d.step_past(ctx)
    guess = d.guess_bonus(ctx, d.config.scheme)
    start = ctx + [guess]
    calls.clear()
    with_memo = d.draft(start, max_drafts=3)
    assert tuple(start) not in calls  # the first position came from the memo
    plain = drafter().draft(start, max_drafts=3)
    assert [x.token for x in with_memo.drafts] == [x.token for x in plain.drafts]
    assert all(np.array_equal(a.probs, b.probs) for a, b in zip(with_memo.drafts, plain.drafts))
    other = drafter()
    other.step_past(ctx)
    calls.clear()
    other.draft(ctx + [(guess + 1) % 6], max_drafts=1)
    assert tuple(ctx + [(guess + 1) % 6]) in calls  # a wrong guess: drafted as usual
