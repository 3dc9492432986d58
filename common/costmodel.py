"""Measured costs of a round, estimated online (pure: numpy only, no clocks read here).

Every figure comes from measurements handed in by the caller; nothing is a hand-set constant:

  PassTimes      the target's forward pass by rows scored (the cloud keeps one process-wide,
                 the edge one per session, seeded from the cloud's table at open)
  LinkEstimate   uplink RTT and ms per byte from (uplink wire bytes, network time) pairs, where
                 network time = round trip seen by the edge - time the cloud held the batch, so
                 clocks need not be synchronised
  Smoothed       a robust running value (median of a window) for the draft time per position
                 and the cloud's per-round overhead outside the forward pass
  row_price      the cloud's price of one more row in its passes at its current load (it quotes
                 it in every verdict; the edge's plan charges each draft's row at that price)
  CostModel      all of them for one session, fed by each round's measurements; its output,
                 `Costs`, is what the plan (common/planner.py) and the stop rule read

Units: milliseconds and bytes throughout.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Costs:
    """The measured costs (ms, bytes) of a round that the plan weighs; made by CostModel.costs()."""

    draft_ms: float  # edge: one drafted position (SLM step, sparsify, quantize, sample)
    fixed_ms: float  # per round: RTT + uplink framing + cloud time outside the forward pass
    ms_per_byte: float  # uplink
    pass_ms: Callable[[int], float]  # target forward scoring r rows (rows past the first at the cloud's price)


class Smoothed:
    """Median of the last `window` samples; `default` until the first sample."""

    def __init__(self, window: int = 16, default: float = 0.0) -> None:
        self._samples: deque[float] = deque(maxlen=window)
        self.default = default
        self._value: float | None = None  # the median, kept until the next sample (read per plan)

    def __bool__(self) -> bool:
        return bool(self._samples)

    def add(self, value: float) -> None:
        if np.isfinite(value):
            self._samples.append(float(value))
            self._value = None

    @property
    def value(self) -> float:
        if not self._samples:
            return self.default
        if self._value is None:
            self._value = float(np.median(self._samples))
        return self._value


class PassTimes:
    """Cost of one forward pass scoring `rows` positions (ms): median per measured row count,
    piecewise-linear in between, extrapolated along the last measured segment. By default more rows
    are never cheaper (a noisy table must not invite wider rounds); ``monotone=False`` gives the
    medians as measured, for a caller that exploits real dips: repacked llama.cpp scores rows in
    fours and every leftover row alone, so 4 rows measured cheaper than 3 and 16 than 13
    (common/pass_shape.py, docs/RESULTS.md section 0i)."""

    def __init__(self, window: int = 9) -> None:
        self._by_rows: dict[int, deque[float]] = {}
        self._window = window
        # (table, xs, ys) until the next measurement: the planner predicts hundreds of times per
        # draft, and recomputing the medians each time cost ~25 ms per draft.
        self._fit: tuple[dict[int, float], np.ndarray, np.ndarray, np.ndarray] | None = None

    def add(self, rows: int, ms: float) -> None:
        if rows >= 1 and np.isfinite(ms) and ms >= 0:
            self._by_rows.setdefault(int(rows), deque(maxlen=self._window)).append(float(ms))
            self._fit = None

    def seed(self, rows: list[int], ms: list[float]) -> None:
        for r, m in zip(rows, ms):
            self.add(int(r), float(m))

    def _fitted(self) -> tuple[dict[int, float], np.ndarray, np.ndarray, np.ndarray]:
        if self._fit is None:
            t = {r: float(np.median(v)) for r, v in sorted(self._by_rows.items()) if v}
            xs = np.array(list(t.keys()), dtype=np.float64)
            raw = np.array(list(t.values()), dtype=np.float64)
            self._fit = (t, xs, np.maximum.accumulate(raw), raw)  # monotone: more rows never cheaper
        return self._fit

    def table(self) -> dict[int, float]:
        return dict(self._fitted()[0])

    def __bool__(self) -> bool:
        return bool(self._by_rows)

    def predict(self, rows: int, monotone: bool = True) -> float:
        t, xs, mono, raw = self._fitted()
        ys = mono if monotone else raw
        if not t:
            return 0.0
        if rows <= xs[-1]:
            return float(np.interp(rows, xs, ys))
        if xs.size == 1:
            return float(ys[0] * rows / xs[0])  # one point: proportional is the cautious guess
        slope = max(0.0, (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]))
        return float(ys[-1] + slope * (rows - xs[-1]))


def row_price(pass_ms: Callable[[int], float], rows: float, sessions: float) -> float:
    """The price (ms) of one more row in a pass that carries `rows` rows of `sessions` sessions:
    what a row adds to the pass near R rows, paid by every session the pass serves (each waits for
    it). An idle cloud (one session, a flat table) quotes the row's own marginal time; a saturated
    one (full passes, many sessions) a multiple of it.

    What a row adds is the secant of the table from R/2 to 2R + 1 rows, not pass_ms(R + 1) -
    pass_ms(R): the table's entries are medians of passes run beside other work (prefills, the
    edges' sampling), and the difference of two neighbours was noise that quoted up to ~600 ms a
    row for an engine whose calibrated extra row costs ~3 ms (torch bf16 on AMX, 8 edges)."""
    r = max(1, int(round(rows)))
    lo, hi = max(1, r // 2), 2 * r + 1
    return max(0.0, (pass_ms(hi) - pass_ms(lo)) / (hi - lo)) * max(1.0, sessions)


@dataclass(frozen=True)
class Link:
    rtt_ms: float  # fixed network time of a round (both directions, downlink verdict included)
    ms_per_byte: float  # uplink serialisation time per wire byte


class LinkEstimate:
    """Fits network_ms = rtt + ms_per_byte * uplink_bytes over a window of rounds.

    Least squares when the window spans enough sizes; otherwise the slope keeps its last value
    (rounds of one size say nothing about it) and the intercept is the median residual.
    """

    def __init__(self, window: int = 32) -> None:
        self._pts: deque[tuple[float, float]] = deque(maxlen=window)
        self._slope = 0.0
        self._link: Link | None = None  # the fit, kept until the next round's point

    def add(self, uplink_bytes: float, network_ms: float) -> None:
        if np.isfinite(network_ms) and uplink_bytes >= 0:
            self._pts.append((float(uplink_bytes), max(0.0, float(network_ms))))
            self._link = None

    def estimate(self) -> Link:
        if self._link is None:
            self._link = self._estimate()
        return self._link

    def _estimate(self) -> Link:
        pts = list(self._pts)
        if not pts:
            return Link(0.0, 0.0)
        x = np.array([p[0] for p in pts])
        y = np.array([p[1] for p in pts])
        spread = x.max() - x.min()
        if x.size >= 3 and spread >= 64:  # sizes differ enough to see the rate
            xm, ym = x.mean(), y.mean()
            var = float(((x - xm) ** 2).sum())
            slope = float(((x - xm) * (y - ym)).sum() / var) if var > 0 else self._slope
            self._slope = max(0.0, slope)
        rtt = float(np.median(y - self._slope * x))
        return Link(max(0.0, rtt), self._slope)


class CostModel:
    """The edge's per-session view of every cost a round has, fed by measurements of real rounds.

    Seeded at open with the cloud's forward times by rows and with one timed draft step; refined by
    every verdict (cloud forward and overhead times) and every drafted position.
    """

    def __init__(self) -> None:
        self.draft = Smoothed(window=32)  # ms per drafted position
        self.passes = PassTimes()  # target forward ms by rows
        self.cloud_overhead = Smoothed(default=0.0)  # cloud round time outside its forward passes
        self.framing = Smoothed(default=0.0)  # uplink wire bytes per round beyond the payload
        self.link = LinkEstimate()
        self.row_price = Smoothed(window=4)  # the cloud's quoted price of a row (ms; recent verdicts)

    def observe_round(self, *, rows: int, plain_steps: int, forward_ms: float, cloud_ms: float,
                      round_trip_ms: float, uplink_bytes: int, payload_bytes: int) -> None:
        """One verdict: rows = drafts + 1; plain_steps extra one-row passes ran after it."""
        if plain_steps:
            # L = 0 rounds: all passes are steps, and the cloud's time around them (sampling, sending
            # each streamed token) is paid per step too, not once per round: a 32-step stream would
            # otherwise teach a ~100 ms round overhead that every speculative round then pays.
            self.passes.add(1, max(forward_ms, cloud_ms) / (1 + plain_steps))
        else:
            self.passes.add(rows, forward_ms)
            self.cloud_overhead.add(max(0.0, cloud_ms - forward_ms))
        self.framing.add(max(0, uplink_bytes - payload_bytes))
        self.link.add(uplink_bytes, round_trip_ms - cloud_ms)

    def costs(self) -> Costs:
        """The costs a plan weighs. Once the cloud quotes a row price, a pass of r rows costs the
        measured one-row pass plus r - 1 rows at that price (the load the cloud sees, not the
        table measured when it was idle)."""
        link = self.link.estimate()
        fixed = link.rtt_ms + link.ms_per_byte * self.framing.value + self.cloud_overhead.value
        pass_ms = self.passes.predict
        if self.row_price:
            price, one = self.row_price.value, pass_ms(1)
            pass_ms = lambda rows: one + (rows - 1) * price  # noqa: E731
        return Costs(self.draft.value, fixed, link.ms_per_byte, pass_ms)
