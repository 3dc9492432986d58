"""gRPC client of the cloud verifier: one session, one bidirectional Verify stream.

Rounds go over the stream (a few bytes of framing each). A broken stream is re-established; when the
cloud no longer knows the session (NOT_FOUND, e.g. after a restart) the session is re-opened with the
whole accepted context under the same id and the same batch is sent again. The cloud keys its draws
by (seed, position), so the retried round gives the verdict the first attempt would have given: no
token is lost or duplicated.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import grpc

from common import codec
from common.pb.v1 import sqs_pb2 as pb
from common.pb.v1 import sqs_pb2_grpc
from edge.wire_meter import ByteCountingRelay

log = logging.getLogger("sqs.edge")

_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED}


class CloudError(Exception):
    """The cloud refused or could not be reached; str() is a one-line reason, code the gRPC status."""

    def __init__(self, code: grpc.StatusCode | None, reason: str) -> None:
        super().__init__(reason)
        self.code = code


@dataclass(frozen=True)
class ClientConfig:
    target: str  # HOST:PORT of the cloud
    round_timeout_s: float = 120.0  # one round (edge send -> verdict)
    connect_timeout_s: float = 10.0
    retries: int = 6
    backoff_s: float = 0.25  # doubles each retry, capped at 4 s
    meter: bool = True  # route through a byte-counting relay to measure wire bytes
    transport: str = "stream"  # "stream": one Verify stream per session; "unary": one VerifyBatch call per round


@dataclass(frozen=True)
class RoundReply:
    verdict: pb.Verdict
    sent_unix_us: int
    received_unix_us: int
    uplink_wire_bytes: int
    downlink_wire_bytes: int


class _Stream:
    """A Verify stream fed from a queue; next() with a timeout runs in a helper thread."""

    _END = object()

    def __init__(self, stub: sqs_pb2_grpc.VerifierStub) -> None:
        self._requests: queue.Queue = queue.Queue()
        self._call = stub.Verify(iter(self._requests.get, self._END))
        self.fresh = True

    def round(self, msg: pb.DraftBatch, timeout_s: float) -> pb.Verdict:
        self._requests.put(msg)
        self.fresh = False
        box: list = []
        t = threading.Thread(target=lambda: box.append(self._next()), daemon=True)
        t.start()
        t.join(timeout_s)
        if not box:
            self._call.cancel()
            raise CloudError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no verdict within {timeout_s:.0f} s")
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def _next(self):
        try:
            return next(self._call)
        except StopIteration:
            return CloudError(grpc.StatusCode.UNAVAILABLE, "the cloud closed the stream")
        except BaseException as exc:  # delivered to the caller's thread
            return exc

    def close(self) -> None:
        self._requests.put(self._END)
        self._call.cancel()


class CloudClient:
    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        host, _, port = config.target.rpartition(":")
        if not host or not port.isdigit():
            raise CloudError(None, f"--cloud must be HOST:PORT, got {config.target!r}")
        self.relay = ByteCountingRelay(host, int(port)) if config.meter else None
        self._channel = grpc.insecure_channel(
            self.relay.address if self.relay else config.target,
            options=[
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
                ("grpc.max_receive_message_length", 16 * 1024 * 1024),
                ("grpc.keepalive_time_ms", 20_000),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 2000),
                ("grpc.http2.bdp_probe", 0),
            ],
        )
        self._stub = sqs_pb2_grpc.VerifierStub(self._channel)
        self._stream: _Stream | None = None
        self.session_id = ""
        self.reopens = 0

    def wire_counts(self) -> tuple[int, int]:
        return self.relay.counts() if self.relay else (0, 0)

    def open(self, request: codec.OpenRequest) -> pb.OpenSessionResponse:
        msg = codec.encode_open(request)
        reply = self._with_retries(
            lambda: self._stub.OpenSession(msg, timeout=self.config.connect_timeout_s, wait_for_ready=True)
        )
        self.session_id = reply.session_id
        self._drop_stream()
        return reply

    def round(self, batch: pb.DraftBatch, reopen: Callable[[], codec.OpenRequest]) -> RoundReply:
        """Send one batch and wait for its verdict, riding out restarts; reopen() gives the context."""
        delay = self.config.backoff_s
        for attempt in range(self.config.retries + 1):
            try:
                msg = pb.DraftBatch()
                msg.CopyFrom(batch)
                if self.config.transport == "unary":
                    msg.session_id = self.session_id
                    call = lambda: self._stub.VerifyBatch(msg, timeout=self.config.round_timeout_s)  # noqa: E731
                else:
                    if self._stream is None:
                        self._stream = _Stream(self._stub)
                    msg.session_id = self.session_id if self._stream.fresh else ""
                    stream = self._stream
                    call = lambda: stream.round(msg, self.config.round_timeout_s)  # noqa: E731
                up0, down0 = self.wire_counts()
                sent = time.time_ns() // 1000
                verdict = call()
                received = time.time_ns() // 1000
                up1, down1 = self.wire_counts()
                return RoundReply(verdict, sent, received, up1 - up0, down1 - down0)
            except (grpc.RpcError, CloudError) as exc:
                code = exc.code() if isinstance(exc, grpc.RpcError) else exc.code
                reason = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
                self._drop_stream()
                if code == grpc.StatusCode.NOT_FOUND and attempt < self.config.retries:
                    log.info("session %s unknown to the cloud; re-opening with the accepted context", self.session_id)
                    req = reopen()
                    self.open(codec.OpenRequest(**{**req.__dict__, "client_session_id": self.session_id}))
                    self.reopens += 1
                    continue
                if code in _RETRYABLE and attempt < self.config.retries:
                    log.info("round failed (%s: %s); retrying in %.2f s", code, reason, delay)
                    time.sleep(delay)
                    delay = min(delay * 2, 4.0)
                    continue
                raise CloudError(code, f"cloud {self.config.target}: {code.name if code else 'error'}: {reason}") from None
        raise CloudError(grpc.StatusCode.UNAVAILABLE, "retries exhausted")

    def _with_retries(self, call):
        delay = self.config.backoff_s
        for attempt in range(self.config.retries + 1):
            try:
                return call()
            except grpc.RpcError as exc:
                if exc.code() in _RETRYABLE and attempt < self.config.retries:
                    time.sleep(delay)
                    delay = min(delay * 2, 4.0)
                    continue
                raise CloudError(exc.code(), f"cloud {self.config.target}: {exc.code().name}: {exc.details()}") from None

    def _drop_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def close(self) -> None:
        if self.session_id:
            try:
                self._stub.CloseSession(pb.CloseSessionRequest(session_id=self.session_id), timeout=2)
            except grpc.RpcError:
                pass
        self._drop_stream()
        self._channel.close()
        if self.relay:
            self.relay.close()

    def __enter__(self) -> "CloudClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
