"""The soak (`sqs-loadtest --soak`): N clients for D minutes against one address (Envoy in front
of cloud replicas), a replica killed on a schedule, and a report of latency over time, resyncs,
errors and per-replica counts.

  sqs-loadtest --soak --clients 16 --soak-minutes 10 --replicas 3 --kill-every-s 60 \\
      --draft-len 4 --k 4 --ell 100 --no-pipeline --temperature 1 --verify-tokens 64 --json-out soak.json
  sqs-loadtest --soak --cloud 127.0.0.1:50051 --cloud-metrics 127.0.0.1:9101 127.0.0.1:9102 ... \\
      --kill-every-s 60 --kill-cmd 'docker kill "$(docker ps -q -f label=com.docker.compose.service=cloud | shuf -n 1)"'

Without --cloud it starts --replicas sqs-cloud processes (--target-model) and Envoy with
deploy/envoy.yaml on loopback (loadtest/replicas.py); every --kill-every-s seconds it kills one of
them with SIGKILL, in turn (0, 1, 2, 0, ...), and restarts it on the same port after
--restart-after-s. With --cloud, --kill-cmd runs through the shell instead (SQS_KILL_INDEX = 0, 1,
... in its environment).

The run is one load-test level (loadtest/levels.py: warm-up, barrier, tickets until the duration)
whose clients ride out outages as the edge does: no retry cap (edge/client.py's outage window:
resend on a broken stream, a proxy's stream reset included; re-open on NOT_FOUND). Reported:

  windows     per --window-s of the measured phase, by request end: requests, errors, latency
              p50/p95, resyncs (sessions re-opened on another replica), kills
  resync      max_gap_ms of the requests that re-opened: the longest wait between two rounds'
              tokens, i.e. what a replica's death cost that session (p50/p95)
  replicas    per replica: rounds and sessions (loadtest/replicas.ReplicaMeter, from /metrics;
              with its own replicas also the sessions each one's log says it opened)
  tokens      --verify-tokens requests (every resynced one first, then a seeded sample) run again
              alone against an in-process cloud: their tokens must be the same (fixed plan, seed)
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Callable

import numpy as np

from loadtest.config import LoadTestConfig, check_loopback
from loadtest.report import RequestRecord, _pct

log = logging.getLogger("sqs.loadtest")


@dataclass
class KillEvent:
    at_s: float  # from the start of the measured phase (negative: during the warm-up)
    index: int  # the kill's number (and, with own replicas, the replica's index modulo N)
    ok: bool
    detail: str
    serving_after_s: float | None = None  # own replicas: seconds from the kill until it served again


@dataclass
class SoakReport:
    config: LoadTestConfig
    address: str
    own_replicas: int  # replicas this run started (0: an external --cloud)
    records: list[RequestRecord] = field(default_factory=list)
    kills: list[KillEvent] = field(default_factory=list)
    replicas: list[dict] = field(default_factory=list)
    verified: int = 0
    mismatches: list[int] = field(default_factory=list)  # seeds whose tokens differed from the solo run
    interrupted: bool = False

    def windows(self) -> list[dict]:
        w = self.config.window_s
        n = max(1, int(np.ceil(max((r.end_s for r in self.records), default=0.0) / w)))
        out = []
        for i in range(n):
            rows = [r for r in self.records if i * w <= r.end_s < (i + 1) * w or (i == n - 1 and r.end_s >= n * w)]
            lat = [r.latency_ms for r in rows if r.ok]
            out.append({"start_s": i * w, "end_s": (i + 1) * w, "requests": len(rows),
                        "errors": sum(1 for r in rows if not r.ok), "p50_ms": _pct(lat, 50), "p95_ms": _pct(lat, 95),
                        "resyncs": sum(r.reopens for r in rows),
                        "kills": sum(1 for k in self.kills if i * w <= k.at_s < (i + 1) * w)})
        return out

    def summary(self) -> dict:
        ok = [r for r in self.records if r.ok]
        lat = [r.latency_ms for r in ok]
        gaps = [r.max_gap_ms for r in ok if r.reopens and r.max_gap_ms is not None]
        calm = [r.max_gap_ms for r in ok if not r.reopens and r.max_gap_ms is not None]
        errors: dict[str, int] = {}
        for r in self.records:
            if not r.ok:
                errors[r.status] = errors.get(r.status, 0) + 1
        return {
            "requests": len(self.records), "ok": len(ok), "errors": sum(errors.values()), "errors_by_status": errors,
            "tokens": sum(r.tokens for r in ok),
            "latency_ms": {"p50": _pct(lat, 50), "p95": _pct(lat, 95), "p99": _pct(lat, 99)},
            "resyncs": sum(r.reopens for r in self.records),
            "resynced_requests": sum(1 for r in self.records if r.reopens),
            "resync_gap_ms": {"p50": _pct(gaps, 50), "p95": _pct(gaps, 95), "max": max(gaps, default=None)},
            "calm_gap_ms": {"p50": _pct(calm, 50), "p95": _pct(calm, 95)},
            "kills": len(self.kills), "failed_kills": sum(1 for k in self.kills if not k.ok),
            "tokens_verified": self.verified, "token_mismatches": len(self.mismatches),
        }

    def to_dict(self) -> dict:
        cfg = dataclasses.asdict(self.config)
        return {"tool": "sqs-loadtest --soak", "address": self.address, "own_replicas": self.own_replicas,
                "interrupted": self.interrupted, "config": cfg, "summary": self.summary(),
                "windows": self.windows(), "kills": [dataclasses.asdict(k) for k in self.kills],
                "replicas": self.replicas, "mismatched_seeds": self.mismatches,
                "requests": [dataclasses.asdict(r) for r in self.records]}

    def write_json(self, path: str) -> None:
        import json

        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")

    def text(self) -> str:
        from loadtest.replica_counts import replica_table

        c, s = self.config, self.summary()
        where = f"{self.own_replicas} sqs-cloud replicas behind Envoy (started here)" if self.own_replicas else "external"
        kills = f"a replica killed every {c.kill_every_s:g} s" if c.kill_every_s else "no kills"
        lines = [f"sqs-loadtest --soak: {c.clients[0]} clients, {c.soak_minutes:g} min against {self.address} ({where}); "
                 f"{kills}; T={c.temperature:g}, draft-len {c.draft_len}, {c.max_new_tokens} new tokens",
                 f"{'window_s':>12} {'requests':>8} {'errors':>6} {'p50_ms':>8} {'p95_ms':>8} {'resyncs':>7} {'kills':>5}"]
        for w in self.windows():
            lines.append(f"{w['start_s']:>5.0f}-{w['end_s']:<6.0f} {w['requests']:>8d} {w['errors']:>6d} "
                         f"{_ms(w['p50_ms']):>8} {_ms(w['p95_ms']):>8} {w['resyncs']:>7d} {w['kills']:>5d}")
        lat, gap, calm = s["latency_ms"], s["resync_gap_ms"], s["calm_gap_ms"]
        by_status = " (" + ", ".join(f"{k}={v}" for k, v in s["errors_by_status"].items()) + ")" if s["errors"] else ""
        lines.append(f"total: {s['requests']} requests, {s['ok']} ok, {s['errors']} errors{by_status}; "
                     f"latency p50 {_ms(lat['p50'])} ms, p95 {_ms(lat['p95'])} ms; {s['resyncs']} resyncs in "
                     f"{s['resynced_requests']} requests; {s['kills']} kills ({s['failed_kills']} failed)")
        lines.append(f"resync: longest wait between rounds of a resynced request p50 {_ms(gap['p50'])} ms, p95 "
                     f"{_ms(gap['p95'])} ms, max {_ms(gap['max'])} ms (requests without a resync: p50 "
                     f"{_ms(calm['p50'])} ms, p95 {_ms(calm['p95'])} ms)")
        for k in self.kills:
            back = f", serving again after {k.serving_after_s:.1f} s" if k.serving_after_s is not None else ""
            lines.append(f"kill {k.index} at {k.at_s:.1f} s: {'ok' if k.ok else 'FAILED'} {k.detail}{back}")
        if self.replicas:
            lines.append(replica_table(self.replicas))
        lines.append(f"tokens: {self.verified} requests re-run alone, {len(self.mismatches)} differ"
                     + (f" (seeds {self.mismatches[:10]})" if self.mismatches else ""))
        return "\n".join(lines)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


class _Killer:
    """Runs act(k) at start + (k + 1) * period for k = 0, 1, ... until stopped (a thread)."""

    def __init__(self, period_s: float, act: Callable[[int], KillEvent]) -> None:
        self.period_s, self.act = period_s, act
        self.events: list[KillEvent] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-killer", daemon=True)

    def start(self) -> "_Killer":
        if self.period_s > 0:
            self._thread.start()
        return self

    def _run(self) -> None:
        t0 = time.perf_counter()
        k = 0
        while not self._stop.wait(max(0.0, t0 + (k + 1) * self.period_s - time.perf_counter())):
            self.events.append(self.act(k))
            k += 1

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(300)


def _replica_killer(rs, restart_after_s: float, stop: threading.Event) -> Callable[[int], KillEvent]:
    def act(k: int) -> KillEvent:
        i = k % len(rs.replicas)
        t = time.perf_counter()
        rs.kill(i)
        stop.wait(restart_after_s)
        replica = rs.replicas[i]
        replica.spawn()
        try:
            replica.wait_serving(rs.start_timeout_s)
            return KillEvent(t, k, True, f"SIGKILL replica {i} ({replica.address})", time.perf_counter() - t)
        except Exception as exc:  # reported; the soak goes on with one replica fewer
            return KillEvent(t, k, False, f"replica {i} did not come back: {exc}")

    return act


def _command_killer(command: str) -> Callable[[int], KillEvent]:
    def act(k: int) -> KillEvent:
        t = time.perf_counter()
        proc = subprocess.run(command, shell=True, env={**os.environ, "SQS_KILL_INDEX": str(k)},
                              capture_output=True, text=True, timeout=120)
        detail = (proc.stdout.strip() or proc.stderr.strip()).splitlines()
        return KillEvent(t, k, proc.returncode == 0, f"{command!r} -> {proc.returncode} {detail[-1] if detail else ''}")

    return act


def _verify(report: SoakReport, runtime, prompt_ids: list[list[int]], draft_config, config: LoadTestConfig) -> None:
    """Re-run the chosen requests alone against an in-process cloud; record seeds that differ."""
    from cloud.inprocess import LocalCloud
    from edge.client import ClientConfig

    ok = [r for r in report.records if r.ok]
    resynced = [r for r in ok if r.reopens]
    others = [r for r in ok if not r.reopens]
    random.Random(config.seed).shuffle(others)
    chosen = ok if config.verify_tokens < 0 else (resynced + others)[:config.verify_tokens]
    if not chosen:
        return
    with LocalCloud(config.target_model, dtype=config.dtype, engine=config.engine) as cloud:
        solo = runtime.with_cloud(ClientConfig(cloud.address, meter=False))
        for r in chosen:
            result = solo.generate(prompt_ids[r.prompt_index], dataclasses.replace(draft_config, seed=r.seed),
                                   max_new_tokens=config.max_new_tokens)
            report.verified += 1
            if result.token_ids != r.token_ids:
                report.mismatches.append(r.seed)


def run_soak(config: LoadTestConfig, *, stop: threading.Event | None = None,
             progress_file: IO[str] | None = None) -> SoakReport:
    """One soak (see the module docstring). Raises ValueError for a bad config, EnvoyUnavailable
    without an envoy binary, ModelNotInstalled when a model is missing."""
    from edge.client import ClientConfig
    from edge.runtime import DraftSpec, EdgeRuntime
    from loadtest.levels import run_level
    from loadtest.replica_counts import ReplicaMeter
    from loadtest.replicas import ReplicaSet
    from loadtest.runner import _client_loop, _SeedSource, _Shared

    config.validate()
    stop = stop or threading.Event()
    runtime = EdgeRuntime.load(DraftSpec(config.draft_model, engine=config.engine, dtype=config.dtype))
    prompt_ids = [runtime.encode(p) for p in config.prompts]
    draft_config = runtime.draft_config(config)
    rs = None
    if config.cloud is None:
        rs = ReplicaSet(config.replicas, model=config.target_model, log_level="INFO")
        rs.__enter__()
        address, metrics = rs.address, rs.metrics_addresses
    else:
        address, metrics = check_loopback(config.cloud), list(config.cloud_metrics)
    report = SoakReport(config, address, config.replicas if rs else 0)
    try:
        # No retry cap: a soak measures the edge riding out replica deaths (its outage window).
        client_config = ClientConfig(address, round_timeout_s=config.round_timeout_s,
                                     connect_timeout_s=config.connect_timeout_s, retries=None, backoff_s=0.1,
                                     meter=False)
        sh = _Shared(runtime.with_cloud(client_config),
                     prompt_ids, draft_config, _SeedSource(config.seed), stop)
        level = dataclasses.replace(config, requests=10**9, duration_s=config.soak_minutes * 60)
        meter = ReplicaMeter(metrics).start() if metrics else None
        act = _replica_killer(rs, config.restart_after_s, stop) if rs else _command_killer(config.kill_cmd or "true")
        killer = _Killer(config.kill_every_s, act).start()
        try:
            lv = run_level(sh, level, config.clients[0], progress_file, _client_loop, label="soak ")
        finally:
            killer.stop()
            replicas = meter.stop() if meter else []
        t0 = lv.t0 if lv.t0 is not None else 0.0
        report.records = sorted(lv.records, key=lambda r: r.end_s)
        report.kills = [dataclasses.replace(k, at_s=k.at_s - t0) for k in killer.events]
        if rs is not None:
            for row, replica in zip(replicas, rs.replicas):
                row["sessions_in_log"] = len(replica.sessions()[0])
        report.replicas = replicas
        report.interrupted = stop.is_set()
    finally:
        if rs is not None:
            rs.__exit__(None, None, None)
    if not report.interrupted and config.verify_tokens:
        _verify(report, runtime, prompt_ids, draft_config, config)
    return report
