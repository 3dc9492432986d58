"""The edge's half of a round: plan, draft, sparsify, quantize, sample, price against the bit budget.

Per round the planner (common/planner.py) decides from measured costs whether to speculate at all
(else the cloud runs plain target steps), which K and ell describe the drafts, and the most drafts
worth sending; with a fixed --draft-len the plan is that length and the given K and ell.
Per position: q = SLM next-token distribution (session temperature/top-k/top-p; T = 0 is one-hot),
described by the scheme (support + lattice counts or float values), priced in bits, and only if it
fits the budget B is the draft token sampled from exactly the q_hat that will be sent. Stops at B,
the plan's length, the token limit, an EOS draft, or (auto) when one more draft does not raise the
expected tokens per second (common/stoprule.py). After the verdict, learn() rolls the conformal
threshold back to the surviving positions and feeds the outcome to the acceptance model
(common/acceptance.py) and the round's measured times and bytes to the cost model
(common/costmodel.py), which the next plan reads. The KV cache is rolled back by the first
lm.logits call in draft(): it crops the cache to the prefix it shares with the context the batch
continues (sqs_models/cached_lm.py), so rejected drafts leave it there.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np

from common.acceptance import AcceptanceModel, NoQuantLoss, QuantLoss, confidence, tv_distance
from common.batch_format import BatchBits, batch_bits, draft_bits
from common.conformal import ConformalController
from common.costmodel import CostModel, Costs
from common.gumbel import gumbel_token
from common.lm import LM
from common.planner import ELL_MENU, K_MENU, Description, Planner, PlannerConfig, RoundPlan
from common.rejection import target_probs
from common.schemes import Draft, Scheme, SchemeConfig, describe, draw, draw_invariant
from common.stats import RoundRecord
from common.stoprule import StopRule
from edge.options import AUTO, options_from


@dataclass(frozen=True)
class DraftConfig:
    scheme: SchemeConfig  # k and ell here are the session's defaults and the fixed choice
    max_draft_len: int | None = None  # None: auto (the planner chooses L per round, up to auto_max_draft_len)
    budget_bits: float = 5000.0  # uplink budget B per batch
    budget_accounting: str = "honest"  # "honest": what is packed; "formula": the paper's eq. 1 bits
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    k_auto: bool = False  # topk / fp16-topk: the planner picks K per round
    ell_auto: bool = False  # lattice schemes: the planner picks ell per round
    auto_max_draft_len: int = 32
    pipeline: bool = True  # draft the next batch while one is in flight (edge/generate.py)
    lookahead: int = 0  # drafts sent ahead of a streamed round's tokens (DraftBatch.lookahead); 0 = none

    @classmethod
    def from_options(cls, source, vocab_size: int, **overrides) -> "DraftConfig":
        """From the generation options (edge/options.py) held by any object or mapping with their
        names (argparse namespace, HTTP request, load-test config), `overrides` taking precedence.
        draft_len 0 = plain target decoding. Raises ValueError with the reason."""
        o = options_from(source, **overrides)
        draft_len = None if o.draft_len == AUTO else o.draft_len
        k = None if o.k == AUTO else o.k
        ell = None if o.ell == AUTO else o.ell
        scheme = Scheme.NONE if draft_len == 0 else Scheme(o.sparsifier)
        if o.reproducible and scheme != Scheme.NONE:
            scheme = Scheme.INVARIANT  # the one drafting scheme whose output does not depend on the plan
        return cls(
            scheme=SchemeConfig(
                scheme, vocab_size=vocab_size, k=min(8, vocab_size) if k is None else k, ell=100 if ell is None else ell,
                drop_zeros=o.drop_zeros and scheme.lattice, beta0=o.beta0, eta=o.eta, alpha=o.alpha,
            ),
            max_draft_len=draft_len, budget_bits=o.budget_bits, budget_accounting=o.budget_accounting,
            temperature=o.temperature, top_k=o.top_k, top_p=o.top_p, seed=o.seed,
            k_auto=k is None and scheme in (Scheme.TOPK, Scheme.FP16_TOPK), ell_auto=ell is None and scheme.lattice,
            pipeline=not o.no_pipeline, lookahead=0 if scheme == Scheme.NONE else o.lookahead,
        )

    def __post_init__(self) -> None:
        if self.budget_accounting not in ("honest", "formula"):
            raise ValueError("budget_accounting must be 'honest' or 'formula'")
        if self.max_draft_len is not None and self.max_draft_len < 0:
            raise ValueError("max_draft_len must be >= 0")
        if not (np.isfinite(self.budget_bits) and self.budget_bits > 0):
            raise ValueError("budget_bits must be a positive finite number")

    @property
    def adaptive(self) -> bool:
        return self.max_draft_len is None

    @property
    def max_drafts(self) -> int:
        """Most drafts any batch of this configuration carries (announced at session open)."""
        return self.auto_max_draft_len if self.adaptive else self.max_draft_len


@dataclass
class DraftedBatch:
    drafts: list[Draft]
    scheme: SchemeConfig  # this batch's description (its k and ell travel with it)
    draft_ms: float
    plain_steps: int = 0  # cloud-only steps requested after the round's token
    plan: RoundPlan | None = None
    bits: BatchBits = BatchBits(0.0, 0.0)  # of the drafts sent: batch_bits, once per batch
    predicted_ms: float = 0.0  # the plan's round time for the drafts actually sent
    predicted_tokens: float = 1.0
    confidences: list[float] = field(default_factory=list)  # per draft, for the acceptance model
    tv_losses: list[float] = field(default_factory=list)  # per draft: TV(q, q_hat)
    accept_probs: list[float] = field(default_factory=list)  # per draft: its predicted acceptance
    runners_up: list[int] = field(default_factory=list)  # per draft: the draft's likeliest other token


# Draft rows kept by context (Drafter.remember): the opening chain, step_past, the hedges drafted
# during a flight. A row is ~0.6 MB (V = 151,936 float32).
KEPT_ROWS = 16
# A lookahead draft past the guesses goes out only while the chance that it is accepted (the
# acceptance model's, times those of the drafts before it) is at least this: on llama.cpp here a
# 2-row pass costs ~1.5 steps, so for one client a draft accepted less often than that loses time
# (measured: lookahead on prose at T = 1 took one client from 0.97x to 0.94x of llama-server).
LOOKAHEAD_MIN_ACCEPT = 0.5
# Rows the edge computes ahead while the cloud prefills the prompt (Drafter.warm): the first
# round's drafts, where they follow the draft's likeliest tokens.
OPENING_CHAIN = 8


class Drafter:
    def __init__(self, lm: LM, config: DraftConfig, eos_token_ids: Sequence[int] = ()) -> None:
        self.lm = lm
        self.config = config
        self.eos = frozenset(int(t) for t in eos_token_ids)
        s = config.scheme
        self.controller = (
            ConformalController(s.beta0, eta=s.eta, alpha=s.alpha) if s.scheme == Scheme.CONFORMAL else None
        )
        self.costs = CostModel()
        self._rows: OrderedDict[tuple[int, ...], np.ndarray] = OrderedDict()  # draft rows computed ahead, by context
        self.acceptance = AcceptanceModel()
        self.loss = NoQuantLoss() if s.scheme == Scheme.INVARIANT else QuantLoss()
        self.planner = Planner(
            PlannerConfig(
                max_draft_len=config.auto_max_draft_len,
                k_menu=tuple(k for k in K_MENU if k <= s.vocab_size) if config.k_auto else (s.max_support,),
                ell_menu=ELL_MENU if config.ell_auto else (s.ell,),
                lattice=s.scheme.lattice,
            ),
            self._bits,
        )

    def _cost(self, honest: float, formula: float) -> float:
        """Bits of a draft as the budget counts them (--budget-accounting)."""
        return honest if self.config.budget_accounting == "honest" else formula

    def _bits(self, k: int, ell: int) -> float:
        return self._cost(*draft_bits(self._scheme_for(k, ell), k))

    def _scheme_for(self, k: int, ell: int) -> SchemeConfig:
        s = self.config.scheme
        if s.scheme in (Scheme.TOPK, Scheme.FP16_TOPK):
            return s if (k, ell) == (s.k, s.ell) else replace(s, k=k, ell=ell)
        return s if ell == s.ell else replace(s, ell=ell)

    # -- costs measured before the first round ----------------------------------------------
    def calibrate(self, pass_rows: Sequence[int], pass_ms: Sequence[float]) -> None:
        """Seed the cost model with the cloud's forward times by rows (the open's pass table); the
        draft's own step time comes from `warm`, which edge/generate.py runs on a thread of its own."""
        self.costs.passes.seed(list(pass_rows), list(pass_ms))

    def warm(self, context: Sequence[int]) -> None:
        """Prefill the draft on the prompt and time one draft step. The edge runs it while the
        cloud prefills the same prompt on the target (edge/generate.py): in line, a 30-token
        prompt cost ~0.6 s of 0.5B prefill before the first round. Both rows are kept (remember)."""
        if self.config.scheme.scheme == Scheme.NONE:
            return
        ctx = list(context)
        row = self.lm.logits(ctx, want=1)[0]  # prefill (needed for the first draft anyway)
        self.remember(ctx, row)
        cfg = self.config
        self.acceptance.seen(confidence(target_probs(row, cfg.temperature or 1.0, cfg.top_k, cfg.top_p)))
        ctx.append(int(np.argmax(row)))
        t0 = time.perf_counter()
        row = self.lm.logits(ctx, want=1)[0]  # one step: the likeliest first draft's row
        self.costs.draft.add((time.perf_counter() - t0) * 1e3)
        self.remember(ctx, row)

    def chain(self, context: Sequence[int], until: threading.Event, rows: int = OPENING_CHAIN) -> None:
        """From the rows kept after `context` on, along the draft's likeliest tokens: compute and
        keep rows until `until` is set (the open is back) or `rows` are kept. The first round's
        drafts, where they are those tokens (always at T = 0), then cost no draft time on the
        critical path (measured: 0.5B on one core, ~75 ms a row; each first round paid 1-2)."""
        if self.config.scheme.scheme == Scheme.NONE:
            return
        ctx = [int(t) for t in context]
        for _ in range(rows):
            row = self._rows.get(tuple(ctx))
            if row is None:
                if until.is_set():
                    return
                t0 = time.perf_counter()
                row = self.lm.logits(ctx, want=1)[0]
                self.costs.draft.add((time.perf_counter() - t0) * 1e3)
                self.remember(ctx, row)
            if ctx and ctx[-1] in self.eos and len(ctx) > len(context):
                return
            ctx.append(int(np.argmax(row)))

    # -- draft rows computed ahead --------------------------------------------------------------
    def remember(self, context: Sequence[int], row: np.ndarray) -> None:
        """Keep the draft's row after `context` for a later draft() at exactly that context."""
        key = tuple(int(t) for t in context)
        self._rows[key] = row
        self._rows.move_to_end(key)
        while len(self._rows) > KEPT_ROWS:
            self._rows.popitem(last=False)

    def ready(self, context: Sequence[int]) -> int:
        """How many of the next draft rows after `context` are kept: the first, and at T = 0 (where
        each draft is the row's argmax) the chain of rows that follows it."""
        ctx, n = tuple(int(t) for t in context), 0
        while (row := self._rows.get(ctx)) is not None:  # get: a follow-up thread may be adding rows
            n += 1
            if self.config.temperature > 0:
                break
            ctx += (int(np.argmax(row)),)
        return n

    def prepare(self, context: Sequence[int]) -> None:
        """Compute and keep the row after `context` (a guessed continuation) unless it is kept."""
        if tuple(int(t) for t in context) not in self._rows:
            self.remember(context, self.lm.logits(list(context), want=1)[0])

    def hedge(self, context: Sequence[int], batch: DraftedBatch) -> None:
        """While `batch` (drafted at `context`) is in flight: keep the row the next round needs if
        the cloud rejects the draft it is likeliest to reject and commits that draft's runner-up
        instead (at T = 0 the target's argmax, when it is not the draft's, is often the draft's
        second choice). One draft step, spent only where the rejection is likelier than not."""
        p_before, best, at = 1.0, 0.0, -1
        for j, a in enumerate(batch.accept_probs):
            if p_before * (1.0 - a) > best:
                best, at = p_before * (1.0 - a), j
            p_before *= a
        if at < 0 or best < 0.5 or at >= len(batch.runners_up):
            return
        self.prepare(list(context) + [d.token for d in batch.drafts[:at]] + [batch.runners_up[at]])

    # -- one round ----------------------------------------------------------------------------
    def plan(self, costs: Costs, remaining_tokens: int, ready: int = 0) -> RoundPlan:
        cfg, s = self.config, self.config.scheme
        if s.scheme == Scheme.NONE:
            return self.planner.plain(costs, remaining_tokens)
        if cfg.adaptive:
            return self.planner.plan(costs, self.acceptance, self.loss, cfg.budget_bits, remaining_tokens,
                                     beta=self.controller.beta if self.controller else None, ready=ready)
        return RoundPlan(True, Description(s.k, s.ell, 0.0, 0.0), cfg.max_draft_len, 0, 0.0, 0.0,
                         self.acceptance.typical())

    def draft(self, context: Sequence[int], max_drafts: int, should_stop: Callable[[], bool] | None = None,
              before_drafting: Callable[[], None] | None = None, busy: bool = False) -> DraftedBatch:
        """Plan and draft the next batch continuing `context`; at most max_drafts drafts.

        should_stop (drafting ahead while a batch is in flight): checked before each position.
        before_drafting: called once the plan speculates, before the draft LM is used (waits for
        work of another thread on it: a streamed round's follow-up).
        busy: the draft LM is still at work it must finish first (the warm after an open that came
        back sooner): where rounds stream, a planned round without its first row ready streams
        plain tokens instead of waiting for the LM and then paying its rows.
        """
        t0 = time.perf_counter()
        costs = self.costs.costs()
        ready = self.ready(context)
        plan = self.plan(costs, max_drafts + 1, ready=ready)
        if (plan.probe or (busy and self.config.adaptive)) and not ready and self.planner.streaming:
            # A probe is a bet that loses ~0.4 of a step when rejected; with its first row not
            # computed ahead (the follow-up guessed the stream's last token wrong, or is still at
            # it) it would also wait for and pay a draft step on the critical path: not this time.
            # (Only where rounds stream: the follow-up that computes probe rows runs beside streams,
            # so without them every probe would be skipped and speculation never come back.)
            plan = self.planner.skip(costs, max_drafts + 1, horizon=self.planner.probe_every)
        if not plan.speculate:
            return DraftedBatch([], self.config.scheme, 0.0, plan.plain_steps, plan,
                                predicted_ms=plan.predicted_ms, predicted_tokens=plan.expected_tokens)
        if before_drafting is not None:
            before_drafting()
        cfg = self.config
        d0 = plan.description
        scheme = self._scheme_for(d0.k, d0.ell)
        limit = min(max_drafts, plan.max_drafts)
        ctx = list(context)
        rng = np.random.default_rng([cfg.seed, len(ctx), 0xED6E])  # keyed by position: restart-safe
        rule = StopRule(costs, plan)
        batch = DraftedBatch([], scheme, 0.0, 0, plan)
        spent = 0.0
        while len(batch.drafts) < limit and not (should_stop and should_stop()):
            t_pos = time.perf_counter()
            # KV-cache rollback at the batch's first position: logits() crops the cache to the prefix it
            # shares with ctx (accepted, or a guessed continuation), dropping rejected drafts, then feeds the rest.
            row, kept_row = self._next_row(ctx)
            logits = row.astype(np.float64)  # [V]
            q = target_probs(logits, cfg.temperature, cfg.top_k, cfg.top_p)  # [V]
            c = self._confidence(logits, q)
            d, honest, formula, capped = self._describe_at(q, scheme, cfg.budget_bits - spent, len(ctx))
            cost = self._cost(honest, formula)
            if d is None or spent + cost > cfg.budget_bits:  # stop before the draft that would exceed B
                break
            kept = q[d.support]
            tv = 0.0 if scheme.scheme == Scheme.INVARIANT else tv_distance(kept, d.probs)  # no q_hat to lose
            a = max(0.0, self.acceptance.predict(c) - tv)
            self.loss.seen(q)
            self.acceptance.seen(c)
            if cfg.adaptive and not rule.keep(a, cost):
                if not kept_row:
                    self.costs.draft.add((time.perf_counter() - t_pos) * 1e3)
                if batch.drafts:
                    rule.drafted_only()
                    break
                # Not even the first draft is worth its row (a probe included: on an engine whose
                # second row costs 0.6 of a step, a probe below ~60% acceptance loses time; prose
                # probes were accepted 40-60%): plain decoding for a few tokens, then plan again.
                self.remember(ctx, row)  # the next plan at this context reads it, not a pass
                plain = self.planner.skip(costs, max_drafts + 1, horizon=self.planner.config.skip_tokens)
                return DraftedBatch([], self.config.scheme, (time.perf_counter() - t0) * 1e3, plain.plain_steps,
                                    plain, predicted_ms=plain.predicted_ms, predicted_tokens=plain.expected_tokens)
            spent += cost
            if scheme.scheme != Scheme.INVARIANT:
                d = draw(d, scheme.ell, rng)
            if self.controller:
                self.controller.observe(d.dropped_mass, float(kept.min()) if capped else None)
            batch.drafts.append(d)
            batch.confidences.append(c)
            batch.tv_losses.append(tv)
            batch.accept_probs.append(a)
            batch.runners_up.append(_runner_up(logits, d.token))
            rule.add(a, cost)
            ctx.append(d.token)
            if not kept_row:  # the draft time a plan charges is a row's pass, not a kept row's lookup
                self.costs.draft.add((time.perf_counter() - t_pos) * 1e3)
            if d.token in self.eos or (cfg.adaptive and not rule.more()):
                break
        batch.bits = batch_bits(scheme, (d.support.size for d in batch.drafts))
        batch.draft_ms = (time.perf_counter() - t0) * 1e3
        batch.predicted_ms, batch.predicted_tokens = rule.total_ms(), rule.e
        return batch

    def _next_row(self, ctx: list[int]) -> tuple[np.ndarray, bool]:
        """The draft's logits [V] after `ctx`, and whether they were kept (computed ahead for
        exactly this context: warm, step_past, prepare, hedge) rather than a pass of the draft."""
        row = self._rows.get(tuple(ctx))
        if row is not None:
            return row, True
        return self.lm.logits(ctx, want=1)[0], False

    def step_past(self, context: Sequence[int]) -> None:
        """Draft the cloud's next token (the same draw as guess_bonus) and the draft's row after it,
        kept for the next draft() if that is where it starts. Run while a streamed plain round's
        last token is still being computed by the cloud: when the guess is right, the next round's
        first draft needs no pass of its own (one 0.5B step, ~68 ms, off the critical path)."""
        ctx = list(context)
        ctx.append(self.guess_bonus(ctx, self.config.scheme))
        self.prepare(ctx)

    def lookahead(self, context: Sequence[int], n: int,
                  each: Callable[[list[Draft], SchemeConfig], None] | None = None,
                  stop: Callable[[], bool] | None = None) -> tuple[list[Draft], SchemeConfig]:
        """Up to n drafts continuing `context` for a lookahead batch (DraftBatch.lookahead), sent while
        the cloud streams plain tokens: the first ones are guesses of the tokens it samples meanwhile
        (it verifies only the drafts past the tokens it has, and only when the guesses before them
        hold), the rest the drafts its next step verifies. Each is described with the session's
        description and drawn on the key a round's first draft at its position draws on; the rows
        are kept for a round that starts there. Not a round: the acceptance, loss and threshold
        models learn nothing from it. Stops at an EOS draft, before the budget B is exceeded, and
        before a draft past the first whose chance of acceptance (with those before it) is below
        LOOKAHEAD_MIN_ACCEPT.
        each(drafts so far, scheme): called after every draft from the second on, so that a lookahead
        goes out as soon as it can ride a step (a first draft alone only guesses the token being sampled).
        stop(): checked before each draft row that is not kept (newer tokens came: drafting from them
        draws the same drafts where the guesses held, from the rows kept here)."""
        cfg, scheme = self.config, self.config.scheme
        ctx, drafts, spent, chance = [int(t) for t in context], [], 0.0, 1.0
        for _ in range(n):
            if stop is not None and tuple(ctx) not in self._rows and stop():
                break
            row, kept = self._next_row(ctx)
            if not kept:
                self.remember(ctx, row)
            logits = row.astype(np.float64)
            q = target_probs(logits, cfg.temperature, cfg.top_k, cfg.top_p)
            if drafts:  # the first draft only guesses the token being sampled: no row of its own
                chance *= self.acceptance.predict(self._confidence(logits, q))
                if chance < LOOKAHEAD_MIN_ACCEPT:
                    break
            d, honest, formula, _ = self._describe_at(q, scheme, cfg.budget_bits - spent, len(ctx))
            cost = self._cost(honest, formula)
            if d is None or spent + cost > cfg.budget_bits:
                break
            spent += cost
            if scheme.scheme != Scheme.INVARIANT:
                d = draw(d, scheme.ell, np.random.default_rng([cfg.seed, len(ctx), 0xED6E]))
            drafts.append(d)
            ctx.append(d.token)
            if each is not None and len(drafts) >= 2:
                each(list(drafts), scheme)
            if d.token in self.eos:
                break
        return drafts, scheme

    def guess_bonus(self, context: Sequence[int], scheme: SchemeConfig) -> int:
        """The edge's guess of the token the cloud will sample after a fully accepted batch ending
        at `context`: the cloud draws it by Gumbel-max on the noise of that position (common/gumbel.py),
        so the guess is the same draw on the draft's q (right whenever q's and p's draws agree). The
        guess only decides whether a batch drafted ahead is adopted, never what is committed."""
        cfg = self.config
        logits = self._next_row(list(context))[0].astype(np.float64)
        return gumbel_token(target_probs(logits, cfg.temperature, cfg.top_k, cfg.top_p), cfg.seed, len(context))

    def _confidence(self, logits: np.ndarray, q: np.ndarray) -> float:
        """The acceptance model's feature of a draft row: q's confidence (at T = 0, of the T = 1 q)."""
        cfg = self.config
        return confidence(q if cfg.temperature > 0 else target_probs(logits, 1.0, cfg.top_k, cfg.top_p))

    def _describe_at(self, q: np.ndarray, scheme: SchemeConfig, left_bits: float,
                     position: int) -> tuple[Draft | None, float, float, bool]:
        """_describe, or for the invariant scheme the token alone, drawn on the shared noise of
        `position` (no description to draw from later)."""
        if scheme.scheme == Scheme.INVARIANT:
            return draw_invariant(q, self.config.seed, position), *draft_bits(scheme, 1), False
        return self._describe(q, scheme, left_bits)

    def _describe(self, q: np.ndarray, scheme: SchemeConfig, left_bits: float) -> tuple[Draft | None, float, float, bool]:
        """The description of q, its (honest, formula) bits, and whether the budget capped it:
        C-SQS sends the largest most-probable prefix of its threshold set that fits what is left of
        the budget (common/conformal.py: the capped mass is dropped mass, beta is projected)."""
        beta = self.controller.beta if self.controller else None
        d = describe(q, scheme, beta=beta)
        honest, formula = draft_bits(scheme, int(d.support.size))
        if self.controller is None or self._cost(honest, formula) <= left_bits:
            return d, honest, formula, False
        # Largest prefix (by probability) whose bits fit; bits grow with k up to V/2 (the subset
        # term C(V, k) peaks there), so the search stays below it.
        lo, hi = 0, min(int(d.support.size) - 1, scheme.vocab_size // 2)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._cost(*draft_bits(scheme, mid)) <= left_bits:
                lo = mid
            else:
                hi = mid - 1
        if lo < 1:
            return None, 0.0, 0.0, False
        d = describe(q, scheme, beta=beta, max_support=lo)
        honest, formula = draft_bits(scheme, int(d.support.size))
        return d, honest, formula, True

    def learn(self, batch: DraftedBatch, record: RoundRecord, *, carry: bool) -> None:
        """Learn from the verdict on `batch`, as `record` (common/stats.py) has it: roll the
        conformal threshold back to the surviving positions, teach the acceptance model the outcome
        and the cost model the round's measured times and bytes.

        carry: the batch drafted ahead during this one's flight is adopted as the next batch (its
        threshold updates stay). The record's beta is the caller's to set, from self.beta after this.
        """
        if record.drafted != len(batch.drafts):
            raise ValueError(f"record of {record.drafted} drafts for a batch of {len(batch.drafts)}")
        if self.controller:
            self.controller.settle(record.accepted, len(batch.drafts), carry=carry)
        if batch.drafts:
            self.acceptance.observe(batch.confidences, batch.tv_losses, record.accepted)
        self.planner.observe(record.accepted + 1 + record.plain, record.total_ms, speculative=record.drafted > 0)
        self.costs.observe_round(
            rows=record.drafted + 1, plain_steps=record.plain, forward_ms=record.forward_ms, cloud_ms=record.verify_ms,
            round_trip_ms=record.uplink_ms + record.verify_ms + record.downlink_ms,
            uplink_bytes=record.uplink_wire_bytes or record.message_bytes, payload_bytes=record.payload_bytes,
        )

    @property
    def drafts(self) -> bool:
        """Whether this drafter ever drafts (scheme none is plain decoding through the same session)."""
        return self.config.scheme.scheme != Scheme.NONE

    @property
    def beta(self) -> float | None:
        return self.controller.beta if self.controller else None


def _runner_up(logits: np.ndarray, token: int) -> int:
    """The likeliest token of `logits` [V] other than `token`."""
    top = np.argpartition(logits, -2)[-2:]
    top = top[np.argsort(logits[top])[::-1]]
    return int(top[1] if int(top[0]) == token else top[0])
