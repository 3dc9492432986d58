"""When to stop drafting a round: running totals of the round so far, weighed against its plan.

The plan (common/planner.py) fixes the description and an upper bound on L before the round; the
draft's confidence is only known position by position. So after each drafted position the
drafter asks keep(a_n, bits_n): is the position worth its bits and the larger verify pass (its
draft time is spent already)? and then more(): does one more draft, at the plan's typical
acceptance, raise the expected tokens per ms? Pure arithmetic on the measured `Costs`.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.costmodel import Costs
from common.planner import RoundPlan, best_length


@dataclass
class StopRule:
    """The tally of one round being drafted: expected tokens, time and all-accepted probability."""

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

    def _draft_ms(self) -> float:
        """Draft time of the position being drafted: none for a row computed before the round."""
        return 0.0 if self.n < self.plan.ready else self.costs.draft_ms

    def keep(self, a: float, bits: float) -> bool:
        """Whether the position just drafted is worth its bits and the larger pass. A probe keeps
        its later positions whatever they are worth, but not a first one that is not."""
        c = self.costs
        drafted = self.t + self._draft_ms()
        without = self.e / (drafted + c.pass_ms(self.n + 1))
        with_it = (self.e + self.p * a) / (drafted + c.ms_per_byte * bits / 8.0 + c.pass_ms(self.n + 2))
        return with_it > without or (self.plan.probe and self.n > 0)

    def add(self, a: float, bits: float) -> None:
        self.p *= a
        self.e += self.p
        self.t += self._draft_ms() + self.costs.ms_per_byte * bits / 8.0
        self.n += 1

    def drafted_only(self) -> None:
        """A drafted position that was not kept: its draft time is spent."""
        self.t += self._draft_ms()

    def more(self) -> bool:
        if self.n >= self.plan.max_drafts or self.plan.description is None:
            return False
        d = self.plan.description
        n, _, _ = best_length(self.plan.acceptance, self.costs, d.bits, self.plan.max_drafts, first=self.n,
                              start=(self.e, self.t, self.p), ready=self.plan.ready)
        return n > self.n
