"""One generation, end to end, from the edge: the per-round hot path in one place.

    open session -> repeat { draft (drafter) -> pack (codec) -> send/verify (client)
                             -> append accepted + new token -> settle conformal state }
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from common import codec
from common.metrics import Metrics
from common.stats import GenerationStats, RoundRecord
from edge.client import CloudClient
from edge.drafter import Drafter

log = logging.getLogger("sqs.edge")


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


def generate(
    prompt_ids: Sequence[int],
    drafter: Drafter,
    client: CloudClient,
    *,
    max_new_tokens: int,
    vocab_fingerprint: str,
    max_drafts: int = 64,
    on_tokens: Callable[[list[int]], None] | None = None,
    metrics: Metrics | None = None,
) -> GenerationResult:
    cfg = drafter.config
    sampling = codec.Sampling(cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed)
    context = list(prompt_ids)
    out: list[int] = []
    stats = GenerationStats()

    def open_request() -> codec.OpenRequest:
        return codec.OpenRequest(list(context), sampling, cfg.scheme, vocab_fingerprint, max_drafts)

    t_start = time.perf_counter()
    wire0 = client.wire_counts()
    opened = client.open(open_request())
    eos = set(opened.eos_token_ids) | drafter.eos
    stop_reason = "length"
    betas: list[float] = []
    while len(out) < max_new_tokens:
        # Each round commits at least one token; drafts beyond the remaining budget are wasted.
        batch = drafter.draft(context, max_drafts=min(max_drafts, max_new_tokens - len(out) - 1))
        msg, packed = codec.encode_batch("", len(context), batch.drafts, cfg.scheme)
        reply = client.round(msg, reopen=open_request)
        v = reply.verdict
        n = len(batch.drafts)
        if v.accepted > n or v.position != len(context) + v.accepted + 1:
            raise RuntimeError(f"inconsistent verdict: accepted {v.accepted} of {n}, position {v.position}")
        new = [d.token for d in batch.drafts[: v.accepted]] + [v.token]
        drafter.settle(v.accepted, n)
        context.extend(new)
        keep = new[: max_new_tokens - len(out)]
        for i, t in enumerate(keep):
            if t in eos:
                keep = keep[: i + 1]
                stop_reason = "eos"
                break
        out.extend(keep)
        rec = _record(batch, packed, msg, reply, v, drafter.beta)
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
    stats.generated = len(out)
    stats.wall_s = time.perf_counter() - t_start
    stats.reopens = client.reopens
    up1, _ = client.wire_counts()
    stats.setup_wire_bytes = (up1 - wire0[0]) - stats.uplink_wire_bytes
    result = GenerationResult(out, stats, stop_reason, client.session_id, opened.target_model, betas)
    if drafter.controller is not None:
        c = drafter.controller
        result.counted_positions = c.counted_positions
        result.mean_dropped_mass = c.mean_dropped_mass
        bound = c.theorem2_bound()
        result.theorem2_bound = bound if math.isfinite(bound) else None  # eta = 0: no bound (and valid JSON)
    return result


def _record(batch, packed, msg, reply, v, beta) -> RoundRecord:
    round_trip_ms = (reply.received_unix_us - reply.sent_unix_us) / 1e3
    verify_ms = (v.sent_unix_us - v.received_unix_us) / 1e3
    uplink_ms = (v.received_unix_us - reply.sent_unix_us) / 1e3
    downlink_ms = (reply.received_unix_us - v.sent_unix_us) / 1e3
    if uplink_ms < 0 or downlink_ms < 0:  # clocks not synchronised: split the network time evenly
        uplink_ms = downlink_ms = max(0.0, round_trip_ms - verify_ms) / 2
    return RoundRecord(
        drafted=len(batch.drafts),
        accepted=v.accepted,
        formula_bits=batch.formula_bits,
        honest_bits=batch.honest_bits,
        payload_bytes=packed.payload_bytes,
        message_bytes=msg.ByteSize(),
        uplink_wire_bytes=reply.uplink_wire_bytes,
        downlink_wire_bytes=reply.downlink_wire_bytes,
        draft_ms=batch.draft_ms,
        uplink_ms=uplink_ms,
        verify_ms=verify_ms,
        downlink_ms=downlink_ms,
        total_ms=batch.draft_ms + round_trip_ms,
        beta=beta,
    )
