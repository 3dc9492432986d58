"""cloud.pass_batcher.PassBatcher: the queue and the window alone (no model, no torch)."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest

from cloud.pass_batcher import PassBatcher


class Recorder:
    """run() that records each pass and returns item * 10 (or the item itself if it is an exception)."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.passes: list[list] = []
        self.delay_s = delay_s
        self.lock = threading.Lock()

    def __call__(self, items):
        with self.lock:
            self.passes.append(list(items))
        time.sleep(self.delay_s)
        return [it if isinstance(it, BaseException) else it * 10 for it in items]


def submit_all(b: PassBatcher, items, rows=1) -> tuple[dict, dict]:
    results, errors = {}, {}

    def one(it):
        try:
            results[it] = b.submit(it, rows)
        except Exception as exc:  # noqa: BLE001
            errors[it] = exc

    threads = [threading.Thread(target=one, args=(it,)) for it in items]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return results, errors


def test_a_lone_session_never_waits_for_the_window():
    run = Recorder()
    b = PassBatcher(run, window_s=5.0, max_rows=64, expected=lambda: 1)
    t0 = time.monotonic()
    assert b.submit(3, rows=5) == 30
    assert time.monotonic() - t0 < 1.0
    assert run.passes == [[3]]


def test_the_rounds_of_every_attached_session_share_one_run():
    run = Recorder()
    b = PassBatcher(run, window_s=5.0, max_rows=64, expected=lambda: 4)
    t0 = time.monotonic()
    results, errors = submit_all(b, [1, 2, 3, 4], rows=5)
    assert results == {1: 10, 2: 20, 3: 30, 4: 40} and not errors
    assert len(run.passes) == 1 and sorted(run.passes[0]) == [1, 2, 3, 4]
    assert time.monotonic() - t0 < 2.0  # the 4th arrival ended the wait, not the 5 s window
    s = b.stats()
    assert (s.passes, s.items, s.rows, s.max_items, s.by_items) == (1, 4, 20, 4, {4: 1})


def test_a_missing_session_holds_the_others_no_longer_than_the_window():
    run = Recorder()
    b = PassBatcher(run, window_s=0.2, max_rows=64, expected=lambda: 3)  # the 3rd session never sends
    t0 = time.monotonic()
    results, _ = submit_all(b, [1, 2])
    waited = time.monotonic() - t0
    assert results == {1: 10, 2: 20}
    assert 0.15 <= waited < 1.5, waited
    assert sorted(map(sorted, run.passes)) == [[1, 2]]


def test_max_rows_splits_a_pass_in_arrival_order():
    run = Recorder()
    b = PassBatcher(run, window_s=0.3, max_rows=10, expected=lambda: 3)
    results, _ = submit_all(b, [1, 2, 3], rows=4)  # 12 rows > 10: two passes of 2 and 1
    assert results == {1: 10, 2: 20, 3: 30}
    assert sorted(len(x) for x in run.passes) == [1, 2]


def test_items_that_queue_during_a_running_pass_go_together_without_a_new_window():
    run = Recorder(delay_s=0.3)
    b = PassBatcher(run, window_s=5.0, max_rows=64, expected=lambda: 1)
    first = threading.Thread(target=b.submit, args=(0, 1))
    first.start()
    time.sleep(0.1)  # the first pass is running
    t0 = time.monotonic()
    results, _ = submit_all(b, [1, 2, 3])
    assert results == {1: 10, 2: 20, 3: 30}
    first.join()
    assert run.passes[0] == [0] and sorted(run.passes[1]) == [1, 2, 3]
    assert time.monotonic() - t0 < 2.0  # they waited for the running pass, not for a 5 s window


def test_an_item_failure_stays_with_its_item_and_a_run_failure_reaches_every_item():
    run = Recorder()
    b = PassBatcher(run, window_s=5.0, max_rows=64, expected=lambda: 3)
    bad = ValueError("bad row")
    results, errors = submit_all(b, [1, bad, 3])
    assert results == {1: 10, 3: 30} and errors == {bad: bad}

    def broken(items):
        raise RuntimeError("the pass failed")

    b2 = PassBatcher(broken, window_s=5.0, max_rows=64, expected=lambda: 2)
    results, errors = submit_all(b2, [1, 2])
    assert not results and set(errors) == {1, 2} and all(isinstance(e, RuntimeError) for e in errors.values())
    # the batcher still serves after a failure
    b3 = PassBatcher(run, window_s=0.0, max_rows=64)
    assert b3.submit(7, 1) == 70


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        PassBatcher(Recorder(), window_s=-1, max_rows=4)
    with pytest.raises(ValueError):
        PassBatcher(Recorder(), window_s=0.01, max_rows=0)
    with pytest.raises(ValueError):
        PassBatcher(Recorder(), window_s=0.01, max_rows=4, comeback=-0.1)


def stream_lanes(b: PassBatcher, lanes: dict[str, tuple[int, float]], use_lanes: bool) -> None:
    """Each lane submits `steps` one-row items, each `sample_s` after the last one's result (the
    sampling between two streamed steps), inside `b.lane(name)` when use_lanes."""

    def one(name: str, steps: int, sample_s: float) -> None:
        with b.lane(name) if use_lanes else contextlib.nullcontext():
            for i in range(steps):
                b.submit(f"{name}{i}", 1, lane=name if use_lanes else None)
                time.sleep(sample_s)

    threads = [threading.Thread(target=one, args=(n, *spec)) for n, spec in lanes.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)


class Names(Recorder):
    def __call__(self, items):
        with self.lock:
            self.passes.append(list(items))
        time.sleep(self.delay_s)
        return list(items)


def test_streaming_lanes_share_every_pass_instead_of_alternating():
    """Four sessions stream steps; one samples at once, three take 20 ms. Without lanes the quick
    one leads alone once its 2 ms window is out, the others queue behind that pass, and the two
    groups alternate (half-full passes). With lanes the leader waits for the lanes still sampling."""
    lanes = {"a": (6, 0.0), "b": (6, 0.02), "c": (6, 0.02), "d": (6, 0.02)}
    split = Names(delay_s=0.1)
    stream_lanes(PassBatcher(split, window_s=0.002, max_rows=64, expected=lambda: 4, comeback=1.0), lanes, False)
    assert min(len(p) for p in split.passes) < 4  # the control: the groups split
    shared = Names(delay_s=0.1)
    stream_lanes(PassBatcher(shared, window_s=0.002, max_rows=64, expected=lambda: 4, comeback=1.0), lanes, True)
    assert [len(p) for p in shared.passes] == [4] * 6


def test_a_lane_that_ends_holds_no_later_pass():
    """A lane that closes after two steps is not waited for: the three that go on run at the pace
    of their passes, not one comeback wait (here a whole pass) later each time."""
    run = Names(delay_s=0.15)
    b = PassBatcher(run, window_s=0.002, max_rows=64, expected=lambda: 4, comeback=1.0)
    t0 = time.monotonic()
    stream_lanes(b, {"x": (2, 0.0), "a": (8, 0.0), "b": (8, 0.0), "c": (8, 0.0)}, True)
    wall = time.monotonic() - t0
    assert [len(p) for p in run.passes] == [4, 4] + [3] * 6
    assert wall < 8 * 0.15 + 0.5  # waiting for x after it left would add ~0.15 s to each of 6 passes


def test_an_item_that_does_not_gather_leads_a_pass_at_once_with_what_is_queued():
    """A prefill (gather=False) never waits for the window or the attached sessions: alone it runs
    at once; queued behind a running pass it takes the items queued with it and goes."""
    run = Recorder()
    b = PassBatcher(run, window_s=5.0, max_rows=64, expected=lambda: 4)
    t0 = time.monotonic()
    assert b.submit(7, rows=6, gather=False) == 70
    assert time.monotonic() - t0 < 1.0 and run.passes == [[7]]
    slow = Recorder(delay_s=0.3)
    b = PassBatcher(slow, window_s=5.0, max_rows=64, expected=lambda: 4)  # a gathering leader waits 5 s
    t1 = time.monotonic()
    first = threading.Thread(target=b.submit, args=(1, 1), kwargs={"gather": False})
    first.start()
    time.sleep(0.1)  # 1 runs; 3 (not gathering) then 2 queue behind it
    rest = [threading.Thread(target=b.submit, args=(3, 1), kwargs={"gather": False}),
            threading.Thread(target=b.submit, args=(2, 1))]
    for t in rest:
        t.start()
        time.sleep(0.02)
    for t in [first, *rest]:
        t.join(10)
    assert slow.passes == [[1], [3, 2]] and time.monotonic() - t1 < 2.0


def rounds(b: PassBatcher, sessions: dict[str, tuple], leave_after: bool = True) -> None:
    """Each session (n, turnaround_s[, rows]) submits `n` items of `rows` rows (default 2; source =
    its name), each `turnaround_s` after the last one's result (the edge reading the verdict and
    drafting the next round), then leaves."""

    def one(name: str, n: int, turnaround_s: float, rows: int = 2) -> None:
        for i in range(n):
            b.submit(f"{name}{i}", rows, source=name)
            time.sleep(turnaround_s)
        if leave_after:
            b.leave(name)

    threads = [threading.Thread(target=one, args=(n, *spec)) for n, spec in sessions.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)


def test_rejoining_sessions_share_every_pass_instead_of_splitting():
    """Four sessions send rounds; one turns around at once, three after 30 ms (the window is 2 ms).
    Without the rejoin wait the quick one's round leads a pass of its own and the sessions split
    into passes that are not full; with it the leader waits for the sessions the last pass served."""
    sessions = {"a": (6, 0.0), "b": (6, 0.03), "c": (6, 0.03), "d": (6, 0.03)}
    split = Names(delay_s=0.1)
    rounds(PassBatcher(split, window_s=0.002, max_rows=64, expected=lambda: 4, rejoin=0.0), sessions)
    assert min(len(p) for p in split.passes) < 4  # the control: the passes split
    shared = Names(delay_s=0.1)
    rounds(PassBatcher(shared, window_s=0.002, max_rows=64, expected=lambda: 4, rejoin=1.0), sessions)
    # (the first pass may go before all four threads have started: a 2 ms window)
    assert sum(len(p) == 4 for p in shared.passes) >= 5 and len(shared.passes) <= 7


class Timed(Names):
    """Names, plus when each pass started and ended (monotonic s)."""

    def __init__(self, delay_s: float) -> None:
        super().__init__(delay_s)
        self.spans: list[tuple[float, float]] = []

    def __call__(self, items):
        start = time.monotonic()
        out = super().__call__(items)
        self.spans.append((start, time.monotonic()))
        return out

    def idle(self) -> list[float]:
        """Seconds between each pass's end and the next one's start."""
        return [b[0] - a[1] for a, b in zip(self.spans, self.spans[1:])]


def test_a_slow_session_is_not_waited_for_again_until_it_comes_back_in_time():
    """A session that comes back 0.15 s after its result, past the rejoin bound (one 0.1 s pass),
    is waited for once; after that late return it is not waited for (the quick sessions' passes
    follow each other at once) until it returns in time again."""
    run = Timed(delay_s=0.1)
    b = PassBatcher(run, window_s=0.002, max_rows=64, expected=lambda: 4, rejoin=1.0)
    rounds(b, {"slow": (4, 0.15, 8), "a": (14, 0.0), "b": (14, 0.0), "c": (14, 0.0)})
    waits = [gap for gap in run.idle() if gap > 0.05]
    assert len(waits) <= 1, run.idle()  # waiting for it after each of its passes: 3-4 waits of 0.1 s


def test_a_session_that_leaves_is_not_waited_for():
    """leave() (its stream ended) ends the wait at once: the next pass does not wait the rejoin
    bound (here a whole pass) for a session that will not send again."""
    run = Timed(delay_s=0.3)
    b = PassBatcher(run, window_s=0.002, max_rows=64, expected=lambda: 4, rejoin=1.0)
    rounds(b, {"x": (1, 0.0, 8), "a": (4, 0.0), "b": (4, 0.0), "c": (4, 0.0)})
    assert [len(p) for p in run.passes][-3:] == [3] * 3
    assert max(run.idle()) < 0.15, run.idle()  # a wait for x: 0.3 s


def test_the_rejoin_wait_is_bounded_by_what_the_merge_saves():
    """Given the pass cost by rows, a leader waits no longer than merging the coming rows saves:
    on a table where rows add linearly (nothing saved) it does not wait and the passes split as
    without the rejoin wait; on a flat one (a merged pass costs one pass) it waits as before."""
    sessions = {"a": (6, 0.0), "b": (6, 0.03), "c": (6, 0.03), "d": (6, 0.03)}
    linear = Names(delay_s=0.1)
    rounds(PassBatcher(linear, window_s=0.002, max_rows=64, expected=lambda: 4, rejoin=1.0,
                       cost=lambda rows: 50.0 * rows), sessions)
    assert min(len(p) for p in linear.passes) < 4
    flat = Names(delay_s=0.1)
    rounds(PassBatcher(flat, window_s=0.002, max_rows=64, expected=lambda: 4, rejoin=1.0,
                       cost=lambda rows: 100.0), sessions)
    assert sum(len(p) == 4 for p in flat.passes) >= 5 and len(flat.passes) <= 7


def test_no_rejoin_wait_when_half_the_pass_is_there():
    """Three of four sessions come straight back, the fourth (as many rows as one of them) takes
    60 ms: the pass goes without it (it rides the next one with the three coming back), while a
    late session carrying more rows than the three is waited for."""
    small = Timed(delay_s=0.1)
    rounds(PassBatcher(small, window_s=0.002, max_rows=64, expected=lambda: 4, rejoin=1.0),
           {"late": (3, 0.06), "a": (8, 0.0), "b": (8, 0.0), "c": (8, 0.0)})
    assert sum(gap > 0.03 for gap in small.idle()) <= 1, small.idle()
    big = Timed(delay_s=0.1)
    rounds(PassBatcher(big, window_s=0.002, max_rows=64, expected=lambda: 4, rejoin=1.0),
           {"late": (3, 0.06, 8), "a": (8, 0.0), "b": (8, 0.0), "c": (8, 0.0)})
    assert sum(gap > 0.03 for gap in big.idle()) >= 2, big.idle()
