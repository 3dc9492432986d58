"""How likely a draft is to be accepted: learned online from verdicts, less the quantization loss.

For a draft q described by q_hat, the cloud accepts with probability sum_x min(p, q_hat) (docs/DESIGN.md
section 5), and sum_x min(p, q_hat) >= sum_x min(p, q) - TV(q, q_hat). So acceptance splits in two:
`AcceptanceModel` learns the acceptance of q itself from the draft's confidence, and `QuantLoss`
prices what a description (support size K, lattice resolution ell) loses by TV(q, q_hat), which
the edge computes exactly from its own q (`tv_distance`, the one TV formula: the drafter measures
each sent draft with it, the planner each candidate description).

Pure: numpy only; edge-side information only (the draft's distributions and past verdicts).
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

import numpy as np

from common import lattice

TOP = 64  # probabilities kept per recent position for the quantization-loss estimate


def confidence(q: np.ndarray) -> float:
    """The acceptance feature of one drafted position: the largest draft probability."""
    return float(np.max(q))


def tv_distance(kept: np.ndarray, q_hat: np.ndarray) -> float:
    """TV(q, q_hat) for a q_hat that lives on a support: kept = q on that support, q_hat = its
    description there (same order). Mass of q outside the support counts whole (q_hat is 0 there);
    it is clamped at 0 because kept's float sum can round a hair above 1."""
    return 0.5 * (float(np.abs(kept - q_hat).sum()) + max(0.0, 1.0 - float(kept.sum())))


# -- acceptance of q ---------------------------------------------------------------------------
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
    """TV(q, q_hat) for a top-k support quantized at ell; `top` = q's largest probabilities, sorted."""
    kept = top[: max(1, k)]
    if float(kept.sum()) <= 0:
        return 1.0
    return tv_distance(kept, lattice.quantize(kept, ell) / ell)


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
        """Mean TV loss of a top-k description at ell. Float values: half the dropped mass (an
        underestimate: renormalising the kept values makes the TV the whole dropped mass, which is
        what the drafter measures for a sent draft)."""
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


class NoQuantLoss(QuantLoss):
    """The loss of a scheme that sends no distribution (invariant: the token alone, verified by
    agreement of Gumbel-max draws): nothing is quantized, so nothing is lost; what agreement costs
    against 1 - TV the acceptance model learns from the outcomes."""

    def mean(self, k: int, ell: int, lattice: bool = True) -> float:
        return 0.0
