"""cloud/sessions.py with identities: a session is its opener's; eviction and the session quota per
identity (no rounds, no torch: the NullLM table of tests/test_cloud_sessions.py)."""

from __future__ import annotations

import functools

import pytest

from cloud.quotas import QuotaConfig, QuotaExceeded, Quotas
from cloud.sessions import Refusal, SessionError
from tests.test_cloud_sessions import open_req, table


def test_only_the_opener_may_use_close_or_reopen_a_session():
    t = table()
    a = t.open(open_req(), owner="edge-a")
    assert a.owner == "edge-a"
    for use in (lambda: t.get(a.id, owner="edge-b"), lambda: t.attach(a.id, owner="edge-b"),
                lambda: t.close(a.id, owner="edge-b"),
                lambda: t.open(open_req(client_session_id=a.id), owner="edge-b")):  # take-over by re-open
        with pytest.raises(SessionError) as e:
            use()
        assert e.value.code == Refusal.NOT_OWNER and "another identity" in e.value.reason
    assert a.streams == 0 and not a.orphan and t.active == 1  # untouched by the refusals
    assert t.get(a.id, owner="edge-a") is a and t.attach(a.id, owner="edge-a") is a
    assert t.open(open_req(client_session_id=a.id), owner="edge-a") is a  # its own identical re-open
    assert t.close(a.id, owner="edge-a") and t.active == 0
    assert not t.close(a.id, owner="edge-b")  # unknown now: nothing to refuse


def test_a_full_table_evicts_from_the_identity_holding_the_most():
    t = table(max_sessions=4)
    b = t.open(open_req(seed=0), owner="edge-b")  # the least recently used of all
    a = [t.open(open_req(seed=i), owner="edge-a") for i in range(1, 4)]
    t.open(open_req(seed=9), owner="edge-c")
    assert t.get(b.id, owner="edge-b") is b  # plain LRU would have evicted b
    with pytest.raises(SessionError):
        t.get(a[0].id)  # edge-a held 3 of 4: its least recently used went
    assert t.owned("edge-a") == 2 and t.owned("edge-b") == 1 and t.owned("edge-c") == 1


def test_the_session_quota_counts_the_openers_sessions_only():
    t = table(max_sessions=16)
    quotas = Quotas(QuotaConfig(max_sessions=2))
    admit = lambda who: functools.partial(quotas.check_open, who)  # noqa: E731
    first = t.open(open_req(seed=0), owner="edge-a", admit=admit("edge-a"))
    t.open(open_req(seed=1), owner="edge-a", admit=admit("edge-a"))
    with pytest.raises(QuotaExceeded) as e:
        t.open(open_req(seed=2), owner="edge-a", admit=admit("edge-a"))
    assert e.value.limit == "sessions" and t.owned("edge-a") == 2
    assert t.open(open_req(client_session_id=first.id), owner="edge-a", admit=admit("edge-a")) is first  # a re-open
    t.open(open_req(seed=3), owner="edge-b", admit=admit("edge-b"))  # another identity is not held back
    t.close(first.id, owner="edge-a")
    t.open(open_req(seed=4), owner="edge-a", admit=admit("edge-a"))
