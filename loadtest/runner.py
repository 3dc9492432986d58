"""The load test: N concurrent edge clients, each a thread on the library path, against one cloud.

Per concurrency level N (``LoadTestConfig.clients`` runs each level in turn):

1. N client threads start. Each has its own ``CachedLM`` (KV cache) over the draft model weights,
   which are loaded once for the whole run, and runs ``warmup`` requests that are not measured.
2. All clients meet at a barrier; the measured phase starts when the last one arrives.
3. Clients take tickets from a shared counter until ``requests`` tickets are issued (all clients
   together) or ``duration_s`` seconds of the measured phase have passed, whichever comes first.
   A request that has started runs to its end (it is bounded by ``max_new_tokens`` and the round
   timeout), so the phase can overrun ``duration_s`` by one request.

One request = one ``edge.generate.generate`` call: a fresh ``CloudClient`` (channel + session, as the
edge HTTP API does per request), a fresh ``Drafter`` (its own conformal state) with a seed no other
request of the run uses, and the prompt ``prompts[ticket % len(prompts)]``.

  latency  end-to-end generation time: from before the client connects to generate() returning
           (connection, session open and every round; the session close afterwards is excluded)
  TTFT     from the same start to the first committed tokens (the first round's verdict)
  tokens   tokens generated (prompt excluded)

A failed request is counted by gRPC status name (``CloudError.code``; an exception that is not a
gRPC failure counts under its class name) and the run goes on. Statistics cover the successful
measured requests; warm-up requests are excluded. ``stop`` (set on Ctrl-C) ends a level early: no
new request starts and in-flight requests are cancelled at their next round (not counted).
"""

from __future__ import annotations

import csv
import dataclasses
import ipaddress
import logging
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import IO, Sequence

import numpy as np

from edge.options import GenerationOptions

log = logging.getLogger("sqs.loadtest")

DEFAULT_PROMPTS: tuple[str, ...] = (
    "def fibonacci(n):",
    "The quick brown fox",
    "import numpy as np\n",
    "class Stack:\n    def push(self, item):",
    "Once upon a time",
    "SELECT name FROM users WHERE",
    "for i in range(10):",
    "# Return the sum of a list\n",
)

_LOOPBACK_V4 = ipaddress.ip_network("127.0.0.0/8")
_LOOPBACK_V6 = ipaddress.ip_address("::1")


def check_loopback(target: str) -> str:
    """`target` (HOST:PORT) if HOST is 127.0.0.0/8, localhost or ::1, else ValueError (one line).

    Returns the target with an IPv6 host bracketed ("::1:50051" -> "[::1]:50051").
    """
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--cloud must be HOST:PORT, got {target!r}")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if bare.lower() == "localhost":
        return f"{bare}:{port}"
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        ip = None
    if ip is not None and ((ip.version == 4 and ip in _LOOPBACK_V4) or ip == _LOOPBACK_V6):
        return f"[{bare}]:{port}" if ip.version == 6 else f"{bare}:{port}"
    raise ValueError(
        f"--cloud {target!r} is not a loopback address (127.0.0.0/8, localhost or ::1); "
        "sqs-loadtest only loads a cloud on this machine"
    )


@dataclass(frozen=True)
class LoadTestConfig(GenerationOptions):
    clients: tuple[int, ...] = (1,)  # concurrency levels, run in turn
    requests: int = 32  # measured requests per level, all clients together
    duration_s: float = 30.0  # measured phase per level (whichever of requests/duration comes first)
    warmup: int = 1  # unmeasured requests per client before each level's measured phase
    cloud: str | None = None  # HOST:PORT on loopback; None = start a cloud in this process
    target_model: str = "tiny"  # for the in-process cloud
    draft_model: str = "tiny"
    dtype: str | None = None
    engine: str = "auto"  # auto | torch | llama (sqs_models.engines), draft and in-process target
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    max_new_tokens: int = 32  # the generation options come from edge/options.py; seed: the first request's,
    # every request of the run gets its own (seed, seed + 1, ...)
    connect_timeout_s: float = 10.0
    round_timeout_s: float = 60.0
    retries: int = 0  # a load test counts failures instead of hiding them behind retries
    meter: bool = False  # byte-counting relay per client (adds a copy of every byte in Python)
    cloud_workers: int = 2  # torch threads of the in-process cloud
    batch_window_ms: float = 2.0  # in-process cloud: cross-session batched verification window (0 = off)
    batch_max_rows: int = 64  # in-process cloud: rows of one batched forward pass at most
    progress: bool = True  # tqdm bar on stderr

    def validate(self) -> None:
        if not self.clients or any(n < 1 for n in self.clients):
            raise ValueError("--clients needs one or more values >= 1")
        if self.requests < 1:
            raise ValueError("--requests must be >= 1")
        if not self.duration_s > 0:
            raise ValueError("--duration-s must be > 0")
        if self.warmup < 0:
            raise ValueError("--warmup must be >= 0")
        from edge.options import options_from

        options_from(self)  # the generation options, checked as everywhere (edge/options.py)
        if not self.prompts:
            raise ValueError("no prompts")
        if self.connect_timeout_s <= 0 or self.round_timeout_s <= 0:
            raise ValueError("timeouts must be > 0")
        if self.retries < 0:
            raise ValueError("--retries must be >= 0")
        if self.cloud_workers < 1:
            raise ValueError("--cloud-workers must be >= 1")
        if self.batch_window_ms < 0 or self.batch_max_rows < 1:
            raise ValueError("--batch-window-ms must be >= 0 and --batch-max-rows >= 1")
        if self.cloud is not None:
            check_loopback(self.cloud)


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

    @property
    def ok(self) -> bool:
        return self.status == "OK"


CSV_FIELDS = [
    "clients", "client", "request", "seed", "prompt_index", "status", "ok", "start_s", "end_s", "latency_ms",
    "ttft_ms", "tokens", "rounds", "drafted", "accepted", "acceptance_rate", "stop_reason",
    "uplink_payload_bytes", "reopens", "error",
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
            for lv in self.levels:
                for r in sorted(lv.records, key=lambda r: r.request):
                    row = dataclasses.asdict(r)
                    row["ok"] = int(r.ok)
                    row["acceptance_rate"] = f"{r.accepted / r.drafted:.4f}" if r.drafted else ""
                    row["ttft_ms"] = "" if r.ttft_ms is None else f"{r.ttft_ms:.3f}"
                    for key in ("start_s", "end_s"):
                        row[key] = f"{row[key]:.4f}"
                    row["latency_ms"] = f"{r.latency_ms:.3f}"
                    w.writerow(row)

    def table(self) -> str:
        head = ["clients", "ok", "err", "wall_s", "req/s", "tok/s", "p50_ms", "p95_ms", "p99_ms",
                "ttft_mean", "ttft_p95", "accept", "sess/pass", "errors"]
        rows = []
        for lv in self.levels:
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


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


class _Interrupted(Exception):
    pass


class _SeedSource:
    """Seeds seed, seed + 1, ... handed out once each across the whole run."""

    def __init__(self, first: int) -> None:
        self._next = first
        self._lock = threading.Lock()

    def take(self) -> int:
        with self._lock:
            s = self._next
            self._next += 1
            return s


class _Level:
    """Shared state of one concurrency level."""

    def __init__(self, n: int, config: LoadTestConfig, stop: threading.Event) -> None:
        self.n = n
        self.config = config
        self.stop = stop
        self.lock = threading.Lock()
        self.issued = 0
        self.records: list[RequestRecord] = []
        self.warm_done = 0
        self.warm_errors = 0
        self.cancelled = 0
        self.t0: float | None = None  # measured phase start (perf_counter)
        self.deadline = float("inf")
        self.stopped_by = ""
        self.target_model = ""

    def start(self) -> None:  # Barrier action: runs once, when the last client arrives
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + self.config.duration_s

    def claim(self) -> int | None:
        with self.lock:
            if self.stop.is_set():
                self.stopped_by = "interrupted"
                return None
            if self.issued >= self.config.requests:
                self.stopped_by = self.stopped_by or "requests"
                return None
            if time.perf_counter() >= self.deadline:
                self.stopped_by = self.stopped_by or "duration"
                return None
            t = self.issued
            self.issued += 1
            return t


@dataclass
class _Shared:
    """What every client of the run shares: the draft model, prompts, edge config, cloud address."""

    model: object  # sqs_models LoadedModel
    prompt_ids: list[list[int]]
    draft_config: object  # edge.drafter.DraftConfig
    client_config: object  # edge.client.ClientConfig
    seeds: _SeedSource
    stop: threading.Event


def _one_request(sh: _Shared, lv: _Level, lm, client: int, ticket: int, prompt_index: int) -> RequestRecord | None:
    """One generation; a record (failed ones included), or None when cancelled by an interrupt."""
    import grpc

    from edge.client import CloudClient, CloudError
    from edge.drafter import Drafter
    from edge.generate import generate

    seed = sh.seeds.take()
    m = sh.model
    drafter = Drafter(lm, dataclasses.replace(sh.draft_config, seed=seed), m.eos_token_ids)
    base = lv.t0 if lv.t0 is not None else time.perf_counter()
    first: list[float] = []

    def on_tokens(new: list[int]) -> None:
        if new and not first:
            first.append(time.perf_counter())
        if sh.stop.is_set():
            raise _Interrupted()

    t0 = time.perf_counter()
    status, error, result = "OK", "", None
    try:
        with CloudClient(sh.client_config) as cc:
            result = generate(sh.prompt_ids[prompt_index], drafter, cc, max_new_tokens=lv.config.max_new_tokens,
                              vocab_fingerprint=m.fingerprint, on_tokens=on_tokens)
            t1 = time.perf_counter()
    except _Interrupted:
        return None
    except CloudError as exc:
        status, error = (exc.code.name if exc.code is not None else "UNKNOWN"), str(exc)
    except grpc.RpcError as exc:  # not expected (the client wraps them), counted all the same
        status, error = exc.code().name, str(exc.details())
    except Exception as exc:  # e.g. an inconsistent verdict: a failed request, the run goes on
        log.debug("request failed", exc_info=True)
        status, error = type(exc).__name__, str(exc)
    if result is None:
        t1 = time.perf_counter()
        if sh.stop.is_set():
            return None  # a failure caused by the interrupt is a cancellation
    rec = RequestRecord(
        clients=lv.n, client=client, request=ticket, seed=seed, prompt_index=prompt_index, status=status,
        start_s=t0 - base, end_s=t1 - base, latency_ms=(t1 - t0) * 1e3,
        ttft_ms=(first[0] - t0) * 1e3 if first else None, error=error.splitlines()[0] if error else "",
    )
    if result is not None:
        s = result.stats
        rec.tokens, rec.rounds, rec.drafted, rec.accepted = s.generated, s.rounds, s.drafted, s.accepted
        rec.stop_reason, rec.uplink_payload_bytes, rec.reopens = result.stop_reason, s.uplink_payload_bytes, s.reopens
        if result.target_model and not lv.target_model:
            lv.target_model = result.target_model
    return rec


def _client_loop(sh: _Shared, lv: _Level, client: int, barrier: threading.Barrier, level_t0: float) -> None:
    from sqs_models.cached_lm import CachedLM

    cfg = lv.config
    lm = None
    try:
        lm = CachedLM(sh.model.model, sh.model.vocab_size)
        for j in range(cfg.warmup):
            if sh.stop.is_set() or time.perf_counter() - level_t0 > cfg.duration_s:
                break
            rec = _one_request(sh, lv, lm, client, -1 - j, (client + j) % len(sh.prompt_ids))
            if rec is not None:  # a warm-up request cancelled by an interrupt is not reported
                with lv.lock:
                    lv.warm_done += 1
                    lv.warm_errors += 0 if rec.ok else 1
    except Exception:  # never miss the barrier: the other clients wait there
        log.exception("client %d failed during warm-up", client)
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        return
    if lm is None:
        return
    while True:
        ticket = lv.claim()
        if ticket is None:
            return
        rec = _one_request(sh, lv, lm, client, ticket, ticket % len(sh.prompt_ids))
        with lv.lock:
            if rec is None:
                lv.cancelled += 1
            else:
                lv.records.append(rec)


def _run_level(sh: _Shared, config: LoadTestConfig, n: int, progress_file: IO[str] | None) -> _Level:
    from tqdm import tqdm

    lv = _Level(n, config, sh.stop)
    barrier = threading.Barrier(n, action=lv.start)
    level_t0 = time.perf_counter()
    threads = [
        threading.Thread(target=_client_loop, args=(sh, lv, c, barrier, level_t0), name=f"loadtest-client-{c}",
                         daemon=True)
        for c in range(n)
    ]
    bar = tqdm(total=config.requests, desc=f"N={n:<3d} warm-up", unit="req", file=progress_file or sys.stderr,
               disable=not config.progress, dynamic_ncols=True, leave=True)
    for t in threads:
        t.start()
    shown = 0
    measuring = False
    try:
        try:
            while True:
                alive = [t for t in threads if t.is_alive()]
                if not alive:
                    break
                alive[0].join(0.1)
                if lv.t0 is not None and not measuring:
                    measuring = True
                    bar.set_description(f"N={n:<3d}", refresh=False)
                    bar.reset(total=config.requests)  # the rate counts from the measured phase
                with lv.lock:
                    done = len(lv.records)
                    errors = sum(1 for r in lv.records if not r.ok)
                if done > shown:
                    bar.update(done - shown)
                    shown = done
                    bar.set_postfix(errors=errors, refresh=False)
        except KeyboardInterrupt:
            sh.stop.set()
            barrier.abort()
            bar.write(f"sqs-loadtest: interrupted; waiting for the {n} client(s) to stop (Ctrl-C again to quit)",
                      file=progress_file or sys.stderr)
            for t in threads:
                while t.is_alive():
                    t.join(0.1)
    finally:
        bar.close()
    if sh.stop.is_set():
        lv.stopped_by = "interrupted"
    return lv


def _batching_delta(before, after) -> dict:
    """The in-process cloud's batched passes between two BatchStats snapshots."""
    passes, items = after.passes - before.passes, after.items - before.items
    sizes = {k: v - before.by_items.get(k, 0) for k, v in after.by_items.items() if v > before.by_items.get(k, 0)}
    return {"passes": passes, "rounds": items, "rows": after.rows - before.rows,
            "sessions_per_pass": items / passes if passes else 0.0, "max_sessions_per_pass": max(sizes, default=0),
            "passes_by_sessions": dict(sorted(sizes.items()))}


def run_load_test(config: LoadTestConfig, *, stop: threading.Event | None = None,
                  progress_file: IO[str] | None = None) -> RunReport:
    """Run every concurrency level of `config` in turn and return the report.

    Raises ValueError for a bad config (a non-loopback cloud included), ModelNotInstalled when a
    model is missing. `stop` ends the run early like Ctrl-C (KeyboardInterrupt during a level is
    handled the same way; the report then has interrupted=True and the levels run so far).
    """
    from edge.client import ClientConfig
    from edge.drafter import DraftConfig
    from sqs_models.registry import load_model

    config.validate()
    stop = stop or threading.Event()
    started = time.time()
    model = load_model(config.draft_model, role="draft", dtype=config.dtype)
    prompt_ids = [list(model.tokenizer.encode(p)) for p in config.prompts]
    if any(not ids for ids in prompt_ids):
        raise ValueError("a prompt encodes to no tokens")
    draft_config = DraftConfig.from_options(config, model.vocab_size)
    cloud = None
    if config.cloud is None:
        from cloud.inprocess import LocalCloud
        from cloud.verifier import VerifierConfig

        cloud = LocalCloud(config.target_model, dtype=config.dtype, engine=config.engine,
                           workers=config.cloud_workers,
                           verifier=VerifierConfig(max_sessions=max(64, 2 * max(config.clients))),
                           batch_window_ms=config.batch_window_ms, batch_max_rows=config.batch_max_rows)
        address = cloud.address
    else:
        address = check_loopback(config.cloud)
    report = RunReport(config, address, cloud is not None, cloud.target_model if cloud else "", model.name,
                       started_unix=started)
    client_config = ClientConfig(address, round_timeout_s=config.round_timeout_s,
                                 connect_timeout_s=config.connect_timeout_s, retries=config.retries,
                                 backoff_s=0.1, meter=config.meter)
    sh = _Shared(model, prompt_ids, draft_config, client_config, _SeedSource(config.seed), stop)
    try:
        for n in config.clients:
            if stop.is_set():
                break
            before = cloud.running.verifier.batch_stats() if cloud is not None else None
            lv = _run_level(sh, config, n, progress_file)
            if lv.target_model and not report.target_model:
                report.target_model = lv.target_model
            batching = _batching_delta(before, cloud.running.verifier.batch_stats()) if before is not None else None
            report.levels.append(LevelResult(n, lv.records, lv.warm_done, lv.warm_errors, lv.cancelled, lv.stopped_by,
                                             batching))
    except KeyboardInterrupt:  # between levels
        stop.set()
    finally:
        if cloud is not None:
            cloud.stop()
    report.interrupted = stop.is_set()
    return report
