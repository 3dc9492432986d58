"""Per-identity limits, so one client cannot starve the others: open sessions, rounds per second,
rows per second (cloud/auth.py says who the identity is).

  - sessions: an OpenSession by an identity that holds max_sessions already is refused (its
    re-opens of a session it holds are not new sessions). The session table counts them
    (SessionTable.owned), so expiry, eviction and close need no bookkeeping here.
  - rounds and rows: one token bucket each per identity, refilled at the rate, holding burst_s
    seconds of it. A verification request costs 1 round and its rows (drafts + 1 + plain steps:
    what it adds to the target's passes). A request costing more than a bucket holds passes when
    the bucket is full and leaves it in debt, so any request can go and the long-run rate holds.
    Both buckets are charged together or not at all. A lookahead batch (drafts that ride a
    streamed round already charged) costs its drafts from the rows bucket only, and only when the
    bucket has them now; otherwise the cloud drops it (charge_rows), as it drops a late one.

A refusal is QuotaExceeded: which limit, and when a retry may pass (retry_after_s). The servicer
answers RESOURCE_EXHAUSTED with the hint in the details and as `retry-after` trailing metadata
(seconds, decimal). 0 turns a limit off. Pure: no gRPC; the clock is injected for tests.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class QuotaConfig:
    max_sessions: int = 0  # open sessions per identity (0 = no limit)
    rounds_per_s: float = 0.0  # verification requests per second per identity (0 = no limit)
    rows_per_s: float = 0.0  # rows (drafts + 1 + plain steps) per second per identity (0 = no limit)
    burst_s: float = 1.0  # a bucket holds this many seconds of its rate (at least one round / one row)

    def __post_init__(self) -> None:
        for name in ("rounds_per_s", "rows_per_s", "burst_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.max_sessions < 0:
            raise ValueError("max_sessions must be >= 0")
        if self.burst_s <= 0:
            raise ValueError("burst_s must be > 0")

    @property
    def enabled(self) -> bool:
        return bool(self.max_sessions or self.rounds_per_s or self.rows_per_s)


class QuotaExceeded(Exception):
    def __init__(self, limit: str, retry_after_s: float, reason: str) -> None:
        super().__init__(reason)
        self.limit = limit  # "sessions" | "rounds" | "rows"
        self.retry_after_s = retry_after_s
        self.reason = reason


class TokenBucket:
    """`rate` tokens per second, at most `capacity` held; starts full."""

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.t = now

    def refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self.t) * self.rate)
        self.t = max(self.t, now)

    def wait(self, cost: float) -> float:
        """Seconds until `cost` may be taken (0: now). A cost above capacity needs a full bucket."""
        need = min(cost, self.capacity)
        if self.tokens >= need - 1e-9:  # a client that waited the hint passes, whatever the float rounding
            return 0.0
        return (need - self.tokens) / self.rate

    def take(self, cost: float) -> None:
        self.tokens -= cost  # may go below 0: the debt of a request larger than the bucket


SESSION_RETRY_S = 1.0  # the hint for the session quota: a session of its own must end first


class Quotas:
    """The buckets of every identity seen (bounded by the identities the cloud admits: token names
    or certificate CNs of its own CA)."""

    def __init__(self, config: QuotaConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[TokenBucket | None, TokenBucket | None]] = {}

    def check_open(self, identity: str, held: int) -> None:
        """Before an OpenSession that would add a session: `held` sessions are `identity`'s now."""
        limit = self.config.max_sessions
        if limit and held >= limit:
            raise QuotaExceeded("sessions", SESSION_RETRY_S,
                                f"session quota: {identity} holds {held} of its {limit} sessions; close one "
                                f"(retry after {SESSION_RETRY_S:g} s)")

    def charge(self, identity: str, rows: int) -> None:
        """One verification request of `rows` rows by `identity`, or QuotaExceeded (nothing charged)."""
        c = self.config
        if not (c.rounds_per_s or c.rows_per_s):
            return
        now = self._clock()
        with self._lock:
            rounds, rowb = self._buckets.get(identity) or self._new(identity, now)
            waits = []
            for name, bucket, cost in (("rounds", rounds, 1), ("rows", rowb, rows)):
                if bucket is not None:
                    bucket.refill(now)
                    waits.append((bucket.wait(cost), name))
            wait, name = max(waits)
            if wait > 0:
                rate = c.rounds_per_s if name == "rounds" else c.rows_per_s
                raise QuotaExceeded(name, wait, f"{name} quota: {identity} may use {rate:g} {name}/s; "
                                                f"retry after {wait:.3f} s")
            for bucket, cost in ((rounds, 1), (rowb, rows)):
                if bucket is not None:
                    bucket.take(cost)

    def charge_rows(self, identity: str, rows: int) -> bool:
        """Optional work of `rows` rows by `identity` (a lookahead batch, which rides a round already
        charged: the rounds bucket is not touched). True when the rows bucket has them now (taken);
        False when it would wait (nothing charged): the caller drops the work instead of refusing."""
        if not self.config.rows_per_s:
            return True
        now = self._clock()
        with self._lock:
            rowb = (self._buckets.get(identity) or self._new(identity, now))[1]
            rowb.refill(now)
            if rowb.wait(rows) > 0:
                return False
            rowb.take(rows)
            return True

    def _new(self, identity: str, now: float) -> tuple[TokenBucket | None, TokenBucket | None]:
        c = self.config

        def bucket(rate: float) -> TokenBucket | None:
            return TokenBucket(rate, max(1.0, rate * c.burst_s), now) if rate else None

        pair = (bucket(c.rounds_per_s), bucket(c.rows_per_s))
        self._buckets[identity] = pair
        return pair
