"""The load test's records and reports: one RequestRecord per measured request, a LevelResult per
concurrency level (its summary: latency and TTFT percentiles, tokens/s, acceptance, errors by status,
the serving processes' CPU per committed token, the load average) and the RunReport of a run (JSON,
CSV, the printed table), which says what ran: commit, CPU, the cloud's engine and batching, the
edges' plan options, llama-server's version and arguments."""

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
    lookahead_drafted: int = 0  # drafts sent ahead of streamed rounds that the cloud verified
    lookahead_accepted: int = 0
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
    "ttft_ms", "tokens", "rounds", "drafted", "accepted", "acceptance_rate", "lookahead_drafted", "lookahead_accepted",
    "stop_reason",
    "uplink_payload_bytes", "reopens", "max_gap_ms", "error", "system",
    # what ran, repeated on every row so that a row read alone says it (run- and level-wide values)
    "server", "commit", "cpu_flags", "loadavg_1m", "cloud_cpu_s", "cloud_ms_cpu_per_token", "cloud_cpu_scope",
]


IN_PROCESS_ONLY = ("cloud_workers", "batch_window_ms", "batch_max_rows")


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
    # the serving processes' CPU over the measured phase (loadtest/proc_cpu.CpuMeter.stop: cpu_s, pids,
    # processes, scope, reason); None: not measured
    cloud_cpu: dict | None = None
    loadavg: list[float] | None = None  # os.getloadavg() when the level started
    server: dict | None = None  # llama-server rows: the process that served this level (pid, args, note)
    edge_cpu: dict | None = None  # an external cloud's edges (this process) over the measured phase, as cloud_cpu
    edge_batching: dict | None = None  # the simulated edges' shared draft passes (--edge-batch-window-ms)

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
            # drafts that rode streamed rounds (DraftBatch.lookahead): not in drafted / accepted above
            "lookahead_drafted": sum(r.lookahead_drafted for r in ok),
            "lookahead_accepted": sum(r.lookahead_accepted for r in ok),
            "warmup_requests": self.warmup_requests,
            "warmup_errors": self.warmup_errors,
            "cloud_batching": self.batching,
            "loadavg_at_start": self.loadavg,
            **_cpu_per_token(self.cloud_cpu, tokens, self.cancelled),
            # cores kept busy on average: near 1.0 on a one-core side is the side that limits tokens/s
            "cloud_cpu_cores": _cores(self.cloud_cpu, wall),
            "edge_cpu": self.edge_cpu,
            "edge_cpu_cores": _cores(self.edge_cpu, wall),
            "edge_batching": self.edge_batching,
            **({"server": self.server} if self.server is not None else {}),
        }


def _cores(cpu: dict | None, wall_s: float) -> float | None:
    """CPU seconds of a reading per second of the measured phase (None: no reading or no phase)."""
    if not cpu or cpu.get("cpu_s") is None or not wall_s > 0:
        return None
    return cpu["cpu_s"] / wall_s


def _cpu_per_token(cpu: dict | None, tokens: int, cancelled: int) -> dict:
    """{"cloud_cpu": the reading (its reason says why there is no figure), "cloud_cpu_ms_per_token":
    the serving processes' CPU ms over the measured phase per committed token, or None: not measured,
    no token committed, or requests cancelled by an interrupt (their CPU counts, their tokens would not)."""
    if cpu is None:
        return {"cloud_cpu": None, "cloud_cpu_ms_per_token": None}
    cpu = dict(cpu)
    per_token = None
    if cpu.get("cpu_s") is not None:
        if cancelled:
            cpu["reason"] = "requests cancelled by an interrupt used CPU but commit no tokens"
        elif tokens <= 0:
            cpu["reason"] = "no committed token"
        else:
            per_token = cpu["cpu_s"] * 1e3 / tokens
    return {"cloud_cpu": cpu, "cloud_cpu_ms_per_token": per_token}


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
    # what ran (loadtest/provenance.py): commit, CPU flags and fingerprint, CPUs
    run: dict = field(default_factory=dict)
    # our cloud: engine, weight_type, dtype, workers (engine_source: "reported by the cloud", "as
    # configured" or "not reported"), batching (on, window_ms, max_rows, source), cloud_reports (each
    # --cloud-metrics endpoint's sqs_cloud_info, or why none), and "cpu": the processes its CPU column
    # measures (pids, source, scope, reason)
    cloud_info: dict = field(default_factory=dict)
    # the edges: draft engine as loaded, the generation options as passed, the plan as applied
    edge: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        cfg = dataclasses.asdict(self.config)
        cfg["clients"] = list(self.config.clients)
        cfg["prompts"] = list(self.config.prompts)
        if not self.cloud_in_process:  # these configure an in-process cloud: an external one never saw them
            for key in IN_PROCESS_ONLY:
                cfg[key] = None
        return {
            "tool": "sqs-loadtest",
            "started_unix": self.started_unix,
            "run": self.run,
            "cloud": {"address": self.cloud_address, "in_process": self.cloud_in_process,
                      "target_model": self.target_model, **self.cloud_info},
            "draft_model": self.draft_model,
            "edge": self.edge,
            "interrupted": self.interrupted,
            "config": cfg,
            "config_note": f"{', '.join(IN_PROCESS_ONLY)} configure an in-process cloud (None: an external cloud ran; "
                           "cloud.batching says what is known of its batching)",
            "definitions": {
                "latency_ms": "end-to-end generation time per request: connect, session open, all rounds",
                "ttft_ms": "request start to the first committed tokens",
                "tokens_per_s": "generated tokens of successful measured requests / wall_s",
                "requests_per_s": "successful measured requests / wall_s",
                "wall_s": "measured phase: all clients warmed up -> last measured request done",
                "cloud_cpu_ms_per_token": "utime + stime of the serving processes (cloud_cpu.pids, /proc/<pid>/stat) "
                                          "from the measured phase's start until every client is done, per committed "
                                          "token of the successful measured requests; cloud_cpu.scope says what the "
                                          "processes hold (an in-process cloud shares this process with the edges)",
                "loadavg_at_start": "os.getloadavg() (1, 5, 15 min) when the level started",
                "cloud_cpu_cores": "cloud_cpu.cpu_s / wall_s: the serving processes' cores kept busy on average",
                "edge_cpu_cores": "the same for this process when the cloud is external (the edges' drafting, "
                                  "sparsifying, packing and gRPC)",
                "cloud_batching": "the cloud's verification passes during the level, warm-up included: rounds "
                                  "(one session's rows) and rows per pass; source says where they were read",
                "edge_batching": "the simulated edges' shared draft passes during the level, warm-up included "
                                 "(--edge-batch-window-ms): steps (draft LM calls) per pass",
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
        run = {"commit": self.run.get("commit") or "", "cpu_flags": self.run.get("cpu_flags") or ""}
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            w.writeheader()
            for system, levels in (("sqs-sd", self.levels), ("llama-server", self.llama_levels)):
                for lv in levels:
                    level = {**run, **self._csv_level(lv, system)}
                    for r in sorted(lv.records, key=lambda r: r.request):
                        w.writerow({**self._csv_row(r, system), **level})

    def _csv_level(self, lv: LevelResult, system: str) -> dict:
        """The level-wide columns of its rows: who served, the load, the serving processes' CPU."""
        s = lv.summary()
        cpu, per_token = s["cloud_cpu"] or {}, s["cloud_cpu_ms_per_token"]
        return {
            "server": self.cloud_line() if system == "sqs-sd" else self.llama_line(lv),
            "loadavg_1m": "" if lv.loadavg is None else f"{lv.loadavg[0]:.2f}",
            "cloud_cpu_s": "" if cpu.get("cpu_s") is None else f"{cpu['cpu_s']:.3f}",
            "cloud_ms_cpu_per_token": "" if per_token is None else f"{per_token:.3f}",
            "cloud_cpu_scope": cpu.get("scope", ""),
        }

    def cloud_line(self) -> str:
        """Our cloud in one line: target, engine and batching, each with where the knowledge comes from."""
        ci = self.cloud_info
        if ci.get("engine") is None:
            engine = "engine not reported"
        else:
            weights = ci.get("weight_type")
            engine = (f"engine {ci['engine']}" + (f" {weights}" if weights else "")
                      + (f" dtype {ci['dtype']}" if ci.get("dtype") and ci["dtype"] != weights else "")
                      + f" ({ci.get('engine_source') or '?'})")
        return f"sqs-cloud target {self.target_model or '?'}, {engine}, {batching_line(ci.get('batching'))}"

    def llama_line(self, lv: LevelResult) -> str:
        """llama-server's version and the arguments it ran this level with."""
        ls, srv = self.llama_server or {}, lv.server or {}
        args = " ".join((srv.get("args") or [])[1:])  # [0] is the binary: llama_server.binary
        return f"llama-server {ls.get('version') or '?'}: {args}".rstrip()

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
        edge = [f"N={lv.clients}: {lv.edge_batching['steps_per_pass']:.2f}" for lv in self.levels if lv.edge_batching]
        if edge:
            out += "\nsimulated edges' draft passes (steps per pass, warm-up included): " + ", ".join(edge)
        ahead = [(lv.clients, lv.summary()) for lv in self.levels]
        ahead = [f"N={n}: {s['lookahead_drafted']} / {s['lookahead_accepted']}" for n, s in ahead if s["lookahead_drafted"]]
        if ahead:
            out += "\ndrafts sent ahead of streamed rounds (verified / accepted, not in accept): " + ", ".join(ahead)
        if self.replicas is not None:
            from loadtest.replica_counts import replica_table

            out += "\ncloud replicas (--cloud-metrics), the whole run:\n" + replica_table(self.replicas)
        if self.llama_server is not None:
            ls = self.llama_server
            out += (f"\nllama-server --parallel N ({ls.get('version') or '?'}): {'/'.join(Path(ls.get('model') or '?').parts[-2:])}, "
                    f"{ls['threads']} thread(s) on CPU(s) {','.join(map(str, ls['cpus']))}"
                    + (f", {ls['note']}" if ls.get("note") else "")
                    + "; plain sampling, no prompt cache; tok/s = predicted tokens / wall_s, no TTFT (not streamed); "
                    "cloud_cpu_ms/tok: the llama-server process")
            if self.llama_levels:
                out += "\n" + _table(self.llama_levels)
            if ls.get("error"):
                out += f"\nllama-server: error: {ls['error']}"
        return out

    def header(self) -> str:
        c = self.config
        where = "in-process" if self.cloud_in_process else "external"
        scheme = "none (plain target decoding)" if c.draft_len == 0 else c.sparsifier
        b = self.cloud_info.get("batching") or {}
        return (
            f"sqs-loadtest: cloud {self.cloud_address} ({where}, target {self.target_model or '?'}), "
            f"draft {self.draft_model}; {scheme}"
            + (f" K={c.k}" if c.sparsifier in ("topk", "fp16-topk") and c.draft_len else "")
            + f", T={c.temperature:g}, draft-len {c.draft_len}, {c.max_new_tokens} new tokens; per level: "
            f"{c.requests} requests or {c.duration_s:g} s, {c.warmup} warm-up/client"
            + ((f"; cloud batching: window {b['window_ms']:g} ms, {b['max_rows']} rows at most "
                f"(sess/pass: rounds per target pass, warm-up included)" if b.get("on") else
                "; cloud batching off") if self.cloud_in_process else "")
            + ("; INTERRUPTED" if self.interrupted else "")
            + "\n" + self.run_line()
        )

    def run_line(self) -> str:
        """The second header line: commit, CPU, the cloud as known, what its CPU column measures."""
        r = self.run
        return (f"run: commit {r.get('commit') or '?'}, CPU [{r.get('cpu_flags') or '?'}]; {self.cloud_line()}; "
                f"cloud_cpu_ms/tok: {cpu_line(self.cloud_info.get('cpu'))}")


def batching_line(b: dict | None) -> str:
    if not b or b.get("on") is None:
        return f"batching unknown ({(b or {}).get('source') or 'not reported'})"
    if not b["on"]:
        return f"batching off ({b.get('source') or '?'})"
    rejoin = f", rejoin {b['rejoin']:g}" if b.get("rejoin") is not None else ""
    return f"batching window {b['window_ms']:g} ms, {b['max_rows']} rows at most{rejoin} ({b.get('source') or '?'})"


def cpu_line(cpu: dict | None) -> str:
    """What the cloud CPU column measures: the scope and pids, or why it is empty."""
    if not cpu:
        return "not measured"
    if not cpu.get("pids"):
        return f"empty ({cpu.get('reason') or 'no process'})"
    return f"{cpu.get('scope')}, pid {', '.join(map(str, cpu['pids']))} ({cpu.get('source') or '?'})"


def _table(levels: list[LevelResult]) -> str:
    head = ["clients", "ok", "err", "wall_s", "req/s", "tok/s", "p50_ms", "p95_ms", "p99_ms",
            "ttft_mean", "ttft_p95", "accept", "sess/pass", "cloud_cpu_ms/tok", "cloud_busy", "edge_busy", "errors"]
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
            "-" if not b else f"{b['sessions_per_pass']:.2f}", _ms(s["cloud_cpu_ms_per_token"], 2),
            _ms(s["cloud_cpu_cores"], 2), _ms(s["edge_cpu_cores"], 2), errs,
        ])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) if i < len(head) - 1 else h for i, (h, w) in enumerate(zip(head, widths)))]
    for r in rows:
        lines.append("  ".join(c.rjust(w) if i < len(head) - 1 else c for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


def _ms(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"
