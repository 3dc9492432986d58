"""Cloud-side sessions and one verification round (no gRPC here; servicer.py adapts it).

Per session: the accepted context, the target LM with its KV cache, the sampling parameters, the
scheme the edge describes its drafts with. A round decodes the batch, runs ONE target forward pass
over [pending token] + drafts, turns the L+1 logit rows into target distributions p and calls the
lossless rejection sampler with a generator keyed by (seed, position), so the same round gives the
same verdict after a cloud restart and a re-open with the same context.

Sessions survive what the network and the edge do to them:
- Rounds are idempotent. The session keeps its last verdict and the digest of the batch that
  produced it; the same batch sent again (its verdict was lost) gets that verdict again without a
  second forward pass; a different batch for an already verified position is refused.
- Session ids are 128-bit random capabilities issued here. `client_session_id` (a re-open after a
  restart or an expiry) may only bring back an id this service does not hold; it never replaces a
  live session (ALREADY_EXISTS), except that an identical re-open (same accepted context and
  parameters: the edge retrying an open whose reply was lost) returns the live session unchanged.
- A context is refused at open when no round fits under `max_context`; the first prefill runs in
  chunks of `prefill_chunk` tokens (`prefill_step`, one executor job each), so a long prompt never
  holds a verify worker for more than one chunk.
- Expired sessions are reaped by `reap()` (the server calls it on a timer). A session whose every
  stream ended without a CloseSession is an orphan: it is kept `orphan_ttl_s` for the edge to
  resume (see release(); a re-open with the accepted context is always correct, so a short orphan
  TTL only costs a prefill).

Cross-session batching (`batch_window_ms` > 0, and a target LM with `logits_batch`, i.e. torch's
CachedLM): a round is prepared (decoded, validated) alone, its forward pass goes through
cloud/pass_batcher.py, which runs ONE pass for the rounds of several sessions that are ready within
the window, and it is finished (sampled, appended, recorded) alone. Each session keeps its own cache,
its own (seed, position) generator and its own errors, so its verdicts are those of an unbatched
run; the plain target steps of a cloud-only round go through the pass batcher too. The pass leader
runs the other sessions' LMs while their round threads wait in the batcher holding their session locks,
so nothing else touches those LMs meanwhile.
"""

from __future__ import annotations

import enum
import logging
import re
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol, Sequence

import numpy as np

from cloud.pass_batcher import PassBatcher, PassStats
from common import codec
from common.batch_format import batch_bits
from common.costmodel import PassTimes
from common.rejection import SparseRow, target_probs, verify_sparse
from common.schemes import Scheme

log = logging.getLogger("sqs.cloud")


class LM(Protocol):
    def logits(self, context: Sequence[int], want: int) -> np.ndarray:  # float32 [want, V]
        ...


@dataclass(frozen=True)
class TargetInfo:
    name: str
    vocab_size: int
    fingerprint: str
    eos_token_ids: tuple[int, ...]


@dataclass(frozen=True)
class VerifierConfig:
    max_sessions: int = 64
    session_ttl_s: float = 600.0
    max_drafts: int = 256  # per batch, whatever the edge asks for
    max_context: int = 32768  # accepted context length at which a session is refused more rounds
    max_plain_steps: int = 64  # plain target steps one request may ask for after its token
    calibrate_rows: tuple[int, ...] = (1, 2, 3, 5, 9, 17)  # forward passes timed at start (edges plan with them)
    prefill_chunk: int = 256  # tokens of an opened context fed per forward pass (one executor job each)
    orphan_ttl_s: float = 60.0  # a session whose streams all ended without a close is kept this long
    reap_interval_s: float = 5.0  # the server reaps expired and orphaned sessions this often
    batch_window_ms: float = 2.0  # cross-session batched verification: the most a round waits for others; 0 = off
    batch_max_rows: int = 64  # rows (L+1 per round) of one batched forward pass at most


class Refusal(enum.StrEnum):
    """Why the verifier refuses a request. The value is the name of the gRPC status it is answered
    with (DESIGN.md section 8); cloud/servicer.py maps each to its status code in one table."""

    MALFORMED = "INVALID_ARGUMENT"  # a malformed or inconsistent request
    UNKNOWN_SESSION = "NOT_FOUND"  # unknown or expired: the edge re-opens it (resync)
    VOCAB_MISMATCH = "FAILED_PRECONDITION"  # draft and target do not share a tokenizer
    CONTEXT_FULL = "OUT_OF_RANGE"  # the session's context would exceed max_context
    SESSION_LIVE = "ALREADY_EXISTS"  # a re-open that differs from the live session of that id


class SessionError(Exception):
    """A request the verifier refuses: `code` says why (a Refusal), `reason` says it to a person."""

    def __init__(self, code: Refusal, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


_SESSION_ID = re.compile(r"[0-9a-f]{32}")  # what new_session_id() issues


def new_session_id() -> str:
    return secrets.token_hex(16)


@dataclass(frozen=True)
class RoundResult:
    accepted: int
    token: int
    position: int
    drafted: int
    scheme: Scheme
    payload_bytes: int
    formula_bits: float
    verify_ms: float  # the whole round in the cloud: decode, forward passes, sampling
    forward_ms: float  # the target forward passes alone
    plain_tokens: tuple[int, ...] = ()  # tokens of the plain steps after `token`
    replayed: bool = False  # the verdict of an earlier identical batch, sent again (no new work)

    def verdict(self, received_unix_us: int, sent_unix_us: int) -> codec.Verdict:
        """What the edge is told, with the wall clock when the batch came in and the verdict went out."""
        return codec.Verdict(self.accepted, self.token, self.position, self.plain_tokens, received_unix_us,
                             sent_unix_us, round(self.forward_ms * 1e3))


@dataclass(frozen=True)
class LastRound:
    position: int  # accepted context length the batch continued
    digest: bytes  # Batch.digest() of that batch
    result: RoundResult


@dataclass
class Session:
    id: str
    context: list[int]
    request: codec.OpenRequest
    lm: LM
    max_drafts: int
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)
    rounds: int = 0
    prefilled: int = 0  # tokens of the context fed to lm by prefill_step
    last: LastRound | None = None  # for idempotent rounds
    streams: int = 0  # Verify streams serving it now (guarded by the verifier's lock)
    orphan: bool = False  # every stream that served it ended without a CloseSession


class Verifier:
    def __init__(self, target: TargetInfo, new_lm: Callable[[], LM], config: VerifierConfig = VerifierConfig(),
                 clock: Callable[[], float] = time.monotonic):
        self.target = target
        self._new_lm = new_lm
        self.config = config
        self._clock = clock  # session expiry (seconds); tests inject a fake one
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()
        self._pass_times = PassTimes()  # process-wide, by rows scored; guarded by _lock
        self._batcher: PassBatcher | None = None
        if config.batch_window_ms > 0:
            self._batcher = PassBatcher(self._run_pass, config.batch_window_ms / 1e3, config.batch_max_rows,
                                    expected=self._attached_sessions)

    # -- measured forward cost --------------------------------------------------------------
    def calibrate(self) -> dict[int, float]:
        """Time warm-cache forward passes of config.calibrate_rows rows on a scratch LM.

        Seeds the table the edges plan with before any round has run (every round refines it).
        """
        from sqs_models.engines import time_passes

        for rows, ms in time_passes(self._new_lm(), self.target.vocab_size, self.config.calibrate_rows).items():
            self._record_pass(rows, ms)
        return self.pass_table()

    def _record_pass(self, rows: int, ms: float) -> None:
        with self._lock:
            self._pass_times.add(rows, ms)

    def pass_table(self) -> dict[int, float]:
        """Median forward time (ms) by rows scored, as measured by this process."""
        with self._lock:
            return self._pass_times.table()

    # -- sessions ---------------------------------------------------------------------------
    def open(self, req: codec.OpenRequest) -> Session:
        """A new session, or with `client_session_id` a re-open (see the module docstring).

        `req` has passed codec.decode_open against this target's vocabulary (the servicer decodes).
        The context is not fed to the LM here: the caller runs prefill_step() until it returns
        True (one executor job per chunk); a round on a session not prefilled feeds the rest itself.
        """
        if req.vocab_fingerprint != self.target.fingerprint:
            raise SessionError(
                Refusal.VOCAB_MISMATCH,
                f"vocabulary fingerprint {req.vocab_fingerprint[:12] or '(none)'}... does not match the target "
                f"model {self.target.name} ({self.target.fingerprint[:12]}...): draft and target must share a tokenizer",
            )
        n, limit = len(req.context), self.config.max_context
        if n + 2 > limit:  # a round adds at least one draft's worth and a token
            raise SessionError(
                Refusal.MALFORMED,
                f"context of {n} tokens leaves no room for a round: this cloud keeps at most {limit} tokens per "
                f"session (context + one draft + one token)",
            )
        cid = req.client_session_id
        if cid and not _SESSION_ID.fullmatch(cid):
            raise SessionError(Refusal.MALFORMED, "client_session_id must be a session id this service issued")
        if cid:
            with self._lock:
                self._expire_locked()
                live = self._reopen_locked(cid, req)
            if live is not None:
                return live
        sid = cid or new_session_id()
        session = Session(sid, list(req.context), req, self._new_lm(), min(req.max_drafts, self.config.max_drafts),
                          last_used=self._clock())
        with self._lock:
            self._expire_locked()
            live = self._reopen_locked(sid, req)  # an identical re-open raced this one
            if live is not None:
                return live
            while len(self._sessions) >= self.config.max_sessions:
                old_id, _ = self._sessions.popitem(last=False)  # least recently used
                log.info("session evicted (LRU) session=%s", old_id)
            self._sessions[sid] = session
        log.info("session %s session=%s scheme=%s context=%d", "re-opened" if cid else "opened", sid,
                 req.scheme.scheme.value, n)
        return session

    def _reopen_locked(self, sid: str, req: codec.OpenRequest) -> Session | None:
        """The live session `sid` if `req` re-opens it identically; ALREADY_EXISTS if it differs."""
        live = self._sessions.get(sid)
        if live is None:
            return None
        same = live.context == req.context and replace(live.request, context=[], client_session_id="") == replace(
            req, context=[], client_session_id=""
        )
        if not same:
            raise SessionError(
                Refusal.SESSION_LIVE,
                f"session {sid} is live with another context or parameters; a re-open can only bring back a "
                f"session this cloud does not hold",
            )
        self._sessions.move_to_end(sid)
        live.last_used = self._clock()
        return live

    def prefill_step(self, session: Session) -> bool:
        """Feed the next prefill_chunk tokens of the opened context to the LM; True when done.

        Bounds the work of one call (a worker is held one chunk at a time, the LM's logits rows one
        chunk wide); everything but the last context token is fed, which the first round feeds
        with its drafts.
        """
        with session.lock:
            target = len(session.context) - 1
            if session.rounds or session.prefilled >= target:
                return True
            end = min(session.prefilled + self.config.prefill_chunk, target)
            session.lm.logits(session.context[:end], want=1)
            session.prefilled = end
            return end >= target

    def get(self, session_id: str) -> Session:
        with self._lock:
            return self._get_locked(session_id)

    def attach(self, session_id: str) -> Session:
        """get() for the first batch of a Verify stream: the stream now serves this session."""
        with self._lock:
            session = self._get_locked(session_id)
            session.streams += 1
            return session

    def _get_locked(self, session_id: str) -> Session:
        self._expire_locked()
        session = self._sessions.get(session_id)
        if session is None:
            raise SessionError(Refusal.UNKNOWN_SESSION, f"unknown or expired session {session_id[:64]!r}")
        self._sessions.move_to_end(session_id)
        session.last_used = self._clock()
        session.orphan = False
        return session

    def release(self, session_id: str) -> None:
        """A stream that served `session_id` ended. When no stream serves it any more, the session
        becomes an orphan, kept orphan_ttl_s for the edge to resume on a new stream.

        Why not close it at once: the server cannot tell a client that is done from one whose link
        broke. grpc.aio often shows a client's cancel (and a connection reset) as a normal end of
        the request stream, just like a half-close. Closing on that would make every hiccup cost
        the edge a re-open and a full prefill; an orphan TTL bounds what a killed client leaves
        behind instead, and our edge ends its sessions with CloseSession anyway.
        """
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                return
            session.streams = max(0, session.streams - 1)
            if not session.streams:
                session.orphan = True
                session.last_used = self._clock()

    def close(self, session_id: str) -> bool:
        with self._lock:
            return self._sessions.pop(session_id, None) is not None

    def reap(self) -> int:
        """Drop expired sessions and orphans past orphan_ttl_s; returns how many (the server's timer)."""
        with self._lock:
            return self._expire_locked()

    @property
    def active_sessions(self) -> int:
        with self._lock:
            return len(self._sessions)

    def _expire_locked(self) -> int:
        now, ttl, orphan_ttl = self._clock(), self.config.session_ttl_s, self.config.orphan_ttl_s
        gone = [
            s.id for s in self._sessions.values()
            if now - s.last_used > ttl or (s.orphan and not s.streams and now - s.last_used > orphan_ttl)
        ]
        for sid in gone:
            orphan = self._sessions.pop(sid).orphan
            log.info("session %s session=%s", "orphan reaped" if orphan else "expired", sid)
        return len(gone)

    # -- one round --------------------------------------------------------------------------
    def verify(self, session: Session, batch: codec.Batch) -> RoundResult:
        """Verify one batch; a malformed batch closes the session (SessionError INVALID_ARGUMENT).

        The batch that was verified last may come again (its verdict was lost on the way): it gets
        the same verdict, marked replayed, with no model work. A different batch for that position
        is refused: the edge must resend exactly what it sent.

        prepare (decode, validate; errors are this session's alone) -> forward (ONE pass over
        [pending token] + drafts, batched with other sessions' rounds when batching is on) ->
        finish (target p, rejection sampling with the (seed, position) generator, append, record).
        """
        with session.lock:
            t0 = time.perf_counter()
            prep = self._prepare(session, batch)
            if isinstance(prep, RoundResult):
                return prep
            logits, forward_ms = self._forward(session, prep.context, prep.want)  # [L+1, V]
            return self._finish(session, prep, logits, forward_ms, t0)

    def _prepare(self, session: Session, batch: codec.Batch) -> _Prepared | RoundResult:
        """Decode and validate `batch` against the session (its lock held); a replayed verdict as is."""
        req = session.request
        digest = batch.digest()
        last = session.last
        if last is not None and batch.position == last.position:
            if digest == last.digest:
                log.info("round replayed session=%s position=%d", session.id, last.position)
                return replace(last.result, replayed=True)
            self.close(session.id)
            raise SessionError(
                Refusal.MALFORMED,
                f"position {batch.position} was already verified with a different batch: a batch whose verdict "
                f"was lost must be resent unchanged",
            )
        try:
            if batch.position != len(session.context):
                raise codec.PayloadError(
                    f"batch continues position {batch.position}, the session's accepted context has "
                    f"{len(session.context)} tokens"
                )
            drafts = codec.unpack_batch(batch, req.scheme, session.max_drafts)
        except codec.PayloadError as exc:
            self.close(session.id)
            raise SessionError(Refusal.MALFORMED, str(exc)) from None
        if len(session.context) + len(drafts) + 1 > self.config.max_context:
            raise SessionError(Refusal.CONTEXT_FULL, f"session context would exceed {self.config.max_context} tokens")
        tokens = [d.token for d in drafts]
        return _Prepared(batch, digest, drafts, tokens, session.context + tokens, len(tokens) + 1)

    def _finish(self, session: Session, prep: _Prepared, logits: np.ndarray, forward_ms: float,
                t0: float) -> RoundResult:
        """Sample the verdict from the target rows, extend the context, run the plain steps, record."""
        req, batch, drafts, tokens = session.request, prep.batch, prep.drafts, prep.tokens
        start = len(session.context)
        s = req.sampling
        steps = min(int(batch.plain_steps), self.config.max_plain_steps)
        p = target_probs(logits.astype(np.float64), s.temperature, s.top_k, s.top_p)  # [L+1, V]
        rng = np.random.default_rng([s.seed, len(session.context)])
        rows = [SparseRow(d.support, d.probs) for d in drafts]
        accepted, token = verify_sparse(tokens, rows, p, rng)
        session.context.extend(tokens[:accepted])
        session.context.append(token)
        round_token = token
        plain: list[int] = []
        eos = set(self.target.eos_token_ids)
        # Cloud-only steps: each is exactly a zero-draft round at its position (same draw).
        while len(plain) < steps and token not in eos and len(session.context) + 1 < self.config.max_context:
            row, step_ms = self._forward(session, session.context, 1)  # [1, V]
            forward_ms += step_ms
            p1 = target_probs(row.astype(np.float64), s.temperature, s.top_k, s.top_p)
            _, token = verify_sparse([], [], p1, np.random.default_rng([s.seed, len(session.context)]))
            session.context.append(token)
            plain.append(token)
        session.rounds += 1
        # The cloud's own bits of the batch, for its metrics (the edge's records carry the edge's).
        bits = batch_bits(codec.batch_scheme(batch, req.scheme), (d.support.size for d in drafts))
        result = RoundResult(
            accepted=accepted,
            token=round_token,
            position=len(session.context),
            drafted=len(drafts),
            scheme=req.scheme.scheme,
            payload_bytes=batch.payload_bytes,
            formula_bits=bits.formula,
            verify_ms=(time.perf_counter() - t0) * 1e3,
            forward_ms=forward_ms,
            plain_tokens=tuple(plain),
        )
        session.last = LastRound(start, prep.digest, result)
        return result

    # -- forward passes ---------------------------------------------------------------------
    def _forward(self, session: Session, context: list[int], want: int) -> tuple[np.ndarray, float]:
        """Target logits [want, V] for the session's context and the ms of the pass that computed them
        (a wait in the batcher's queue is not in it: it shows in RoundResult.verify_ms).

        With batching on (and an LM that has a batched pass) the pass is shared with the rounds of
        other sessions that are ready within the window (cloud/pass_batcher.py). The pass table records,
        for a batched pass, the time of the whole pass against the rows of THIS session: it is what
        this session's round costs in latency, which is what the edges plan their draft lengths with.
        """
        if self._batcher is None or not hasattr(type(session.lm), "logits_batch"):
            t_fwd = time.perf_counter()
            # The LM's KV cache follows `context`: it crops to the common prefix (the rollback of the
            # last round's rejected drafts) and feeds the rest (sqs_models/cached_lm.py).
            logits = session.lm.logits(context, want=want)
            ms = (time.perf_counter() - t_fwd) * 1e3
        else:
            logits, ms = self._batcher.submit(_Pass(session.lm, context, want), want)
        self._record_pass(want, ms)
        return logits, ms

    def _run_pass(self, passes: list[_Pass]) -> list[tuple[np.ndarray, float] | BaseException]:
        """The PassBatcher's run: ONE forward pass over every item (their LMs share the target model).

        If the batched pass fails, each item runs alone so that a failure stays with its session.
        """
        t_fwd = time.perf_counter()
        try:
            rows = type(passes[0].lm).logits_batch([p.lm for p in passes], [p.context for p in passes],
                                                    [p.want for p in passes])
        except Exception as exc:
            if len(passes) == 1:
                return [exc]
            log.warning("batched forward pass of %d sessions failed (%s); running them one by one",
                        len(passes), exc)
            out: list[tuple[np.ndarray, float] | BaseException] = []
            for p in passes:
                t1 = time.perf_counter()
                try:
                    out.append((p.lm.logits(p.context, p.want), (time.perf_counter() - t1) * 1e3))
                except Exception as one:
                    out.append(one)
            return out
        ms = (time.perf_counter() - t_fwd) * 1e3
        return [(r, ms) for r in rows]

    def pass_stats(self) -> PassStats | None:
        """Counters of the shared passes (None with cross-session batching off)."""
        return None if self._batcher is None else self._batcher.stats()

    batch_stats = pass_stats  # the former name; loadtest/runner.py and tests/test_batching_e2e.py still call it

    def _attached_sessions(self) -> int:
        """Sessions with a Verify stream now: the rounds a pass leader may wait for."""
        with self._lock:
            return sum(1 for s in self._sessions.values() if s.streams)


@dataclass(frozen=True)
class _Prepared:
    """A decoded, validated round waiting for its forward pass."""

    batch: codec.Batch
    digest: bytes
    drafts: list
    tokens: list[int]
    context: list[int]  # accepted context + drafts: what the pass scores
    want: int  # L + 1 rows


@dataclass(frozen=True)
class _Pass:
    """One session's share of a batched forward pass."""

    lm: LM
    context: list[int]
    want: int
