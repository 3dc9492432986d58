"""The plan of every round, from measured costs (pure: numpy only; the drafter asks, it decides).

Throughput model (the quantize-and-sample paper, arXiv 2507.00605, made online). A round with L
drafts whose acceptance probabilities, each given the earlier ones accepted, are a_1..a_L commits

    E(L) = 1 + sum_{n=1..L} prod_{j<=n} a_j                                   tokens

and takes, with the measured costs of `Costs`,

    T(L) = L * draft_ms + fixed_ms + ms_per_byte * L * bits / 8 + pass_ms(L + 1)   ms

(fixed_ms = RTT + framing bytes on the uplink + the cloud's time outside its forward pass). The
alternative is plain target decoding through the same session: a round of M cloud steps commits M
tokens in fixed_ms + M * pass_ms(1). A plan maximises expected committed tokens per ms.

When plain rounds are streamed (each token reaches the edge as the cloud samples it), a long M costs
the user no latency, so M runs to the next probe (or to the end when drafting is not an option),
and the probes back off (their interval doubles) while plain decoding keeps winning.

What the plan chooses, per round: speculate or not (L = 0 with M plain steps), the support size K
(K-SQS) and the lattice resolution ell from a menu, and an upper bound on L (the bit budget B and
the draft limit); during drafting, common/stoprule.py decides per position against this plan
whether to keep it and whether to draft another. Acceptance comes from common/acceptance.py: the
draft's confidence, learned online from verdicts (`AcceptanceModel`), minus the quantization loss
TV(q, q_hat) of the description (`QuantLoss`): sum_x min(p, q_hat) >= sum_x min(p, q) - TV. The
costs come from common/costmodel.py.

Everything here uses edge-side information only (the draft's distributions, past verdicts,
timings), so every committed token is still distributed exactly as the target's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from common.acceptance import TOP, AcceptanceModel, QuantLoss  # noqa: F401 - TOP: tests/test_lattice_sparsify.py imports it from here
from common.costmodel import Costs

K_MENU = (1, 2, 4, 8, 16, 32, 64)
ELL_MENU = (4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class Description:
    """How this round's drafts are described: support size (top-K) and lattice resolution."""

    k: int
    ell: int
    bits: float  # per draft, as the budget counts them
    loss: float  # mean TV(q, q_hat) of this description


@dataclass(frozen=True)
class RoundPlan:
    speculate: bool
    description: Description | None  # None when not speculating
    max_drafts: int  # upper bound on L (budget, limits, the optimum at the typical acceptance)
    plain_steps: int  # cloud steps after the round's token when not speculating (0 otherwise)
    expected_tokens: float  # at the plan's L and the typical acceptance
    predicted_ms: float
    acceptance: float  # typical acceptance of one draft under this description
    probe: bool = False  # a one-draft round to keep learning acceptance while plain decoding wins
    ready: int = 0  # leading draft rows computed before the round (no draft time on its critical path)


@dataclass
class PlannerConfig:
    max_draft_len: int = 32  # auto: the most drafts one round may carry
    k_menu: tuple[int, ...] = K_MENU  # one entry = fixed K
    ell_menu: tuple[int, ...] = ELL_MENU  # one entry = fixed ell
    max_plain_steps: int = 16  # most cloud-only steps per round (the plan is revisited after them)
    plain_overhead: float = 0.05  # plain rounds: M large enough that fixed_ms <= 5% of the steps' time
    probe_tokens: int = 32  # while plain decoding wins, one probe draft every this many tokens
    stream_probe_tokens: int = 8  # streamed plain rounds: the first probe interval (it doubles while plain wins)
    skip_tokens: int = 4  # streamed plain tokens after a round whose first draft was not worth sending
    realized_decay: float = 0.7  # weight of older speculative rounds in the realized rate (Planner.observe)
    realized_min_rounds: int = 3  # speculative rounds measured before the realized rate may overrule the model
    lattice: bool = True  # lattice-quantized values (else float values: no quantization loss)


def expected_tokens(acc: Sequence[float]) -> float:
    """E = 1 + sum_n prod_{j<=n} a_j."""
    return 1.0 + float(np.cumprod(np.asarray(acc, dtype=np.float64)).sum()) if len(acc) else 1.0


def best_length(a: float, costs: Costs, bits: float, limit: int, first: int = 0,
                start: tuple[float, float, float] = (1.0, 0.0, 1.0), ready: int = 0) -> tuple[int, float, float]:
    """Best total L in [first, limit] with constant acceptance a after `first` drafts already in.

    start = (E, T without the pass, P) after the first drafts. ready: the first `ready` positions'
    draft rows are computed already (Drafter.ready), so they cost no draft time. Returns (L, E, T)
    at the best E/T.
    """
    e, t, p = start
    best = (first, e, t + costs.pass_ms(first + 1))
    wire = costs.ms_per_byte * bits / 8.0
    for n in range(first + 1, limit + 1):
        p *= a
        e += p
        t += wire + (costs.draft_ms if n > ready else 0.0)
        total = t + costs.pass_ms(n + 1)
        if e / total > best[1] / best[2]:
            best = (n, e, total)
    return best


class Planner:
    def __init__(self, config: PlannerConfig, bits_of: Callable[[int, int], float]) -> None:
        """bits_of(k, ell): bits one draft costs as the budget counts them (k = support size)."""
        self.config = config
        self.bits_of = bits_of
        self.tokens_since_draft = 0
        self.streaming = False  # plain rounds come streamed (edge/generate.py says so at open)
        self._probe_every: int | None = None  # streaming: doubles with each probe while plain wins
        self._opening_probe = False
        self._spec_tokens = self._spec_ms = 0.0  # decayed sums over speculative rounds (observe)
        self._spec_rounds = 0
        self._plain_tokens = self._plain_ms = 0.0  # the same over plain rounds

    def observe(self, tokens: int, ms: float, speculative: bool) -> None:
        """A round's outcome as the user saw it: tokens committed in `ms` (drafting that outlasted
        the flight included). Speculative rounds (probes too) feed the realized rate that
        `_losing` holds the model's prediction to; plain rounds the realized plain rate it is
        held against."""
        if not ms > 0:
            return
        d = self.config.realized_decay
        if speculative:
            self._spec_tokens = d * self._spec_tokens + tokens
            self._spec_ms = d * self._spec_ms + ms
            self._spec_rounds += 1
        else:
            self._plain_tokens = d * self._plain_tokens + tokens
            self._plain_ms = d * self._plain_ms + ms

    def _losing(self, plain_rate: float) -> bool:
        """Whether the recent speculative rounds committed fewer tokens per ms than plain decoding
        is predicted to. The model plans long rounds at the acceptance it expects; the stop rule
        then cuts them where the draft's confidence falls, and short rounds on an engine whose
        extra row costs half a step do not pay (measured at T = 1: 1-2 draft rounds at 161 ms a
        token against 158 for plain steps). Measured outcomes overrule the prediction; the probes
        keep measuring, and a probe that does well lets speculation back in.

        Measured against measured: once plain rounds have run, their realized rate stands for
        plain decoding, not the model's. Under load a plain step waits for the shared pass like a
        round does (measured: 8 edges on one cloud core, streamed steps at 2.0-2.3 tokens/s
        against the 3.0 predicted from the idle one-row pass, which held speculation off while
        its rounds realized 1.1-2.6)."""
        if self._spec_rounds < self.config.realized_min_rounds:
            return False
        if self._plain_ms > 0:
            plain_rate = self._plain_tokens / self._plain_ms
        return self._spec_tokens / self._spec_ms < plain_rate

    def snapshot(self) -> tuple[int, int | None, bool]:
        """What plan() changes (the probe schedule): a plan made ahead, for a context the round in
        flight may not lead to, is undone with restore() when its batch is not adopted."""
        return self.tokens_since_draft, self._probe_every, self._opening_probe

    def restore(self, state: tuple[int, int | None, bool]) -> None:
        self.tokens_since_draft, self._probe_every, self._opening_probe = state

    def probe_first(self) -> None:
        """The next round probes if plain decoding looks better: a generation's first round, where
        the acceptance is still the prior's guess and a streamed plain round would hold that guess
        for many tokens (measured: 32 plain tokens before any draft on a prompt whose drafts were
        then 92% accepted)."""
        self.tokens_since_draft = self.probe_every
        self._opening_probe = True  # does not lengthen the plain stretches: no plain round lost to it yet

    @property
    def probe_every(self) -> int:
        """Tokens of plain decoding between probes: short at first when plain rounds stream (a
        streamed round runs to the next probe, so a plain decision holds that long)."""
        if self._probe_every is None:
            return self.config.stream_probe_tokens if self.streaming else self.config.probe_tokens
        return self._probe_every

    def plan(self, costs: Costs, acc: AcceptanceModel, loss: QuantLoss, budget_bits: float,
             remaining_tokens: int, beta: float | None = None, ready: int = 0) -> RoundPlan:
        """The round's plan; remaining_tokens bounds drafts (each round commits >= 1 token).
        ready: how many of the round's first draft rows are computed already (no draft time)."""
        cfg = self.config
        plain = self.plain(costs, remaining_tokens)
        m = plain.plain_steps + 1
        limit = min(cfg.max_draft_len, remaining_tokens - 1)
        if limit < 1:
            return plain
        a_q = acc.optimistic()
        best: RoundPlan | None = None
        for desc in self._descriptions(loss, beta):
            if desc.bits > budget_bits:
                continue
            a = max(0.0, a_q - desc.loss)
            cap = min(limit, int(budget_bits // desc.bits) if desc.bits > 0 else limit)
            if cap < 1:
                continue
            n, e, t = best_length(a, costs, desc.bits, cap, start=(1.0, costs.fixed_ms, 1.0), ready=ready)
            if n >= 1 and (best is None or e / t > best.expected_tokens / best.predicted_ms):
                best = RoundPlan(True, desc, cap, 0, e, t, a, ready=ready)
        plain_rate = plain.expected_tokens / plain.predicted_ms
        if best is not None and best.expected_tokens / best.predicted_ms > plain_rate and not self._losing(plain_rate):
            self.tokens_since_draft = 0
            self._probe_every = None
            self._opening_probe = False
            return best
        if self.tokens_since_draft >= self.probe_every:
            desc = best.description if best else min(self._descriptions(loss, beta), key=lambda d: d.bits)
            if desc.bits <= budget_bits:
                self.tokens_since_draft = 0
                if self.streaming and not self._opening_probe:
                    self._probe_every = 2 * self.probe_every
                self._opening_probe = False
                a = max(0.0, a_q - desc.loss)
                t = costs.fixed_ms + (0.0 if ready else costs.draft_ms) + costs.pass_ms(2)
                return RoundPlan(True, desc, 1, 0, 1.0 + a, t, a, probe=True, ready=ready)
        if self.streaming:  # a streamed round runs to the next probe
            plain = self.plain(costs, remaining_tokens, horizon=self.probe_every - self.tokens_since_draft)
            m = plain.plain_steps + 1
        self.tokens_since_draft += m
        return plain

    def skip(self, costs: Costs, remaining_tokens: int, horizon: int) -> RoundPlan:
        """Plain decoding instead of the round the plan chose (the drafter found its first draft not
        worth its row, or a probe's row not computed ahead): streamed for `horizon` tokens, after
        which the plan may draft again (a probe is due)."""
        plain = self.plain(costs, remaining_tokens, horizon=horizon)
        self.tokens_since_draft = self.probe_every
        return plain

    def plain(self, costs: Costs, remaining_tokens: int, horizon: int | None = None) -> RoundPlan:
        """Plain target decoding: M steps in one round, M large enough that the round's fixed cost
        is a small part of it (and no larger than the tokens still wanted). Streamed, M is every
        token still wanted, or up to `horizon` (the next probe) if that is longer than the above."""
        cfg = self.config
        step = costs.pass_ms(1)
        m = max(1, math.ceil(costs.fixed_ms / max(cfg.plain_overhead * step, 1e-9)))
        if self.streaming:
            m = max(m, horizon if horizon is not None else remaining_tokens)
        else:
            m = min(m, cfg.max_plain_steps)
        m = max(1, min(m, remaining_tokens))
        return RoundPlan(False, None, 0, m - 1, float(m), costs.fixed_ms + m * step, 0.0)

    def _descriptions(self, loss: QuantLoss, beta: float | None) -> list[Description]:
        out = []
        for ell in self.config.ell_menu:
            if beta is not None:  # C-SQS: the support is the threshold set; its mean size prices it
                k = max(1, round(loss.support_at(beta)))
                out.append(Description(k, ell, self.bits_of(k, ell), loss.threshold_loss(beta, ell)))
                continue
            for k in self.config.k_menu:
                if k == 1 and ell != self.config.ell_menu[0]:
                    continue  # one token: ell changes nothing
                out.append(Description(k, ell, self.bits_of(k, ell), loss.mean(k, ell, self.config.lattice)))
        return out
