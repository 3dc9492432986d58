"""Sessions that survive (issue 12): idempotent rounds, re-open rules, chunked prefill, reaping,
one stream one session, a lost verdict, a paused cloud, a cloud killed -9 and restarted.

Every disturbed generation must end with exactly the token_ids of an undisturbed run with the same
seed at T = 1: the cloud keys its draws by (seed, position), the edge its drafts likewise.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from dataclasses import replace

import grpc
import numpy as np
import pytest

from cloud.server import CloudConfig, create_server
from cloud.verifier import SessionError, TargetInfo, Verifier, VerifierConfig
from common import codec
from common.pb.v1 import sqs_pb2 as pb
from common.pb.v1 import sqs_pb2_grpc
from common.rejection import target_probs
from common.schemes import SchemeConfig, describe, draw
from edge.client import ClientConfig, CloudClient, CloudError
from tests.survive_tools import (
    FAST_RETRY, Cloud, HookedVerifier, Relay, free_port, open_request, run_generation, start_cloud_process,
    target, wait_serving, wait_until,
)

# --- the verifier with a fake model -------------------------------------------------------------

V = 6
_rng = np.random.default_rng(7)
TABLE = _rng.normal(0, 1.5, size=(V, V))  # next-token logits given the previous token


class TableLM:
    """Logits depend on the previous token only; records (len(context), want) of every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def logits(self, context, want):
        self.calls.append((len(context), want))
        return np.stack([TABLE[t] for t in context[len(context) - want:]]).astype(np.float32)


def fake_verifier(clock=time.monotonic, **config) -> Verifier:
    return Verifier(TargetInfo("table", V, "fp", ()), TableLM, VerifierConfig(**config), clock=clock)


def open_msg(context=(0,), seed=0, ell=20, client_session_id="") -> codec.OpenRequest:
    cfg = SchemeConfig("topk", V, k=3, ell=ell)
    return codec.OpenRequest(list(context), codec.Sampling(1.0, 0, 1.0, seed), cfg, "fp", 4, client_session_id)


def batch(session, n: int, seed: int, ell: int = 20) -> tuple[codec.Batch, list]:
    cfg = SchemeConfig("topk", V, k=3, ell=ell)
    rng = np.random.default_rng(seed)
    ctx = list(session.context)
    drafts = []
    for _ in range(n):
        d = draw(describe(target_probs(TABLE[ctx[-1]] + 1.0, 1.0), cfg), cfg.ell, rng)
        drafts.append(d)
        ctx.append(d.token)
    return codec.pack_batch(len(session.context), drafts, cfg), drafts


def test_a_resent_batch_gets_the_same_verdict_and_a_different_one_is_refused():
    v = fake_verifier()
    s = v.open(open_msg(seed=3))
    msg, _ = batch(s, 3, seed=1)
    first = v.verify(s, msg)
    calls, context = len(s.lm.calls), list(s.context)
    again = replace(msg)  # the same batch, sent again
    replay = v.verify(s, again)
    assert replay.replayed and not first.replayed
    assert (replay.accepted, replay.token, replay.position) == (first.accepted, first.token, first.position)
    assert len(s.lm.calls) == calls and s.context == context  # no model work, nothing appended
    nxt, _ = batch(s, 2, seed=2)
    assert v.verify(s, nxt).position > first.position  # the session goes on

    s2 = v.open(open_msg(seed=4))
    one, _ = batch(s2, 3, seed=1)
    v.verify(s2, one)
    other, _ = batch(s2, 3, seed=9)
    other = replace(other, position=one.position)
    with pytest.raises(SessionError) as e:
        v.verify(s2, other)
    assert e.value.code == "INVALID_ARGUMENT" and "already verified with a different batch" in e.value.reason


def test_a_batch_packed_with_another_ell_decodes_to_the_q_hat_it_was_packed_with():
    """The mismatched-ell hole: ell travels in every batch, so the cloud verifies against the q_hat
    the edge sampled from whatever the session's ell."""
    session_cfg = SchemeConfig("topk", V, k=3, ell=100)
    q = target_probs(TABLE[0], 1.0)
    for ell in (7, 100, 1000):
        cfg = SchemeConfig("topk", V, k=3, ell=ell)
        drafts = [draw(describe(q, cfg), ell, np.random.default_rng(i)) for i in range(3)]
        msg, _ = codec.encode_batch("s", 1, drafts, cfg)
        got = codec.decode_batch(msg, session_cfg, 8)
        for sent, decoded in zip(drafts, got):
            assert decoded.token == sent.token
            np.testing.assert_array_equal(decoded.support, sent.support)
            np.testing.assert_array_equal(decoded.probs, sent.probs)  # bit-exact q_hat = counts / ell
            np.testing.assert_array_equal(decoded.probs * ell, sent.counts)
    v = fake_verifier()
    s = v.open(open_msg(ell=100))
    msg, _ = batch(s, 2, seed=0, ell=7)  # the session says 100, this batch was packed with 7
    assert v.verify(s, msg).drafted == 2


def test_reopen_can_bring_back_a_lost_session_but_never_take_over_a_live_one():
    v = fake_verifier()
    a, b = v.open(open_msg()), v.open(open_msg())
    assert a.id != b.id and len(a.id) == 32  # ids issued by the cloud, 128 random bits
    lost = "ab" * 16
    back = v.open(open_msg(context=(0, 1, 2), client_session_id=lost))  # e.g. after a restart
    assert back.id == lost and back.context == [0, 1, 2]
    assert v.open(open_msg(context=(0, 1, 2), client_session_id=lost)) is back  # an open retried: same session
    for msg in (open_msg(context=(0, 5), client_session_id=lost), open_msg(seed=5, client_session_id=a.id)):
        with pytest.raises(SessionError) as e:
            v.open(msg)
        assert e.value.code == "ALREADY_EXISTS"
    assert v.get(a.id).context == [0]
    with pytest.raises(SessionError) as e:
        v.open(open_msg(client_session_id="my-session"))
    assert e.value.code == "INVALID_ARGUMENT"
    assert v.close(a.id) and not v.close(a.id)


def test_a_context_with_no_room_for_a_round_is_refused_at_open():
    v = fake_verifier(max_context=10)
    with pytest.raises(SessionError) as e:
        v.open(open_msg(context=[0] * 9))
    assert e.value.code == "INVALID_ARGUMENT" and "no room for a round" in e.value.reason
    s = v.open(open_msg(context=[0] * 8))
    msg, _ = batch(s, 1, seed=0)
    assert v.verify(s, msg).position in (9, 10)


def test_the_first_prefill_runs_in_chunks_then_a_round_feeds_only_its_drafts():
    v = fake_verifier(prefill_chunk=4)
    s = v.open(open_msg(context=[i % V for i in range(11)]))
    steps = 1
    while not v.prefill_step(s):
        steps += 1
    assert steps == 3 and s.lm.calls == [(4, 1), (8, 1), (11, 1)]  # the whole context
    assert v.prefill_step(s)  # done: nothing more
    msg, _ = batch(s, 2, seed=0)
    v.verify(s, msg)
    # The prefill's last row is the round's first: the pass scores the 2 drafts only.
    assert s.lm.calls[3] == (13, 2)


def test_the_first_round_takes_the_prefills_row_and_gives_the_verdicts_of_a_round_that_computes_it():
    ctx = [i % V for i in range(9)]
    for drafts, steps in ((0, 3), (2, 0), (3, 2)):
        for seed in range(6):
            prefilled, cold = fake_verifier(), fake_verifier()
            a, b = prefilled.open(open_msg(context=ctx, seed=seed)), cold.open(open_msg(context=ctx, seed=seed))
            while not prefilled.prefill_step(a):
                pass
            fed = len(a.lm.calls)
            msg, _ = batch(a, drafts, seed=seed)
            msg = replace(msg, plain_steps=steps)
            got, want = prefilled.verify(a, msg), cold.verify(b, msg)
            assert (got.accepted, got.token, got.plain_tokens) == (want.accepted, want.token, want.plain_tokens)
            assert a.context == b.context
            # The pass scored the drafts only (none for a plain round), then one step per plain token.
            assert a.lm.calls[fed:] == ([(len(ctx) + drafts, drafts)] if drafts else []) + [
                (n, 1) for n in range(len(ctx) + 1 + got.accepted, len(ctx) + 1 + got.accepted + len(got.plain_tokens))]
            assert b.lm.calls[0] == (len(ctx) + drafts, drafts + 1)  # unprefilled: the last token too
            nxt, _ = batch(a, 2, seed=seed)
            assert prefilled.verify(a, nxt).token == cold.verify(b, nxt).token  # later rounds compute all rows


def test_expired_and_orphaned_sessions_are_reaped_on_the_injected_clock():
    now = [0.0]
    v = fake_verifier(clock=lambda: now[0], session_ttl_s=100.0, orphan_ttl_s=10.0)
    ended, idle, streaming = (v.open(open_msg()) for _ in range(3))
    v.attach(ended.id)
    v.attach(streaming.id)
    v.attach(streaming.id)  # a resend's new stream while the old one is still being torn down
    now[0] = 5.0
    v.release(ended.id)  # its only stream ended without a close: an orphan from now on
    v.release(streaming.id)  # one of its two streams: still served
    now[0] = 15.0
    assert v.reap() == 0
    now[0] = 15.5
    assert v.reap() == 1 and v.active_sessions == 2  # the orphan went; idle and streaming stay
    v.get(streaming.id)
    now[0] = 100.5
    assert v.reap() == 1  # idle passed the TTL
    assert v.get(streaming.id)


# --- gRPC, in process -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cloud():
    c = Cloud()
    yield c
    c.stop()


def test_a_verdict_lost_on_the_downlink_is_answered_again(cloud):
    """The downlink freezes after round 2 (bytes held, as in a stalled link) until the edge's round
    timed out; the edge resends the batch and the cloud, which has verified it already, replays the
    verdict: the generation ends as an undisturbed one."""
    reference = run_generation(cloud.address, seed=21).token_ids
    relay = Relay(cloud.port)
    client = CloudClient(ClientConfig(relay.address, round_timeout_s=0.5, outage_window_s=30, **FAST_RETRY))
    rounds = [0]

    def freeze_after_round_2(_tokens):
        rounds[0] += 1
        if rounds[0] == 2:
            relay.freeze()
            threading.Thread(target=thaw_after_timeout, daemon=True).start()

    def thaw_after_timeout():
        wait_until(lambda: client.resends >= 1, 30, "the edge's round times out")
        relay.thaw()

    replays = cloud.verifier.replays
    try:
        disturbed = run_generation(relay.address, seed=21, on_tokens=freeze_after_round_2, client=client)
    finally:
        client.close()
        relay.close()
    assert disturbed.token_ids == reference
    assert client.resends >= 1 and cloud.verifier.replays > replays and disturbed.stats.reopens == 0


def test_a_paused_cloud_finishes_the_round_and_the_resent_batch_gets_its_verdict(cloud):
    """The cloud stalls in round 3 (as under SIGSTOP) past the edge's round timeout; the resent batch
    is verified by another worker; the stalled attempt then finds the round done and replays it."""
    reference = run_generation(cloud.address, seed=22).token_ids
    state = {"rounds": {}, "paused": None}
    resumed = threading.Event()

    def before(session, msg):
        n = state["rounds"].setdefault(session.id, 0)
        if session.id == state.get("target") and n == 2 and state["paused"] is None:
            state["paused"] = msg.position
            resumed.wait(30)  # until the resent batch has been verified

    def after(session, result):
        state["rounds"][session.id] = state["rounds"].get(session.id, 0) + 1
        if state["paused"] is not None and session.id == state.get("target"):
            resumed.set()

    client = CloudClient(ClientConfig(cloud.address, round_timeout_s=0.5, outage_window_s=30, **FAST_RETRY))
    original_open = client.open

    def open_and_mark(request):
        reply = original_open(request)
        state["target"] = reply.session_id
        return reply

    client.open = open_and_mark
    cloud.verifier.before, cloud.verifier.after = before, after
    replays = cloud.verifier.replays
    try:
        disturbed = run_generation(cloud.address, seed=22, client=client)
    finally:
        cloud.verifier.before = cloud.verifier.after = None
        resumed.set()
        client.close()
    assert state["paused"] is not None and client.resends >= 1
    wait_until(lambda: cloud.verifier.replays > replays, 10, "the stalled attempt replays the verdict")
    assert disturbed.token_ids == reference


def test_stream_rules_close_rules_and_the_reaper_timer():
    c = Cloud(session_ttl_s=2.0, orphan_ttl_s=0.3, reap_interval_s=0.05)
    channel = grpc.insecure_channel(c.address)
    stub = sqs_pb2_grpc.VerifierStub(channel)
    try:
        open_msg_ = codec.encode_open(open_request())
        n = len(open_msg_.context_token_ids)
        s1, s2, s3, idle = (stub.OpenSession(open_msg_, timeout=10).session_id for _ in range(4))

        # One stream, one session.
        reqs = [pb.DraftBatch(session_id=s1, position=n), pb.DraftBatch(session_id=s2, position=n)]
        replies = stub.Verify(iter(reqs), timeout=10)
        assert next(replies).position == n + 1
        with pytest.raises(grpc.RpcError) as e:
            next(replies)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "one stream, one session" in e.value.details()

        # A live session cannot be taken over by a re-open with its id.
        takeover = pb.OpenSessionRequest()
        takeover.CopyFrom(open_msg_)
        takeover.client_session_id = s2
        takeover.context_token_ids.append(1)
        with pytest.raises(grpc.RpcError) as e:
            stub.OpenSession(takeover, timeout=10)
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS

        # Closing an unknown session is NOT_FOUND; closing twice too.
        stub.CloseSession(pb.CloseSessionRequest(session_id=s2), timeout=10)
        for sid in (s2, "no-such-session"):
            with pytest.raises(grpc.RpcError) as e:
                stub.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=10)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND

        # Streams that end without a CloseSession (s1's aborted, s3's half-closed) leave orphans,
        # reaped by the timer after orphan_ttl_s while the idle session waits for its TTL. No
        # request is needed for the gauge to follow.
        assert [r.position for r in stub.Verify(iter([pb.DraftBatch(session_id=s3, position=n)]), timeout=10)] == [n + 1]
        wait_until(lambda: c.verifier.active_sessions == 1, 5, "the orphans are reaped")
        assert c.verifier.get(idle) and c.sessions_gauge() == 1
        wait_until(lambda: c.sessions_gauge() == 0, 10, "the idle session expires on the timer")
    finally:
        channel.close()
        c.stop()


def test_a_second_cloud_on_the_same_port_fails_at_once(cloud):
    async def second():
        cfg = CloudConfig(model="tiny", host="127.0.0.1", port=cloud.port, metrics_port=0, calibrate=False)
        await create_server(cfg, verifier=HookedVerifier())

    with pytest.raises(OSError) as e:
        asyncio.run(second())
    assert f"127.0.0.1:{cloud.port}" in str(e.value) and "taken" in str(e.value)


def test_a_cloud_down_at_the_start_is_named_within_seconds():
    dead = f"127.0.0.1:{free_port()}"
    client = CloudClient(ClientConfig(dead, connect_timeout_s=1.0))
    t0 = time.monotonic()
    with pytest.raises(CloudError) as e:
        client.open(open_request())
    elapsed = time.monotonic() - t0
    relay_port = client.relay.address.rsplit(":", 1)[1]
    client.close()
    assert elapsed < 4, elapsed
    assert str(e.value).startswith(f"cloud {dead} does not answer") and relay_port not in str(e.value), str(e.value)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE


def test_the_first_connect_waits_for_a_cloud_when_asked():
    port = free_port()
    box: dict = {}
    request = open_request()  # models are loaded here, not in two threads at once

    def connect():
        box["t0"] = time.monotonic()
        with CloudClient(ClientConfig(f"127.0.0.1:{port}", connect_timeout_s=0.2, connect_wait_s=60)) as client:
            box["reply"] = client.open(request)

    target()
    t = threading.Thread(target=connect)
    t.start()
    # No clock to inject into grpc's connect: let the client wait past its connect timeout for real.
    wait_until(lambda: "t0" in box and time.monotonic() - box["t0"] > 0.5, 10, "the client waits")
    late = Cloud(port=port)
    try:
        t.join(60)
        assert box["reply"].session_id
    finally:
        late.stop()


def test_an_outage_longer_than_the_window_ends_with_an_error_naming_the_cloud():
    c = Cloud()
    rounds = [0]

    def stop_after_round_2(_tokens):
        rounds[0] += 1
        if rounds[0] == 2:
            c.stop()

    t0 = time.monotonic()
    with pytest.raises(CloudError) as e:
        run_generation(c.address, seed=1, on_tokens=stop_after_round_2, outage_window_s=1.0)
    assert time.monotonic() - t0 < 10
    assert f"cloud {c.address}" in str(e.value) and e.value.code == grpc.StatusCode.UNAVAILABLE


# --- a real cloud process killed -9 and restarted on its port -----------------------------------------


def test_concurrent_generations_ride_out_a_cloud_killed_and_restarted():
    """Three edges pause after their second round; the cloud is killed -9 and a new process started
    on the same port (a cold start: the edges wait it out); every generation ends with exactly the
    tokens of its undisturbed run. A third process on the taken port then fails at once."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    seeds = (31, 32, 33)
    procs = [start_cloud_process(port)]
    try:
        wait_serving(address, procs[0])
        reference = {s: run_generation(address, s).token_ids for s in seeds}
        paused = {s: threading.Event() for s in seeds}
        restarted = threading.Event()
        results: dict = {}

        def edge(seed: int) -> None:
            rounds = [0]

            def hook(_tokens):
                rounds[0] += 1
                if rounds[0] == 2:
                    paused[seed].set()
                    restarted.wait(60)

            try:
                results[seed] = run_generation(address, seed, on_tokens=hook)
            except Exception as exc:  # reported by the assertion below
                results[seed] = exc

        threads = [threading.Thread(target=edge, args=(s,)) for s in seeds]
        for t in threads:
            t.start()
        for s in seeds:
            assert paused[s].wait(60), f"edge {s} did not reach its second round"
        procs[0].kill()
        procs[0].wait(10)
        procs.append(start_cloud_process(port))
        restarted.set()  # the edges go on at once, against a cloud still starting
        for t in threads:
            t.join(120)
        for s in seeds:
            r = results[s]
            assert not isinstance(r, Exception), f"seed {s}: {r}"
            assert r.token_ids == reference[s], s
            assert r.stats.reopens >= 1, s

        dup = subprocess.run(
            [sys.executable, "-m", "cloud", "--model", "tiny", "--host", "127.0.0.1", "--port", str(port),
             "--metrics-port", "0"], capture_output=True, text=True, timeout=60,
        )
        assert dup.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in dup.stderr, dup.stderr
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
