"""``sqs-bench llama-server``: llama.cpp's llama-server side by side with ours (the process manager
and the client are bench/llama_server.py).

    sqs-bench llama-server [--quick] [--server-cpus 1] [--edge-cpus 0] [--temperatures 0 1]
                           [--prompts 4] [--max-new-tokens 48] [--out DIR]

One run, the same prompts, token counts, temperatures and seeds, the cloud side pinned to the same
CPUs (--server-cpus, default: the last CPU of this process) with the same threads:

  llama-ar     llama-server, the target GGUF, autoregressive
  llama-sd     llama-server, its own speculative decoding: the draft GGUF (-md) in the same process,
               on the same CPUs, --spec-draft-n-max 8
  sqs-cloud    our cloud-only path: a sqs-cloud process (--engine llama: the same GGUF through
               llama-cpp-python) driven by our edge in this process with --draft-len 0
  sqs-sd       our speculative path: the same cloud, the edge drafting (K-SQS, --draft-len auto) on
               --edge-cpus

Per row and temperature: tokens/s = generated tokens / summed request wall time (both sides timed
from the client: connect, prompt, every token), p50/p95 request latency, and the acceptance each
side reports (llama-server: timings.draft_n_accepted / draft_n; ours: GenerationStats accepted /
drafted). Every row first runs one unmeasured request. The CSV (DIR/llama_server.csv) carries the
CPU flags and the llama-server version. ``--quick`` runs the tiny pair (its GGUFs written on the fly
by bench.tiny_gguf, our cloud on torch: tiny has no GGUF of its own) with 2 prompts x 8 tokens.

The binary is the one ``make llama-server`` (scripts/build_llama_server.sh) built, or --llama-server.
Only loopback is used: llama-server listens on 127.0.0.1 and never downloads anything (built
without CURL; it gets file paths).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from bench.llama_server import (LlamaServer, LlamaServerError, ServerConfig, complete, default_cpus, parse_cpus,
                                repack_args, resolve_binary, server_version)

ROWS = ("llama-ar", "llama-sd", "sqs-cloud", "sqs-sd")
CSV_COLUMNS = [
    "row", "system", "mode", "temperature", "requests", "generated", "tokens_per_s", "latency_p50_ms",
    "latency_p95_ms", "server_tokens_per_s", "drafted", "accepted", "acceptance", "target", "draft",
    "max_new_tokens", "server_cpus", "edge_cpus", "threads", "engine", "llama_server_version", "llama_server_note", "cpu_flags",
]


# --- our side: a sqs-cloud process and the edge in this process ----------------------------------


@contextlib.contextmanager
def sqs_cloud(model: str, engine: str, cpus: Sequence[int] | None, threads: int, timeout_s: float = 600.0):
    """A sqs-cloud process on 127.0.0.1 (a free port), pinned to `cpus`; yields its address."""
    from bench.cloudproc import free_port, start_cloud, stop_process

    port = free_port()
    try:
        proc = start_cloud(model, port, set(cpus) if cpus else None, engine=engine, threads=threads,
                           timeout_s=timeout_s)
    except RuntimeError as exc:
        raise LlamaServerError(str(exc)) from None
    try:
        yield f"127.0.0.1:{port}"
    finally:
        stop_process(proc)


def sqs_generate(runtime, prompt: str, *, draft_len, max_new_tokens: int, temperature: float, seed: int):
    """One generation through our edge runtime: (wall ms, GenerationResult). draft_len 0 is plain
    target decoding (cloud-only); "auto" plans each round (K-SQS)."""
    config = runtime.draft_config({"sparsifier": "topk", "draft_len": draft_len, "temperature": temperature,
                                   "seed": seed, "max_new_tokens": max_new_tokens})
    ids = runtime.encode(prompt)
    t0 = time.perf_counter()
    g = runtime.generate(ids, config, max_new_tokens=max_new_tokens)
    return (time.perf_counter() - t0) * 1e3, g


# --- the benchmark -------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    binary: str
    target: str  # model name (sqs_models) for our side
    draft: str
    target_gguf: str
    draft_gguf: str
    prompts: list[str]
    temperatures: list[float]
    max_new_tokens: int
    server_cpus: tuple[int, ...]
    edge_cpus: tuple[int, ...]
    threads: int
    engine: str = "llama"  # our cloud's engine
    draft_len: int | str = "auto"  # our sqs-sd row: auto (planned per round) or a fixed plan of up to N
    draft_n_max: int = 8
    seed: int = 0
    rows: tuple[str, ...] = ROWS
    ignore_eos: bool = False  # llama-server only: the tiny pair has no EOS, llama.cpp assigns one
    slot_ctx: int = 1024
    request_timeout_s: float = 600.0


@dataclass
class Sample:
    wall_ms: float
    generated: int
    drafted: int = 0
    accepted: int = 0
    server_tokens_per_s: float | None = None


@dataclass
class Row:
    row: str
    temperature: float
    samples: list[Sample] = field(default_factory=list)

    def summary(self) -> dict:
        walls = [s.wall_ms for s in self.samples]
        gen = sum(s.generated for s in self.samples)
        drafted, accepted = sum(s.drafted for s in self.samples), sum(s.accepted for s in self.samples)
        server = [s.server_tokens_per_s for s in self.samples if s.server_tokens_per_s is not None]
        return {
            "row": self.row, "temperature": self.temperature, "requests": len(self.samples), "generated": gen,
            "tokens_per_s": gen / (sum(walls) / 1e3) if walls and sum(walls) > 0 else 0.0,
            "latency_p50_ms": _pct(walls, 50), "latency_p95_ms": _pct(walls, 95),
            "server_tokens_per_s": statistics.fmean(server) if server else None,
            "drafted": drafted, "accepted": accepted, "acceptance": accepted / drafted if drafted else None,
        }


def _pct(values: Sequence[float], q: float) -> float | None:
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else None


def _llama_rows(cfg: BenchConfig, name: str, draft: str | None, progress) -> list[Row]:
    server = ServerConfig(cfg.binary, cfg.target_gguf, draft_model=draft, draft_n_max=cfg.draft_n_max,
                          threads=cfg.threads, cpus=cfg.server_cpus, slot_ctx=cfg.slot_ctx)
    rows = []
    with LlamaServer(server) as srv:
        for temperature in cfg.temperatures:
            complete(srv.address, cfg.prompts[0], n_predict=cfg.max_new_tokens, temperature=temperature,
                     seed=cfg.seed, ignore_eos=cfg.ignore_eos, timeout_s=cfg.request_timeout_s)  # warm-up
            row = Row(name, temperature)
            for i, prompt in enumerate(cfg.prompts):
                c = complete(srv.address, prompt, n_predict=cfg.max_new_tokens, temperature=temperature,
                             seed=cfg.seed + i, ignore_eos=cfg.ignore_eos, timeout_s=cfg.request_timeout_s)
                row.samples.append(Sample(c.wall_ms, c.predicted_n, c.draft_n, c.draft_n_accepted,
                                          c.predicted_per_second))
                progress()
            rows.append(row)
    return rows


def _sqs_rows(cfg: BenchConfig, wanted: Sequence[str], progress) -> list[Row]:
    from edge.client import ClientConfig
    from edge.runtime import DraftSpec, EdgeRuntime

    draft = EdgeRuntime.load(DraftSpec(cfg.draft, threads=len(cfg.edge_cpus)))
    rows = []
    with sqs_cloud(cfg.target, cfg.engine, cfg.server_cpus, cfg.threads) as address:
        runtime = draft.with_cloud(ClientConfig(address))
        for name in wanted:
            draft_len = 0 if name == "sqs-cloud" else cfg.draft_len
            for temperature in cfg.temperatures:
                sqs_generate(runtime, cfg.prompts[0], draft_len=draft_len, max_new_tokens=cfg.max_new_tokens,
                             temperature=temperature, seed=cfg.seed)  # warm-up
                row = Row(name, temperature)
                for i, prompt in enumerate(cfg.prompts):
                    ms, g = sqs_generate(runtime, prompt, draft_len=draft_len,
                                         max_new_tokens=cfg.max_new_tokens, temperature=temperature, seed=cfg.seed + i)
                    row.samples.append(Sample(ms, g.stats.generated, g.stats.drafted, g.stats.accepted))
                    progress()
                rows.append(row)
    return rows


@contextlib.contextmanager
def _pinned(cpus: Sequence[int] | None):
    """This process (the edge) on `cpus` with as many torch threads, restored afterwards."""
    if not cpus:
        yield
        return
    import torch

    before, threads = os.sched_getaffinity(0), torch.get_num_threads()
    os.sched_setaffinity(0, set(cpus))
    torch.set_num_threads(len(cpus))
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)
        torch.set_num_threads(threads)


def run(cfg: BenchConfig, *, pin_edge: bool = True, progress: bool = True) -> list[dict]:
    """Every row of `cfg.rows` in turn; one summary dict per (row, temperature), CSV_COLUMNS keys."""
    from tqdm import tqdm

    from bench.machine import cpu_flags

    bar = tqdm(total=len(cfg.rows) * len(cfg.temperatures) * len(cfg.prompts), disable=not progress,
               desc="sqs-bench llama-server", unit="req")
    rows: list[Row] = []
    try:
        if "llama-ar" in cfg.rows:
            rows += _llama_rows(cfg, "llama-ar", None, bar.update)
        if "llama-sd" in cfg.rows:
            rows += _llama_rows(cfg, "llama-sd", cfg.draft_gguf, bar.update)
        ours = [r for r in ("sqs-cloud", "sqs-sd") if r in cfg.rows]
        if ours:
            with _pinned(cfg.edge_cpus if pin_edge else None):
                rows += _sqs_rows(cfg, ours, bar.update)
    finally:
        bar.close()
    version, flags = server_version(cfg.binary), cpu_flags()
    note = repack_args(ServerConfig(cfg.binary, cfg.target_gguf, draft_model=cfg.draft_gguf))[1]  # probed once
    out = []
    for r in rows:
        s = r.summary()
        ours = r.row.startswith("sqs")
        s.update({
            "system": "sqs-sd" if ours else "llama-server",
            "mode": "speculative" if r.row.endswith("sd") else "autoregressive",
            "target": cfg.target if ours else Path(cfg.target_gguf).name,
            "draft": (cfg.draft if r.row == "sqs-sd" else Path(cfg.draft_gguf).name if r.row == "llama-sd" else ""),
            "max_new_tokens": cfg.max_new_tokens, "server_cpus": cpus_text(cfg.server_cpus),
            "edge_cpus": cpus_text(cfg.edge_cpus) if ours else "", "threads": cfg.threads,
            "engine": cfg.engine if ours else "llama-server", "llama_server_version": version, "llama_server_note": note,
            "cpu_flags": flags,
        })
        out.append(s)
    return out


def cpus_text(cpus: Sequence[int]) -> str:
    return ",".join(map(str, cpus))


def _f(v, fmt: str) -> str:
    return "-".rjust(int(fmt.split(".")[0])) if v is None else format(v, fmt)


def table(rows: list[dict]) -> str:
    head = f"{'row':<10} {'T':>4} {'req':>4} {'tokens':>6} {'tok/s':>7} {'p50_ms':>9} {'p95_ms':>9} {'accept':>7} " \
           f"{'server tok/s':>12}"
    lines = [head]
    for r in rows:
        lines.append(f"{r['row']:<10} {r['temperature']:4.2g} {r['requests']:4d} {r['generated']:6d} "
                     f"{r['tokens_per_s']:7.2f} {_f(r['latency_p50_ms'], '9.1f')} {_f(r['latency_p95_ms'], '9.1f')} "
                     f"{_f(r['acceptance'], '7.1%')} {_f(r['server_tokens_per_s'], '12.2f')}")
    return "\n".join(lines)


def ratios(rows: list[dict]) -> list[str]:
    """Per temperature: our cloud-only against llama-server AR (the issue's latency target: p50 within
    1.2x), and each speculative row against its own side's AR."""
    by = {(r["row"], r["temperature"]): r for r in rows}
    out = []
    for t in sorted({r["temperature"] for r in rows}):
        ar, ours = by.get(("llama-ar", t)), by.get(("sqs-cloud", t))
        if ar and ours and ar["latency_p50_ms"]:
            x = ours["latency_p50_ms"] / ar["latency_p50_ms"]
            out.append(f"T={t:g}: sqs-cloud / llama-ar p50 latency x{x:.2f} (target <= 1.2: "
                       f"{'met' if x <= 1.2 else 'missed'}), tokens/s x{ours['tokens_per_s'] / max(ar['tokens_per_s'], 1e-12):.2f}")
        for sd, base in (("llama-sd", "llama-ar"), ("sqs-sd", "sqs-cloud"), ("sqs-sd", "llama-ar")):
            a, b = by.get((sd, t)), by.get((base, t))
            if a and b and b["tokens_per_s"]:
                out.append(f"T={t:g}: {sd} / {base} tokens/s x{a['tokens_per_s'] / b['tokens_per_s']:.2f}")
    return out


# --- sqs-bench llama-server ----------------------------------------------------------------------


def register(subparsers) -> None:
    """Add `llama-server` to sqs-bench's subcommands (bench/cli.py)."""
    import argparse

    from common.lm import ENGINES
    from edge.options import arg_type

    p = subparsers.add_parser("llama-server", help="llama.cpp's llama-server side by side with ours, same cores",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny pair (GGUFs written on the fly), 2 prompts x 8 tokens")
    p.add_argument("--llama-server", metavar="PATH", help="the binary (default: the one `make llama-server` built)")
    p.add_argument("--target-model", default="qwen2.5-coder-1.5b")
    p.add_argument("--draft-model", default="qwen2.5-coder-0.5b")
    p.add_argument("--engine", default="llama", choices=ENGINES,
                   help="our cloud's engine (llama: the same GGUF as llama-server, through llama-cpp-python)")
    p.add_argument("--temperatures", nargs="+", type=float, default=[0.0, 1.0])
    p.add_argument("--prompts", type=int, default=4, help="code prompts (bench.prompts.CODE_PROMPTS), each once per row")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--draft-n-max", type=int, default=8, help="llama-server --spec-draft-n-max")
    p.add_argument("--draft-len", type=arg_type("draft_len"), default="auto",
                   help="our sqs-sd row: auto (each round planned from measured costs; may choose plain target "
                        "steps) or a fixed plan of up to N drafts")
    p.add_argument("--server-cpus", metavar="CPUS", help="cloud side: llama-server and sqs-cloud (default: the last CPU)")
    p.add_argument("--edge-cpus", metavar="CPUS", help="our edge, this process (default: the other CPUs)")
    p.add_argument("--threads", type=int, default=0, help="cloud-side threads (default: one per --server-cpus CPU)")
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", metavar="DIR", help="write DIR/llama_server.csv")
    p.add_argument("--no-progress", action="store_true")


def _fail(msg: str) -> int:
    print(f"sqs-bench llama-server: error: {msg}", file=sys.stderr)
    return 2


def main(args) -> int:
    """sqs-bench llama-server: 0, or 2 with one line on stderr."""
    from bench.machine import cpu_flags, write_csv
    from bench.prompts import CODE_PROMPTS
    from sqs_models.engines import model_gguf

    try:
        binary = resolve_binary(args.llama_server)
        server_cpus, edge_cpus = default_cpus()
        server_cpus = parse_cpus(args.server_cpus) if args.server_cpus else server_cpus
        edge_cpus = parse_cpus(args.edge_cpus) if args.edge_cpus else edge_cpus
    except (LlamaServerError, ValueError) as exc:
        return _fail(str(exc))
    threads = args.threads or len(server_cpus)
    with tempfile.TemporaryDirectory(prefix="sqs-llama-server-") as tmp:
        if args.quick:
            from bench.tiny_gguf import write_tiny_gguf

            target, draft, engine, n, max_new = "tiny", "tiny", "auto", 2, 8
            target_gguf = str(write_tiny_gguf(Path(tmp) / "tiny-target.gguf", "target"))
            draft_gguf = str(write_tiny_gguf(Path(tmp) / "tiny-draft.gguf", "draft"))
        else:
            target, draft, engine, n, max_new = (args.target_model, args.draft_model, args.engine, args.prompts,
                                                 args.max_new_tokens)
            paths = [model_gguf(target), model_gguf(draft)]
            if None in paths:
                missing = target if paths[0] is None else draft
                return _fail(f"no GGUF for {missing}: sqs-models install {missing}")
            target_gguf, draft_gguf = map(str, paths)
        cfg = BenchConfig(binary, target, draft, target_gguf, draft_gguf, list(CODE_PROMPTS[:n]),
                          list(args.temperatures), max_new, server_cpus, edge_cpus, threads, engine=engine,
                          draft_len=args.draft_len, draft_n_max=args.draft_n_max, seed=args.seed, rows=tuple(args.rows),
                          ignore_eos=args.quick, slot_ctx=256 if args.quick else 1024)
        try:
            rows = run(cfg, progress=not args.no_progress)
        except LlamaServerError as exc:
            return _fail(str(exc))
    print(f"target {target}, draft {draft}; {n} prompt(s) x {max_new} new tokens; cloud side on CPU(s) "
          f"{cpus_text(server_cpus)} with {threads} thread(s), our edge on {cpus_text(edge_cpus)}; our cloud engine {engine}; "
          f"llama-server {server_version(binary) or '?'}; CPU flags [{cpu_flags()}]"
          + "".join(f"; {note}" for note in {r["llama_server_note"] for r in rows} if note))
    print(table(rows))
    for line in ratios(rows):
        print(line)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_csv(rows, out / "llama_server.csv", CSV_COLUMNS)
        print(f"wrote {out / 'llama_server.csv'}")
    return 0

