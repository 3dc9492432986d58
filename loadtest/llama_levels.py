"""The load test's llama-server rows: for each concurrency level N, ``llama-server --parallel N``
(continuous batching over N slots) with N client threads, the same prompts, ``max_new_tokens``,
temperature, requests / duration / warm-up rules as our levels (loadtest/runner.py; both run
through loadtest/levels.py).

One request = one POST /completion on a fresh HTTP connection (bench/llama_server.complete: plain
sampling, no prompt cache), prompt ``prompts[ticket % len(prompts)]``, seed config.seed + ticket.
latency = from before the connection to the answer read; tokens = the server's predicted_n; no
TTFT (the answer is not streamed). The server process is pinned to ``llama_server_cpus`` with
``llama_server_threads`` threads and runs the target model's GGUF (the tiny pair's is written on
the fly: bench/tiny_gguf.py; the tiny pair has no EOS, so its requests set ignore_eos). Its CPU
over each measured phase (/proc/<pid>/stat) is the level's cloud CPU; each level records the
process's pid and arguments, and the run its note (e.g. --no-repack, bench/llama_server.repack_args).
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from loadtest.config import LoadTestConfig
from loadtest.levels import Level, run_level
from loadtest.proc_cpu import CpuMeter
from loadtest.report import LevelResult, RequestRecord


@dataclass
class _LlamaShared:
    address: str
    prompts: tuple[str, ...]
    ignore_eos: bool
    stop: threading.Event


def _one(sh: _LlamaShared, lv: Level, client: int, ticket: int, prompt_index: int) -> RequestRecord:
    from bench.llama_server import LlamaServerError, complete

    cfg = lv.config
    seed = cfg.seed + max(ticket, 0)
    base = lv.t0 if lv.t0 is not None else time.perf_counter()
    t0 = time.perf_counter()
    status, error, c = "OK", "", None
    try:
        c = complete(sh.address, sh.prompts[prompt_index], n_predict=cfg.max_new_tokens, temperature=cfg.temperature,
                     seed=seed, ignore_eos=sh.ignore_eos, timeout_s=cfg.round_timeout_s)
    except LlamaServerError as exc:
        status, error = exc.status, str(exc)
    t1 = time.perf_counter()
    rec = RequestRecord(clients=lv.n, client=client, request=ticket, seed=seed, prompt_index=prompt_index,
                        status=status, start_s=t0 - base, end_s=t1 - base, latency_ms=(t1 - t0) * 1e3, ttft_ms=None,
                        error=error.splitlines()[0] if error else "")
    if c is not None:
        rec.tokens, rec.drafted, rec.accepted, rec.stop_reason = c.predicted_n, c.draft_n, c.draft_n_accepted, c.stop_type
    return rec


def _client_loop(sh: _LlamaShared, lv: Level, client: int, barrier: threading.Barrier, level_t0: float) -> None:
    """As loadtest.runner._client_loop: warm-up, the barrier, then tickets until the level ends."""
    cfg = lv.config
    for j in range(cfg.warmup):
        if sh.stop.is_set() or time.perf_counter() - level_t0 > cfg.duration_s:
            break
        rec = _one(sh, lv, client, -1 - j, (client + j) % len(sh.prompts))
        with lv.lock:
            lv.warm_done += 1
            lv.warm_errors += 0 if rec.ok else 1
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        return
    while True:
        ticket = lv.claim()
        if ticket is None:
            return
        rec = _one(sh, lv, client, ticket, ticket % len(sh.prompts))
        with lv.lock:
            lv.records.append(rec)


def _model_gguf(config: LoadTestConfig, tmp: str) -> tuple[str, bool]:
    """(GGUF path, ignore_eos) for llama_server_model or target_model."""
    from bench.llama_server import LlamaServerError
    from sqs_models.engines import model_gguf

    name = config.llama_server_model or config.target_model
    if name == "tiny":
        from bench.tiny_gguf import write_tiny_gguf

        return str(write_tiny_gguf(Path(tmp) / "tiny-target.gguf", "target")), True
    if name.endswith(".gguf"):
        return name, False
    path = model_gguf(name)
    if path is None:
        raise LlamaServerError(f"no GGUF for {name}: sqs-models install {name}, or --llama-server-model FILE.gguf")
    return str(path), False


def run_llama_levels(config: LoadTestConfig, stop: threading.Event,
                     progress_file: IO[str] | None) -> tuple[dict, list[LevelResult]]:
    """One level per N of config.clients against llama-server --parallel N. Returns (what ran: binary,
    version, model, cpus, threads, note, and "error" if a server could not start, one line; levels)."""
    from bench.llama_server import LlamaServer, LlamaServerError, ServerConfig, resolve_binary, server_version

    cpus = config.llama_server_cpus or tuple(sorted(os.sched_getaffinity(0)))
    threads = config.llama_server_threads or len(cpus)
    info: dict = {"binary": config.llama_server_binary, "cpus": list(cpus), "threads": threads}
    levels: list[LevelResult] = []
    with tempfile.TemporaryDirectory(prefix="sqs-loadtest-llama-") as tmp:
        try:
            binary = resolve_binary(config.llama_server_binary)
            info.update(binary=binary, version=server_version(binary))
            gguf, ignore_eos = _model_gguf(config, tmp)
            info["model"] = gguf
            longest = max(len(p.encode()) for p in config.prompts)  # tokens <= bytes
            for n in config.clients:
                if stop.is_set():
                    break
                server = ServerConfig(binary, gguf, parallel=n, threads=threads, cpus=cpus,
                                      slot_ctx=longest + config.max_new_tokens + 64,
                                      start_timeout_s=max(300.0, config.connect_timeout_s))
                with LlamaServer(server) as srv:
                    info["note"] = srv.note  # the same model and CPU every level: one note for the run
                    sh = _LlamaShared(srv.address, config.prompts, ignore_eos, stop)
                    cpu = CpuMeter([srv.pid], scope="llama-server process")
                    lv = run_level(sh, config, n, progress_file, _client_loop, label="llama-server ", cpu=cpu)
                    ran = {"pid": srv.pid, "args": [str(a) for a in srv.proc.args], "note": srv.note}
                levels.append(LevelResult(n, lv.records, lv.warm_done, lv.warm_errors, lv.cancelled, lv.stopped_by,
                                          cloud_cpu=lv.cpu_result, loadavg=lv.loadavg, server=ran))
        except LlamaServerError as exc:
            info["error"] = str(exc)
    return info, levels
