"""Forward passes shared across sessions: the queue and the window, no model and no math.

("Batch" in this project is the edge's batch of drafts, one DraftBatch message; what is gathered
here is a *pass*: the rounds of several sessions scored by ONE forward pass of the target.)

Worker threads, one per session round in flight, call `PassBatcher.submit(item, rows)` and block
until the item's result is there. One pass runs at a time. The thread whose item is first in the
queue when no pass is running leads the next pass: it waits for more items until

  - the queue holds `max_rows` rows, or
  - the queue holds an item from every session that may send one soon (`expected()`: the verifier
    counts the sessions with a Verify stream attached), or
  - `window_s` has passed since the leader's item arrived,

then takes the queue's items in arrival order up to `max_rows` rows (always at least one), runs
`run(items)` (ONE forward pass for all of them) outside the lock, hands every item its own result
and wakes the next leader. Consequences, by design:

  - A lone session never waits: with one session attached, its item is the whole expected pass.
  - A round waits for others at most `window_s` after its own arrival (plus the passes ahead of
    it): an item that queued while a longer pass ran is past its window when it leads, so it goes
    at once with whatever queued behind that pass (continuous batching). A slow session (an edge
    still drafting, a large batch still decoding) is simply not in the queue; it holds nobody
    beyond the window.
  - window_s == 0 never waits (items that queued during a running pass still share the next one).

`run` returns one outcome per item, a result or an exception instance (that item's own failure);
if `run` raises, every item of the pass gets that exception.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence


@dataclass
class _Ticket:
    item: Any
    rows: int
    arrived: float
    done: bool = False
    result: Any = None
    error: BaseException | None = None


@dataclass
class PassStats:
    """Counters since start (pure numbers; the loadtest reads them from an in-process cloud)."""

    passes: int = 0  # run() calls
    items: int = 0  # items served by them
    rows: int = 0
    max_items: int = 0  # the most items one pass served
    by_items: dict[int, int] = field(default_factory=dict)  # items in a pass -> passes

    def mean_items(self) -> float:
        return self.items / self.passes if self.passes else 0.0


class PassBatcher:
    def __init__(self, run: Callable[[list[Any]], Sequence[Any]], window_s: float, max_rows: int,
                 expected: Callable[[], int] = lambda: 1, clock: Callable[[], float] = time.monotonic) -> None:
        if window_s < 0 or max_rows < 1:
            raise ValueError("window_s must be >= 0 and max_rows >= 1")
        self._run = run
        self.window_s = window_s
        self.max_rows = max_rows
        self._expected = expected
        self._clock = clock
        self._cv = threading.Condition()
        self._queue: deque[_Ticket] = deque()
        self._busy = False  # a pass is running
        self._stats = PassStats()

    def submit(self, item: Any, rows: int) -> Any:
        """Block until `item` has been run in some pass; its result, or raise its error."""
        ticket = _Ticket(item, max(1, rows), self._clock())
        with self._cv:
            self._queue.append(ticket)
            self._cv.notify_all()  # a waiting leader may now have its full pass
            while not ticket.done:
                if not self._busy and self._queue[0] is ticket:
                    shared = self._lead_locked(ticket)
                    break
                self._cv.wait()
            else:
                return self._outcome(ticket)
        try:
            outcomes = list(self._run([t.item for t in shared]))
            if len(outcomes) != len(shared):
                raise RuntimeError(f"pass run returned {len(outcomes)} outcomes for {len(shared)} items")
        except BaseException as exc:  # noqa: BLE001 - every item of the pass gets it
            outcomes = [exc] * len(shared)
        with self._cv:
            for t, out in zip(shared, outcomes):
                if isinstance(out, BaseException):
                    t.error = out
                else:
                    t.result = out
                t.done = True
            s = self._stats
            s.passes += 1
            s.items += len(shared)
            s.rows += sum(t.rows for t in shared)
            s.max_items = max(s.max_items, len(shared))
            s.by_items[len(shared)] = s.by_items.get(len(shared), 0) + 1
            self._busy = False
            self._cv.notify_all()
        return self._outcome(ticket)

    def _lead_locked(self, leader: _Ticket) -> list[_Ticket]:
        """Wait (bounded by the window) for more items, then take the pass's items off the queue."""
        self._busy = True
        deadline = leader.arrived + self.window_s
        while True:
            queued_rows = sum(t.rows for t in self._queue)
            left = deadline - self._clock()
            if queued_rows >= self.max_rows or len(self._queue) >= max(1, self._expected()) or left <= 0:
                break
            self._cv.wait(left)
        shared = [self._queue.popleft()]
        rows = shared[0].rows
        while self._queue and rows + self._queue[0].rows <= self.max_rows:
            rows += self._queue[0].rows
            shared.append(self._queue.popleft())
        return shared

    @staticmethod
    def _outcome(ticket: _Ticket) -> Any:
        if ticket.error is not None:
            raise ticket.error
        return ticket.result

    def stats(self) -> PassStats:
        with self._cv:
            s = self._stats
            return PassStats(s.passes, s.items, s.rows, s.max_items, dict(s.by_items))
