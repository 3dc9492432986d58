"""Cloud-side sessions and one verification round (no gRPC here; servicer.py adapts it).

Per session: the accepted context, the target LM with its KV cache, the sampling parameters, the
scheme the edge describes its drafts with. A round decodes the batch, runs ONE target forward pass
over [pending token] + drafts, turns the L+1 logit rows into target distributions p and calls the
lossless rejection sampler with a generator keyed by (seed, position), so the same round gives the
same verdict after a cloud restart and a re-open with the same context.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np

from common import codec
from common.bits import formula_bits
from common.costmodel import PassTimes
from common.pb.v1 import sqs_pb2 as pb
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


class SessionError(Exception):
    """A request the verifier refuses; `code` names the gRPC status the servicer answers with."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


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

    # -- measured forward cost --------------------------------------------------------------
    def calibrate(self, context_len: int = 32) -> dict[int, float]:
        """Time warm-cache forward passes of config.calibrate_rows rows on a scratch LM.

        Seeds the table the edges plan with before any round has run (every round refines it).
        """
        lm = self._new_lm()
        base = [i % self.target.vocab_size for i in range(context_len)]
        lm.logits(base, want=1)  # prefill, not timed
        for rows in self.config.calibrate_rows:
            extra = [(7 * j + 3) % self.target.vocab_size for j in range(rows)]
            lm.logits(base + extra, want=rows)  # warm-up of this shape
            for _ in range(2):
                t0 = time.perf_counter()
                lm.logits(base + extra, want=rows)
                self._record_pass(rows, (time.perf_counter() - t0) * 1e3)
        return self.pass_table()

    def _record_pass(self, rows: int, ms: float) -> None:
        with self._lock:
            self._pass_times.add(rows, ms)

    def pass_table(self) -> dict[int, float]:
        """Median forward time (ms) by rows scored, as measured by this process."""
        with self._lock:
            return self._pass_times.table()

    # -- sessions ---------------------------------------------------------------------------
    def open(self, msg: pb.OpenSessionRequest) -> Session:
        try:
            req = codec.decode_open(msg, self.target.vocab_size)
        except codec.PayloadError as exc:
            raise SessionError("INVALID_ARGUMENT", str(exc)) from None
        if req.vocab_fingerprint != self.target.fingerprint:
            raise SessionError(
                "FAILED_PRECONDITION",
                f"vocabulary fingerprint {req.vocab_fingerprint[:12] or '(none)'}... does not match the target "
                f"model {self.target.name} ({self.target.fingerprint[:12]}...): draft and target must share a tokenizer",
            )
        if len(req.context) > self.config.max_context:
            raise SessionError("INVALID_ARGUMENT", f"context longer than {self.config.max_context} tokens")
        sid = req.client_session_id or uuid.uuid4().hex
        session = Session(sid, list(req.context), req, self._new_lm(), min(req.max_drafts, self.config.max_drafts),
                          last_used=self._clock())
        with self._lock:
            self._expire_locked()
            self._sessions.pop(sid, None)
            while len(self._sessions) >= self.config.max_sessions:
                old_id, _ = self._sessions.popitem(last=False)  # least recently used
                log.info("session evicted (LRU) session=%s", old_id)
            self._sessions[sid] = session
        log.info("session opened session=%s scheme=%s context=%d", sid, req.scheme.scheme.value, len(req.context))
        return session

    def get(self, session_id: str) -> Session:
        with self._lock:
            self._expire_locked()
            session = self._sessions.get(session_id)
            if session is None:
                raise SessionError("NOT_FOUND", f"unknown or expired session {session_id[:64]!r}")
            self._sessions.move_to_end(session_id)
            session.last_used = self._clock()
            return session

    def close(self, session_id: str) -> bool:
        with self._lock:
            return self._sessions.pop(session_id, None) is not None

    @property
    def active_sessions(self) -> int:
        with self._lock:
            return len(self._sessions)

    def _expire_locked(self) -> None:
        now = self._clock()
        for sid in [s.id for s in self._sessions.values() if now - s.last_used > self.config.session_ttl_s]:
            del self._sessions[sid]
            log.info("session expired session=%s", sid)

    # -- one round --------------------------------------------------------------------------
    def verify(self, session: Session, msg: pb.DraftBatch) -> RoundResult:
        """Verify one batch; a malformed batch closes the session (SessionError INVALID_ARGUMENT)."""
        with session.lock:
            t0 = time.perf_counter()
            req = session.request
            try:
                if msg.position != len(session.context):
                    raise codec.PayloadError(
                        f"batch continues position {msg.position}, the session's accepted context has "
                        f"{len(session.context)} tokens"
                    )
                drafts = codec.decode_batch(msg, req.scheme, session.max_drafts)
            except codec.PayloadError as exc:
                self.close(session.id)
                raise SessionError("INVALID_ARGUMENT", str(exc)) from None
            if len(session.context) + len(drafts) + 1 > self.config.max_context:
                raise SessionError("OUT_OF_RANGE", f"session context would exceed {self.config.max_context} tokens")
            tokens = [d.token for d in drafts]
            steps = min(int(msg.plain_steps), self.config.max_plain_steps)
            s = req.sampling
            t_fwd = time.perf_counter()
            logits = session.lm.logits(session.context + tokens, want=len(tokens) + 1)  # [L+1, V]
            forward_ms = (time.perf_counter() - t_fwd) * 1e3
            self._record_pass(len(tokens) + 1, forward_ms)
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
                t_fwd = time.perf_counter()
                row = session.lm.logits(session.context, want=1)  # [1, V]
                step_ms = (time.perf_counter() - t_fwd) * 1e3
                forward_ms += step_ms
                self._record_pass(1, step_ms)
                p1 = target_probs(row.astype(np.float64), s.temperature, s.top_k, s.top_p)
                _, token = verify_sparse([], [], p1, np.random.default_rng([s.seed, len(session.context)]))
                session.context.append(token)
                plain.append(token)
            session.rounds += 1
            scheme = codec.batch_scheme(msg, req.scheme)
            formula = sum(formula_bits(scheme, int(d.support.size)) for d in drafts)
            return RoundResult(
                accepted=accepted,
                token=round_token,
                position=len(session.context),
                drafted=len(drafts),
                scheme=req.scheme.scheme,
                payload_bytes=len(msg.packed) + len(msg.raw),
                formula_bits=formula,
                verify_ms=(time.perf_counter() - t0) * 1e3,
                forward_ms=forward_ms,
                plain_tokens=tuple(plain),
            )
