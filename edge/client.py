"""gRPC client of the cloud verifier: one session, one bidirectional Verify stream.

Rounds go over the stream (a few bytes of framing each). The client rides out what a real link and
a real cloud do, for `outage_window_s` (default 180 s) from the first failure of a round:

- A broken stream or a round without a verdict (round_timeout_s) is retried on a new stream after
  an exponential backoff with jitter (capped at backoff_max_s). The batch is sent again unchanged:
  the cloud answers a batch it has already verified with the same verdict (idempotent rounds), so
  a lost verdict costs a round trip, never the generation.
- When the cloud no longer knows the session (NOT_FOUND: a restart, an expiry, an eviction) the
  session is re-opened with the whole accepted context under the same id, and the same batch is
  sent again. The cloud keys its draws by (seed, position), so the retried round gives the verdict
  the first attempt would have given: no token is lost or duplicated.

The first connect is different: a cloud that does not answer within connect_timeout_s is an error
naming its HOST:PORT at once (a typo, a cloud not started), unless connect_wait_s asks to wait for
it. Why 180 s: a cold start of the cloud measured 6-17 s with the tiny pair and takes about a
minute with the Qwen pair (weights, calibration); a container restart adds its health-check delay,
and link stalls of 30-130 s were seen. Three minutes covers those with margin, and a generation
whose cloud is really gone still ends with an error a person will wait for.

A `cancel` event (set by the HTTP API when its client goes away) stops the generation between two
waits: every wait polls it, and round()/open() raise Cancelled.

The link: with tls_ca the channel speaks TLS and checks the cloud's certificate against that CA
for the cloud's host name (through the byte-counting relay too: the name is the target's, not the
relay's), presenting tls_cert/tls_key for mutual TLS; `token` goes as `authorization: Bearer` metadata
on every call. Plaintext outside loopback must be asked for (insecure). A quota refusal of a round
(RESOURCE_EXHAUSTED) is waited out by its `retry-after` hint and the batch resent, within the outage
window; one at open (the session quota) is an error.

A streamed round (Batch.stream, plain target steps on the stream transport) answers with a Verdict
message per token; stream_round() yields the verdict so far as each arrives. A resend (after a lost
message or a cloud restart) starts the round's messages again from its first: the caller skips the
tokens it has (the cloud replays the same ones). Each message must come within round_timeout_s.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import queue
import random
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import grpc

from common import codec
from common.pb.v1 import sqs_pb2 as pb
from common.pb.v1 import sqs_pb2_grpc
from edge.routing import RouteKeyInterceptor, new_route_key
from edge.wire_meter import ByteCountingRelay
from sqs_rpc.service import probe

log = logging.getLogger("sqs.edge")

_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED}


def _broken_stream(code: grpc.StatusCode | None, reason: str) -> bool:
    """A round that can be sent again: the connection or stream broke, or the wait ran out. A proxy
    (Envoy, deploy/envoy.yaml) whose upstream replica dies under a started Verify stream resets it
    with RST_STREAM INTERNAL_ERROR, which gRPC reports as INTERNAL; that is a broken stream too."""
    return code in _RETRYABLE or (code == grpc.StatusCode.INTERNAL and "RST_STREAM" in reason)
_POLL_S = 0.1  # how often a wait looks at the cancel event
_MAX_REOPENS = 3  # re-opens within one round before the cloud is declared unable to keep the session


class CloudError(Exception):
    """The cloud refused or could not be reached; str() is a one-line reason, code the gRPC status.

    at_open: the refusal came at session open (the request itself: limits, parameters), not from a
    round of a running session.
    """

    def __init__(self, code: grpc.StatusCode | None, reason: str, at_open: bool = False) -> None:
        super().__init__(reason)
        self.code = code
        self.at_open = at_open


class Cancelled(Exception):
    """The generation was cancelled through the client's cancel event."""


@dataclass(frozen=True)
class ClientConfig:
    target: str  # HOST:PORT of the cloud
    round_timeout_s: float = 120.0  # one round (edge send -> verdict), and one OpenSession with its prefill
    connect_timeout_s: float = 5.0  # first connect: the cloud must answer within this
    connect_wait_s: float = 0.0  # first connect: keep waiting for the cloud this much longer (0 = don't)
    outage_window_s: float = 180.0  # a running session rides out an outage this long (see the docstring)
    retries: int | None = None  # optional cap on the retries of one round (None: only the window bounds them)
    backoff_s: float = 0.25  # first retry delay; doubles with jitter up to backoff_max_s
    backoff_max_s: float = 2.0
    meter: bool = True  # route through a byte-counting relay to measure wire bytes
    transport: str = "stream"  # "stream": one Verify stream per session; "unary": one VerifyBatch call per round
    tls_ca: str | None = None  # TLS: the CA that signed the cloud's certificate (None: plaintext)
    tls_cert: str | None = None  # mutual TLS: this edge's certificate (its CN is its identity) ...
    tls_key: str | None = None  # ... and its key
    token: str | None = field(default=None, repr=False)  # bearer token (never in a repr or a log line)
    insecure: bool = False  # plaintext to a cloud outside loopback, said explicitly

    def __post_init__(self) -> None:
        for name in ("round_timeout_s", "connect_timeout_s", "connect_wait_s", "outage_window_s", "backoff_s",
                     "backoff_max_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.retries is not None and self.retries < 0:
            raise ValueError("retries must be >= 0 (or None)")
        if self.transport not in ("stream", "unary"):
            raise ValueError(f"transport must be 'stream' or 'unary', got {self.transport!r}")
        if bool(self.tls_cert) != bool(self.tls_key) or (self.tls_cert and not self.tls_ca):
            raise ValueError("--tls-cert and --tls-key go together, with --tls-ca")
        host = self.target.rpartition(":")[0].strip("[]")
        if not self.tls_ca and not self.insecure and host and not _loopback(host):
            raise ValueError(f"the cloud {self.target} is not on loopback: give --tls-ca (TLS) or say --insecure "
                             f"(SQS_INSECURE=1) to talk to it in plaintext")

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials from the files (None: plaintext); OSError for a file that cannot be read."""
        if not self.tls_ca:
            return None
        read = lambda f: Path(f).read_bytes() if f else None  # noqa: E731
        return grpc.ssl_channel_credentials(read(self.tls_ca), read(self.tls_key), read(self.tls_cert))


def cloud_health(config: ClientConfig, timeout_s: float = 1.5) -> tuple[bool, str]:
    """(serving, status) of the cloud of `config` by one grpc.health.v1 check over the same transport
    a generation uses (TLS with its CA and certificate when configured; health needs no token)."""
    try:
        credentials = config.credentials()
    except OSError as exc:
        return False, f"TLS file: {exc}"
    if credentials is None:
        return probe(config.target, timeout_s)
    channel = grpc.secure_channel(config.target, credentials)
    try:
        return probe(channel, timeout_s)
    finally:
        channel.close()


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class RoundReply:
    verdict: codec.Verdict
    sent_unix_us: int  # edge wall clock when the batch went out ...
    received_unix_us: int  # ... and when its verdict came in
    uplink_wire_bytes: int  # bytes on the connection for this round (0 without the meter)
    downlink_wire_bytes: int
    message_bytes: int  # the serialized DraftBatch, without its session routing
    verdict_bytes: int  # the serialized Verdict


def _retry_after(exc: BaseException) -> float | None:
    """The `retry-after` trailing metadata (seconds) of a refused call, if it has one."""
    trailing = exc.trailing_metadata() if isinstance(exc, grpc.RpcError) else None
    for key, value in trailing or ():
        if key == "retry-after":
            try:
                seconds = float(value)
            except ValueError:
                return None
            return seconds if math.isfinite(seconds) and seconds >= 0 else None
    return None


class _Backoff:
    """Exponential backoff with jitter: the n-th delay lies in [d/2, d], d = first * 2^n capped."""

    def __init__(self, first_s: float, cap_s: float) -> None:
        self._next = first_s
        self._cap = cap_s
        self._rng = random.Random()  # jitter only; never touches a token draw

    def __call__(self) -> float:
        d = min(self._next, self._cap)
        self._next = min(self._next * 2, self._cap)
        return d * (0.5 + 0.5 * self._rng.random())


class _Stream:
    """A Verify stream fed from a queue; its verdicts are read by a helper thread into another
    queue, so that a wait for the next one can time out and look at the cancel event."""

    _END = object()

    def __init__(self, stub: sqs_pb2_grpc.VerifierStub, metadata: tuple = ()) -> None:
        self._requests: queue.Queue = queue.Queue()
        self._call = stub.Verify(iter(self._requests.get, self._END), metadata=metadata)
        self._verdicts: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.fresh = True

    def send(self, msg: pb.DraftBatch) -> None:
        self._requests.put(msg)
        self.fresh = False

    def receive(self, timeout_s: float, cancel: threading.Event) -> pb.Verdict:
        """The next verdict message, within timeout_s."""
        deadline = time.monotonic() + timeout_s
        while True:
            if cancel.is_set():  # also between the messages of a streamed round
                self._call.cancel()
                raise Cancelled("generation cancelled")
            try:
                got = self._verdicts.get(timeout=min(_POLL_S, max(0.0, deadline - time.monotonic())))
                break
            except queue.Empty:
                if time.monotonic() >= deadline:
                    self._call.cancel()
                    raise CloudError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no verdict within {timeout_s:g} s") from None
        if isinstance(got, BaseException):
            self._verdicts.put(got)  # the stream is over: every later wait sees it too
            raise got
        return got

    def _read(self) -> None:
        try:
            for verdict in self._call:
                self._verdicts.put(verdict)
            self._verdicts.put(CloudError(grpc.StatusCode.UNAVAILABLE, "the cloud closed the stream"))
        except BaseException as exc:  # delivered to the waiting caller's thread
            self._verdicts.put(exc)

    def close(self) -> None:
        """Cancel, then end the request iterator (its feeding thread must not wait forever).

        Cancel first: a clean half-close would tell the cloud the session is finished, while a
        dropped stream is one the edge resumes on a new stream.
        """
        self._call.cancel()
        self._requests.put(self._END)


class CloudClient:
    def __init__(self, config: ClientConfig, cancel: threading.Event | None = None) -> None:
        self.config = config
        host, _, port = config.target.rpartition(":")
        if not host or not port.isdigit():
            raise CloudError(None, f"--cloud must be HOST:PORT, got {config.target!r}")
        try:
            credentials = config.credentials()
        except OSError as exc:
            raise CloudError(None, f"TLS file: {exc}") from None
        self.relay = ByteCountingRelay(host.strip("[]"), int(port)) if config.meter else None
        options = [
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
            ("grpc.http2.bdp_probe", 0),
        ]
        address = self.relay.address if self.relay else config.target
        if credentials is None:
            self._channel = grpc.insecure_channel(address, options=options)
        else:  # the certificate is checked for the cloud's name, not the relay's 127.0.0.1
            self._channel = grpc.secure_channel(address, credentials,
                                                options=[*options, ("grpc.ssl_target_name_override", host.strip("[]"))])
        self._metadata = (("authorization", f"Bearer {config.token}"),) if config.token else ()
        # Every RPC of this generation carries its routing key (edge/routing.py): a proxy in front of
        # several clouds keeps them on one replica.
        self.route_key = new_route_key()
        self._channel = grpc.intercept_channel(self._channel, RouteKeyInterceptor(self.route_key))
        self._stub = sqs_pb2_grpc.VerifierStub(self._channel)
        self._stream: _Stream | None = None
        self._cancel = cancel or threading.Event()
        self.session_id = ""
        self._closed = False
        self.reopens = 0
        self.resends = 0  # batches sent again after a lost verdict or a broken stream

    def wire_counts(self) -> tuple[int, int]:
        return self.relay.counts() if self.relay else (0, 0)

    @property
    def streams_plain(self) -> bool:
        """Whether a round's plain steps can come streamed (the stream transport; not VerifyBatch)."""
        return self.config.transport == "stream"

    # -- session ----------------------------------------------------------------------------
    def open(self, request: codec.OpenRequest) -> codec.Opened:
        """First connect: fail within connect_timeout_s (+ connect_wait_s) if the cloud does not answer."""
        c = self.config
        until = time.monotonic() + c.connect_timeout_s + c.connect_wait_s
        reply = codec.opened_from_pb(self._open(codec.encode_open(request), until, at_open=True))
        self.session_id = reply.session_id
        self._drop_stream()
        return reply

    def resync(self, accepted: Callable[[], codec.OpenRequest], until: float) -> None:
        """The cloud lost this session (NOT_FOUND: a restart, an expiry, an eviction): re-open it
        under the same id with the whole accepted context, from which the cloud rebuilds its state;
        round() then sends the same batch again."""
        request = accepted()
        log.info("session %s unknown to the cloud; re-opening with the %d-token accepted context",
                 self.session_id, len(request.context))
        self._open(codec.encode_open(replace(request, client_session_id=self.session_id)), until, at_open=False)
        self.reopens += 1

    def _open(self, msg: pb.OpenSessionRequest, until: float, at_open: bool) -> pb.OpenSessionResponse:
        backoff = _Backoff(self.config.backoff_s, self.config.backoff_max_s)
        while True:
            if not self._wait_ready(until):
                raise self._unreachable(until)
            try:
                return self._stub.OpenSession(msg, timeout=self.config.round_timeout_s, metadata=self._metadata)
            except grpc.RpcError as exc:
                self._check_cancel()
                if exc.code() in _RETRYABLE and time.monotonic() < until:
                    self._sleep(backoff())
                    continue
                raise self._error(exc.code(), exc.details(), at_open=at_open) from None

    # -- one round --------------------------------------------------------------------------
    def round(self, batch: codec.Batch, reopen: Callable[[], codec.OpenRequest]) -> RoundReply:
        """Send one batch and wait for its verdict, riding out outages; reopen() gives the accepted
        context for resync(). A streamed round's messages come back as one verdict."""
        reply = None
        for reply in self.stream_round(batch, reopen):
            pass
        if reply is None:  # stream_round yields at least the final verdict, or raises
            raise CloudError(None, f"cloud {self.config.target}: the round ended without a verdict")
        return reply

    def stream_round(self, batch: codec.Batch, reopen: Callable[[], codec.OpenRequest]) -> Iterator[RoundReply]:
        """Send one batch and yield its verdict as it comes: for a streamed round (batch.stream) the
        verdict so far after each message (verdict.more while more follow), else the one verdict.
        After a resend it starts again from the round's first message. Closing the iterator early
        drops the stream, which stops the cloud's steps."""
        msg = codec.batch_to_pb(batch)
        c = self.config
        backoff = _Backoff(c.backoff_s, c.backoff_max_s)
        outage_since: float | None = None
        attempts = reopens = 0
        while True:
            self._check_cancel()
            try:
                yield from self._send(msg)
                return
            except (grpc.RpcError, CloudError) as exc:
                code = exc.code() if isinstance(exc, grpc.RpcError) else exc.code
                reason = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
                self._drop_stream()
                self._check_cancel()
                attempts += 1
                now = time.monotonic()
                outage_since = outage_since if outage_since is not None else now
                until = outage_since + c.outage_window_s
                within = now < until and (c.retries is None or attempts <= c.retries)
                if code == grpc.StatusCode.NOT_FOUND and within and reopens < _MAX_REOPENS:
                    self.resync(reopen, until)
                    reopens += 1
                    continue
                hint = _retry_after(exc) if code == grpc.StatusCode.RESOURCE_EXHAUSTED else None
                if hint is not None and within:  # over a rate quota: wait what the cloud says, resend
                    log.info("cloud %s: %s; resending in %.3f s", c.target, self._scrub(reason), hint)
                    self._sleep(min(hint, max(0.0, until - now)))
                    continue
                if _broken_stream(code, reason) and within:
                    if attempts == 1:
                        log.warning("cloud %s: %s (%s); resending for up to %.0f s", c.target,
                                    code.name, self._scrub(reason), c.outage_window_s)
                    self.resends += 1
                    self._sleep(backoff())
                    continue
                raise self._error(code, reason) from None

    def _send(self, batch: pb.DraftBatch) -> Iterator[RoundReply]:
        """One attempt: the verdict so far after each message of it (one message unless streamed)."""
        message_bytes = batch.ByteSize()
        msg = pb.DraftBatch()
        msg.CopyFrom(batch)
        up0, down0 = self.wire_counts()
        sent = time.time_ns() // 1000
        if self.config.transport == "unary":
            msg.session_id = self.session_id
            receive = lambda: self._unary(msg)  # noqa: E731
        else:
            if self._stream is None:
                self._stream = _Stream(self._stub, self._metadata)
            msg.session_id = self.session_id if self._stream.fresh else ""
            stream = self._stream
            stream.send(msg)
            receive = lambda: stream.receive(self.config.round_timeout_s, self._cancel)  # noqa: E731
        verdict: codec.Verdict | None = None
        verdict_bytes = 0
        try:
            while verdict is None or verdict.more:
                part = receive()
                received = time.time_ns() // 1000
                verdict_bytes += part.ByteSize()
                v = codec.verdict_from_pb(part)
                verdict = v if verdict is None else verdict.then(v)
                up1, down1 = self.wire_counts()
                yield RoundReply(verdict, sent, received, up1 - up0, down1 - down0, message_bytes, verdict_bytes)
        except GeneratorExit:  # the caller stopped reading a streamed round: stop the cloud's steps
            if verdict is not None and verdict.more:
                self._drop_stream()
            raise

    def send_lookahead(self, batch: codec.Batch) -> bool:
        """Send a lookahead batch (DraftBatch.lookahead) on the stream of the round in flight, from
        any thread; False when there is none (unary transport, a stream not started or dropped):
        then it is lost, as one that comes too late is. It needs no verdict of its own."""
        stream = self._stream
        if stream is None or stream.fresh or self.config.transport != "stream":
            return False
        stream.send(codec.batch_to_pb(batch))
        return True

    def _unary(self, msg: pb.DraftBatch) -> pb.Verdict:
        future = self._stub.VerifyBatch.future(msg, timeout=self.config.round_timeout_s, metadata=self._metadata)
        while True:
            try:
                return future.result(timeout=_POLL_S)
            except grpc.FutureTimeoutError:
                if self._cancel.is_set():
                    future.cancel()
                    raise Cancelled("generation cancelled") from None

    # -- waiting ----------------------------------------------------------------------------
    def _wait_ready(self, until: float) -> bool:
        """Wait until the cloud answers (a health check that waits for the connection), or `until`.

        Not grpc.channel_ready_future: its connectivity watcher made every channel close wait for
        its ~0.2 s poll (180 ms per generation, measured).
        """
        while True:
            self._check_cancel()
            left = until - time.monotonic()
            if left <= 0:
                return False
            _, status = probe(self._channel, min(_POLL_S, left), service="", wait_for_ready=True)
            if not status.startswith(grpc.StatusCode.DEADLINE_EXCEEDED.name):
                return True  # something answered: the connection is up; the open says the rest

    def _sleep(self, seconds: float) -> None:
        if self._cancel.wait(seconds):
            raise Cancelled("generation cancelled")

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise Cancelled("generation cancelled")

    # -- errors -----------------------------------------------------------------------------
    def _unreachable(self, until: float) -> CloudError:
        why = (self.relay.last_error if self.relay else "") or "no gRPC connection"
        return CloudError(grpc.StatusCode.UNAVAILABLE, f"cloud {self.config.target} does not answer ({why})")

    def _scrub(self, reason: str) -> str:
        """The cloud's address instead of the local relay's in grpc's messages."""
        return reason.replace(self.relay.address, self.config.target) if self.relay else reason

    def _error(self, code: grpc.StatusCode | None, reason: str, at_open: bool = False) -> CloudError:
        name = code.name if code else "error"
        return CloudError(code, f"cloud {self.config.target}: {name}: {self._scrub(reason)}", at_open=at_open)

    def _drop_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def close(self) -> None:
        """Close the cloud session and the channel; a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        if self.session_id:
            try:
                self._stub.CloseSession(pb.CloseSessionRequest(session_id=self.session_id), timeout=2,
                                        metadata=self._metadata)
            except grpc.RpcError:
                pass  # unknown to the cloud (NOT_FOUND) or unreachable: it reaps the session itself
        self._drop_stream()
        self._channel.close()
        if self.relay:
            self.relay.close()

    def __enter__(self) -> "CloudClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
