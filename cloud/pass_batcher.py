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

then takes the queue's items up to `max_rows` rows (always the leader's first), fairly by key, runs
`run(items)` (ONE forward pass for all of them) outside the lock, hands every item its own result
and wakes the next leader. Consequences, by design:

  - A lone session never waits: with one session attached, its item is the whole expected pass.
  - A round waits for others at most `window_s` after its own arrival (plus the passes ahead of
    it): an item that queued while a longer pass ran is past its window when it leads, so it goes
    at once with whatever queued behind that pass (continuous batching). A slow session (an edge
    still drafting, a large batch still decoding) is simply not in the queue; it holds nobody
    beyond the window.
  - window_s == 0 never waits (items that queued during a running pass still share the next one).

Streaming lanes. A session that streams plain steps submits one item per step, each right after the
last one's result (`with batcher.lane(session_id):` around its steps, `submit(lane=session_id)`).
Such an item is not late, it is a few ms of sampling behind the pass that just ended; without lanes
the next leader (queued during that pass, its window long past) goes without it, the lane's item
leads the pass after, and the sessions split into two groups that alternate, each pass half full
(measured: N = 8 edges on torch bf16, passes of ~2.5 sessions while ~4.5 waited in the cloud). So a
leader also waits for every open lane that is not queued yet, at most `comeback` of the last pass's
duration after it ended (window_s at least): a stopped or ended lane closes (`lane` exits), so the
wait normally ends when the last streaming session is back.

Rejoining sessions. The same holds, a step further out, for every session a pass served: its edge
gets the verdict, reads it and sends its next round (drafted during the flight when the guess held,
else after a few draft steps). On llama.cpp a pass costs about 0.6 of a step more for each doubling
of its rows, so passes that the sessions' rounds ride together cost far less a token than the
half-full ones they split into (measured, N = 8 edges, llama Q4_K_M cloud, 2 drafts a round: 2.9
sessions and 70 cloud CPU ms a token without this; 5.6 sessions and 47 ms with `rejoin` 1.0). So a
leader also waits for the sessions of the last pass (`submit(source=session id)`) that have not
queued again, at most `rejoin` of the last pass's duration after it ended, and, given the engine's
pass cost by rows (`cost`), no longer than merging their rows into this pass saves: cost(R) +
cost(k) - cost(R + k) for R rows queued and k on their way (a wait past that idles the engine for
more than the pass it spares; on llama.cpp's table here ~120 ms for 3 + 1 rows, while a flat torch
table waits up to the bound). It waits at all only if, once the window is past (the sessions that
come straight back have queued), fewer rows are queued than are on their way: with half the pass
there, the late rows ride the next pass with those coming back from this one, and waiting only
delays everyone (N = 16, T = 1: 9% of tokens/s for no CPU saved). A session whose last return took
longer than `rejoin` of a pass is not waited for until it returns within that again (a slow or
stalled edge holds at most one pass), and `leave(source)` (its stream ended, it closed) ends any
wait for it.

`run` returns one outcome per item, a result or an exception instance (that item's own failure);
if `run` raises, every item of the pass gets that exception.

Fair by key: each item has a key (the identity whose session sent it: `submit(key=...)`, or the
FAIR_KEY context variable of the submitting thread, which the servicer sets with `served_as`). When
the queue holds more rows than a pass takes, the pass takes items round-robin over the keys (in the
order of each key's oldest item, the leader's key first), each key's own items in arrival order, so
an identity with many sessions queued cannot fill every pass while another waits. A key whose next
item does not fit gives up its later turns in this pass (its order is kept). With one key this is
plain arrival order.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterator, Sequence

FAIR_KEY: contextvars.ContextVar[Hashable] = contextvars.ContextVar("sqs_fair_key", default=None)


def served_as(key: Hashable, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs) with FAIR_KEY = key in this thread (a worker thread of the rounds)."""
    token = FAIR_KEY.set(key)
    try:
        return fn(*args, **kwargs)
    finally:
        FAIR_KEY.reset(token)


@dataclass
class _Ticket:
    item: Any
    rows: int
    arrived: float
    key: Hashable = None  # whose item: the pass takes keys round-robin
    lane: Hashable = None  # the streaming lane it came from (None: not streaming)
    source: Hashable = None  # the session it came from (None: not said), for the rejoin wait
    gather: bool = True  # a pass it leads waits for more items (window, lanes); False: goes at once
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
                 expected: Callable[[], int] = lambda: 1, clock: Callable[[], float] = time.monotonic,
                 comeback: float = 0.2, rejoin: float = 0.0, cost: Callable[[int], float] | None = None) -> None:
        """cost(rows): ms of one pass of that many rows (the rejoin wait's second bound), or None."""
        if window_s < 0 or max_rows < 1 or comeback < 0 or rejoin < 0:
            raise ValueError("window_s, comeback and rejoin must be >= 0 and max_rows >= 1")
        self._run = run
        self.window_s = window_s
        self.max_rows = max_rows
        self._expected = expected
        self._clock = clock
        self._cv = threading.Condition()
        self._queue: deque[_Ticket] = deque()
        self._busy = False  # a pass is running
        self._stats = PassStats()
        self.comeback = comeback  # a leader waits for open lanes at most this share of the last pass
        self._lanes: dict[Hashable, int] = {}  # open streaming lanes -> how many times opened
        self._last_end = 0.0  # clock() when the last pass ended
        self._last_s = 0.0  # and how long it ran
        self.rejoin = rejoin  # a leader waits for the last pass's sessions at most this share of it
        self._served: dict[Hashable, float] = {}  # source -> clock() when a pass last served it
        self._returning: dict[Hashable, int] = {}  # sources of the last pass waited for -> their rows
        self._cost = cost
        self._slow: set[Hashable] = set()  # sources whose last return came after the rejoin wait

    @contextlib.contextmanager
    def lane(self, lane: Hashable) -> Iterator[None]:
        """While open, `lane`'s next item is expected right after each result (a streaming loop)."""
        with self._cv:
            self._lanes[lane] = self._lanes.get(lane, 0) + 1
        try:
            yield
        finally:
            with self._cv:
                left = self._lanes.pop(lane) - 1
                if left:
                    self._lanes[lane] = left
                self._cv.notify_all()  # a leader may be waiting for this lane

    def leave(self, source: Hashable) -> None:
        """`source` sends no more items soon (its stream ended, it closed): no leader waits for it."""
        with self._cv:
            self._served.pop(source, None)
            self._slow.discard(source)
            if self._returning.pop(source, None) is not None:
                self._cv.notify_all()

    def submit(self, item: Any, rows: int, key: Hashable = None, lane: Hashable = None, gather: bool = True,
               source: Hashable = None) -> Any:
        """Block until `item` has been run in some pass; its result, or raise its error. `key`
        (default: this thread's FAIR_KEY) is whose item it is, for the round-robin; `lane` the open
        streaming lane it comes from, if any. gather=False: a pass this item leads takes what is
        queued and goes, waiting for nobody (a prefill: the sessions attached are not waiting on
        it, and its session's first token is). `source`: the session it comes from (the rejoin wait)."""
        ticket = _Ticket(item, max(1, rows), self._clock(), FAIR_KEY.get() if key is None else key, lane, source,
                         gather)
        with self._cv:
            if source is not None and source in self._served:
                late = ticket.arrived - self._served.pop(source) > self.rejoin * self._last_s
                (self._slow.add if late else self._slow.discard)(source)
            self._queue.append(ticket)
            self._cv.notify_all()  # a waiting leader may now have its full pass
            while not ticket.done:
                if not self._busy and self._queue[0] is ticket:
                    shared = self._lead_locked(ticket)
                    break
                self._cv.wait()
            else:
                return self._outcome(ticket)
        started = self._clock()
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
            end = self._clock()
            self._last_s, self._last_end = max(0.0, end - started), end
            self._rejoined_locked(shared, end)
            self._busy = False
            self._cv.notify_all()
        return self._outcome(ticket)

    def _lead_locked(self, leader: _Ticket) -> list[_Ticket]:
        """Wait (bounded by the window) for more items, then take the pass's items off the queue."""
        self._busy = True
        deadline = leader.arrived + self.window_s
        lanes_by = self._last_end + max(self.window_s, self.comeback * self._last_s)
        # Whether to wait for the rejoining sessions is decided once the window is past, when the
        # sessions that come straight back have queued (the first one back leads alone).
        decide_at = max(self._last_end, leader.arrived) + self.window_s
        rejoins: bool | None = None
        while leader.gather:
            queued_rows = sum(t.rows for t in self._queue)
            now = self._clock()
            if queued_rows >= self.max_rows:
                break
            coming = now < lanes_by and not self._lanes.keys() <= {t.lane for t in self._queue}
            if rejoins is None and now >= decide_at:
                rejoins = self._rejoin_by_locked(queued_rows, deciding=True) > now
            rejoin_by = self._rejoin_by_locked(queued_rows) if rejoins is not False else float("-inf")
            if rejoins is None:
                rejoin_by = min(rejoin_by, decide_at)
            rejoining = now < rejoin_by
            ready = len(self._queue) >= max(1, self._expected()) or now >= deadline
            if ready and not coming and not rejoining:
                break
            wake = min(([lanes_by] if coming else []) + ([rejoin_by] if rejoining else [])
                       + ([] if ready else [deadline]))
            self._cv.wait(max(0.0, wake - now))
        shared = _round_robin(list(self._queue), self.max_rows)
        taken = {id(t) for t in shared}
        self._queue = deque(t for t in self._queue if id(t) not in taken)
        return shared

    def _rejoin_by_locked(self, queued_rows: int, deciding: bool = False) -> float:
        """Until when a leader waits for the last pass's sessions that have not queued again
        (-inf: for none). deciding: whether to wait at all, once the window is past."""
        queued = {t.source for t in self._queue}
        coming = sum(rows for source, rows in self._returning.items() if source not in queued)
        coming = min(coming, self.max_rows - queued_rows)  # what can still join this pass
        if coming <= 0 or (deciding and queued_rows >= coming):
            # At least half the pass is here when it could go: the late rows ride the next pass with
            # those that come back from this one, which is then as full (measured at N = 16, T = 1,
            # passes of ~13 sessions: waiting cost 9% of tokens/s and saved no CPU). Waiting pays
            # when this pass would be the thin half of a split.
            return float("-inf")
        wait = self.rejoin * self._last_s
        if self._cost is not None:
            saved_ms = self._cost(queued_rows) + self._cost(coming) - self._cost(queued_rows + coming)
            wait = min(wait, max(0.0, saved_ms) / 1e3)
        return self._last_end + wait

    def _rejoined_locked(self, shared: list[_Ticket], end: float) -> None:
        """After a pass: its sessions are expected back (the slow ones aside); sessions served long
        ago and never heard from again (reaped without a leave) are forgotten."""
        if not self.rejoin:
            return
        rows: dict[Hashable, int] = {}
        for t in shared:
            if t.source is not None:
                rows[t.source] = rows.get(t.source, 0) + t.rows
        for source in rows:
            self._served[source] = end
        self._returning = {source: n for source, n in rows.items() if source not in self._slow}
        sources = rows
        if len(self._served) > 4 * len(sources) + 64:
            horizon = end - 60.0
            for source in [s for s, at in self._served.items() if at < horizon]:
                del self._served[source]
                self._slow.discard(source)

    @staticmethod
    def _outcome(ticket: _Ticket) -> Any:
        if ticket.error is not None:
            raise ticket.error
        return ticket.result

    def stats(self) -> PassStats:
        with self._cv:
            s = self._stats
            return PassStats(s.passes, s.items, s.rows, s.max_items, dict(s.by_items))


def _round_robin(queue: list[_Ticket], max_rows: int) -> list[_Ticket]:
    """The items of one pass from the queue (oldest first; queue[0] leads and always goes): keys
    round-robin in the order of their oldest item, each key's items in order, up to max_rows rows."""
    by_key: dict[Hashable, deque[_Ticket]] = {}
    for t in queue:
        by_key.setdefault(t.key, deque()).append(t)
    shared = [by_key[queue[0].key].popleft()]
    rows = shared[0].rows
    turns = deque(k for k in by_key if k != queue[0].key)
    turns.append(queue[0].key)  # the leader's key has had its first turn
    while turns:
        key = turns.popleft()
        items = by_key[key]
        if items and rows + items[0].rows <= max_rows:
            rows += items[0].rows
            shared.append(items.popleft())
            turns.append(key)
    return shared
