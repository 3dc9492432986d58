"""Prometheus exporter: one round record in, every series out (as vLLM's spec-decode metrics).

Each side observes a round through one record and one call, `Metrics.observe(sparsifier,
RoundStats)`: the cloud builds the record from its verdict (cloud/servicer.py), the edge from its
RoundRecord (common/stats.py) through `observe_record`, which adds the edge's plan series.

Series (label `sparsifier`, and `part` or `position` where named: never a session id or a prompt):
  sqs_batches_total, sqs_draft_tokens_total, sqs_accepted_tokens_total, sqs_resampled_tokens_total,
  sqs_bonus_tokens_total, sqs_generated_tokens_total, sqs_uplink_payload_bytes_total,
  sqs_uplink_wire_bytes_total, sqs_uplink_formula_bits_total   (counters)
  sqs_drafted_by_position_total{position}, sqs_accepted_by_position_total{position}   (counters:
      a round with L drafts of which T are accepted counts positions 1..L drafted, 1..T accepted;
      positions past MAX_POSITION share the label "33+", so the label set stays bounded)
  sqs_batch_latency_seconds{part=draft|uplink|verify|downlink|total}   (histogram)
  sqs_conformal_threshold                                            (gauge)
  sqs_accepted_length (drafts accepted per round with drafts, as vLLM's)          (histogram)
  sqs_plan_draft_len (drafts the plan sent per round; 0 = plain target steps)   (histogram, edge)
  sqs_plan_time_error_ratio (|measured - predicted| / measured round time)       (histogram, edge)
  sqs_active_sessions                                                (gauge)
  sqs_sessions_opened_total{how=open|reopen}  sessions opened, and re-opened with their accepted context
                                              (a cloud restart, a replica that died behind the proxy)
  sqs_pass_rows, sqs_pass_sessions (rows scored by one target verification pass, and the sessions
      whose rounds shared it: 1 with cross-session batching off)      (histograms, cloud, no labels)
  sqs_pass_rows_dropped_total   (counter, cloud: lookahead draft rows a shared pass left out because
      they cost more than they commit there, common/pass_shape.py)
  sqs_auth_failures_total{reason=missing|malformed|invalid|certificate}   (counter, cloud: calls
      refused UNAUTHENTICATED, cloud/auth.py; a refused TLS handshake never reaches the server's code)
  sqs_quota_refusals_total{limit=sessions|rounds|rows|lookahead_rows}   (counter, cloud: RESOURCE_EXHAUSTED, cloud/quotas.py;
                                                        lookahead_rows: a lookahead dropped, no error)
  sqs_cloud_info{model, engine, weight_type, dtype, detail, batching=on|off, batch_window_ms, batch_max_rows,
      batch_rejoin, threads, workers} = 1   (gauge, cloud, one sample set at start: what the verifier runs as applied, so a
      load test or a dashboard records what served rather than what it asked for; "" = not known)

PromQL for a dashboard:
  acceptance:  sum(rate(sqs_accepted_tokens_total[1m])) / sum(rate(sqs_draft_tokens_total[1m]))
  by position: sum by (position) (rate(sqs_accepted_by_position_total[5m]))
               / sum by (position) (rate(sqs_drafted_by_position_total[5m]))
               (the chance that draft j is accepted when it is sent: vLLM's per-position curve)
  resampling:  sum(rate(sqs_resampled_tokens_total[1m])) / sum(rate(sqs_batches_total[1m]))
  p95 by part: histogram_quantile(0.95, sum by (le, part) (rate(sqs_batch_latency_seconds_bucket[1m])))
  mean L:      sum(rate(sqs_plan_draft_len_sum[5m])) / sum(rate(sqs_plan_draft_len_count[5m]))
  sessions per pass: sum(rate(sqs_pass_sessions_sum[5m])) / sum(rate(sqs_pass_sessions_count[5m]))
  rows per pass:     sum(rate(sqs_pass_rows_sum[5m])) / sum(rate(sqs_pass_rows_count[5m]))
  refused calls:     sum by (reason) (rate(sqs_auth_failures_total[5m])), sum by (limit) (rate(sqs_quota_refusals_total[5m]))
  bits/token:  sum(rate(sqs_uplink_formula_bits_total[1m]))
               / (sum(rate(sqs_accepted_tokens_total[1m])) + sum(rate(sqs_batches_total[1m])))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from common.stats import PARTS, RoundRecord, ends_in_resample

# Milliseconds (loopback, tiny models) to seconds (1.5B target on 2 cores, narrow links).
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
MAX_POSITION = 32  # draft positions 1..32 are labelled one by one; later ones share one label
_POSITIONS = tuple(str(j) for j in range(1, MAX_POSITION + 1))
_LATER_POSITIONS = f"{MAX_POSITION + 1}+"
# The labels of sqs_cloud_info, in order (cloud/server.py: CloudInfo.labels fills them; loadtest reads them back)
CLOUD_INFO_LABELS = ("model", "engine", "weight_type", "dtype", "detail", "batching", "batch_window_ms",
                     "batch_max_rows", "batch_rejoin", "threads", "workers")


@dataclass(frozen=True)
class RoundStats:
    """One verified round as the exporter counts it, on either side (vLLM's SpecDecodingStats).

    drafted: L, the drafts the batch carried; accepted: T <= L; plain: plain target steps after
    the round's token; latency_ms: ms by part (common.stats.PARTS), only the parts this side
    measured (the cloud: verify).
    """

    drafted: int
    accepted: int
    payload_bytes: int  # packed + raw bytes of the draft description
    formula_bits: float
    wire_bytes: int = 0  # uplink bytes on the connection (the edge measures them; 0 on the cloud)
    latency_ms: Mapping[str, float] = field(default_factory=dict)
    beta: float | None = None  # conformal threshold after the round (the edge's sparsifier state)
    plain: int = 0

    @classmethod
    def of_record(cls, r: RoundRecord) -> RoundStats:
        """The edge's full record of a round, as counted (every part of its latency)."""
        return cls(r.drafted, r.accepted, r.payload_bytes, r.formula_bits, r.uplink_wire_bytes,
                   {p: getattr(r, f"{p}_ms") for p in PARTS}, r.beta, r.plain)


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
        pos = lab + ["position"]
        self.drafted_by_position = Counter("sqs_drafted_by_position", "Rounds that sent a draft at this position",
                                           pos, registry=r)
        self.accepted_by_position = Counter("sqs_accepted_by_position",
                                            "Rounds whose draft at this position was accepted", pos, registry=r)
        self.threshold = Gauge("sqs_conformal_threshold", "Current C-SQS threshold beta", lab, registry=r)
        self.sessions = Gauge("sqs_active_sessions", "Open generation sessions", registry=r)
        self.sessions_opened = Counter("sqs_sessions_opened", "Sessions opened (how: open = a new generation, "
                                       "reopen = re-opened with its accepted context after a restart or a move)",
                                       ["how"], registry=r)
        self.accepted_length = Histogram("sqs_accepted_length", "Drafts accepted per round that carried drafts",
                                         lab, buckets=(0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64), registry=r)
        self.plan_len = Histogram("sqs_plan_draft_len", "Drafts the round's plan sent (0 = plain target steps)",
                                  lab, buckets=(0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64), registry=r)
        self.plan_error = Histogram("sqs_plan_time_error_ratio", "|measured - predicted| / measured round time",
                                    lab, buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0), registry=r)
        self.pass_rows = Histogram("sqs_pass_rows", "Rows scored by one target verification pass (all sessions)",
                                   buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256), registry=r)
        self.pass_rows_dropped = Counter("sqs_pass_rows_dropped", "Lookahead draft rows a shared pass left out "
                                         "(they cost more than they commit there)", registry=r)
        self.pass_sessions = Histogram("sqs_pass_sessions", "Sessions whose rounds shared one target verification pass",
                                       buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64), registry=r)
        self.auth_failures = Counter("sqs_auth_failures", "Calls refused UNAUTHENTICATED, by what failed",
                                     ["reason"], registry=r)
        self.quota_refusals = Counter("sqs_quota_refusals", "Requests refused RESOURCE_EXHAUSTED, by the limit",
                                      ["limit"], registry=r)
        # Info-style (value 1, the facts in the labels); the edge never sets it, so it exports no sample there.
        self.cloud_info = Gauge("sqs_cloud_info", "What the cloud verifier runs, as applied at start (value 1)",
                                CLOUD_INFO_LABELS, registry=r)

    def set_cloud_info(self, labels: Mapping[str, str]) -> None:
        """The one sqs_cloud_info sample: earlier ones are cleared, so a scrape never sees two
        (missing labels are exported as "", Prometheus' "not known")."""
        self.cloud_info.clear()
        self.cloud_info.labels(**{k: str(labels.get(k, "")) for k in CLOUD_INFO_LABELS}).set(1)

    def observe(self, sparsifier: str, s: RoundStats) -> None:
        """Count one verified round (a replayed verdict is not a new round: do not observe it)."""
        self.batches.labels(sparsifier).inc()
        self.drafted.labels(sparsifier).inc(s.drafted)
        self.accepted.labels(sparsifier).inc(s.accepted)
        (self.resampled if ends_in_resample(s.drafted, s.accepted) else self.bonus).labels(sparsifier).inc()
        self.generated.labels(sparsifier).inc(s.accepted + 1 + s.plain)
        if s.drafted:
            self.accepted_length.labels(sparsifier).observe(s.accepted)
        self._count_positions(self.drafted_by_position, sparsifier, s.drafted)
        self._count_positions(self.accepted_by_position, sparsifier, s.accepted)
        self.payload_bytes.labels(sparsifier).inc(s.payload_bytes)
        self.wire_bytes.labels(sparsifier).inc(s.wire_bytes)
        self.formula_bits.labels(sparsifier).inc(s.formula_bits)
        for part, ms in s.latency_ms.items():
            self.latency.labels(sparsifier, part).observe(ms / 1e3)
        if s.beta is not None:
            self.threshold.labels(sparsifier).set(s.beta)

    def observe_pass(self, sessions: int, rows: int) -> None:
        """One target verification pass on the cloud: the sessions it served and the rows it scored."""
        self.pass_sessions.observe(sessions)
        self.pass_rows.observe(rows)

    def observe_rows_dropped(self, rows: int) -> None:
        self.pass_rows_dropped.inc(rows)

    @staticmethod
    def _count_positions(counter: Counter, sparsifier: str, n: int) -> None:
        """Positions 1..n, one count each; those past MAX_POSITION on the shared label."""
        for label in _POSITIONS[:n]:
            counter.labels(sparsifier, label).inc()
        if n > MAX_POSITION:
            counter.labels(sparsifier, _LATER_POSITIONS).inc(n - MAX_POSITION)

    def observe_record(self, sparsifier: str, r: RoundRecord) -> None:
        """The edge's round: observe() its counts, then the edge's plan series."""
        self.observe(sparsifier, RoundStats.of_record(r))
        self.plan_len.labels(sparsifier).observe(r.drafted)
        if r.predicted_ms > 0 and r.total_ms > 0:
            self.plan_error.labels(sparsifier).observe(abs(r.total_ms - r.predicted_ms) / r.total_ms)
