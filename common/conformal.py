"""Conformal threshold controller for C-SQS (paper eq. 8, Algorithm 1, Theorem 2).

beta_{n+1} = beta_n - eta * (dropped_mass_n - alpha). The edge applies the update at every drafted
position, keeps the threshold each position started from, and after the cloud's reply keeps only the
updates of the positions whose context survives: the accepted drafts and, if one was rejected, the
rejected position (its q and support are the edge's, and the dropped mass does not depend on which
token the cloud resampled). Over the counted positions the updates telescope, which gives
Theorem 2: mean dropped mass <= alpha + (|beta_1| + 1 + eta*alpha) / (eta * T).
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
    _batch_betas: list[float] = field(default_factory=list, repr=False)  # beta before each position
    _batch_dropped: list[float] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.eta < 0:
            raise ValueError("eta must be >= 0")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError("alpha must lie in [0, 1]")
        self.beta_initial = self.beta

    def observe(self, dropped_mass: float) -> float:
        """Apply the update for one drafted position; returns the new beta."""
        self._batch_betas.append(self.beta)
        self._batch_dropped.append(dropped_mass)
        self.beta = self.beta - self.eta * (dropped_mass - self.alpha)
        return self.beta

    def settle(self, accepted: int, drafted: int) -> None:
        """End of a batch: keep the updates of the surviving positions, roll the rest back.

        accepted: drafts the cloud accepted (T); drafted: drafts sent (L). With T < L the rejected
        position T+1 also survives; with T = L the bonus position was never drafted by the edge.
        """
        if not 0 <= accepted <= drafted or drafted != len(self._batch_betas):
            raise ValueError(f"settle({accepted}, {drafted}) does not match {len(self._batch_betas)} positions")
        kept = accepted + 1 if accepted < drafted else drafted
        if kept < drafted:
            self.beta = self._batch_betas[kept]
        self.counted_positions += kept
        self.counted_dropped_mass += sum(self._batch_dropped[:kept])
        self._batch_betas.clear()
        self._batch_dropped.clear()

    @property
    def mean_dropped_mass(self) -> float:
        return self.counted_dropped_mass / self.counted_positions if self.counted_positions else 0.0

    def theorem2_bound(self) -> float:
        """alpha + (|beta_1| + 1 + eta*alpha) / (eta*T); inf when eta == 0 or T == 0."""
        if self.eta == 0 or self.counted_positions == 0:
            return float("inf")
        return self.alpha + (abs(self.beta_initial) + 1 + self.eta * self.alpha) / (self.eta * self.counted_positions)
