"""Draft rows computed ahead of the round that needs them (edge/drafter.py: warm's opening chain,
remember/ready, hedge, the probe that is skipped) and the plan's credit for them
(common/planner.py, common/stoprule.py: `ready`).

On this machine's pair a 0.5B draft row costs ~75 ms on the edge core against a ~156 ms target
step; every row on a round's critical path was most of what speculation lost on prose prompts.
"""

from __future__ import annotations

import threading

import numpy as np

from common.acceptance import AcceptanceModel, QuantLoss
from common.costmodel import Costs
from common.planner import Description, Planner, PlannerConfig, RoundPlan, best_length
from common.schemes import SchemeConfig
from common.stoprule import StopRule
from edge.drafter import OPENING_CHAIN, DraftConfig, Drafter

V = 6
_TABLE = np.random.default_rng(11).normal(0, 1.5, size=(V, V))


class _CountingLM:
    """Row after a context = _TABLE[last token]; every call is recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, ...]] = []

    def logits(self, context, want):
        self.calls.append(tuple(context))
        return np.stack([_TABLE[t] for t in context[len(context) - want:]]).astype(np.float32)


def _drafter(temperature: float = 0.0, draft_len: int | None = 3, costs: Costs | None = None) -> Drafter:
    cfg = DraftConfig(SchemeConfig("topk", V, k=3, ell=20), temperature=temperature, seed=5, max_draft_len=draft_len)
    d = Drafter(_CountingLM(), cfg)
    if costs is not None:
        d.costs.costs = lambda: costs  # the plans do not depend on the clock
    return d


def _greedy_chain(start: list[int], n: int) -> list[int]:
    ctx = list(start)
    for _ in range(n):
        ctx.append(int(np.argmax(_TABLE[ctx[-1]])))
    return ctx


def test_warm_then_chain_keeps_the_opening_rows_until_the_open_is_back_and_the_first_draft_uses_them():
    prompt = [0, 1, 2]
    d = _drafter()
    d.warm(prompt)  # the prefill row and the timed step's row
    assert len(d.lm.calls) == 2 and d.ready(prompt) == 2
    d.chain(prompt, until=threading.Event())  # never set: the whole chain
    chain = _greedy_chain(prompt, OPENING_CHAIN - 1)
    assert d.lm.calls == [tuple(chain[:n]) for n in range(len(prompt), len(chain) + 1)]
    assert d.ready(prompt) == OPENING_CHAIN
    d.lm.calls.clear()
    batch = d.draft(prompt, max_drafts=3)
    assert d.lm.calls == []  # at T = 0 every draft is the row's argmax: all three rows were kept
    fresh = _drafter().draft(prompt, max_drafts=3)
    assert [x.token for x in batch.drafts] == [x.token for x in fresh.drafts] == chain[3:6]
    assert all(np.array_equal(a.probs, b.probs) for a, b in zip(batch.drafts, fresh.drafts))

    stopped = threading.Event()
    stopped.set()  # the open is back: no row beyond warm's
    e = _drafter()
    e.warm(prompt)
    e.chain(prompt, until=stopped)
    assert len(e.lm.calls) == 2 and e.ready(prompt) == 2


def test_ready_counts_the_chain_only_at_t0_and_nothing_for_another_context():
    prompt = [3, 4]
    for temperature, want in ((0.0, OPENING_CHAIN), (1.0, 1)):
        d = _drafter(temperature)
        d.warm(prompt)
        d.chain(prompt, until=threading.Event())
        assert d.ready(prompt) == want
        assert d.ready([4, 3]) == 0


def test_a_ready_row_costs_no_draft_time_in_the_plan_and_the_stop_rule():
    costs = Costs(draft_ms=75.0, fixed_ms=3.0, ms_per_byte=0.0, pass_ms=lambda r: 156.0 + 94.0 * (r - 1))
    n0, e0, t0 = best_length(0.9, costs, 0.0, 4, start=(1.0, 3.0, 1.0))
    n1, e1, t1 = best_length(0.9, costs, 0.0, 4, start=(1.0, 3.0, 1.0), ready=1)
    n4, e4, t4 = best_length(0.9, costs, 0.0, 4, start=(1.0, 3.0, 1.0), ready=4)
    # The first row's 75 ms decide: paid, one draft does not beat plain; ready, it does.
    assert (n0, n1) == (0, 1) and t1 == 3.0 + costs.pass_ms(2)
    assert e4 / t4 >= e1 / t1 >= e0 / t0
    assert t4 == 3.0 + costs.pass_ms(n4 + 1)  # every row kept: the round is the pass alone
    plan = RoundPlan(True, None, 4, 0, 1.0, 0.0, 0.9, ready=2)
    rule = StopRule(costs, plan)
    for _ in range(3):
        rule.add(0.9, 0.0)
    assert rule.t == 3.0 + 75.0  # two kept rows free, the third paid


def test_a_plan_made_ahead_is_undone_by_restore():
    p = Planner(PlannerConfig(), lambda k, ell: 8.0 * k)
    p.streaming = True
    before = p.snapshot()
    costs = Costs(75.0, 3.0, 0.0, lambda r: 156.0 * r)  # speculation never pays: a plain plan
    acc = AcceptanceModel()
    p.plan(costs, acc, QuantLoss(), 5000.0, 64)
    assert p.snapshot() != before
    p.restore(before)
    assert p.snapshot() == before


def _probe_costs() -> Costs:
    # Draft rows dear, extra rows dear: plain decoding wins, so every speculative round is a probe.
    return Costs(draft_ms=75.0, fixed_ms=3.0, ms_per_byte=0.0, pass_ms=lambda r: 156.0 + 94.0 * (r - 1))


def _due_probe(d: Drafter) -> None:
    d.planner.streaming = True
    d.planner.probe_first()


def test_a_probe_without_its_row_ready_is_plain_decoding_without_a_draft_pass():
    d = _drafter(draft_len=None, costs=_probe_costs())
    _due_probe(d)
    batch = d.draft([0, 1, 2], max_drafts=40)
    assert batch.drafts == [] and batch.plain_steps >= 1
    assert d.lm.calls == []  # neither waited for nor computed on the critical path


def test_without_streamed_rounds_a_probe_still_drafts_its_row_in_line():
    """Over the unary transport nothing computes probe rows beside a stream, so a probe without
    its row drafts it as before; skipping it would keep speculation from ever coming back."""
    d = _drafter(draft_len=None, costs=_probe_costs())
    d.acceptance.predict = lambda c: 0.95  # a draft worth its row, once drafted
    d.planner.probe_first()  # streaming stays False
    batch = d.draft([0, 1, 2], max_drafts=40)
    assert len(batch.drafts) == 1 and batch.plan.probe
    assert (0, 1, 2) in d.lm.calls


def test_a_skipped_first_draft_keeps_its_row_for_the_next_plan_at_that_context():
    ctx = [0, 1, 2]
    d = _drafter(draft_len=None, costs=_probe_costs())
    d.acceptance.predict = lambda c: 0.3
    d.planner.streaming = True
    d.planner.plan = lambda *a, **k: RoundPlan(True, Description(3, 20, 13.8, 0.0), 8, 0, 1.5, 300.0, 0.5)
    batch = d.draft(ctx, max_drafts=40)
    assert batch.drafts == [] and d.lm.calls == [tuple(ctx)]
    assert d.ready(ctx) == 1  # kept: planning here again costs no draft pass


def test_a_first_draft_from_a_ready_row_is_sent_when_likely_and_skipped_for_plain_steps_when_not():
    ctx = [0, 1, 2]
    row = _TABLE[2]
    sent = _drafter(draft_len=None, costs=_probe_costs())
    sent.acceptance.predict = lambda c: 0.95  # a confident draft: 1.95 tokens in 253 ms beats 1 in 159
    sent.remember(ctx, row.astype(np.float32))
    _due_probe(sent)
    batch = sent.draft(ctx, max_drafts=40)
    assert len(batch.drafts) >= 1 and batch.plan.ready == 1
    assert tuple(ctx) not in sent.lm.calls  # the first row was the kept one

    skipped = _drafter(draft_len=None, costs=_probe_costs())
    skipped.acceptance.predict = lambda c: 0.3  # 1.3 tokens in 253 ms lose to 1 in 159
    skipped.remember(ctx, row.astype(np.float32))
    _due_probe(skipped)
    batch = skipped.draft(ctx, max_drafts=40)
    assert batch.drafts == [] and batch.plain_steps + 1 == skipped.planner.config.skip_tokens
    assert skipped.planner.tokens_since_draft >= skipped.planner.probe_every  # the next plan may probe


def test_hedge_keeps_the_row_after_the_runner_up_where_a_rejection_is_likelier_than_not():
    ctx = [0, 1, 2]
    d = _drafter(draft_len=2)
    batch = d.draft(ctx, max_drafts=2)
    assert len(batch.drafts) == 2
    top2 = np.argsort(_TABLE[2])[::-1][:2]
    assert batch.runners_up[0] == int(top2[1])  # T = 0: the draft is the argmax, the runner-up second

    batch.accept_probs = [0.9, 0.2]  # P(reject 1st) = 0.1, P(reject 2nd) = 0.72
    d.lm.calls.clear()
    d.hedge(ctx, batch)
    hedged = ctx + [batch.drafts[0].token, batch.runners_up[1]]
    assert d.lm.calls == [tuple(hedged)] and d.ready(hedged) >= 1

    batch.accept_probs = [0.9, 0.8]  # no rejection likelier than 0.5: no row spent
    d.lm.calls.clear()
    d.hedge(ctx, batch)
    assert d.lm.calls == []


def test_a_planned_round_whose_lm_is_still_warming_streams_plain_tokens_instead_of_waiting():
    """busy (the warm still runs after the open came back): a speculative plan without its first
    row ready is plain this time where rounds stream; with the row ready, or the LM free, it drafts."""
    ctx = [0, 1, 2]
    speculative = RoundPlan(True, Description(3, 20, 13.8, 0.0), 8, 0, 4.0, 300.0, 0.9)  # not a probe
    for busy, streaming, drafts in ((True, True, False), (False, True, True), (True, False, True)):
        d = _drafter(draft_len=None, costs=_probe_costs())
        d.acceptance.predict = lambda c: 0.95
        d.planner.streaming = streaming
        d.planner.plan = lambda *a, **k: speculative
        waited: list[bool] = []
        batch = d.draft(ctx, max_drafts=40, before_drafting=lambda: waited.append(True), busy=busy)
        assert bool(batch.drafts) == drafts and bool(waited) == drafts, (busy, streaming)
        assert (d.lm.calls != []) == drafts
        if not drafts:
            assert batch.plain_steps >= 1
    d = _drafter(draft_len=None, costs=_probe_costs())
    d.acceptance.predict = lambda c: 0.95
    d.planner.streaming = True
    d.planner.plan = lambda *a, **k: speculative
    d.remember(ctx, _TABLE[ctx[-1]].astype(np.float32))  # the warm got as far as the first row
    assert d.draft(ctx, max_drafts=40, busy=True).drafts
