"""Conformal threshold controller for C-SQS (paper eq. 8, Algorithm 1, Theorem 2).

beta_{n+1} = beta_n - eta * (dropped_mass_n - alpha). The edge applies the update at every drafted
position, keeps the threshold each position started from, and after the cloud's reply keeps only the
updates of the positions whose context survives: the accepted drafts and, if one was rejected, the
rejected position (its q and support are the edge's, and the dropped mass does not depend on which
token the cloud resampled). Over the counted positions the updates telescope, which gives
Theorem 2: mean dropped mass <= alpha + (|beta_1| + 1 + eta*alpha) / (eta * T).

Under an uplink budget the edge may not afford the threshold set: it sends the most probable prefix
that fits and counts the mass the cap drops as dropped mass (honest accounting). Counting it pushes
beta down (more dropped mass asks for a lower threshold), and since the budget, not beta, now
decides the support, beta would drift without bound and describe every later position, however
peaked, with the largest support the budget allows. So observe() first projects beta onto the
thresholds the budget could honour (beta >= the smallest kept probability when the cap bound): the
projected online update of conformal prediction. Theorem 2's bound assumes no projection; with the
cap binding, alpha is out of reach, and the reported mean dropped mass says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ConformalController:
    beta: float  # current threshold (the one the next drafted position uses)
    eta: float = 0.001
    alpha: float = 0.0005
    beta_initial: float = field(init=False)
    counted_positions: int = 0  # positions whose update survived (T in Theorem 2)
    counted_dropped_mass: float = 0.0  # sum of their dropped masses
    projections: int = 0  # positions where the budget cap bound and beta was projected up
    _batch_betas: list[float] = field(default_factory=list, repr=False)  # beta before each position
    _batch_dropped: list[float] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.eta < 0:
            raise ValueError("eta must be >= 0")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError("alpha must lie in [0, 1]")
        self.beta_initial = self.beta

    def observe(self, dropped_mass: float, feasible_floor: float | None = None) -> float:
        """Apply the update for one drafted position; returns the new beta.

        feasible_floor: the threshold the budget actually allowed at this position (the smallest
        kept probability when the support was capped); beta is projected up to it first.
        """
        self._batch_betas.append(self.beta)
        self._batch_dropped.append(dropped_mass)
        if feasible_floor is not None and feasible_floor > self.beta:
            self.projections += 1
            self.beta = feasible_floor
        self.beta = self.beta - self.eta * (dropped_mass - self.alpha)
        return self.beta

    def settle(self, accepted: int, drafted: int, carry: bool = False) -> None:
        """End of a batch: keep the updates of the surviving positions, roll the rest back.

        accepted: drafts the cloud accepted (T); drafted: drafts sent (L). With T < L the rejected
        position T+1 also survives; with T = L the bonus position was never drafted by the edge.
        carry: positions observed after the batch (drafted ahead while it was in flight, see
        edge/generate.py) stay pending as the next batch; needs T = L. Without carry they are
        rolled back like any discarded position.
        """
        pending = len(self._batch_betas)
        if not 0 <= accepted <= drafted <= pending or (carry and accepted != drafted):
            raise ValueError(f"settle({accepted}, {drafted}, carry={carry}) does not match {pending} positions")
        if not carry and pending > drafted:  # drafted ahead, not adopted
            self.beta = self._batch_betas[drafted]
            del self._batch_betas[drafted:], self._batch_dropped[drafted:]
        kept = accepted + 1 if accepted < drafted else drafted
        if kept < drafted:
            self.beta = self._batch_betas[kept]
        self.counted_positions += kept
        self.counted_dropped_mass += sum(self._batch_dropped[:kept])
        del self._batch_betas[:drafted], self._batch_dropped[:drafted]

    @property
    def mean_dropped_mass(self) -> float:
        return self.counted_dropped_mass / self.counted_positions if self.counted_positions else 0.0

    def theorem2_bound(self) -> float:
        """alpha + (|beta_1| + 1 + eta*alpha) / (eta*T); inf when eta == 0 or T == 0."""
        if self.eta == 0 or self.counted_positions == 0:
            return float("inf")
        return self.alpha + (abs(self.beta_initial) + 1 + self.eta * self.alpha) / (self.eta * self.counted_positions)
