"""The load test's records and reports: one RequestRecord per measured request, a LevelResult per
concurrency level (its summary: latency and TTFT percentiles, tokens/s, acceptance, errors by status)
and the RunReport of a run (JSON, CSV, the printed table)."""

from __future__ import annotations

import csv
import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from loadtest.config import LoadTestConfig

@dataclass
class RequestRecord:
    clients: int  # the level's concurrency
    client: int
    request: int  # ticket within the level (measured requests are numbered 0, 1, ...)
    seed: int
    prompt_index: int
    status: str  # "OK" or the gRPC status name (or exception class) of the failure
    start_s: float  # from the start of the measured phase
    end_s: float
    latency_ms: float  # to the end of generation, or to the failure
    ttft_ms: float | None  # None when no token arrived
    tokens: int = 0
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    stop_reason: str = ""
    uplink_payload_bytes: int = 0
    reopens: int = 0
    error: str = ""
    max_gap_ms: float | None = None  # longest wait between two rounds' tokens (a resync shows here)
    token_ids: list[int] = field(default_factory=list, repr=False)  # JSON only (the soak checks them)

    @property
    def ok(self) -> bool:
        return self.status == "OK"


CSV_FIELDS = [
    "clients", "client", "request", "seed", "prompt_index", "status", "ok", "start_s", "end_s", "latency_ms",
    "ttft_ms", "tokens", "rounds", "drafted", "accepted", "acceptance_rate", "stop_reason",
    "uplink_payload_bytes", "reopens", "max_gap_ms", "error", "system",
]


def _pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else None


@dataclass
class LevelResult:
    clients: int
    records: list[RequestRecord]  # measured requests (successful and failed), in completion order
    warmup_requests: int = 0
    warmup_errors: int = 0
    cancelled: int = 0  # in-flight requests cancelled by an interrupt (not in records)
    stopped_by: str = ""  # "requests" | "duration" | "interrupted" | "" (no measured phase)
    batching: dict | None = None  # in-process cloud with batching on: its passes during the level (warm-up included)

    @property
    def wall_s(self) -> float:
        """Measured phase: from the barrier to the end of its last request."""
        return max((r.end_s for r in self.records), default=0.0)

    def summary(self) -> dict:
        ok = [r for r in self.records if r.ok]
        lat = [r.latency_ms for r in ok]
        ttft = [r.ttft_ms for r in ok if r.ttft_ms is not None]
        tokens = sum(r.tokens for r in ok)
        drafted = sum(r.drafted for r in ok)
        accepted = sum(r.accepted for r in ok)
        wall = self.wall_s
        errors = Counter(r.status for r in self.records if not r.ok)
        return {
            "clients": self.clients,
            "requests": len(self.records),
            "ok": len(ok),
            "errors": sum(errors.values()),
            "errors_by_status": dict(sorted(errors.items())),
            "cancelled": self.cancelled,
            "stopped_by": self.stopped_by,
            "wall_s": wall,
            "requests_per_s": len(ok) / wall if wall > 0 else 0.0,
            "tokens": tokens,
            "tokens_per_s": tokens / wall if wall > 0 else 0.0,
            "mean_tokens_per_request": tokens / len(ok) if ok else 0.0,
            "latency_ms": {"p50": _pct(lat, 50), "p95": _pct(lat, 95), "p99": _pct(lat, 99),
                           "mean": float(np.mean(lat)) if lat else None, "max": max(lat, default=None)},
            "ttft_ms": {"mean": float(np.mean(ttft)) if ttft else None, "p95": _pct(ttft, 95)},
            "rounds": sum(r.rounds for r in ok),
            "drafted": drafted,
            "accepted": accepted,
            "acceptance_rate": accepted / drafted if drafted else None,
            "acceptance_rate_definition": "accepted drafts / drafted tokens, successful measured requests",
            "warmup_requests": self.warmup_requests,
            "warmup_errors": self.warmup_errors,
            "cloud_batching": self.batching,
        }


@dataclass
class RunReport:
    config: LoadTestConfig
    cloud_address: str
    cloud_in_process: bool
    target_model: str  # as the cloud reports it ("" if no session ever opened on an external cloud)
    draft_model: str
    levels: list[LevelResult] = field(default_factory=list)
    interrupted: bool = False
    started_unix: float = 0.0
    # llama-server side by side (--llama-server): what ran (binary, version, model, cpus, threads,
    # "error" when a server could not start) and one level per N (loadtest/llama_levels.py)
    llama_server: dict | None = None
    llama_levels: list[LevelResult] = field(default_factory=list)
    # --cloud-metrics: per replica behind the router, over the whole run (loadtest/replicas.ReplicaMeter)
    replicas: list[dict] | None = None

    def to_dict(self) -> dict:
        cfg = dataclasses.asdict(self.config)
        cfg["clients"] = list(self.config.clients)
        cfg["prompts"] = list(self.config.prompts)
        return {
            "tool": "sqs-loadtest",
            "started_unix": self.started_unix,
            "cloud": {"address": self.cloud_address, "in_process": self.cloud_in_process,
                      "target_model": self.target_model},
            "draft_model": self.draft_model,
            "interrupted": self.interrupted,
            "config": cfg,
            "definitions": {
                "latency_ms": "end-to-end generation time per request: connect, session open, all rounds",
                "ttft_ms": "request start to the first committed tokens",
                "tokens_per_s": "generated tokens of successful measured requests / wall_s",
                "requests_per_s": "successful measured requests / wall_s",
                "wall_s": "measured phase: all clients warmed up -> last measured request done",
            },
            "levels": [lv.summary() for lv in self.levels],
            **({"replicas": self.replicas} if self.replicas is not None else {}),
            **({"llama_server": {**self.llama_server, "levels": [lv.summary() for lv in self.llama_levels]}}
               if self.llama_server is not None else {}),
        }

    def write_json(self, path: str) -> None:
        import json

        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    def write_csv(self, path: str) -> None:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            w.writeheader()
            for system, levels in (("sqs-sd", self.levels), ("llama-server", self.llama_levels)):
                for lv in levels:
                    for r in sorted(lv.records, key=lambda r: r.request):
                        w.writerow(self._csv_row(r, system))

    @staticmethod
    def _csv_row(r: RequestRecord, system: str) -> dict:
        row = dataclasses.asdict(r)
        del row["token_ids"]
        row["ok"] = int(r.ok)
        row["max_gap_ms"] = "" if r.max_gap_ms is None else f"{r.max_gap_ms:.3f}"
        row["acceptance_rate"] = f"{r.accepted / r.drafted:.4f}" if r.drafted else ""
        row["ttft_ms"] = "" if r.ttft_ms is None else f"{r.ttft_ms:.3f}"
        for key in ("start_s", "end_s"):
            row[key] = f"{row[key]:.4f}"
        row["latency_ms"] = f"{r.latency_ms:.3f}"
        row["system"] = system
        return row

    def table(self) -> str:
        """Our levels; with --llama-server, a line saying what it ran and its levels below, same columns."""
        out = _table(self.levels)
        if self.replicas is not None:
            from loadtest.replica_counts import replica_table

            out += "\ncloud replicas (--cloud-metrics), the whole run:\n" + replica_table(self.replicas)
        if self.llama_server is not None:
            ls = self.llama_server
            out += (f"\nllama-server --parallel N ({ls.get('version') or '?'}): {'/'.join(Path(ls.get('model') or '?').parts[-2:])}, "
                    f"{ls['threads']} thread(s) on CPU(s) {','.join(map(str, ls['cpus']))}; plain sampling, "
                    f"no prompt cache; tok/s = predicted tokens / wall_s, no TTFT (not streamed)")
            if self.llama_levels:
                out += "\n" + _table(self.llama_levels)
            if ls.get("error"):
                out += f"\nllama-server: error: {ls['error']}"
        return out

    def header(self) -> str:
        c = self.config
        where = "in-process" if self.cloud_in_process else "external"
        scheme = "none (plain target decoding)" if c.draft_len == 0 else c.sparsifier
        return (
            f"sqs-loadtest: cloud {self.cloud_address} ({where}, target {self.target_model or '?'}), "
            f"draft {self.draft_model}; {scheme}"
            + (f" K={c.k}" if c.sparsifier in ("topk", "fp16-topk") and c.draft_len else "")
            + f", T={c.temperature:g}, draft-len {c.draft_len}, {c.max_new_tokens} new tokens; per level: "
            f"{c.requests} requests or {c.duration_s:g} s, {c.warmup} warm-up/client"
            + ((f"; cloud batching: window {c.batch_window_ms:g} ms, {c.batch_max_rows} rows at most "
                f"(sess/pass: rounds per target pass, warm-up included)" if c.batch_window_ms > 0 else
                "; cloud batching off") if self.cloud_in_process else "")
            + ("; INTERRUPTED" if self.interrupted else "")
        )


def _table(levels: list[LevelResult]) -> str:
    head = ["clients", "ok", "err", "wall_s", "req/s", "tok/s", "p50_ms", "p95_ms", "p99_ms",
            "ttft_mean", "ttft_p95", "accept", "sess/pass", "errors"]
    rows = []
    for lv in levels:
        s = lv.summary()
        lat, ttft = s["latency_ms"], s["ttft_ms"]
        acc = s["acceptance_rate"]
        errs = " ".join(f"{k}={v}" for k, v in s["errors_by_status"].items()) or "-"
        b = s["cloud_batching"]
        rows.append([
            str(s["clients"]), str(s["ok"]), str(s["errors"]), f"{s['wall_s']:.2f}",
            f"{s['requests_per_s']:.2f}", f"{s['tokens_per_s']:.1f}", _ms(lat["p50"]), _ms(lat["p95"]),
            _ms(lat["p99"]), _ms(ttft["mean"]), _ms(ttft["p95"]), "-" if acc is None else f"{acc:.1%}",
            "-" if not b else f"{b['sessions_per_pass']:.2f}", errs,
        ])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) if i < len(head) - 1 else h for i, (h, w) in enumerate(zip(head, widths)))]
    for r in rows:
        lines.append("  ".join(c.rjust(w) if i < len(head) - 1 else c for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"
