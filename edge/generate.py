"""One generation, round by round, from the edge: the hot path in one place.

    open session -> calibrate costs -> repeat { plan + draft -> send -> apply the verdict
        -> settle (the drafter learns from the round) -> record, yield the committed tokens }

`Generation` is an iterator of rounds (as nanochat's engine is a generator of tokens): the CLI,
the HTTP API and the benchmarks consume it one round at a time, or through `generate()` for the
whole result. A round of plain target steps is streamed when the client can (the cloud sends each
token as it samples it: one round trip for many tokens, so the plan asks for many); with
`previews` the generation yields those tokens as they arrive, before the round's record. The edge runtime (edge/runtime.py) is what wires a draft engine and a cloud client
into one; this module knows neither models nor addresses.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, Sequence

from common import codec
from common.stats import GenerationStats, RoundRecord
from edge.client import RoundReply
from edge.drafter import DraftedBatch, Drafter

log = logging.getLogger("sqs.edge")


class Cloud(Protocol):
    """What a generation needs of the cloud: edge/client.CloudClient, or a test's loopback."""

    session_id: str
    reopens: int

    def open(self, request: codec.OpenRequest) -> codec.Opened: ...

    def round(self, batch: codec.Batch, reopen: Callable[[], codec.OpenRequest]) -> RoundReply: ...

    def wire_counts(self) -> tuple[int, int]: ...


def streams_plain(client: Cloud) -> bool:
    """Whether the client streams plain rounds: its own class has stream_round (a wrapper that
    only rewrites round(), as bench/link_model.py, gets whole verdicts) and says it can now."""
    return callable(getattr(type(client), "stream_round", None)) and bool(getattr(client, "streams_plain", False))


@dataclass
class GenerationResult:
    token_ids: list[int]  # generated tokens (prompt excluded)
    stats: GenerationStats
    stop_reason: str  # "length" | "eos"
    session_id: str = ""
    target_model: str = ""
    beta_trace: list[float] = field(default_factory=list)
    # C-SQS, Theorem 2 over the positions whose updates survived (None for other schemes)
    counted_positions: int = 0
    mean_dropped_mass: float | None = None
    theorem2_bound: float | None = None
    link: str = "measured"  # "measured", or the analytic link a benchmark priced the rounds on


@dataclass(frozen=True)
class RoundOutput:
    """What one round adds to the output: `tokens` (cut at max_new_tokens and at an EOS) and the
    round's record (sizes, bits, per-part latency). A preview (record None; only with
    Generation(previews=True)) carries tokens of a streamed round as they arrive; the round's
    RoundOutput with its record then carries the rest of its tokens."""

    tokens: list[int]
    record: RoundRecord | None

    @property
    def preview(self) -> bool:
        return self.record is None


@dataclass
class _Ahead:
    """A batch drafted while the previous one was in flight, assuming it is fully accepted and the
    cloud's bonus token equals `guess`; adopted (sent next) only when both hold."""

    guess: int
    batch: DraftedBatch
    overrun_ms: float  # drafting that outlasted the flight
    planner_state: tuple  # Planner.snapshot() before the ahead batch was planned
    adopted: bool = False


class Generation:
    """One generation as an iterator of RoundOutput; `result` is set once the iteration ends.

    Closing the iterator early (a consumer that stops reading) ends the generation between rounds,
    or within a streamed round (its stream is dropped, which stops the cloud's steps); the caller
    owns the client and closes the cloud session.

    previews: yield the tokens of a streamed round as they arrive (RoundOutput.preview), not only
    with the round's record at its end.
    """

    def __init__(self, prompt_ids: Sequence[int], drafter: Drafter, client: Cloud, *, max_new_tokens: int,
                 vocab_fingerprint: str, previews: bool = False) -> None:
        self.drafter = drafter
        self.client = client
        self.max_new_tokens = max_new_tokens
        self.vocab_fingerprint = vocab_fingerprint
        self.previews = previews
        self.context = list(prompt_ids)
        self.result: GenerationResult | None = None

    def _open_request(self) -> codec.OpenRequest:
        cfg = self.drafter.config
        sampling = codec.Sampling(cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed)
        return codec.OpenRequest(list(self.context), sampling, cfg.scheme, self.vocab_fingerprint, cfg.max_drafts)

    def __iter__(self) -> Iterator[RoundOutput]:
        drafter, client, context = self.drafter, self.client, self.context
        out: list[int] = []
        stats = GenerationStats()
        betas: list[float] = []
        t_start = time.perf_counter()
        wire0 = client.wire_counts()
        # The draft prefills the prompt while the cloud prefills it on the target (the open), then
        # computes the first round's likeliest draft rows until the open is back.
        warming = ThreadPoolExecutor(1, thread_name_prefix="warm")
        opened_event = threading.Event()
        warm = warming.submit(_warm_then_chain, drafter, list(context), opened_event)
        try:
            opened = client.open(self._open_request())
        except BaseException:
            opened_event.set()
            warming.shutdown(wait=True)
            raise
        opened_event.set()
        warming.shutdown(wait=False)
        # The first round does not wait for the warm unless it drafts: where the draft prefills
        # slower than the cloud (edges sharing a core in a load test: ~2.6 s of warms at N = 16 on
        # one core, TTFT 4.2 s), it streams plain tokens meanwhile. The draft LM is not ours to use
        # until the warm is done: drafting waits for it (before_drafting), so does the follow-up.
        warming_up = _Warming(warm)
        eos = set(opened.eos_token_ids) | drafter.eos
        drafter.calibrate(opened.pass_rows, opened.pass_ms)
        streaming = streams_plain(client)
        # Streamed plain rounds run long (to the next probe): one request for many cloud steps, so a
        # plain token costs a step and its share of one round trip, as in llama-server's own loop.
        drafter.planner.streaming = streaming
        drafter.planner.probe_first()
        stop_reason = "length"
        ahead: _Ahead | None = None
        # following: the last streamed round's follow-up (or the warm), maybe still running
        pool = ThreadPoolExecutor(1, thread_name_prefix="round") if drafter.config.pipeline else None
        # The draft's follow-up of streamed rounds runs at the lowest CPU priority: on an edge of its
        # own it is free, where edges share cores (a load test) it yields to their drafting.
        follower_pool = ThreadPoolExecutor(1, thread_name_prefix="follow", initializer=_lowest_priority) \
            if pool is not None and drafter.drafts else None
        if follower_pool is not None:
            follower_pool.submit(warming_up.settle)  # its feeds queue behind the warm
        following: _DraftFollower | _Warming | None = warming_up
        try:
            while len(out) < self.max_new_tokens:
                remaining = self.max_new_tokens - len(out)  # each round commits >= 1 token
                # plan + draft (or adopt the batch drafted during the last flight for exactly this context)
                if ahead is not None and ahead.adopted:
                    batch = ahead.batch
                    batch.draft_ms = ahead.overrun_ms  # only what outlasted the flight costs time
                else:
                    # Plain next: it may start while the follow-up still computes; drafts wait for it.
                    batch = drafter.draft(context, max_drafts=remaining - 1,
                                          before_drafting=following.wait if following is not None else None,
                                          busy=following is warming_up and warming_up.running())
                following = warming_up if warming_up.running() else None  # the LM stays the warm's
                wire = codec.pack_batch(len(context), batch.drafts, batch.scheme, batch.plain_steps,
                                        stream=streaming and batch.plain_steps > 0)
                # send
                n = len(batch.drafts)
                ahead = None
                shown: list[int] = []  # tokens of this round already yielded as previews
                if wire.stream:
                    reply = None
                    follow = _DraftFollower(follower_pool, drafter) if follower_pool is not None else None
                    # Drafts sent ahead of the stream ride its next steps (DraftBatch.lookahead).
                    send = getattr(client, "send_lookahead", None) if drafter.config.lookahead else None
                    if follow is not None:
                        follow.feed(context)
                    try:
                        for reply in client.stream_round(wire, reopen=self._open_request):  # type: ignore[attr-defined]
                            if not reply.verdict.more:
                                continue
                            so_far = _committed(batch, reply.verdict, len(context))
                            if follow is not None:
                                if len(so_far) == batch.plain_steps:  # the round's last token is next
                                    follow.step_past(context + so_far)
                                elif len(so_far) < batch.plain_steps:
                                    # (Not after the last token: that feed, ~75 ms of a draft pass,
                                    # was what the next round's drafting waited for.)
                                    if send is not None:  # at most what the round still owes
                                        n = min(drafter.config.lookahead, batch.plain_steps + 1 - len(so_far))
                                        follow.lookahead(context + so_far, n, send)
                                    else:
                                        follow.feed(context + so_far)
                            if self.previews:
                                keep = _shown(shown, _cut(so_far, remaining, eos)[0])
                                if len(keep) > len(shown):
                                    yield RoundOutput(keep[len(shown):], None)
                                    shown = keep
                    except BaseException:
                        if follow is not None:
                            follow.wait()
                        raise
                    # Not waited for here: measured, the follow-up's last rows outlasted the
                    # stream by ~70 ms a round, paid even when the next round is plain.
                    if follow is not None:  # (its feeds queued behind the warm)
                        following = follow
                    if reply is None or reply.verdict.more:
                        raise RuntimeError("a streamed round ended without its final verdict")
                elif pool is not None and n and remaining - n - 1 >= 2 and batch.drafts[-1].token not in eos:
                    reply, ahead = self._round_drafting_ahead(pool, wire, batch, remaining - n - 2)
                else:
                    reply = client.round(wire, reopen=self._open_request)
                # apply the verdict
                new = _committed(batch, reply.verdict, len(context))
                if ahead is not None:
                    v = reply.verdict
                    ahead.adopted = (v.accepted == n and not v.plain_tokens and v.token == ahead.guess
                                     and bool(ahead.batch.drafts))
                    if not ahead.adopted:  # its plan was for a context that did not come
                        drafter.planner.restore(ahead.planner_state)
                # settle: the drafter learns from the round (threshold rollback, acceptance, costs)
                rec = _record(batch, wire, reply, ahead)
                drafter.learn(batch, rec, carry=ahead is not None and ahead.adopted)
                if reply.verdict.row_price_ms is not None:  # the cloud's load: the next plans weigh rows at its price
                    drafter.costs.row_price.add(reply.verdict.row_price_ms)
                rec.beta = drafter.beta
                # record
                context.extend(new)
                keep, at_eos = _cut(new, remaining, eos)
                keep = _shown(shown, keep)
                if at_eos:
                    stop_reason = "eos"
                out.extend(keep)
                stats.add(rec)
                if drafter.beta is not None:
                    betas.append(drafter.beta)
                log.debug("round drafted=%d accepted=%d token=%d total_ms=%.1f", n, rec.accepted,
                          reply.verdict.token, rec.total_ms)
                yield RoundOutput(keep[len(shown):], rec)
                if stop_reason == "eos":
                    break
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
            if follower_pool is not None:
                follower_pool.shutdown(wait=True)
            warming_up.settle()  # the draft LM is free for the next generation
        stats.generated = len(out)
        stats.wall_s = time.perf_counter() - t_start
        stats.reopens = client.reopens
        stats.setup_wire_bytes = (client.wire_counts()[0] - wire0[0]) - stats.uplink_wire_bytes
        self.result = _result(out, stats, stop_reason, client.session_id, opened.target_model, betas, drafter)

    def _round_drafting_ahead(self, pool: ThreadPoolExecutor, wire: codec.Batch, batch: DraftedBatch,
                              max_drafts: int) -> tuple[RoundReply, _Ahead]:
        """Send a batch; while its verdict is on the way, draft the next batch as if every draft were
        accepted and the bonus token were the edge's own guess (pipelined drafting).

        The ahead batch is drafted to its plan's end unless the verdict shows it is invalid (then
        drafting stops at once): an adopted batch is then exactly the batch the edge would have
        drafted after the verdict (same plan for a fixed plan, same draws keyed by position), so
        pipelining changes when drafts are made, never which. Lossless: the ahead drafts are q_hat
        draws given the context they continue, with randomness independent of the cloud's, used
        only when that context turns out to be the real one. The verdict "lands" when the reply's
        timestamps say (a benchmark's analytic link rewrites them: bench/link_model.py).
        """
        t_send = time.perf_counter()
        future: Future[RoundReply] = pool.submit(self.client.round, wire, reopen=self._open_request)
        guessed = self.context + [d.token for d in batch.drafts]
        guess = self.drafter.guess_bonus(guessed, batch.scheme)
        n = len(batch.drafts)

        def flight_ms() -> float:  # once the reply is in: when the verdict lands
            r = future.result()
            return (r.received_unix_us - r.sent_unix_us) / 1e3

        def invalidated() -> bool:
            if not future.done() or (time.perf_counter() - t_send) * 1e3 < flight_ms():
                return False
            v = future.result().verdict
            return not (v.accepted == n and not v.plain_tokens and v.token == guess)

        planner_state = self.drafter.planner.snapshot()
        ahead_batch = self.drafter.draft(guessed + [guess], max_drafts=max_drafts, should_stop=invalidated)
        # What is left of the flight goes to rows the next round may start from: after the guessed
        # bonus when the plan ahead was plain (a probe may follow it), and the likeliest rejection.
        costs = self.drafter.costs.costs()
        flight_due = costs.fixed_ms + costs.pass_ms(n + 1)

        def time_for_a_row() -> bool:
            return not future.done() and (time.perf_counter() - t_send) * 1e3 + costs.draft_ms <= flight_due

        if not ahead_batch.drafts and time_for_a_row():
            self.drafter.prepare(guessed + [guess])
        if time_for_a_row():
            self.drafter.hedge(self.context, batch)
        reply = future.result()
        overrun = max(0.0, (time.perf_counter() - t_send) * 1e3 - flight_ms())
        return reply, _Ahead(guess, ahead_batch, overrun, planner_state)


def _warm_then_chain(drafter: Drafter, context: list[int], opened: threading.Event) -> None:
    """The draft's prefill and timed step, then (at the lowest CPU priority: where edges share
    cores, a load test, it yields to their drafting) the opening chain until the open is back."""
    drafter.warm(context)
    _lowest_priority()
    drafter.chain(context, opened)


def _lowest_priority() -> None:
    """This thread at nice 19 (Linux: a thread's own priority); elsewhere it stays as it is."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


class _Warming:
    """The draft's warm (edge/generate.py _warm_then_chain) as the first round's `following`:
    drafting waits for it (and meets its error), a plain round does not."""

    def __init__(self, job: Future) -> None:
        self.job = job
        self._told = False

    def running(self) -> bool:
        return not self.job.done()

    def wait(self) -> None:
        self.job.result()

    def settle(self) -> None:
        """Wait without raising: where the generation never drafted, a failed warm only costs
        the rows it did not keep (said once, though both the follow-up and the end settle it)."""
        exc = self.job.exception()
        if exc is not None and not self._told:
            self._told = True
            log.warning("draft warm-up failed: %s", exc)


class _DraftFollower:
    """Keeps the draft model's cache up with a streamed plain round while it streams: the tokens
    the cloud commits are fed to the draft LM on the pipeline's thread, whenever it is idle, so
    the next speculative round drafts at once instead of first prefilling every plain token (on
    the critical path: a probe after 64 plain tokens paid ~0.6 s of 0.5B prefill). Only the
    draft's cache moves (the LM crops and feeds to the context it is given), never a draw; the
    rows it later returns may differ from a one-piece prefill by float rounding only."""

    def __init__(self, pool: ThreadPoolExecutor, drafter: Drafter) -> None:
        self.pool, self.drafter = pool, drafter
        self.job: Future | None = None
        self._lock = threading.Lock()
        self._latest: tuple | None = None  # the newest lookahead asked for, not started yet
        self._looking = False  # a lookahead job runs (it takes _latest until there is none)

    def step_past(self, context: Sequence[int]) -> None:
        """Queued behind any feed: guess the round's last token and draft the row after it."""
        self.job = self.pool.submit(self.drafter.step_past, list(context))

    def feed(self, context: Sequence[int]) -> None:
        """Feed `context` to the draft unless a feed is still running (the next one catches up)."""
        if self.job is None or self.job.done():
            self.job = self.pool.submit(self.drafter.lm.logits, list(context), 1)

    def lookahead(self, context: Sequence[int], n: int, send: Callable[[codec.Batch], bool]) -> None:
        """Draft n tokens past `context` (feeding it on the way) and send them as a lookahead batch
        (a late one is dropped by the cloud, a wrong guess too). A job already drafting from an
        older context stops at its next draft row and drafts from this one: where its guesses held,
        the rows it kept give the same drafts at once (measured at N = 8: a job per other token
        while a job ran to its end left half the cloud's steps with no lookahead)."""
        with self._lock:
            self._latest = (list(context), n, send)
            if self._looking:
                return
            self._looking = True
        self.job = self.pool.submit(self._lookaheads)

    def _lookaheads(self) -> None:
        try:
            while True:
                with self._lock:
                    latest, self._latest = self._latest, None
                    if latest is None:
                        self._looking = False
                        return
                context, n, send = latest
                # Each longer lookahead replaces the last at the cloud: the first that can ride goes out early.
                self.drafter.lookahead(context, n, lambda drafts, scheme: send(
                    codec.pack_batch(len(context), drafts, scheme, lookahead=True)),
                    stop=lambda: self._latest is not None)
        except BaseException:  # the draft LM failed: no lookahead from here (the next draft meets the error)
            with self._lock:
                self._latest, self._looking = None, False
            raise

    def wait(self) -> None:
        if self.job is not None:
            if self.job.exception() is not None:  # waits; a failed feed is the next draft's to meet
                log.debug("draft follow-up failed: %s", self.job.exception())
            self.job = None


def generate(prompt_ids: Sequence[int], drafter: Drafter, client: Cloud, *, max_new_tokens: int,
             vocab_fingerprint: str, on_round: Callable[[RoundOutput], None] | None = None,
             previews: bool = False) -> GenerationResult:
    """A whole generation: every round of a Generation, then its result."""
    g = Generation(prompt_ids, drafter, client, max_new_tokens=max_new_tokens, vocab_fingerprint=vocab_fingerprint,
                   previews=previews)
    return run_to_end(g, on_round)


def run_to_end(generation, on_round: Callable[[RoundOutput], None] | None = None) -> GenerationResult:
    """Every remaining round of a generation (a Generation, or the runtime's EdgeGeneration, both
    iterables of RoundOutput with a `result` once done), then its result."""
    for r in generation:
        if on_round is not None:
            on_round(r)
    if generation.result is None:  # the rounds ended without finishing: closed from elsewhere
        raise RuntimeError("the generation ended before its result (it was closed)")
    return generation.result


def _cut(tokens: list[int], remaining: int, eos: set[int]) -> tuple[list[int], bool]:
    """The tokens that go to the output: at most `remaining`, up to and including an EOS; and
    whether one was reached."""
    keep = tokens[:remaining]
    for i, t in enumerate(keep):
        if t in eos:
            return keep[: i + 1], True
    return keep, False


def _shown(shown: list[int], keep: list[int]) -> list[int]:
    """`keep` (a round's output so far), checked against what was already yielded of it: after a
    resend the cloud replays the round from its start, and must give the same tokens."""
    n = min(len(shown), len(keep))
    if shown[:n] != keep[:n]:
        raise RuntimeError(f"a resent streamed round gave other tokens than it had shown: {keep[:n]} != {shown[:n]}")
    return keep if len(keep) >= len(shown) else shown


def _committed(batch: DraftedBatch, v: codec.Verdict, context_len: int) -> list[int]:
    """The tokens a verdict commits: the accepted drafts, the resampled or bonus token, plain steps.
    A verdict that cannot belong to this batch is an error, never silently applied."""
    n = len(batch.drafts)
    if v.accepted > n or len(v.plain_tokens) > batch.plain_steps or \
            v.position != context_len + v.accepted + 1 + len(v.plain_tokens):
        raise RuntimeError(f"inconsistent verdict: accepted {v.accepted} of {n}, position {v.position}")
    return [d.token for d in batch.drafts[: v.accepted]] + [v.token] + list(v.plain_tokens)


def _record(batch: DraftedBatch, wire: codec.Batch, reply: RoundReply, ahead: _Ahead | None) -> RoundRecord:
    v = reply.verdict
    round_trip_ms = (reply.received_unix_us - reply.sent_unix_us) / 1e3
    verify_ms = (v.sent_unix_us - v.received_unix_us) / 1e3
    uplink_ms = (v.received_unix_us - reply.sent_unix_us) / 1e3
    downlink_ms = (reply.received_unix_us - v.sent_unix_us) / 1e3
    if uplink_ms < 0 or downlink_ms < 0:  # clocks not synchronised: split the network time evenly
        uplink_ms = downlink_ms = max(0.0, round_trip_ms - verify_ms) / 2
    plan = batch.plan
    rec = RoundRecord(
        drafted=len(batch.drafts),
        accepted=v.accepted,
        formula_bits=batch.bits.formula,
        honest_bits=batch.bits.honest,
        payload_bytes=wire.payload_bytes,
        message_bytes=reply.message_bytes,
        uplink_wire_bytes=reply.uplink_wire_bytes,
        downlink_wire_bytes=reply.downlink_wire_bytes,
        draft_ms=batch.draft_ms,
        uplink_ms=uplink_ms,
        verify_ms=verify_ms,
        downlink_ms=downlink_ms,
        total_ms=batch.draft_ms + round_trip_ms,
        plain=len(v.plain_tokens),
        lookahead_drafted=v.lookahead_drafted,
        lookahead_accepted=v.lookahead_accepted,
        k=batch.scheme.k if batch.drafts else 0,
        ell=batch.scheme.ell if batch.drafts else 0,
        forward_ms=v.forward_us / 1e3,
        planned_max_drafts=plan.max_drafts if plan else 0,
        predicted_ms=batch.predicted_ms,
        predicted_tokens=batch.predicted_tokens,
    )
    if ahead is not None:
        rec.ahead_drafts, rec.ahead_adopted = len(ahead.batch.drafts), ahead.adopted
        if not ahead.adopted:  # drafting past the verdict delayed this round
            rec.total_ms += ahead.overrun_ms
    return rec


def _result(out: list[int], stats: GenerationStats, stop_reason: str, session_id: str, target_model: str,
            betas: list[float], drafter: Drafter) -> GenerationResult:
    result = GenerationResult(out, stats, stop_reason, session_id, target_model, betas)
    if drafter.controller is not None:
        c = drafter.controller
        result.counted_positions = c.counted_positions
        result.mean_dropped_mass = c.mean_dropped_mass
        bound = c.theorem2_bound()
        result.theorem2_bound = bound if math.isfinite(bound) else None  # eta = 0: no bound (and valid JSON)
    return result
