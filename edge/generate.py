"""One generation, end to end, from the edge: the per-round hot path in one place.

    open session -> calibrate costs -> repeat { plan + draft (drafter) -> pack (codec)
        -> send/verify (client) -> append accepted + new token (+ plain steps)
        -> settle (conformal rollback, acceptance and cost model learn from the round) }

A `LinkModel` replaces the measured network time of each round by bits / rate + RTT (the analytic
link of the benchmarks, for sweeping link settings without shaping a real one): the records, the
cost model and the totals then describe that link, and `GenerationResult.link` says so.
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

from common import codec
from common.metrics import Metrics
from common.stats import GenerationStats, RoundRecord
from edge.client import CloudClient
from edge.drafter import DraftedBatch, Drafter

log = logging.getLogger("sqs.edge")


@dataclass(frozen=True)
class LinkModel:
    """Analytic link: rates in bit/s, RTT in ms (both directions' propagation together)."""

    uplink_bps: float
    downlink_bps: float
    rtt_ms: float

    def network_ms(self, uplink_bytes: int, downlink_bytes: int) -> tuple[float, float]:
        """(uplink ms, downlink ms) of one round."""
        up = self.rtt_ms / 2 + uplink_bytes * 8e3 / self.uplink_bps
        return up, self.rtt_ms / 2 + downlink_bytes * 8e3 / self.downlink_bps

    def round_ms(self, r: RoundRecord) -> float:
        """A recorded round's time on this link: its network time replaced, everything else (draft,
        cloud, drafting ahead past the verdict) as recorded."""
        up, down = self.network_ms(r.uplink_wire_bytes or r.message_bytes, r.downlink_wire_bytes)
        return r.total_ms - r.uplink_ms - r.downlink_ms + up + down


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
    link: str = "measured"  # "measured" or "model:<up bps>/<down bps>/<rtt ms>"


def generate(
    prompt_ids: Sequence[int],
    drafter: Drafter,
    client: CloudClient,
    *,
    max_new_tokens: int,
    vocab_fingerprint: str,
    on_tokens: Callable[[list[int]], None] | None = None,
    metrics: Metrics | None = None,
    link: LinkModel | None = None,
) -> GenerationResult:
    cfg = drafter.config
    sampling = codec.Sampling(cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed)
    context = list(prompt_ids)
    out: list[int] = []
    stats = GenerationStats()

    def open_request() -> codec.OpenRequest:
        return codec.OpenRequest(list(context), sampling, cfg.scheme, vocab_fingerprint, cfg.max_drafts)

    t_start = time.perf_counter()
    wire0 = client.wire_counts()
    opened = client.open(open_request())
    eos = set(opened.eos_token_ids) | drafter.eos
    drafter.calibrate(context, opened.pass_rows, opened.pass_ms)
    stop_reason = "length"
    betas: list[float] = []
    ahead: _Ahead | None = None
    pool = ThreadPoolExecutor(1, thread_name_prefix="round") if cfg.pipeline else None
    try:
        while len(out) < max_new_tokens:
            remaining = max_new_tokens - len(out)
            # Each round commits at least one token; drafts beyond the remaining budget are wasted.
            if ahead is not None and ahead.adopted:
                batch = ahead.batch  # drafted during the last flight for exactly this context
                batch.draft_ms = ahead.overrun_ms  # only what outlasted the flight costs time
            else:
                batch = drafter.draft(context, max_drafts=remaining - 1)
            wire = codec.pack_batch(len(context), batch.drafts, batch.scheme, batch.plain_steps)
            n = len(batch.drafts)
            ahead = None
            if pool is not None and n and remaining - n - 1 >= 2 and batch.drafts[-1].token not in eos:
                reply, ahead = _round_drafting_ahead(pool, client, wire, open_request, drafter, batch, context,
                                                     remaining - n - 2, link)
            else:
                reply = client.round(wire, reopen=open_request)
            v = reply.verdict
            plain = list(v.plain_tokens)
            if v.accepted > n or len(plain) > batch.plain_steps or v.position != len(context) + v.accepted + 1 + len(plain):
                raise RuntimeError(f"inconsistent verdict: accepted {v.accepted} of {n}, position {v.position}")
            new = [d.token for d in batch.drafts[: v.accepted]] + [v.token] + plain
            if ahead is not None:
                ahead.adopted = v.accepted == n and not plain and v.token == ahead.guess and bool(ahead.batch.drafts)
            drafter.settle(batch, v.accepted, carry=ahead is not None and ahead.adopted)
            rec = _record(batch, wire, reply, drafter.beta, link)
            if ahead is not None:
                rec.ahead_drafts, rec.ahead_adopted = len(ahead.batch.drafts), ahead.adopted
                if not ahead.adopted:  # drafting past the verdict delayed this round
                    rec.total_ms += ahead.overrun_ms
            drafter.costs.observe_round(
                rows=n + 1, plain_steps=len(plain), forward_ms=v.forward_us / 1e3, cloud_ms=rec.verify_ms,
                round_trip_ms=rec.uplink_ms + rec.verify_ms + rec.downlink_ms,
                uplink_bytes=rec.uplink_wire_bytes or rec.message_bytes, payload_bytes=rec.payload_bytes,
            )
            context.extend(new)
            keep = new[:remaining]
            for i, t in enumerate(keep):
                if t in eos:
                    keep = keep[: i + 1]
                    stop_reason = "eos"
                    break
            out.extend(keep)
            stats.add(rec)
            if drafter.beta is not None:
                betas.append(drafter.beta)
            if metrics:
                metrics.observe_record(cfg.scheme.scheme.value, rec)
            if on_tokens:
                on_tokens(keep)
            log.debug("round drafted=%d accepted=%d token=%d total_ms=%.1f", n, v.accepted, v.token, rec.total_ms)
            if stop_reason == "eos":
                break
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    stats.generated = len(out)
    stats.wall_s = time.perf_counter() - t_start
    stats.reopens = client.reopens
    up1, _ = client.wire_counts()
    stats.setup_wire_bytes = (up1 - wire0[0]) - stats.uplink_wire_bytes
    result = GenerationResult(out, stats, stop_reason, client.session_id, opened.target_model, betas)
    if link is not None:
        result.link = f"model:{link.uplink_bps:g}/{link.downlink_bps:g}/{link.rtt_ms:g}"
        stats.wall_s = stats.latency_ms["total"] / 1e3  # the modelled link's time, not this loopback's
    if drafter.controller is not None:
        c = drafter.controller
        result.counted_positions = c.counted_positions
        result.mean_dropped_mass = c.mean_dropped_mass
        bound = c.theorem2_bound()
        result.theorem2_bound = bound if math.isfinite(bound) else None  # eta = 0: no bound (and valid JSON)
    return result


@dataclass
class _Ahead:
    """A batch drafted while the previous one was in flight, assuming it is fully accepted and the
    cloud's bonus token equals `guess`; adopted (sent next) only when both hold."""

    guess: int
    batch: DraftedBatch
    overrun_ms: float  # drafting that outlasted the flight
    adopted: bool = False


def _round_drafting_ahead(pool, client, wire: codec.Batch, open_request, drafter: Drafter, batch: DraftedBatch,
                          context: list[int], max_drafts: int, link: LinkModel | None):
    """Send a batch; while its verdict is on the way, draft the next batch as if every draft were
    accepted and the bonus token were the edge's own guess (pipelined drafting).

    The ahead batch is drafted to its plan's end unless the verdict shows it is invalid (then
    drafting stops at once): an adopted batch is then exactly the batch the edge would have drafted
    after the verdict (same plan for a fixed plan, same draws keyed by position), so pipelining
    changes when drafts are made, never which. Lossless: the ahead drafts are q_hat draws given the
    context they continue, with randomness independent of the cloud's, used only when that context
    turns out to be the real one. With an analytic link the verdict lands when the model says.
    """
    t_send = time.perf_counter()
    future = pool.submit(client.round, wire, reopen=open_request)
    guessed = context + [d.token for d in batch.drafts]
    guess = drafter.guess_bonus(guessed, batch.scheme)
    n = len(batch.drafts)

    def flight_ms() -> float:  # once the reply is in: when the verdict lands
        r = future.result()
        measured = (r.received_unix_us - r.sent_unix_us) / 1e3
        if link is None:
            return measured
        up, down = link.network_ms(r.uplink_wire_bytes or r.message_bytes, r.downlink_wire_bytes or r.verdict_bytes)
        return up + (r.verdict.sent_unix_us - r.verdict.received_unix_us) / 1e3 + down

    def invalidated() -> bool:
        if not future.done() or (time.perf_counter() - t_send) * 1e3 < flight_ms():
            return False
        v = future.result().verdict
        return not (v.accepted == n and not v.plain_tokens and v.token == guess)

    ahead_batch = drafter.draft(guessed + [guess], max_drafts=max_drafts, should_stop=invalidated)
    reply = future.result()
    overrun = max(0.0, (time.perf_counter() - t_send) * 1e3 - flight_ms())
    return reply, _Ahead(guess, ahead_batch, overrun)


def _record(batch: DraftedBatch, wire: codec.Batch, reply, beta, link: LinkModel | None) -> RoundRecord:
    v = reply.verdict
    round_trip_ms = (reply.received_unix_us - reply.sent_unix_us) / 1e3
    verify_ms = (v.sent_unix_us - v.received_unix_us) / 1e3
    uplink_ms = (v.received_unix_us - reply.sent_unix_us) / 1e3
    downlink_ms = (reply.received_unix_us - v.sent_unix_us) / 1e3
    if uplink_ms < 0 or downlink_ms < 0:  # clocks not synchronised: split the network time evenly
        uplink_ms = downlink_ms = max(0.0, round_trip_ms - verify_ms) / 2
    if link is not None:
        uplink_ms, downlink_ms = link.network_ms(
            reply.uplink_wire_bytes or reply.message_bytes, reply.downlink_wire_bytes or reply.verdict_bytes
        )
        round_trip_ms = uplink_ms + verify_ms + downlink_ms
    plan = batch.plan
    return RoundRecord(
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
        beta=beta,
        plain=len(v.plain_tokens),
        k=batch.scheme.k if batch.drafts else 0,
        ell=batch.scheme.ell if batch.drafts else 0,
        forward_ms=v.forward_us / 1e3,
        planned_max_drafts=plan.max_drafts if plan else 0,
        predicted_ms=batch.predicted_ms,
        predicted_tokens=batch.predicted_tokens,
    )
