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

Per level, the cloud's CPU (utime + stime from /proc of its processes: this one for an in-process
cloud, edges included; --cloud-pid or the port's listeners for an external one) is read at the
measured phase's start and end and divided by the committed tokens (loadtest/proc_cpu.py); the
report says what ran (loadtest/provenance.py: commit, CPU flags, load average, and the cloud's engine
and batching as the cloud reports them: RunningCloud.info in-process, sqs_cloud_info on --cloud-metrics).

A failed request is counted by gRPC status name (``CloudError.code``; an exception that is not a
gRPC failure counts under its class name) and the run goes on. Statistics cover the successful
measured requests; warm-up requests are excluded. ``stop`` (set on Ctrl-C) ends a level early: no
new request starts and in-flight requests are cancelled at their next round (not counted).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import IO, Callable

from loadtest.config import DEFAULT_PROMPTS, LoadTestConfig, check_loopback
from loadtest.levels import Level, run_level
from loadtest.proc_cpu import CpuMeter
from loadtest.replica_counts import pass_totals
from loadtest.provenance import SCOPE_IN_PROCESS, reported_cloud, run_info
from loadtest.report import CSV_FIELDS, LevelResult, RequestRecord, RunReport

__all__ = ["DEFAULT_PROMPTS", "LoadTestConfig", "check_loopback", "CSV_FIELDS", "LevelResult", "RequestRecord",
           "RunReport", "run_load_test"]

log = logging.getLogger("sqs.loadtest")


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


@dataclass
class _Shared:
    """What every client of the run shares: the edge runtime (draft engine + cloud), prompts, config."""

    runtime: object  # edge.runtime.EdgeRuntime
    prompt_ids: list[list[int]]
    draft_config: object  # edge.drafter.DraftConfig
    seeds: _SeedSource
    stop: threading.Event
    new_lm: Callable[[], object] | None = None  # a client's draft LM (default: the engine's own, unbatched)


def _one_request(sh: _Shared, lv: Level, lm, client: int, ticket: int, prompt_index: int) -> RequestRecord | None:
    """One generation; a record (failed ones included), or None when cancelled by an interrupt."""
    import grpc

    from edge.client import CloudError

    seed = sh.seeds.take()
    base = lv.t0 if lv.t0 is not None else time.perf_counter()
    first: float | None = None
    t0 = last = time.perf_counter()
    max_gap = 0.0
    status, error, result = "OK", "", None
    generation = sh.runtime.start(sh.prompt_ids[prompt_index], dataclasses.replace(sh.draft_config, seed=seed),
                                  max_new_tokens=lv.config.max_new_tokens, lm=lm)
    try:
        for r in generation:
            if r.tokens:
                now = time.perf_counter()
                first = now if first is None else first
                max_gap, last = max(max_gap, now - last), now
            if sh.stop.is_set():
                generation.close()  # closes the cloud session
                return None
        result = generation.result
        t1 = time.perf_counter()
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
        ttft_ms=(first - t0) * 1e3 if first is not None else None, error=error.splitlines()[0] if error else "",
    )
    if result is not None:
        s = result.stats
        rec.tokens, rec.rounds, rec.drafted, rec.accepted = s.generated, s.rounds, s.drafted, s.accepted
        rec.lookahead_drafted, rec.lookahead_accepted = s.lookahead_drafted, s.lookahead_accepted
        rec.stop_reason, rec.uplink_payload_bytes, rec.reopens = result.stop_reason, s.uplink_payload_bytes, s.reopens
        rec.max_gap_ms, rec.token_ids = max_gap * 1e3, list(result.token_ids)
        if result.target_model and not lv.target_model:
            lv.target_model = result.target_model
    return rec


def _client_loop(sh: _Shared, lv: Level, client: int, barrier: threading.Barrier, level_t0: float) -> None:
    cfg = lv.config
    lm = None
    try:
        lm = (sh.new_lm or sh.runtime.engine.new_lm)()  # this client's own KV cache
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


def _batching_delta(before, after) -> dict:
    """The in-process cloud's batched passes between two PassStats snapshots."""
    passes, items = after.passes - before.passes, after.items - before.items
    sizes = {k: v - before.by_items.get(k, 0) for k, v in after.by_items.items() if v > before.by_items.get(k, 0)}
    return {"passes": passes, "rounds": items, "rows": after.rows - before.rows,
            "sessions_per_pass": items / passes if passes else 0.0, "max_sessions_per_pass": max(sizes, default=0),
            "passes_by_sessions": dict(sorted(sizes.items())), "source": "the in-process cloud's pass counters"}


def _scraped_batching_delta(before: dict[str, float] | None, after: dict[str, float] | None) -> dict | None:
    """An external cloud's passes between two loadtest.replica_counts.pass_totals readings; None when
    either is missing or a counter went back (a replica restarted: the difference would be wrong)."""
    if before is None or after is None or any(after[k] < before[k] for k in before):
        return None
    passes, rounds = int(after["passes"] - before["passes"]), int(after["rounds"] - before["rounds"])
    return {"passes": passes, "rounds": rounds, "rows": int(after["rows"] - before["rows"]),
            "sessions_per_pass": rounds / passes if passes else 0.0, "source": "the sqs_pass_* histograms of --cloud-metrics"}


def _edge_batching(stats) -> dict:
    """The simulated edges' shared draft passes of one level (loadtest/edge_batching.py), warm-up included:
    how far N edges on one core were from drafting alone (steps = draft LM calls, a pass = one forward)."""
    return {"passes": stats.passes, "steps": stats.items, "steps_per_pass": stats.mean_items(),
            "max_steps_per_pass": stats.max_items, "passes_by_steps": dict(sorted(stats.by_items.items()))}


def _in_process_cloud_info(cloud, config: LoadTestConfig) -> dict:
    """The in-process cloud as it reports itself (RunningCloud.info, what its sqs_cloud_info says):
    engine, weight type, threads and batching as applied; as configured only if it has no report."""
    cpu = {"pids": [os.getpid()], "source": "this process", "scope": SCOPE_IN_PROCESS, "reason": ""}
    info = cloud.running.info
    if info is not None:
        return {**reported_cloud(info.labels(), "the in-process cloud's RunningCloud.info"), "cpu": cpu}
    verifier = cloud.running.verifier
    on = verifier.pass_stats() is not None
    vc = verifier.config
    return {
        "engine": config.engine, "weight_type": None, "dtype": config.dtype, "workers": config.cloud_workers,
        "engine_source": "as configured", "engine_note": "the cloud reported no engine or weight type",
        "batching": {"on": on, "window_ms": vc.batch_window_ms if on else None,
                     "max_rows": vc.batch_max_rows if on else None, "rejoin": vc.batch_rejoin if on else None,
                     "source": "applied: the in-process verifier"},
        "cpu": cpu,
    }


def _external_cloud_info(config: LoadTestConfig, address: str) -> dict:
    """An external cloud as its replicas' /metrics report it (--cloud-metrics: sqs_cloud_info); without
    them, or without a report there, unknown (this process's --batch-window-ms and --cloud-workers
    never reached it)."""
    from loadtest.provenance import external_cloud_pids, scrape_cloud_reports

    cpu = external_cloud_pids(address, config.cloud_pids, config.cloud_metrics)
    info = {
        "engine": None, "weight_type": None, "dtype": None, "workers": None, "engine_source": "not reported",
        "engine_note": "an external cloud reports its engine and batching on its /metrics: give --cloud-metrics",
        "batching": {"on": None, "window_ms": None, "max_rows": None,
                     "source": "not reported by an external cloud: its command line decides"},
    }
    if config.cloud_metrics:
        labels, reports, note = scrape_cloud_reports(config.cloud_metrics)
        info = {**info, "engine_note": note, "cloud_reports": reports}
        if labels is not None:
            info.update(reported_cloud(labels, note))
    return {**info, "cpu": {**cpu, "scope": "cloud process" + ("es" if len(cpu["pids"]) > 1 else "")}}


def _edge_info(runtime, draft_config, config: LoadTestConfig) -> dict:
    """The edges: the draft engine as loaded, the generation options as passed, the plan as applied
    (edge.drafter.DraftConfig: scheme, fixed or planned draft length, K and ell, pipelining)."""
    from edge.options import OPTIONS

    eng = runtime.engine
    sc = draft_config.scheme
    return {
        "draft_model": eng.name, "engine": eng.kind, "weight_type": eng.weight_type, "dtype": eng.dtype,
        "detail": eng.detail,
        "options": {o.name: getattr(config, o.name) for o in OPTIONS},
        "plan": {"scheme": sc.scheme.value,
                 "draft_len": draft_config.max_draft_len if draft_config.max_draft_len is not None
                 else f"auto (<= {draft_config.auto_max_draft_len})",
                 "k": "auto" if draft_config.k_auto else sc.k, "ell": "auto" if draft_config.ell_auto else sc.ell,
                 "pipeline": draft_config.pipeline, "budget_bits": draft_config.budget_bits,
                 "budget_accounting": draft_config.budget_accounting},
    }


def _cpu_meter(cloud_info: dict) -> CpuMeter:
    cpu = cloud_info["cpu"]
    return CpuMeter(cpu["pids"], scope=cpu["scope"], reason=cpu["reason"])


def run_load_test(config: LoadTestConfig, *, stop: threading.Event | None = None,
                  progress_file: IO[str] | None = None) -> RunReport:
    """Run every concurrency level of `config` in turn and return the report.

    Raises ValueError for a bad config (a non-loopback cloud included), ModelNotInstalled when a
    model is missing. `stop` ends the run early like Ctrl-C (KeyboardInterrupt during a level is
    handled the same way; the report then has interrupted=True and the levels run so far).
    """
    from edge.client import ClientConfig
    from edge.runtime import DraftSpec, EdgeRuntime

    config.validate()
    stop = stop or threading.Event()
    started = time.time()
    # The draft behind --engine as sqs-edge loads it (llama.cpp where installed with a GGUF).
    # The cloud's address is known below (an in-process cloud starts after the draft loads): with_cloud.
    runtime = EdgeRuntime.load(DraftSpec(config.draft_model, engine=config.engine, dtype=config.dtype))
    model = runtime.engine
    prompt_ids = [runtime.encode(p) for p in config.prompts]  # ValueError: a prompt encodes to no tokens
    draft_config = runtime.draft_config(config)
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
    cloud_info = _in_process_cloud_info(cloud, config) if cloud is not None else _external_cloud_info(config, address)
    report = RunReport(config, address, cloud is not None, cloud.target_model if cloud else "", model.name,
                       started_unix=started, run=run_info(), cloud_info=cloud_info,
                       edge=_edge_info(runtime, draft_config, config))
    client_config = ClientConfig(address, round_timeout_s=config.round_timeout_s,
                                 connect_timeout_s=config.connect_timeout_s, retries=config.retries,
                                 backoff_s=0.1, meter=config.meter)
    sh = _Shared(runtime.with_cloud(client_config), prompt_ids, draft_config, _SeedSource(config.seed), stop)
    meter = None
    if config.cloud_metrics:  # replicas behind a router: who served how much (loadtest/replicas.py)
        from loadtest.replica_counts import ReplicaMeter

        meter = ReplicaMeter(config.cloud_metrics).start()
    try:
        for n in config.clients:
            if stop.is_set():
                break
            before = cloud.running.verifier.pass_stats() if cloud is not None else None
            scraped = pass_totals(config.cloud_metrics) if cloud is None and config.cloud_metrics else None
            shared = None
            if config.edge_batch_window_ms > 0:  # this level's N edges share the draft's passes
                from loadtest.edge_batching import SharedDraftPasses

                shared = SharedDraftPasses(model, n, config.edge_batch_window_ms)
                sh.new_lm = shared.new_lm
            # An external cloud's CPU is measured apart from the edges': this process is the edges' alone.
            edge_cpu = CpuMeter([os.getpid()], scope="this process (the edges)") if cloud is None else None
            lv = run_level(sh, config, n, progress_file, _client_loop, cpu=_cpu_meter(cloud_info), edge_cpu=edge_cpu)
            if lv.target_model and not report.target_model:
                report.target_model = lv.target_model
            if before is not None:
                batching = _batching_delta(before, cloud.running.verifier.pass_stats())
            elif scraped is not None:
                batching = _scraped_batching_delta(scraped, pass_totals(config.cloud_metrics))
            else:
                batching = None
            report.levels.append(LevelResult(n, lv.records, lv.warm_done, lv.warm_errors, lv.cancelled, lv.stopped_by,
                                             batching, cloud_cpu=lv.cpu_result, loadavg=lv.loadavg,
                                             edge_cpu=lv.edge_cpu_result,
                                             edge_batching=_edge_batching(shared.stats) if shared else None))
        if config.llama_server and not stop.is_set():
            from loadtest.llama_levels import run_llama_levels

            if cloud is not None:  # its threads would compete with llama-server for the CPUs
                cloud.stop()
                cloud = None
            report.llama_server, report.llama_levels = run_llama_levels(config, stop, progress_file)
    except KeyboardInterrupt:  # between levels
        stop.set()
    finally:
        if cloud is not None:
            cloud.stop()
        if meter is not None:
            report.replicas = meter.stop()
    report.interrupted = stop.is_set()
    return report
