"""cloud/quotas.py (token buckets on a fake clock) and the pass batcher's round-robin by identity."""

from __future__ import annotations

import threading
import time

import pytest

from cloud.pass_batcher import PassBatcher, _round_robin, _Ticket, served_as
from cloud.quotas import QuotaConfig, QuotaExceeded, Quotas


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_rounds_per_second_with_a_retry_hint():
    clock = Clock()
    q = Quotas(QuotaConfig(rounds_per_s=4, burst_s=0.5), clock)  # a bucket of 2 rounds
    q.charge("a", 5)
    q.charge("a", 5)
    with pytest.raises(QuotaExceeded) as e:
        q.charge("a", 5)
    assert e.value.limit == "rounds" and e.value.retry_after_s == pytest.approx(0.25)
    assert "retry after 0.250 s" in e.value.reason
    q.charge("b", 5)  # another identity has its own bucket
    clock.t += 0.25
    q.charge("a", 5)
    with pytest.raises(QuotaExceeded):
        q.charge("a", 5)


def test_rows_bucket_goes_into_debt_for_a_large_round_and_refuses_nothing_partially():
    clock = Clock()
    q = Quotas(QuotaConfig(rounds_per_s=100, rows_per_s=10, burst_s=1.0), clock)  # 10 rows held
    q.charge("a", 33)  # larger than the bucket: passes when it is full, leaves 23 rows of debt
    with pytest.raises(QuotaExceeded) as e:
        q.charge("a", 1)
    assert e.value.limit == "rows" and e.value.retry_after_s == pytest.approx(2.4)
    rounds_before = q._buckets["a"][0].tokens
    with pytest.raises(QuotaExceeded):
        q.charge("a", 1)
    assert q._buckets["a"][0].tokens == rounds_before  # a refused request charges neither bucket
    clock.t += 2.4
    q.charge("a", 1)


def test_long_run_rate_is_the_configured_one():
    clock = Clock()
    q = Quotas(QuotaConfig(rows_per_s=50, burst_s=0.2), clock)
    served = refused = 0
    while clock.t < 110.0 and refused < 10_000:  # 10 s of a client that retries on the hint
        try:
            q.charge("a", 5)
            served += 5
        except QuotaExceeded as e:
            refused += 1
            clock.t += e.retry_after_s
    assert refused < 200  # each hint is enough: one refusal per wait
    assert 500 <= served <= 500 + 10 + 5


def test_a_lookahead_takes_rows_only_while_the_bucket_has_them_and_never_goes_into_debt():
    clock = Clock()
    q = Quotas(QuotaConfig(rounds_per_s=1, rows_per_s=10, burst_s=1.0), clock)  # 10 rows, 1 round held
    assert q.charge_rows("a", 4) and q.charge_rows("a", 6)  # the rows bucket is empty now
    assert not q.charge_rows("a", 1)  # dropped, not refused: nothing charged, no debt
    assert q._buckets["a"][1].tokens == pytest.approx(0.0)
    clock.t += 0.1  # one row refilled
    assert not q.charge_rows("a", 2) and q.charge_rows("a", 1)
    assert q._buckets["a"][0].tokens == 1  # the rounds bucket untouched by lookaheads
    assert Quotas(QuotaConfig(rounds_per_s=1), clock).charge_rows("a", 10**6)  # no rows limit: always


def test_session_quota_and_off_switch():
    q = Quotas(QuotaConfig(max_sessions=2))
    q.check_open("a", 1)
    with pytest.raises(QuotaExceeded) as e:
        q.check_open("a", 2)
    assert e.value.limit == "sessions" and e.value.retry_after_s > 0
    off = Quotas(QuotaConfig())
    assert not off.config.enabled
    for _ in range(1000):
        off.charge("a", 64)
        off.check_open("a", 10**6)
    with pytest.raises(ValueError):
        QuotaConfig(rows_per_s=float("nan"))
    with pytest.raises(ValueError):
        QuotaConfig(burst_s=0)


def _tickets(spec: str) -> list[_Ticket]:
    """'a2 a2 b1': items of key a (2 rows), a, b (1 row), in arrival order."""
    return [_Ticket(i, int(s[1:]), float(i), key=s[0]) for i, s in enumerate(spec.split())]


def test_round_robin_takes_keys_in_turn_each_in_arrival_order():
    take = lambda spec, rows: [t.item for t in _round_robin(_tickets(spec), rows)]  # noqa: E731
    assert take("a1 a1 a1 a1 b1 c1", 4) == [0, 4, 5, 1]  # a leads; b and c get their turns before a's second
    assert take("a1 a1 a1 a1 b1 c1", 64) == [0, 4, 5, 1, 2, 3]
    assert take("a1 a1 a1", 2) == [0, 1]  # one key: arrival order, as before
    assert take("a2 b4 a1 b1", 4) == [0, 2]  # b's next does not fit: b keeps its order, gives up its turns
    assert take("a9", 4) == [0]  # the leader always goes


def test_a_crowded_identity_cannot_fill_every_pass():
    """Six sessions of identity a and one of b queue while a pass runs; the next pass holds 2 items:
    b's round goes in it (arrival order would have served a's four older items first)."""
    passes: list[list[str]] = []
    gate = threading.Event()

    def run(items):
        if not passes:
            gate.wait(5)
        passes.append(list(items))
        return items

    batcher = PassBatcher(run, window_s=0.0, max_rows=2, expected=lambda: 7)
    out: dict[str, str] = {}

    def submit(name: str, key: str) -> None:
        out[name] = served_as(key, batcher.submit, name, 1)

    first = threading.Thread(target=submit, args=("a0", "a"))
    first.start()
    time.sleep(0.2)  # a0's pass is running (run waits on the gate)
    names = [("a1", "a"), ("a2", "a"), ("a3", "a"), ("a4", "a"), ("b0", "b")]
    threads = [threading.Thread(target=submit, args=nk) for nk in names]
    for t in threads:
        t.start()
        time.sleep(0.05)  # arrival order a1..a4, then b0
    gate.set()
    for t in [first, *threads]:
        t.join(10)
    assert out == {n: n for n in ("a0", "a1", "a2", "a3", "a4", "b0")}
    assert passes[0] == ["a0"]
    assert passes[1] == ["a1", "b0"]
