"""Prometheus exporter for the plain statistics (common/stats.py, cloud RoundResult).

Series (label `sparsifier` only: never a session id or a prompt):
  sqs_batches_total, sqs_draft_tokens_total, sqs_accepted_tokens_total, sqs_resampled_tokens_total,
  sqs_bonus_tokens_total, sqs_generated_tokens_total, sqs_uplink_payload_bytes_total,
  sqs_uplink_wire_bytes_total, sqs_uplink_formula_bits_total   (counters)
  sqs_batch_latency_seconds{part=draft|uplink|verify|downlink|total}   (histogram)
  sqs_conformal_threshold                                            (gauge)
  sqs_accepted_length (drafts accepted per round with drafts, as vLLM's)          (histogram)
  sqs_plan_draft_len (drafts the plan sent per round; 0 = plain target steps)   (histogram, edge)
  sqs_plan_time_error_ratio (|measured - predicted| / measured round time)       (histogram, edge)
  sqs_active_sessions                                                (gauge)

PromQL for a dashboard:
  acceptance:  sum(rate(sqs_accepted_tokens_total[1m])) / sum(rate(sqs_draft_tokens_total[1m]))
  resampling:  sum(rate(sqs_resampled_tokens_total[1m])) / sum(rate(sqs_batches_total[1m]))
  p95 by part: histogram_quantile(0.95, sum by (le, part) (rate(sqs_batch_latency_seconds_bucket[1m])))
  mean L:      sum(rate(sqs_plan_draft_len_sum[5m])) / sum(rate(sqs_plan_draft_len_count[5m]))
  bits/token:  sum(rate(sqs_uplink_formula_bits_total[1m]))
               / (sum(rate(sqs_accepted_tokens_total[1m])) + sum(rate(sqs_batches_total[1m])))
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from common.stats import PARTS, RoundRecord, ends_in_resample

# Milliseconds (loopback, tiny models) to seconds (1.5B target on 2 cores, narrow links).
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r, lab = self.registry, ["sparsifier"]
        self.batches = Counter("sqs_batches", "Verification rounds (batches)", lab, registry=r)
        self.drafted = Counter("sqs_draft_tokens", "Draft tokens sent", lab, registry=r)
        self.accepted = Counter("sqs_accepted_tokens", "Draft tokens accepted", lab, registry=r)
        self.resampled = Counter("sqs_resampled_tokens", "Tokens resampled at a rejection", lab, registry=r)
        self.bonus = Counter("sqs_bonus_tokens", "Bonus tokens after a fully accepted batch", lab, registry=r)
        self.generated = Counter("sqs_generated_tokens", "Tokens committed to outputs", lab, registry=r)
        self.payload_bytes = Counter("sqs_uplink_payload_bytes", "Packed draft payload bytes", lab, registry=r)
        self.wire_bytes = Counter("sqs_uplink_wire_bytes", "Uplink bytes on the connection", lab, registry=r)
        self.formula_bits = Counter("sqs_uplink_formula_bits", "Paper-formula bits of the drafts", lab, registry=r)
        self.latency = Histogram(
            "sqs_batch_latency_seconds", "Batch latency by part", lab + ["part"], buckets=LATENCY_BUCKETS_S, registry=r
        )
        self.threshold = Gauge("sqs_conformal_threshold", "Current C-SQS threshold beta", lab, registry=r)
        self.sessions = Gauge("sqs_active_sessions", "Open generation sessions", registry=r)
        self.accepted_length = Histogram("sqs_accepted_length", "Drafts accepted per round that carried drafts",
                                         lab, buckets=(0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64), registry=r)
        self.plan_len = Histogram("sqs_plan_draft_len", "Drafts the round's plan sent (0 = plain target steps)",
                                  lab, buckets=(0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64), registry=r)
        self.plan_error = Histogram("sqs_plan_time_error_ratio", "|measured - predicted| / measured round time",
                                    lab, buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0), registry=r)

    def observe_round(
        self, sparsifier: str, *, drafted: int, accepted: int, payload_bytes: int, formula_bits: float,
        wire_bytes: int = 0, latency_ms: dict[str, float] | None = None, beta: float | None = None,
        plain: int = 0,
    ) -> None:
        self.batches.labels(sparsifier).inc()
        self.drafted.labels(sparsifier).inc(drafted)
        self.accepted.labels(sparsifier).inc(accepted)
        (self.resampled if ends_in_resample(drafted, accepted) else self.bonus).labels(sparsifier).inc()
        self.generated.labels(sparsifier).inc(accepted + 1 + plain)
        if drafted:
            self.accepted_length.labels(sparsifier).observe(accepted)
        self.payload_bytes.labels(sparsifier).inc(payload_bytes)
        self.wire_bytes.labels(sparsifier).inc(wire_bytes)
        self.formula_bits.labels(sparsifier).inc(formula_bits)
        for part, ms in (latency_ms or {}).items():
            self.latency.labels(sparsifier, part).observe(ms / 1e3)
        if beta is not None:
            self.threshold.labels(sparsifier).set(beta)

    def observe_record(self, sparsifier: str, r: RoundRecord) -> None:
        self.observe_round(
            sparsifier, drafted=r.drafted, accepted=r.accepted, payload_bytes=r.payload_bytes,
            formula_bits=r.formula_bits, wire_bytes=r.uplink_wire_bytes,
            latency_ms={p: getattr(r, f"{p}_ms") for p in PARTS}, beta=r.beta, plain=r.plain,
        )
        self.plan_len.labels(sparsifier).observe(r.drafted)
        if r.predicted_ms > 0 and r.total_ms > 0:
            self.plan_error.labels(sparsifier).observe(abs(r.total_ms - r.predicted_ms) / r.total_ms)
