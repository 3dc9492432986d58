"""gRPC adapter for the Verifier: thin; protobuf in and out through common/codec.py, the Verifier's
refusals (SessionError with a Refusal) mapped to gRPC statuses in one table, STATUS.

Torch work runs in a thread pool so the event loop keeps serving every other session's I/O; an
opened context is prefilled one chunk per pool job. Requests are deserialized by a wrapper that
turns unparsable bytes into INVALID_ARGUMENT instead of grpc's generic INTERNAL.

One Verify stream serves one session: its first batch names it, a later batch naming another is
INVALID_ARGUMENT. When a stream ends (half-close, cancel, reset, keepalive timeout: grpc.aio does
not tell them apart reliably) the session is released (Verifier.release): with no stream left it
is an orphan, kept orphan_ttl_s for the edge to resume, then reaped. CloseSession ends it at once.

A batch that asks for a streamed round (DraftBatch.stream, on Verify) gets a partial Verdict per
token as the Verifier samples it (`emit` from the executor thread, sent from the event loop), then
the final one; when the stream ends first, the Verifier's steps stop (`stop`) and the session keeps
what it owes for a resend.

Who calls (cloud/auth.py: identity(), set by the server's interceptor) owns the sessions it opens:
another identity's request on them is PERMISSION_DENIED. Quotas (cloud/quotas.py) are charged per
identity before the work: RESOURCE_EXHAUSTED with the hint in the details and `retry-after` trailing
metadata (seconds). A round runs with the identity as its pass batcher key (fair passes).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import threading
import time
from concurrent.futures import Executor
from dataclasses import replace
from typing import AsyncIterator, Callable

import grpc
from google.protobuf.message import DecodeError

from cloud import auth
from cloud.pass_batcher import served_as
from cloud.quotas import QuotaConfig, QuotaExceeded, Quotas
from cloud.sessions import Refusal, SessionError
from cloud.verifier import RoundResult, Verifier
from common import codec
from common.metrics import Metrics, RoundStats
from common.pb.v1 import sqs_pb2 as pb
from sqs_rpc.service import SERVICE, SERVICE_NAME

log = logging.getLogger("sqs.cloud")

# Every refusal of the service and the status it goes out with (the one table).
STATUS = {
    Refusal.MALFORMED: grpc.StatusCode.INVALID_ARGUMENT,
    Refusal.UNKNOWN_SESSION: grpc.StatusCode.NOT_FOUND,
    Refusal.VOCAB_MISMATCH: grpc.StatusCode.FAILED_PRECONDITION,
    Refusal.CONTEXT_FULL: grpc.StatusCode.OUT_OF_RANGE,
    Refusal.SESSION_LIVE: grpc.StatusCode.ALREADY_EXISTS,
    Refusal.NOT_OWNER: grpc.StatusCode.PERMISSION_DENIED,
}
RETRY_AFTER = "retry-after"  # trailing metadata of a quota refusal: seconds until a retry may pass


class _Malformed:
    """Stands in for a request whose bytes are not a valid protobuf message."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _safe(message_type):
    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except (DecodeError, RuntimeError, ValueError) as exc:
            return _Malformed(f"request is not a valid {message_type.DESCRIPTOR.full_name}: {exc}")

    return parse


def _now_us() -> int:
    return time.time_ns() // 1000


def _round_stats(result: RoundResult) -> RoundStats:
    """What the cloud counts of a round it verified: the edge's drafts as received, its verify time."""
    return RoundStats(drafted=result.drafted, accepted=result.accepted, payload_bytes=result.payload_bytes,
                      formula_bits=result.formula_bits, latency_ms={"verify": result.verify_ms},
                      plain=len(result.plain_tokens))


class VerifierServicer:
    def __init__(self, verifier: Verifier, metrics: Metrics, executor: Executor,
                 round_executor: Executor | None = None, quotas: Quotas | None = None) -> None:
        """`executor` runs opens and prefills; `round_executor` (default: the same) runs rounds. With
        cross-session batching a round's thread mostly waits in the batcher for its share of a
        pass, so the server gives rounds a pool of one thread per session that may batch."""
        self.verifier = verifier
        self.metrics = metrics
        self.executor = executor
        self.round_executor = round_executor or executor
        self.quotas = quotas or Quotas(QuotaConfig())

    async def _run(self, fn, *args, executor: Executor | None = None):
        return await asyncio.get_running_loop().run_in_executor(executor or self.executor, fn, *args)

    async def _abort(self, context: grpc.aio.ServicerContext, exc: SessionError):
        log.info("request refused code=%s reason=%s", exc.code, exc.reason)
        await context.abort(STATUS[exc.code], exc.reason)

    async def _over_quota(self, context: grpc.aio.ServicerContext, exc: QuotaExceeded):
        self.metrics.quota_refusals.labels(exc.limit).inc()
        log.debug("request refused code=RESOURCE_EXHAUSTED reason=%s", exc.reason)  # counted; a flood must not flood the log
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, exc.reason,
                            trailing_metadata=((RETRY_AFTER, f"{math.ceil(exc.retry_after_s * 1e3) / 1e3:.3f}"),))

    async def _refuse(self, context: grpc.aio.ServicerContext, code: Refusal, reason: str):
        await context.abort(STATUS[code], reason)

    async def _check(self, request, context) -> None:
        if isinstance(request, _Malformed):
            await self._refuse(context, Refusal.MALFORMED, request.reason)
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline expired before the work started")

    def _open(self, request: pb.OpenSessionRequest, owner: str):
        try:
            req = codec.decode_open(request, self.verifier.target.vocab_size)
        except codec.PayloadError as exc:
            raise SessionError(Refusal.MALFORMED, str(exc)) from None
        return self.verifier.sessions.open(req, owner, admit=functools.partial(self.quotas.check_open, owner))

    async def OpenSession(self, request, context):
        await self._check(request, context)
        try:
            session = await self._run(self._open, request, auth.identity())
            self.metrics.sessions.set(self.verifier.active_sessions)
            self.metrics.sessions_opened.labels("reopen" if request.client_session_id else "open").inc()
            # A prefill that shares the passes waits in the batcher like a round: the rounds' pool.
            pool = self.round_executor if self.verifier.prefills_in_passes(session) else None
            while not await self._run(served_as, auth.identity(), self.verifier.prefill_step, session, executor=pool):
                pass
        except SessionError as exc:
            await self._abort(context, exc)
        except QuotaExceeded as exc:
            await self._over_quota(context, exc)
        t = self.verifier.target
        passes = self.verifier.pass_table()
        return codec.opened_to_pb(codec.Opened(session.id, t.name, t.vocab_size, tuple(t.eos_token_ids),
                                               tuple(passes), tuple(passes.values())))

    async def _verified(self, session_id: str, request, context, emit: Callable[[RoundResult], None] | None = None,
                        stop: Callable[[], bool] | None = None) -> tuple[RoundResult, int]:
        """The Verifier's round on `request`, counted; with the wall clock (us) when it came in."""
        received = _now_us()
        who = auth.identity()
        try:
            session = self.verifier.sessions.get(session_id, owner=who)
            self.quotas.charge(who, request.num_drafts + 1 + request.plain_steps)
            streamed = {} if emit is None else {"emit": emit, "stop": stop}
            result: RoundResult = await self._run(
                functools.partial(served_as, who, self.verifier.verify, session, codec.batch_from_pb(request),
                                  **streamed),
                executor=self.round_executor)
        except SessionError as exc:
            self.metrics.sessions.set(self.verifier.active_sessions)
            await self._abort(context, exc)
        except QuotaExceeded as exc:
            await self._over_quota(context, exc)
        if not result.replayed:  # a replayed verdict was counted when it was computed
            self.metrics.observe(result.scheme.value, _round_stats(result))
        log.debug(
            "round session=%s drafted=%d accepted=%d plain=%d verify_ms=%.1f replayed=%s",
            session_id, result.drafted, result.accepted, len(result.plain_tokens), result.verify_ms, result.replayed,
        )
        return result, received

    async def _round(self, session_id: str, request, context) -> pb.Verdict:
        result, received = await self._verified(session_id, request, context)
        return codec.verdict_to_pb(result.verdict(received, _now_us()))

    async def _streamed(self, session_id: str, request, context) -> AsyncIterator[pb.Verdict]:
        """A streamed round: a partial Verdict as each token is sampled, then the final one (the
        tokens not sent yet, the clocks). Leaving early (the stream ended) stops the Verifier's steps."""
        loop = asyncio.get_running_loop()
        parts: asyncio.Queue[RoundResult] = asyncio.Queue()
        stopped = threading.Event()
        task = asyncio.ensure_future(self._verified(
            session_id, request, context, lambda r: loop.call_soon_threadsafe(parts.put_nowait, r), stopped.is_set))
        sent: RoundResult | None = None  # what the messages so far carried
        try:
            while True:
                get = asyncio.ensure_future(parts.get())
                done, _ = await asyncio.wait({task, get}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    break
                part = get.result()
                if sent is None or len(part.plain_tokens) > len(sent.plain_tokens):
                    yield codec.verdict_to_pb(_since(sent, part.verdict(0, 0), more=True))
                    sent = part
            result, received = await task
            yield codec.verdict_to_pb(_since(sent, result.verdict(received, _now_us()), more=False))
        finally:
            stopped.set()  # the stream ended first: the round keeps what it owes for a resend

    async def _read(self, request_iterator: AsyncIterator, inbox: asyncio.Queue, stream: dict, who: str) -> None:
        """The stream's reader: lookahead batches go to the session at once (its streamed round is
        stepping: the loop below is inside it), every other request to `inbox`, then _END (or the
        iterator's exception)."""
        try:
            async for request in request_iterator:
                session = stream.get("session")
                if session is not None and getattr(request, "lookahead", False) and not request.session_id:
                    # Its drafts are rows the round's charge did not cover: over the rows quota the
                    # lookahead is dropped (it is optional work), the stream goes on.
                    if self.quotas.charge_rows(who, request.num_drafts):
                        self.verifier.offer_lookahead(session, codec.batch_from_pb(request))
                    else:
                        self.metrics.quota_refusals.labels("lookahead_rows").inc()
                else:
                    await inbox.put(request)
        except asyncio.CancelledError:  # the RPC is over (the loop below is cancelled with it)
            raise
        except Exception as exc:  # noqa: BLE001 - the stream broke: the loop below ends with it
            await inbox.put(exc)
            return
        await inbox.put(_END)

    async def Verify(self, request_iterator: AsyncIterator, context) -> AsyncIterator[pb.Verdict]:
        session_id = ""
        # One request waits at most (as when the loop read the stream itself): a client that sends
        # batches without reading verdicts is held by the transport's flow control, not our memory.
        inbox: asyncio.Queue = asyncio.Queue(maxsize=1)
        stream: dict = {}  # the attached session, once there is one (the reader hands it lookaheads)
        reader = asyncio.ensure_future(self._read(request_iterator, inbox, stream, auth.identity()))
        try:
            while True:
                request = await inbox.get()
                if request is _END:
                    break
                if isinstance(request, BaseException):
                    raise request
                await self._check(request, context)
                if request.lookahead:
                    # Outside a streamed round (or naming a session): nothing for it to ride.
                    if not session_id or request.session_id:
                        await self._refuse(context, Refusal.MALFORMED,
                                           "a lookahead batch rides a streamed round of this stream's session")
                    continue
                if not session_id:
                    if not request.session_id:
                        await self._refuse(context, Refusal.MALFORMED,
                                           "the first batch of a stream must name its session")
                    try:
                        stream["session"] = self.verifier.sessions.attach(request.session_id, owner=auth.identity())
                    except SessionError as exc:
                        await self._abort(context, exc)
                    session_id = request.session_id
                elif request.session_id and request.session_id != session_id:
                    await self._refuse(
                        context, Refusal.MALFORMED,
                        f"this stream serves session {session_id}; one stream, one session (open a new stream)",
                    )
                if request.stream:
                    async for verdict in self._streamed(session_id, request, context):
                        yield verdict
                else:
                    yield await self._round(session_id, request, context)
        finally:
            reader.cancel()
            if session_id:
                self.verifier.release(session_id)

    async def VerifyBatch(self, request, context):
        await self._check(request, context)
        if not request.session_id:
            await self._refuse(context, Refusal.MALFORMED, "session_id is required")
        return await self._round(request.session_id, request, context)

    async def CloseSession(self, request, context):
        await self._check(request, context)
        try:
            closed = self.verifier.close(request.session_id, owner=auth.identity())
        except SessionError as exc:
            await self._abort(context, exc)
        self.metrics.sessions.set(self.verifier.active_sessions)
        if not closed:
            await self._refuse(context, Refusal.UNKNOWN_SESSION, f"unknown or expired session {request.session_id[:64]!r}")
        return pb.CloseSessionResponse()


_END = object()  # the end of a Verify stream's requests (VerifierServicer._read)


def _since(sent: RoundResult | None, v: codec.Verdict, more: bool) -> codec.Verdict:
    """The message of a streamed round after the ones that carried `sent`: the plain tokens since,
    accepted and token only in the first (codec.Verdict.then puts them together again)."""
    if more:
        # the clocks, the forward time, the price and the lookahead counts go in the last
        v = replace(v, forward_us=0, row_price_ms=None, lookahead_drafted=0, lookahead_accepted=0)
    if sent is None:
        return replace(v, more=more)
    return replace(v, accepted=0, token=0, plain_tokens=v.plain_tokens[len(sent.plain_tokens):], more=more)


_HANDLERS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def method_handlers(servicer: VerifierServicer) -> dict[str, grpc.RpcMethodHandler]:
    """One handler per RPC the service descriptor declares (what the generated
    add_VerifierServicer_to_server registers), with malformed-request-tolerant deserializers.
    A declared RPC the servicer does not implement is an AttributeError here, at start-up."""
    ser = lambda m: m.SerializeToString()  # noqa: E731
    return {
        m.name: _HANDLERS[m.client_streaming, m.server_streaming](
            getattr(servicer, m.name), request_deserializer=_safe(getattr(pb, m.input_type.name)),
            response_serializer=ser,
        )
        for m in SERVICE.methods
    }


def add_to_server(servicer: VerifierServicer, server: grpc.aio.Server) -> None:
    """Register the service with malformed-request-tolerant deserializers."""
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, method_handlers(servicer)),))
