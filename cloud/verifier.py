"""One verification round on a session (no gRPC here; servicer.py adapts it): prepare, forward, finish.

A round decodes the batch, runs ONE target forward pass over [pending token] + drafts, turns the
L+1 logit rows into target distributions p and calls the lossless rejection sampler with a
generator keyed by (seed, position), so the same round gives the same verdict after a cloud restart
and a re-open with the same context. The sessions themselves (open, re-open, streams, expiry) are
cloud/sessions.py; the Verifier answers the service's session calls through its table.

Rounds are idempotent. The session keeps its last verdict and the digest of the batch that produced
it; the same batch sent again (its verdict was lost) gets that verdict again without a second
forward pass; a different batch for an already verified position is refused.

Streamed plain steps (Batch.stream): the round hands each token to `emit` as soon as it is sampled
(the servicer sends it at once) and steps on without waiting for the edge, until its plain steps
are done, an EOS, the context limit, or `stop()` (the stream ended). A round stopped that way keeps
the steps it still owes; the same batch sent again replays what was sampled and goes on, so the
token stream after a resend is the one the first attempt would have given.

Cross-session batching (`batch_window_ms` > 0, and a target LM with `logits_batch`: torch's CachedLM,
or llama.cpp's BatchedLlamaLM, whose sessions are sequences of one llama_context): a round is
prepared (decoded, validated) alone, its forward pass goes through cloud/pass_batcher.py, which runs
ONE pass for the rounds of several sessions that are ready within the window, and it is finished
(sampled, appended, recorded) alone. Each session keeps its own cache,
its own (seed, position) generator and its own errors, so its verdicts are those of an unbatched
run; the plain target steps of a cloud-only round go through the pass batcher too. The pass leader
runs the other sessions' LMs while their round threads wait in the batcher holding their session locks,
so nothing else touches those LMs meanwhile.

The pass-time table (median forward ms by rows scored, which the edges plan their rounds with) is
refined by every pass here; whoever loads the engine seeds it at start (cloud/server.py).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable, Mapping

import numpy as np

from cloud.config import TargetInfo, VerifierConfig
from cloud.pass_batcher import PassBatcher, PassStats
from cloud.sessions import Refusal, Session, SessionError, SessionTable
from common import codec
from common.batch_format import batch_bits
from common.costmodel import PassTimes, row_price
from common.pass_shape import shape_rows
from common.lm import LM
from common.gumbel import gumbel_token, verify_invariant
from common.rejection import SparseRow, target_probs, verify_sparse
from common.schemes import Scheme

# Names the callers of the service import from here (tests, the servicer); they live next door.
__all__ = ["LastRound", "Refusal", "RoundResult", "Session", "SessionError", "TargetInfo", "Verifier",
           "VerifierConfig"]

log = logging.getLogger("sqs.cloud")


# The acceptance a shared pass values a lookahead draft by before any was verified (per position;
# RESULTS 0g-0i measured 0.86-0.97 at T = 0 and 1), and how many drafts that prior is worth.
LOOKAHEAD_PRIOR = 0.7
LOOKAHEAD_PRIOR_DRAFTS = 20


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
    row_price_ms: float | None = None  # the cloud's price of one more row when the round ended
    lookahead_drafted: int = 0  # drafts of lookahead batches verified in the plain steps
    lookahead_accepted: int = 0  # of those, accepted (their tokens are in plain_tokens)

    def verdict(self, received_unix_us: int, sent_unix_us: int) -> codec.Verdict:
        """What the edge is told, with the wall clock when the batch came in and the verdict went out."""
        return codec.Verdict(self.accepted, self.token, self.position, self.plain_tokens, received_unix_us,
                             sent_unix_us, round(self.forward_ms * 1e3), row_price_ms=self.row_price_ms,
                             lookahead_drafted=self.lookahead_drafted, lookahead_accepted=self.lookahead_accepted)


@dataclass(frozen=True)
class LastRound:
    """What a session keeps of its last verified batch (Session.last), for idempotent rounds."""

    position: int  # accepted context length the batch continued
    digest: bytes  # Batch.digest() of that batch
    result: RoundResult
    owed: int = 0  # plain steps not run yet: a streamed round whose stream ended first


class Verifier:
    def __init__(self, target: TargetInfo, new_lm: Callable[[], LM], config: VerifierConfig = VerifierConfig(),
                 clock: Callable[[], float] = time.monotonic):
        self.target = target
        self.config = config
        self.sessions = SessionTable(target, new_lm, config, clock)
        self._pass_lock = threading.Lock()
        self._pass_times = PassTimes()  # process-wide, by rows scored; guarded by _pass_lock
        self._load = (1.0, 1.0)  # rows and sessions per shared pass, smoothed; guarded by _pass_lock
        self._quoted = (0, 0, 0)  # the batcher's (passes, rows, items) at the last price quote
        self._batcher: PassBatcher | None = None
        # Told (sessions, rows) of every verification pass; the server points it at Metrics.observe_pass.
        self.on_pass: Callable[[int, int], None] = lambda sessions, rows: None
        # Told the optional rows a shared pass dropped (common/pass_shape.py); the server meters them.
        self.on_rows_dropped: Callable[[int], None] = lambda rows: None
        self._lookahead = (0, 0)  # lookahead drafts (accepted, verified) so far; guarded by _pass_lock
        if config.batch_window_ms > 0:
            self._batcher = PassBatcher(self._run_pass, config.batch_window_ms / 1e3, config.batch_max_rows,
                                        expected=self.sessions.attached, rejoin=config.batch_rejoin,
                                        cost=self._predict_pass)

    # -- the service's session calls, answered by the table (cloud/sessions.py) ------------------
    def open(self, req: codec.OpenRequest) -> Session:
        return self.sessions.open(req)

    def prefill_step(self, session: Session) -> bool:
        """The next prefill chunk of an opened session: in a shared pass when the LMs take ragged
        batches (see prefills_in_passes), else alone."""
        if not self.prefills_in_passes(session):
            return self.sessions.prefill_step(session)

        def feed(prefix: list[int], new_tokens: int) -> np.ndarray:
            logits, _ = self._batcher.submit(_Pass(session.lm, prefix, 1, fed=new_tokens),  # type: ignore[union-attr]
                                             new_tokens, gather=False, source=session.id)
            return logits

        return self.sessions.prefill_step(session, feed)

    def prefills_in_passes(self, session: Session) -> bool:
        """Does an opened session's prefill go into the shared passes? Only on LMs whose batched
        pass feeds each session its own tokens (``ragged_batch``: llama.cpp's one llama_decode);
        torch's pads every session to the longest, so a prompt would pad every step beside it.
        Alone, an 8-token prompt cost llama Q4_K_M ~450 ms of the cloud's one core, a pass of its own
        beside the shared ones (at N = 16 edges, ~30% of the cloud CPU of 32-token requests); in
        a pass of 16 one-row steps it adds about what 8 more rows do."""
        return self._batcher is not None and getattr(type(session.lm), "ragged_batch", False)

    def get(self, session_id: str) -> Session:
        return self.sessions.get(session_id)

    def attach(self, session_id: str) -> Session:
        return self.sessions.attach(session_id)

    def release(self, session_id: str) -> None:
        self.sessions.release(session_id)
        if self._batcher is not None:
            self._batcher.leave(session_id)  # no shared pass waits for a session its stream no longer serves

    def close(self, session_id: str, owner: str | None = None) -> bool:
        closed = self.sessions.close(session_id, owner)  # raises for another's session: nothing left then
        if self._batcher is not None:
            self._batcher.leave(session_id)
        return closed

    def reap(self) -> int:
        return self.sessions.reap()

    @property
    def active_sessions(self) -> int:
        return self.sessions.active

    # -- measured forward cost --------------------------------------------------------------
    def record_passes(self, ms_by_rows: Mapping[int, float]) -> None:
        """Add forward-pass times measured outside a round (ms by rows scored): the server times
        warm-cache passes when it loads the engine, so the edges can plan before any round ran."""
        for rows, ms in ms_by_rows.items():
            self._record_pass(rows, ms)

    def _predict_pass(self, rows: int) -> float:
        """ms of one pass of `rows` rows from this process's table (0 before any pass is known)."""
        with self._pass_lock:
            return self._pass_times.predict(rows)

    def _predict_pass_as_measured(self, rows: int) -> float:
        """_predict_pass without "more rows never cheaper": the dips of repacked llama.cpp (4 rows
        under 3, 16 under 13) are what common/pass_shape.py steers the shared passes into."""
        with self._pass_lock:
            return self._pass_times.predict(rows, monotone=False)

    def _record_pass(self, rows: int, ms: float) -> None:
        with self._pass_lock:
            self._pass_times.add(rows, ms)

    def row_price(self) -> float:
        """The price (ms) of one more row in this cloud's passes now, which every verdict quotes
        (common/costmodel.row_price): the pass table at the current load, i.e. the rows and
        sessions per shared pass since the last quote (smoothed). Without cross-session batching
        every pass serves one session."""
        stats = self.pass_stats()
        with self._pass_lock:
            if stats is not None and stats.passes > self._quoted[0]:
                passes, rows, items = (n - q for n, q in zip((stats.passes, stats.rows, stats.items), self._quoted))
                self._load = tuple(0.5 * old + 0.5 * new for old, new in zip(self._load, (rows / passes, items / passes)))
                self._quoted = (stats.passes, stats.rows, stats.items)
            return row_price(self._pass_times.predict, *self._load)

    def pass_table(self) -> dict[int, float]:
        """Median forward time (ms) by rows scored, as measured by this process."""
        with self._pass_lock:
            return self._pass_times.table()

    # -- one round --------------------------------------------------------------------------
    def verify(self, session: Session, batch: codec.Batch, emit: Callable[[RoundResult], None] | None = None,
               stop: Callable[[], bool] | None = None) -> RoundResult:
        """Verify one batch; a malformed batch closes the session (SessionError INVALID_ARGUMENT).

        The batch that was verified last may come again (its verdict was lost on the way): it gets
        the same verdict, marked replayed, with no model work; a streamed round that was stopped
        early goes on from where it stopped. A different batch for that position is refused: the
        edge must resend exactly what it sent.

        prepare (decode, validate; errors are this session's alone) -> forward (ONE pass over
        [pending token] + drafts, batched with other sessions' rounds when batching is on) ->
        finish (target p, rejection sampling with the (seed, position) generator, append) -> plain
        steps, if asked (each handed to `emit` as it is sampled; `stop()` ends them early) -> record.
        """
        with session.lock:
            t0 = time.perf_counter()
            prep = self._prepare(session, batch)
            if isinstance(prep, RoundResult):
                if session.last.owed:  # a streamed round stopped early: replay and go on
                    return self._plain_steps(session, session.last, emit, stop, t0)
                return prep
            logits, forward_ms = self._round_rows(session, prep)  # [L+1, V]
            return self._finish(session, prep, logits, forward_ms, t0, emit, stop)

    def _prepare(self, session: Session, batch: codec.Batch) -> _Prepared | RoundResult:
        """Decode and validate `batch` against the session (its lock held); a replayed verdict as is."""
        req = session.request
        digest = batch.digest()
        last = session.last
        if last is not None and batch.position == last.position:
            if digest == last.digest:
                log.info("round replayed session=%s position=%d", session.id, last.position)
                return replace(last.result, replayed=True)
            self.sessions.close(session.id)
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
            self.sessions.close(session.id)
            raise SessionError(Refusal.MALFORMED, str(exc)) from None
        if len(session.context) + len(drafts) + 1 > self.config.max_context:
            raise SessionError(Refusal.CONTEXT_FULL, f"session context would exceed {self.config.max_context} tokens")
        tokens = [d.token for d in drafts]
        return _Prepared(batch, digest, drafts, tokens, session.context + tokens, len(tokens) + 1)

    def _finish(self, session: Session, prep: _Prepared, logits: np.ndarray, forward_ms: float, t0: float,
                emit: Callable[[RoundResult], None] | None, stop: Callable[[], bool] | None) -> RoundResult:
        """Sample the verdict from the target rows, extend the context, run the plain steps, record."""
        req, batch, drafts, tokens = session.request, prep.batch, prep.drafts, prep.tokens
        start = len(session.context)
        s = req.sampling
        # A streamed round is bounded by the context limit only: the edge ends it when it wants.
        steps = int(batch.plain_steps) if batch.stream else min(int(batch.plain_steps), self.config.max_plain_steps)
        p = target_probs(logits, s.temperature, s.top_k, s.top_p)  # [L+1, V] float64
        accepted, token = self._sample(req, tokens, drafts, p, start)
        session.context.extend(tokens[:accepted])
        session.context.append(token)
        session.rounds += 1
        # The cloud's own bits of the batch, for its metrics (the edge's records carry the edge's).
        bits = batch_bits(codec.batch_scheme(batch, req.scheme), (d.support.size for d in drafts))
        result = RoundResult(
            accepted=accepted,
            token=token,
            position=len(session.context),
            drafted=len(drafts),
            scheme=req.scheme.scheme,
            payload_bytes=batch.payload_bytes,
            formula_bits=bits.formula,
            verify_ms=(time.perf_counter() - t0) * 1e3,
            forward_ms=forward_ms,
        )
        return self._plain_steps(session, LastRound(start, prep.digest, result, steps), emit, stop, t0)

    @staticmethod
    def _sample(req: codec.OpenRequest, tokens: list[int], drafts: list, p: np.ndarray, start: int) -> tuple[int, int]:
        """(accepted, token) of drafts `tokens` continuing a context of `start` tokens, from the
        target's rows p [L+1, V]: a round's rejection sampling with the draws of (seed, start)."""
        s = req.sampling
        if req.scheme.scheme == Scheme.INVARIANT:  # token-only drafts, accepted iff equal to p's own draw
            return verify_invariant(tokens, p, s.seed, start)
        accepted, token = len(tokens), -1
        if tokens:
            rng = np.random.default_rng([s.seed, start])  # the acceptance uniforms and the resample
            accepted, token = verify_sparse(tokens, [SparseRow(d.support, d.probs) for d in drafts], p, rng)
        if accepted == len(tokens):
            # The bonus token (the round's token when there are no drafts) is a Gumbel-max draw on the
            # noise of its absolute position: the same token plain decoding samples there, whatever
            # the plan (independent of the acceptance uniforms and the edge's draws: other keys).
            token = gumbel_token(p[accepted], s.seed, start + accepted)
        return accepted, token

    # -- lookahead: drafts that ride a streamed round -------------------------------------------
    def offer_lookahead(self, session: Session, batch: codec.Batch) -> None:
        """Hold a lookahead batch (DraftBatch.lookahead) for the session's streamed round: decoded
        here, on the stream's reader, while the round steps; the next step takes it
        (_lookahead_drafts). A malformed one fails the round at that step, as a malformed batch does."""
        try:
            if not batch.num_drafts:
                raise codec.PayloadError("a lookahead batch carries drafts")
            if batch.plain_steps or batch.stream:
                raise codec.PayloadError("a lookahead batch asks for no steps of its own")
            held = (batch.position, codec.unpack_batch(batch, session.request.scheme, session.max_drafts))
        except codec.PayloadError as exc:
            held = (batch.position, f"lookahead batch: {exc}")
        session.hold_lookahead(held)

    def _lookahead_drafts(self, session: Session, owed: int) -> list:
        """The drafts of the held lookahead that the next step may verify: those past the context
        when its leading drafts (the edge's guesses) equal the tokens sampled since its position; []
        when none is held, it is stale or a guess missed. At most owed - 1 (the step then commits
        at most what the round owes) and what the context limit leaves."""
        held = session.take_lookahead()
        if held is None:
            return []
        position, drafts = held
        if isinstance(drafts, str):
            self.sessions.close(session.id)
            raise SessionError(Refusal.MALFORMED, drafts)
        c = len(session.context)
        guessed = c - position
        if guessed < 0 or guessed >= len(drafts):
            return []
        if [d.token for d in drafts[:guessed]] != session.context[position:]:
            return []
        room = min(owed - 1, self.config.max_context - 2 - c)
        return list(drafts[guessed:guessed + max(0, room)])

    def _lookahead_step(self, session: Session, drafts: list, eos: set[int]) -> tuple[list[int], int, int, float]:
        """One plain step that verifies `drafts` too: ONE pass over [the last token] + drafts, the
        round's sampling at this position. Returns the tokens it commits (cut after an EOS), how many
        of them are accepted drafts, how many drafts it verified (the shared pass may keep fewer:
        common/pass_shape.py) and the pass's ms."""
        s = session.request.sampling
        tokens = [d.token for d in drafts]
        start = len(session.context)
        rows, step_ms = self._forward(session, session.context + tokens, len(tokens) + 1, lane=session.id,
                                      optional=len(tokens))
        # The shared pass may have kept a prefix of the drafts (their rows cost more than they commit
        # there): verifying that prefix is the round an edge that sent fewer drafts would get.
        verified = rows.shape[0] - 1
        tokens, drafts = tokens[:verified], drafts[:verified]
        p = target_probs(rows, s.temperature, s.top_k, s.top_p)
        accepted, token = self._sample(session.request, tokens, drafts, p, start)
        self._lookahead_outcome(verified, accepted)
        new = tokens[:accepted] + [token]
        for i, t in enumerate(new):
            if t in eos:
                new = new[: i + 1]
                break
        return new, min(accepted, len(new)), verified, step_ms

    def _plain_steps(self, session: Session, last: LastRound, emit: Callable[[RoundResult], None] | None,
                     stop: Callable[[], bool] | None, t0: float) -> RoundResult:
        """The cloud-only steps a round owes (last.owed) after its token and plain tokens so far, each
        exactly a zero-draft round at its position (same draw); every token goes to `emit` as it is
        sampled (a resumed round first hands over all it has). Records the round as session.last."""
        s = session.request.sampling
        result, owed = last.result, last.owed
        resumed = session.last is last  # the batch came again
        plain = list(result.plain_tokens)
        token = plain[-1] if plain else result.token
        eos = set(self.target.eos_token_ids)
        if emit is not None:
            emit(result)
        # While it steps, the session is a streaming lane: the next shared pass waits the few ms
        # between its result and its next step instead of leaving it to the pass after.
        with self._batcher.lane(session.id) if self._batcher is not None else contextlib.nullcontext():
            while owed > 0 and token not in eos and len(session.context) + 1 < self.config.max_context:
                if stop is not None and stop():
                    break
                drafts = self._lookahead_drafts(session, owed)
                if drafts:  # the edge's drafts for the next positions ride this step
                    new, accepted, verified, step_ms = self._lookahead_step(session, drafts, eos)
                    result = replace(result, lookahead_drafted=result.lookahead_drafted + verified,
                                     lookahead_accepted=result.lookahead_accepted + accepted)
                else:
                    row, step_ms = self._forward(session, session.context, 1, lane=session.id)  # [1, V]
                    if s.temperature == 0:  # the one-hot's token, without building a [V] one-hot per step
                        new = [int(np.argmax(row[0]))]
                    else:
                        p1 = target_probs(row, s.temperature, s.top_k, s.top_p)
                        new = [gumbel_token(p1[0], s.seed, len(session.context))]  # a zero-draft round's draw
                token = new[-1]
                session.context.extend(new)
                plain.extend(new)
                owed -= len(new)
                result = replace(result, position=len(session.context), plain_tokens=tuple(plain),
                                 forward_ms=result.forward_ms + step_ms)
                if emit is not None:
                    emit(result)
        if token in eos or len(session.context) + 1 >= self.config.max_context:
            owed = 0  # what stopped the steps stops them on a resend too
        result = replace(result, verify_ms=(time.perf_counter() - t0) * 1e3, replayed=resumed,
                         row_price_ms=self.row_price())
        session.last = LastRound(last.position, last.digest, replace(result, replayed=False), owed)
        return result

    # -- forward passes ---------------------------------------------------------------------
    def _round_rows(self, session: Session, prep: _Prepared) -> tuple[np.ndarray, float]:
        """The round's target logits [L+1, V] and the ms of the pass that computed them. The first
        round after the prefill takes its first row from it: the pass scores only the L drafts (the
        KV cache holds the whole context), and a round with no drafts needs no pass at all."""
        head = session.take_next_row()
        if head is None:
            return self._forward(session, prep.context, prep.want)
        if prep.want == 1:
            return head[None, :], 0.0
        rows, ms = self._forward(session, prep.context, prep.want - 1)
        return np.concatenate([head[None, :], rows]), ms

    def _forward(self, session: Session, context: list[int], want: int,
                 lane: str | None = None, optional: int = 0) -> tuple[np.ndarray, float]:
        """Target logits [want - dropped, V] for the session's context and the ms of the pass that
        computed them (a wait in the batcher's queue is not in it: it shows in RoundResult.verify_ms).
        A shared pass may drop up to `optional` trailing rows (and their context tokens); alone, the
        pass keeps them all.

        With batching on (and an LM that has a batched pass) the pass is shared with the rounds of
        other sessions that are ready within the window (cloud/pass_batcher.py). The pass table records
        every pass at the rows it scored, all sessions' together (_run_pass): it is the engine's cost,
        which the row price reads at the current load. (It once recorded a shared pass against each
        session's own rows: under load its one-row entry became the whole pass and the slopes between
        entries noise, quoting up to ~960 ms a row on an engine whose extra row costs ~3.)
        """
        if self._batcher is None or not hasattr(type(session.lm), "logits_batch"):
            t_fwd = time.perf_counter()
            # The LM's KV cache follows `context`: it crops to the common prefix (the rollback of the
            # last round's rejected drafts) and feeds the rest (the LM contract, common/lm.py).
            logits = session.lm.logits(context, want=want)
            ms = (time.perf_counter() - t_fwd) * 1e3
            self._passed([_Pass(session.lm, context, want)], ms)
        else:
            logits, ms = self._batcher.submit(_Pass(session.lm, context, want, optional=optional), want, lane=lane,
                                              source=session.id)
        return logits, ms

    def _run_pass(self, passes: list[_Pass]) -> list[tuple[np.ndarray, float] | BaseException]:
        """The PassBatcher's run: ONE forward pass over every item (their LMs share the target model).

        If the batched pass fails, each item runs alone so that a failure stays with its session.
        Items with optional rows first keep only those that pay for themselves in this pass
        (common/pass_shape.py, on this process's pass table); the dropped count is metered.
        """
        passes = self._shaped(passes)
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
                    self._passed([p], out[-1][1])
                except Exception as one:
                    out.append(one)
            return out
        ms = (time.perf_counter() - t_fwd) * 1e3
        self._passed(passes, ms)
        return [(r, ms) for r in rows]

    def _shaped(self, passes: list[_Pass]) -> list[_Pass]:
        """`passes` with the optional rows shape_rows drops removed (each item's trailing rows and
        the context tokens they score)."""
        if not any(p.optional for p in passes):
            return passes
        with self._pass_lock:
            acceptance = self._lookahead_acceptance()
        keep = shape_rows([p.want for p in passes], [p.optional for p in passes], self._predict_pass_as_measured,
                          acceptance)
        dropped = sum(p.want - k for p, k in zip(passes, keep))
        if dropped:
            self.on_rows_dropped(dropped)
        return [p if k == p.want else replace(p, context=p.context[: len(p.context) - (p.want - k)], want=k,
                                             optional=p.optional - (p.want - k))
                for p, k in zip(passes, keep)]

    def _lookahead_outcome(self, verified: int, accepted: int) -> None:
        with self._pass_lock:
            self._lookahead = (self._lookahead[0] + accepted, self._lookahead[1] + verified)

    def _lookahead_acceptance(self) -> float:
        """Accepted / verified lookahead drafts so far, from a prior worth LOOKAHEAD_PRIOR_DRAFTS drafts
        at LOOKAHEAD_PRIOR (caller holds _pass_lock)."""
        accepted, verified = self._lookahead
        return (accepted + LOOKAHEAD_PRIOR * LOOKAHEAD_PRIOR_DRAFTS) / (verified + LOOKAHEAD_PRIOR_DRAFTS)

    def _passed(self, passes: list[_Pass], ms: float) -> None:
        """One forward pass ran over `passes` in `ms`: the metrics count it, the pass table records it
        at all its rows, unless it carried a prefill: a prefill feeds many tokens for one row of
        logits (no output layer on the rest), so such a pass is cheaper than a verify pass of as many
        rows and is kept out of the table the edges plan verify rounds with."""
        rows = sum(p.rows for p in passes)
        self.on_pass(len(passes), rows)
        if not any(p.prefill for p in passes):
            self._record_pass(rows, ms)

    def pass_stats(self) -> PassStats | None:
        """Counters of the shared passes (None with cross-session batching off)."""
        return None if self._batcher is None else self._batcher.stats()



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
    fed: int = 0  # tokens this item feeds, when more than its `want` rows (a prefill chunk)
    optional: int = 0  # of the `want` rows, how many trailing ones the pass may drop (common/pass_shape.py)

    @property
    def rows(self) -> int:
        """What the item adds to the pass: the tokens it feeds."""
        return max(self.want, self.fed)

    @property
    def prefill(self) -> bool:
        return self.fed > self.want
