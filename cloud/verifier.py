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
    verify_ms: float


class Verifier:
    def __init__(self, target: TargetInfo, new_lm: Callable[[], LM], config: VerifierConfig = VerifierConfig()):
        self.target = target
        self._new_lm = new_lm
        self.config = config
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

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
        session = Session(sid, list(req.context), req, self._new_lm(), min(req.max_drafts, self.config.max_drafts))
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
            session.last_used = time.monotonic()
            return session

    def close(self, session_id: str) -> bool:
        with self._lock:
            return self._sessions.pop(session_id, None) is not None

    @property
    def active_sessions(self) -> int:
        with self._lock:
            return len(self._sessions)

    def _expire_locked(self) -> None:
        now = time.monotonic()
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
            logits = session.lm.logits(session.context + tokens, want=len(tokens) + 1)  # [L+1, V]
            s = req.sampling
            p = target_probs(logits.astype(np.float64), s.temperature, s.top_k, s.top_p)  # [L+1, V]
            rng = np.random.default_rng([s.seed, len(session.context)])
            rows = [SparseRow(d.support, d.probs) for d in drafts]
            accepted, token = verify_sparse(tokens, rows, p, rng)
            session.context.extend(tokens[:accepted])
            session.context.append(token)
            session.rounds += 1
            formula = sum(formula_bits(req.scheme, int(d.support.size)) for d in drafts)
            return RoundResult(
                accepted=accepted,
                token=token,
                position=len(session.context),
                drafted=len(drafts),
                scheme=req.scheme.scheme,
                payload_bytes=len(msg.packed) + len(msg.raw),
                formula_bits=formula,
                verify_ms=(time.perf_counter() - t0) * 1e3,
            )
