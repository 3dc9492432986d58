"""The plan of every round, from measured costs (pure: numpy only; the drafter asks, it decides).

Throughput model (the quantize-and-sample paper, arXiv 2507.00605, made online). A round with L
drafts whose acceptance probabilities, each given the earlier ones accepted, are a_1..a_L commits

    E(L) = 1 + sum_{n=1..L} prod_{j<=n} a_j                                   tokens

and takes, with the measured costs of `Costs`,

    T(L) = L * draft_ms + fixed_ms + ms_per_byte * L * bits / 8 + pass_ms(L + 1)   ms

(fixed_ms = RTT + framing bytes on the uplink + the cloud's time outside its forward pass). The
alternative is plain target decoding through the same session: a round of M cloud steps commits M
tokens in fixed_ms + M * pass_ms(1). A plan maximises expected committed tokens per ms.

What the plan chooses, per round: speculate or not (L = 0 with M plain steps), the support size K
(K-SQS) and the lattice resolution ell from a menu, an upper bound on L (the bit budget B and the
draft limit); and during drafting, after each drafted position, whether to keep it and whether to
draft another (`Round.keep` / `Round.more`): a confidence-based stop. Acceptance comes from
`AcceptanceModel` (the draft's confidence, learned online from verdicts) minus the quantization
loss TV(q, q_hat) of the description (`QuantLoss`): sum_x min(p, q_hat) >= sum_x min(p, q) - TV.

Everything here uses edge-side information only (the draft's distributions, past verdicts,
timings), so every committed token is still distributed exactly as the target's.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from common import lattice

K_MENU = (1, 2, 4, 8, 16, 32, 64)
ELL_MENU = (4, 8, 16, 32, 64, 128, 256)
TOP = 64  # probabilities kept per recent position for the quantization-loss estimate


def confidence(q: np.ndarray) -> float:
    """The acceptance feature of one drafted position: the largest draft probability."""
    return float(np.max(q))


# -- acceptance --------------------------------------------------------------------------------
class AcceptanceModel:
    """P(draft accepted | confidence c) for an exactly described q, learned from verdicts.

    Bins over c in [0, 1]; each bin starts from `prior` pseudo-observations at the rate its
    confidence states (a draft that puts mass c on its token is, before any verdict, taken to be
    accepted with probability c: a calibrated draft's own estimate), and verdicts take over.
    Outcomes are corrected by the description's TV loss, so what is learned is the acceptance of
    q itself and the plan can price other descriptions (a(K, ell) = a_q - TV(K, ell)).
    """

    def __init__(self, bins: int = 10, prior: float = 2.0, window: int = 64) -> None:
        edges = np.linspace(0.0, 1.0, bins + 1)
        self._edges = edges[1:-1]
        self._centers = (edges[:-1] + edges[1:]) / 2
        self._hits = np.zeros(bins)
        self._n = np.zeros(bins)
        self._prior = prior
        self._recent: deque[float] = deque(maxlen=window)  # confidences of recent drafted positions
        self.tested = 0  # positions the cloud tested (accepted or rejected)

    def _bin(self, c: float) -> int:
        return int(np.searchsorted(self._edges, c, side="right"))

    @property
    def overall(self) -> float:
        return (self._hits.sum() + 1.0) / (self._n.sum() + 2.0)

    def predict(self, c: float) -> float:
        b = self._bin(c)
        return float((self._hits[b] + self._prior * self._centers[b]) / (self._n[b] + self._prior))

    def typical(self) -> float:
        """Expected acceptance of a future position (mean prediction over recent confidences)."""
        if not self._recent:
            return self.overall
        return float(np.mean([self.predict(c) for c in self._recent]))

    def optimistic(self) -> float:
        """typical() plus one standard error of the overall rate: an upper confidence bound that
        makes a session with few tested drafts try speculation (plain rounds teach nothing about
        acceptance), and shrinks to typical() as verdicts come in."""
        a = self.typical()
        return min(1.0, a + float(np.sqrt(a * (1.0 - a) / (self.tested + 2.0))))

    def seen(self, c: float) -> None:
        """A drafted position's confidence (whether or not the cloud tests it)."""
        self._recent.append(c)

    def observe(self, confidences: Sequence[float], tv_losses: Sequence[float], accepted: int) -> None:
        """A verdict: positions 1..accepted accepted, accepted+1 rejected (if drafted), rest untested."""
        tested = min(len(confidences), accepted + 1)
        for n in range(tested):
            b = self._bin(confidences[n])
            outcome = 1.0 if n < accepted else min(1.0, tv_losses[n])  # a rejection partly blames q_hat
            self._hits[b] += outcome
            self._n[b] += 1.0
        self.tested += tested


# -- quantization loss -------------------------------------------------------------------------
def tv_loss(top: np.ndarray, k: int, ell: int) -> float:
    """TV(q, q_hat) for a top-k support quantized at ell; `top` = q's largest probabilities, sorted.

    q_hat puts counts/ell on the k kept tokens, so TV = (dropped mass + sum |q_s - q_hat_s|) / 2.
    """
    kept = top[: max(1, k)]
    mass = float(kept.sum())
    if mass <= 0:
        return 1.0
    q_hat = lattice.quantize(kept, ell) / ell
    return 0.5 * ((1.0 - mass) + float(np.abs(kept - q_hat).sum()))


class QuantLoss:
    """Mean TV loss of each (k, ell) description over recent drafted positions."""

    def __init__(self, window: int = 16, refresh: int = 4) -> None:
        self._tops: deque[np.ndarray] = deque(maxlen=window)
        self._cache: dict[tuple, float] = {}
        self._refresh = refresh  # recompute the table after this many new positions (it moves slowly)
        self._new = 0

    def seen(self, q: np.ndarray) -> None:
        n = min(TOP, q.size)
        # The n largest values among the nonzero entries, padded with zeros: the same values a
        # partition over all of q gives, without its slow path on ~V equal zeros (T = 0 drafts).
        nz = q[q > 0]
        top = np.partition(nz, nz.size - n)[nz.size - n:] if nz.size > n else nz
        top = np.concatenate([np.sort(top)[::-1].astype(np.float64), np.zeros(n - top.size)])
        self._tops.append(top)
        self._new += 1
        if self._new >= self._refresh or len(self._tops) <= self._refresh:
            self._cache.clear()
            self._new = 0

    def mean(self, k: int, ell: int, lattice: bool = True) -> float:
        """Mean TV loss of a top-k description at ell (float values: the dropped mass alone)."""
        if not self._tops:
            return 0.0
        key = (k, ell, lattice)
        if key not in self._cache:
            self._cache[key] = float(np.mean([
                tv_loss(t, k, ell) if lattice else 0.5 * max(0.0, 1.0 - float(t[:k].sum())) for t in self._tops
            ]))
        return self._cache[key]

    def support_at(self, beta: float) -> float:
        """Mean threshold-support size at beta over recent positions (at least 1)."""
        if not self._tops:
            return 1.0
        return float(np.mean([max(1, int((t >= beta).sum())) for t in self._tops]))

    def threshold_loss(self, beta: float, ell: int) -> float:
        if not self._tops:
            return 0.0
        return float(np.mean([tv_loss(t, max(1, int((t >= beta).sum())), ell) for t in self._tops]))


# -- costs -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Costs:
    """Measured costs (ms, bytes) the plan uses; see common/costmodel.CostModel."""

    draft_ms: float  # edge: one drafted position (SLM step, sparsify, quantize, sample)
    fixed_ms: float  # per round: RTT + uplink framing + cloud time outside the forward pass
    ms_per_byte: float  # uplink
    pass_ms: Callable[[int], float]  # target forward scoring r rows


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


@dataclass
class PlannerConfig:
    max_draft_len: int = 32  # auto: the most drafts one round may carry
    k_menu: tuple[int, ...] = K_MENU  # one entry = fixed K
    ell_menu: tuple[int, ...] = ELL_MENU  # one entry = fixed ell
    max_plain_steps: int = 16  # most cloud-only steps per round (the plan is revisited after them)
    plain_overhead: float = 0.05  # plain rounds: M large enough that fixed_ms <= 5% of the steps' time
    probe_tokens: int = 32  # while plain decoding wins, one probe draft every this many tokens
    lattice: bool = True  # lattice-quantized values (else float values: no quantization loss)


def expected_tokens(acc: Sequence[float]) -> float:
    """E = 1 + sum_n prod_{j<=n} a_j."""
    return 1.0 + float(np.cumprod(np.asarray(acc, dtype=np.float64)).sum()) if len(acc) else 1.0


def best_length(a: float, costs: Costs, bits: float, limit: int, first: int = 0,
                start: tuple[float, float, float] = (1.0, 0.0, 1.0)) -> tuple[int, float, float]:
    """Best total L in [first, limit] with constant acceptance a after `first` drafts already in.

    start = (E, T without the pass, P) after the first drafts. Returns (L, E, T) at the best E/T.
    """
    e, t, p = start
    best = (first, e, t + costs.pass_ms(first + 1))
    per_draft = costs.draft_ms + costs.ms_per_byte * bits / 8.0
    for n in range(first + 1, limit + 1):
        p *= a
        e += p
        t += per_draft
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

    def plan(self, costs: Costs, acc: AcceptanceModel, loss: QuantLoss, budget_bits: float,
             remaining_tokens: int, beta: float | None = None) -> RoundPlan:
        """The round's plan; remaining_tokens bounds drafts (each round commits >= 1 token)."""
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
            n, e, t = best_length(a, costs, desc.bits, cap, start=(1.0, costs.fixed_ms, 1.0))
            if n >= 1 and (best is None or e / t > best.expected_tokens / best.predicted_ms):
                best = RoundPlan(True, desc, cap, 0, e, t, a)
        if best is not None and best.expected_tokens / best.predicted_ms > plain.expected_tokens / plain.predicted_ms:
            self.tokens_since_draft = 0
            return best
        if self.tokens_since_draft >= cfg.probe_tokens:
            desc = best.description if best else min(self._descriptions(loss, beta), key=lambda d: d.bits)
            if desc.bits <= budget_bits:
                self.tokens_since_draft = 0
                a = max(0.0, a_q - desc.loss)
                t = costs.fixed_ms + costs.draft_ms + costs.pass_ms(2)
                return RoundPlan(True, desc, 1, 0, 1.0 + a, t, a, probe=True)
        self.tokens_since_draft += m
        return plain

    def plain(self, costs: Costs, remaining_tokens: int) -> RoundPlan:
        """Plain target decoding: M steps in one round, M large enough that the round's fixed cost
        is a small part of it (and no larger than the tokens still wanted)."""
        cfg = self.config
        step = costs.pass_ms(1)
        m = max(1, math.ceil(costs.fixed_ms / max(cfg.plain_overhead * step, 1e-9)))
        m = max(1, min(m, cfg.max_plain_steps, remaining_tokens))
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


@dataclass
class Round:
    """Running totals of a round being drafted: the confidence-based stop.

    After each drafted position the drafter asks keep(a_n, bits_n) (is the position worth its bits
    and the larger verify pass, its draft time being spent already?) and then more() (does one more
    draft, at the typical acceptance, raise the expected rate?).
    """

    costs: Costs
    plan: RoundPlan
    e: float = 1.0  # expected committed tokens so far
    t: float = 0.0  # ms so far without the pass
    p: float = 1.0  # probability that every draft so far is accepted
    n: int = 0

    def __post_init__(self) -> None:
        self.t = self.costs.fixed_ms

    def total_ms(self) -> float:
        return self.t + self.costs.pass_ms(self.n + 1)

    def keep(self, a: float, bits: float) -> bool:
        c = self.costs
        drafted = self.t + c.draft_ms
        without = self.e / (drafted + c.pass_ms(self.n + 1))
        with_it = (self.e + self.p * a) / (drafted + c.ms_per_byte * bits / 8.0 + c.pass_ms(self.n + 2))
        return with_it > without or self.plan.probe

    def add(self, a: float, bits: float) -> None:
        self.p *= a
        self.e += self.p
        self.t += self.costs.draft_ms + self.costs.ms_per_byte * bits / 8.0
        self.n += 1

    def drafted_only(self) -> None:
        """A drafted position that was not kept: its draft time is spent."""
        self.t += self.costs.draft_ms

    def more(self) -> bool:
        if self.n >= self.plan.max_drafts or self.plan.description is None:
            return False
        d = self.plan.description
        n, _, _ = best_length(self.plan.acceptance, self.costs, d.bits, self.plan.max_drafts, first=self.n,
                              start=(self.e, self.t, self.p))
        return n > self.n
