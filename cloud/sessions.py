"""The cloud's session table: open, re-open, prefill, attach and release streams, close, expire, reap.

Per session: the accepted context, the target LM with its KV cache, the sampling parameters and the
scheme the edge describes its drafts with (the OpenRequest). What a round does with them is
cloud/verifier.py; this module only decides which sessions exist.

Sessions survive what the network and the edge do to them:
- Session ids are 128-bit random capabilities issued here. `client_session_id` (a re-open after a
  restart or an expiry) may only bring back an id this service does not hold; it never replaces a
  live session (ALREADY_EXISTS), except that an identical re-open (same accepted context and
  parameters: the edge retrying an open whose reply was lost) returns the live session unchanged.
- A context is refused at open when no round fits under `max_context`; the first prefill runs in
  chunks of `prefill_chunk` tokens (`prefill_step`, one executor job each), so a long prompt never
  holds a verify worker for more than one chunk.
- A session belongs to the identity that opened it (cloud/auth.py: a token name or a certificate
  CN): a get, attach, close or re-open of its id by another identity is PERMISSION_DENIED (the id
  is known, so NOT_FOUND would only send that edge into a futile re-open; it learns nothing it did
  not have). When the table is full, the least recently used session of the identity holding the
  most is evicted, so one identity's sessions cannot push out everyone else's; `admit(held)` at
  open is the per-identity session quota (cloud/quotas.py), checked under the table's lock.
- Expired sessions are reaped by `reap()` (the server calls it on a timer). A session whose every
  stream ended without a CloseSession is an orphan: it is kept `orphan_ttl_s` for the edge to
  resume (see release(); a re-open with the accepted context is always correct, so a short orphan
  TTL only costs a prefill).
"""

from __future__ import annotations

import enum
import logging
import re
import secrets
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from cloud.config import TargetInfo, VerifierConfig
from common import codec
from common.lm import LM

log = logging.getLogger("sqs.cloud")


class Refusal(enum.StrEnum):
    """Why the verifier refuses a request. The value is the name of the gRPC status it is answered
    with (docs/DESIGN.md section 8); cloud/servicer.py maps each to its status code in one table."""

    MALFORMED = "INVALID_ARGUMENT"  # a malformed or inconsistent request
    UNKNOWN_SESSION = "NOT_FOUND"  # unknown or expired: the edge re-opens it (resync)
    VOCAB_MISMATCH = "FAILED_PRECONDITION"  # draft and target do not share a tokenizer
    CONTEXT_FULL = "OUT_OF_RANGE"  # the session's context would exceed max_context
    SESSION_LIVE = "ALREADY_EXISTS"  # a re-open that differs from the live session of that id
    NOT_OWNER = "PERMISSION_DENIED"  # the session was opened by another identity


class SessionError(Exception):
    """A request the verifier refuses: `code` says why (a Refusal), `reason` says it to a person."""

    def __init__(self, code: Refusal, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


ANONYMOUS = "anonymous"  # the identity of every caller of a cloud that authenticates none (cloud/auth.py)
_SESSION_ID = re.compile(r"[0-9a-f]{32}")  # what new_session_id() issues


def new_session_id() -> str:
    return secrets.token_hex(16)


@dataclass
class Session:
    id: str
    context: list[int]
    request: codec.OpenRequest
    lm: LM
    max_drafts: int
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)  # held by a round or a prefill step
    rounds: int = 0
    prefilled: int = 0  # tokens of the context fed to lm by prefill_step
    # The target's logits after the whole prefilled context, float32 [V], from the last prefill
    # chunk: the first round's first row, which it then takes instead of computing (take_next_row).
    next_row: Any = None
    last: Any = None  # the verifier's record of the last verified batch (cloud/verifier.py LastRound)
    streams: int = 0  # Verify streams serving it now (guarded by the table's lock)
    orphan: bool = False  # every stream that served it ended without a CloseSession
    owner: str = ANONYMOUS  # the identity that opened it (cloud/auth.py); only it may use the session
    # The latest lookahead batch (DraftBatch.lookahead), held for the streamed round's next step:
    # (position, drafts) or (position, refusal reason). Set by the stream's reader while the round
    # steps under `lock`, so it has its own.
    lookahead: Any = None
    lookahead_lock: threading.Lock = field(default_factory=threading.Lock)

    def hold_lookahead(self, held: Any) -> None:
        with self.lookahead_lock:
            self.lookahead = held

    def take_lookahead(self) -> Any:
        """The held lookahead, once (None: none since the last take)."""
        with self.lookahead_lock:
            held, self.lookahead = self.lookahead, None
            return held

    def take_next_row(self) -> Any:
        """The prefill's row after the whole context (float32 [V]), once, if the context is still the
        one prefilled (a round always extends it); else None (the round computes its own rows)."""
        kept, self.next_row = self.next_row, None
        if kept is None or kept[0] != len(self.context):
            return None
        return kept[1]


class SessionTable:
    """The sessions of one cloud, least recently used first. Thread-safe: one lock guards the
    table; a session's own state during a round is guarded by its `lock` (cloud/verifier.py)."""

    def __init__(self, target: TargetInfo, new_lm: Callable[[], LM], config: VerifierConfig = VerifierConfig(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.target = target
        self.new_lm = new_lm  # one LM (with its own KV cache) per session
        self.config = config
        self._clock = clock  # session expiry (seconds); tests inject a fake one
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

    def open(self, req: codec.OpenRequest, owner: str = ANONYMOUS, admit: Callable[[int], None] | None = None) -> Session:
        """A new session of `owner`, or with `client_session_id` a re-open (see the module docstring).
        admit(sessions owner holds now) may raise to refuse a new one (the session quota).

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
                live = self._reopen_locked(cid, req, owner)
            if live is not None:
                return live
        if admit is not None:
            with self._lock:
                admit(self._owned_locked(owner))  # refused before an LM is made
        sid = cid or new_session_id()
        session = Session(sid, list(req.context), req, self.new_lm(), min(req.max_drafts, self.config.max_drafts),
                          last_used=self._clock(), owner=owner)
        with self._lock:
            self._expire_locked()
            live = self._reopen_locked(sid, req, owner)  # an identical re-open raced this one
            if live is not None:
                return live
            if admit is not None:
                admit(self._owned_locked(owner))
            while len(self._sessions) >= self.config.max_sessions:
                old_id = self._eviction_locked()
                del self._sessions[old_id]
                log.info("session evicted (LRU of the identity holding the most) session=%s", old_id)
            self._sessions[sid] = session
        log.info("session %s session=%s scheme=%s context=%d", "re-opened" if cid else "opened", sid,
                 req.scheme.scheme.value, n)
        return session

    def _owned_locked(self, owner: str) -> int:
        return sum(1 for s in self._sessions.values() if s.owner == owner)

    def owned(self, owner: str) -> int:
        """Sessions `owner` holds now."""
        with self._lock:
            return self._owned_locked(owner)

    def _eviction_locked(self) -> str:
        """The id to evict from a full table: the least recently used session of the identity that
        holds the most (plain LRU when one identity holds them all)."""
        held = Counter(s.owner for s in self._sessions.values())
        most = max(held.values())
        return next(sid for sid, s in self._sessions.items() if held[s.owner] == most)

    @staticmethod
    def _check_owner(session: Session, owner: str | None) -> None:
        if owner is not None and session.owner != owner:
            raise SessionError(Refusal.NOT_OWNER, f"session {session.id} was opened by another identity; "
                                                  f"only that identity may use it")

    def _reopen_locked(self, sid: str, req: codec.OpenRequest, owner: str) -> Session | None:
        """The live session `sid` if `req` re-opens it identically; ALREADY_EXISTS if it differs,
        PERMISSION_DENIED if another identity holds it."""
        live = self._sessions.get(sid)
        if live is None:
            return None
        self._check_owner(live, owner)
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

    def prefill_step(self, session: Session, feed: Callable[[list[int], int], Any] | None = None) -> bool:
        """Feed the next prefill_chunk tokens of the opened context to the LM; True when done.

        Bounds the work of one call (a worker is held one chunk at a time, the LM's logits rows one
        chunk wide). The whole context is fed, and the last chunk's row (the logits after the last
        context token) is kept as the first round's first row: fed with the prompt it costs a
        prefill's share of a token, while the first round feeding it alone costs a pass (measured on
        llama Q4_K_M, one core: a 30-token prompt 574 ms, then a lone step 147 ms; a plain first
        token came ~170 ms after llama-server's). feed(prefix, new_tokens) feeds them and returns
        the logits after the prefix, float32 [1, V] (default: the session's LM alone; the verifier
        may hand them to a shared pass).
        """
        with session.lock:
            target = len(session.context)
            if session.rounds or session.prefilled >= target:
                return True
            end = min(session.prefilled + self.config.prefill_chunk, target)
            if feed is None:
                row = session.lm.logits(session.context[:end], want=1)
            else:
                row = feed(session.context[:end], end - session.prefilled)
            session.prefilled = end
            if end >= target:
                session.next_row = (end, row[-1])
            return end >= target

    def get(self, session_id: str, owner: str | None = None) -> Session:
        """The session (owner given: only if `owner` opened it, else PERMISSION_DENIED)."""
        with self._lock:
            return self._get_locked(session_id, owner)

    def attach(self, session_id: str, owner: str | None = None) -> Session:
        """get() for the first batch of a Verify stream: the stream now serves this session."""
        with self._lock:
            session = self._get_locked(session_id, owner)
            session.streams += 1
            return session

    def _get_locked(self, session_id: str, owner: str | None = None) -> Session:
        self._expire_locked()
        session = self._sessions.get(session_id)
        if session is None:
            raise SessionError(Refusal.UNKNOWN_SESSION, f"unknown or expired session {session_id[:64]!r}")
        self._check_owner(session, owner)  # before anything of the session changes
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

    def close(self, session_id: str, owner: str | None = None) -> bool:
        """End the session; False if unknown. Owner given: PERMISSION_DENIED for another's."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None:
                self._check_owner(session, owner)
            return self._sessions.pop(session_id, None) is not None

    def reap(self) -> int:
        """Drop expired sessions and orphans past orphan_ttl_s; returns how many (the server's timer)."""
        with self._lock:
            return self._expire_locked()

    @property
    def active(self) -> int:
        """Sessions held now."""
        with self._lock:
            return len(self._sessions)

    def attached(self) -> int:
        """Sessions with a Verify stream now: the rounds that may come in soon."""
        with self._lock:
            return sum(1 for s in self._sessions.values() if s.streams)

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
