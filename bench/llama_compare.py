"""``sqs-bench llama-server``: llama.cpp's llama-server side by side with ours (the process manager
and the client are bench/llama_server.py).

    sqs-bench llama-server [--quick] [--server-cpus 1] [--edge-cpus 0] [--temperatures 0 1]
                           [--prompts 4] [--prose-prompts 0] [--max-new-tokens 48] [--out DIR]

Issue 20's single-client comparison: --prompts 8 --prose-prompts 8 --max-new-tokens 64.

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
drafted). Every row first runs one unmeasured request.

Prompts: --prompts code prompts (bench.prompts.CODE_PROMPTS), then --prose-prompts prose prompts
(offline Wikipedia summaries, bench.prompts.wiki_prompts). Every row runs them in the same order with
the same seeds, so the samples of two rows pair by prompt. tokens/s gets a 95% bootstrap interval
over prompts (2,000 resamples, fixed seed), and each ratio of two rows' tokens/s a paired one (the
same resampled prompts for both rows), overall and, when both kinds ran, for code and prose apart.

Files (--out DIR): DIR/llama_server.csv, one line per row and temperature (with the commit, CPU
flags, load average at the row's start, engine, llama-server version and note);
DIR/llama_server_ratios.csv, the ratios and their intervals; DIR/llama_server_samples.csv, every
measured request, so the intervals can be recomputed. ``--quick`` runs the tiny pair (its GGUFs
written on the fly by bench.tiny_gguf, our cloud on torch: tiny has no GGUF of its own) with
2 code prompts (and --prose-prompts prose ones) x 8 tokens.

The binary is the one ``make llama-server`` (scripts/build_llama_server.sh) built, or --llama-server.
Only loopback is used: llama-server listens on 127.0.0.1 and never downloads anything (built
without CURL; it gets file paths).
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from bench.machine import loadavg_1m
from bench.llama_server import (LlamaServer, LlamaServerError, ServerConfig, complete, default_cpus, parse_cpus,
                                repack_args, resolve_binary, server_version)

ROWS = ("llama-ar", "llama-sd", "sqs-cloud", "sqs-sd")
KINDS = ("code", "prose")
# The ratios reported (row_a / row_b tokens/s): our cloud-only against llama-server AR, and each
# speculative row against its own side's AR and against llama-server AR.
PAIRS = (("sqs-cloud", "llama-ar"), ("llama-sd", "llama-ar"), ("sqs-sd", "sqs-cloud"), ("sqs-sd", "llama-ar"))
BOOTSTRAP_SEED = 0  # fixed: rerunning the report on the same samples gives the same intervals
CSV_COLUMNS = [
    "row", "system", "mode", "temperature", "requests", "generated", "tokens_per_s", "tokens_per_s_lo",
    "tokens_per_s_hi", "latency_p50_ms",
    "latency_p95_ms", "server_tokens_per_s", "drafted", "accepted", "acceptance", "lookahead_drafted",
    "lookahead_accepted", "target", "draft",
    "max_new_tokens", "server_cpus", "edge_cpus", "threads", "engine", "llama_server_version", "llama_server_note", "cpu_flags",
    "prompts_code", "prompts_prose", "tokens_per_s_code", "tokens_per_s_prose", "seed", "commit", "loadavg_1m",
]
RATIO_COLUMNS = ["row_a", "row_b", "temperature", "kind", "prompts", "ratio", "lo", "hi", "commit"]
SAMPLE_COLUMNS = ["row", "temperature", "kind", "prompt", "seed", "generated", "wall_ms", "drafted", "accepted",
                  "lookahead_drafted", "lookahead_accepted", "server_tokens_per_s", "commit"]


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
    kinds: list[str] = field(default_factory=list)  # each prompt's kind (code/prose); empty: all code

    def plan(self) -> list[Prompt]:
        """The prompts in the order every row runs them, each with its kind, its index within that
        kind and its seed: the same in every row, so samples pair by prompt across rows."""
        kinds = self.kinds or ["code"] * len(self.prompts)
        if len(kinds) != len(self.prompts):
            raise ValueError(f"{len(self.prompts)} prompts but {len(kinds)} kinds")
        seen: Counter[str] = Counter()
        out = []
        for i, (kind, text) in enumerate(zip(kinds, self.prompts)):
            out.append(Prompt(kind, seen[kind], self.seed + i, text))
            seen[kind] += 1
        return out


@dataclass(frozen=True)
class Prompt:
    kind: str  # "code" | "prose"
    index: int  # within its kind
    seed: int
    text: str


@dataclass
class Sample:
    wall_ms: float
    generated: int
    drafted: int = 0
    accepted: int = 0
    server_tokens_per_s: float | None = None
    kind: str = "code"
    index: int = 0  # the prompt's index within its kind: (kind, index) pairs samples across rows
    seed: int = 0
    lookahead_drafted: int = 0  # drafts sent ahead of streamed rounds that the cloud verified (not in drafted)
    lookahead_accepted: int = 0


@dataclass
class Row:
    row: str
    temperature: float
    samples: list[Sample] = field(default_factory=list)
    loadavg_1m: float | None = None  # at the row's start (it includes this benchmark's own earlier rows)

    def summary(self) -> dict:
        """CSV_COLUMNS' measured keys, and "samples": the measured requests in prompt order."""
        walls = [s.wall_ms for s in self.samples]
        gen = sum(s.generated for s in self.samples)
        drafted, accepted = sum(s.drafted for s in self.samples), sum(s.accepted for s in self.samples)
        server = [s.server_tokens_per_s for s in self.samples if s.server_tokens_per_s is not None]
        lo, hi = tokens_per_s_ci(self.samples)
        by_kind = {k: [s for s in self.samples if s.kind == k] for k in KINDS}
        return {
            "row": self.row, "temperature": self.temperature, "requests": len(self.samples), "generated": gen,
            "tokens_per_s": tokens_per_s(self.samples) or 0.0, "tokens_per_s_lo": lo, "tokens_per_s_hi": hi,
            "latency_p50_ms": _pct(walls, 50), "latency_p95_ms": _pct(walls, 95),
            "server_tokens_per_s": statistics.fmean(server) if server else None,
            "drafted": drafted, "accepted": accepted, "acceptance": accepted / drafted if drafted else None,
            "lookahead_drafted": sum(s.lookahead_drafted for s in self.samples),
            "lookahead_accepted": sum(s.lookahead_accepted for s in self.samples),
            **{f"prompts_{k}": len(v) for k, v in by_kind.items()},
            **{f"tokens_per_s_{k}": tokens_per_s(v) for k, v in by_kind.items()},
            "loadavg_1m": self.loadavg_1m, "samples": list(self.samples),
        }


# --- tokens/s and its intervals: bootstrap over prompts --------------------------------------------


def _tokens_seconds(samples: Sequence[Sample]) -> tuple[list[float], list[float]]:
    return [float(s.generated) for s in samples], [s.wall_ms / 1e3 for s in samples]


def tokens_per_s(samples: Sequence[Sample]) -> float | None:
    """Summed tokens / summed seconds (a long request weighs more than a short one); None without time."""
    tokens, seconds = _tokens_seconds(samples)
    return sum(tokens) / sum(seconds) if sum(seconds) > 0 else None


def tokens_per_s_ci(samples: Sequence[Sample]) -> tuple[float, float]:
    """95% bootstrap interval of tokens_per_s over prompts; nan under two prompts (nothing to resample)."""
    from bench.paper_report import ratio_ci

    return ratio_ci(*_tokens_seconds(samples), seed=BOOTSTRAP_SEED)


def paired_ratio(a: Sequence[Sample], b: Sequence[Sample]) -> tuple[float, float, float]:
    """tokens/s of `a` over `b` and its 95% paired bootstrap interval: each resample draws prompts
    once and uses them for both rows, so what the prompts share (length, how predictable they are)
    cancels out of the ratio. ValueError when the two rows did not run the same prompts."""
    from bench.paper_report import ratio_ci

    if [(s.kind, s.index) for s in a] != [(s.kind, s.index) for s in b]:
        raise ValueError("the two rows did not run the same prompts in the same order")
    ta, tb = tokens_per_s(a), tokens_per_s(b)
    ratio = ta / tb if ta is not None and tb else math.nan
    lo, hi = ratio_ci(*_tokens_seconds(a), *_tokens_seconds(b), paired=True, seed=BOOTSTRAP_SEED)
    return ratio, lo, hi


def ratio_records(rows: list[dict]) -> list[dict]:
    """RATIO_COLUMNS per temperature and PAIRS entry whose two rows ran: kind "all" (every prompt,
    the headline), then "code" and "prose" apart when both kinds ran. `rows` carry their samples
    (Row.summary)."""
    by = {(r["row"], r["temperature"]): r for r in rows}
    out = []
    for t in sorted({r["temperature"] for r in rows}):
        for name_a, name_b in PAIRS:
            a, b = by.get((name_a, t)), by.get((name_b, t))
            if not (a and b):
                continue
            kinds = [k for k in KINDS if any(s.kind == k for s in a["samples"])]
            groups = [("all", None)] + ([(k, k) for k in kinds] if len(kinds) > 1 else [])
            for label, kind in groups:
                sa = [s for s in a["samples"] if kind is None or s.kind == kind]
                sb = [s for s in b["samples"] if kind is None or s.kind == kind]
                ratio, lo, hi = paired_ratio(sa, sb)
                out.append({"row_a": name_a, "row_b": name_b, "temperature": t, "kind": label, "prompts": len(sa),
                            "ratio": ratio, "lo": lo, "hi": hi})
    return out


def sample_records(rows: list[dict]) -> list[dict]:
    """SAMPLE_COLUMNS: one per measured request, so the intervals can be recomputed."""
    return [{"row": r["row"], "temperature": r["temperature"], "kind": s.kind, "prompt": s.index, "seed": s.seed,
             "generated": s.generated, "wall_ms": round(s.wall_ms, 6), "drafted": s.drafted, "accepted": s.accepted,
             "lookahead_drafted": s.lookahead_drafted, "lookahead_accepted": s.lookahead_accepted,
             "server_tokens_per_s": s.server_tokens_per_s, "commit": r.get("commit")}
            for r in rows for s in r["samples"]]


def _pct(values: Sequence[float], q: float) -> float | None:
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else None


def _llama_rows(cfg: BenchConfig, name: str, draft: str | None, progress) -> list[Row]:
    server = ServerConfig(cfg.binary, cfg.target_gguf, draft_model=draft, draft_n_max=cfg.draft_n_max,
                          threads=cfg.threads, cpus=cfg.server_cpus, slot_ctx=cfg.slot_ctx)
    rows = []
    with LlamaServer(server) as srv:
        for temperature in cfg.temperatures:
            row = Row(name, temperature, loadavg_1m=loadavg_1m())
            complete(srv.address, cfg.prompts[0], n_predict=cfg.max_new_tokens, temperature=temperature,
                     seed=cfg.seed, ignore_eos=cfg.ignore_eos, timeout_s=cfg.request_timeout_s)  # warm-up
            for p in cfg.plan():
                c = complete(srv.address, p.text, n_predict=cfg.max_new_tokens, temperature=temperature,
                             seed=p.seed, ignore_eos=cfg.ignore_eos, timeout_s=cfg.request_timeout_s)
                row.samples.append(Sample(c.wall_ms, c.predicted_n, c.draft_n, c.draft_n_accepted,
                                          c.predicted_per_second, p.kind, p.index, p.seed))
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
                row = Row(name, temperature, loadavg_1m=loadavg_1m())
                sqs_generate(runtime, cfg.prompts[0], draft_len=draft_len, max_new_tokens=cfg.max_new_tokens,
                             temperature=temperature, seed=cfg.seed)  # warm-up
                for p in cfg.plan():
                    ms, g = sqs_generate(runtime, p.text, draft_len=draft_len,
                                         max_new_tokens=cfg.max_new_tokens, temperature=temperature, seed=p.seed)
                    row.samples.append(Sample(ms, g.stats.generated, g.stats.drafted, g.stats.accepted,
                                              kind=p.kind, index=p.index, seed=p.seed,
                                              lookahead_drafted=g.stats.lookahead_drafted,
                                              lookahead_accepted=g.stats.lookahead_accepted))
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
    """Every row of `cfg.rows` in turn; one summary dict per (row, temperature): CSV_COLUMNS keys,
    and "samples" (Row.summary)."""
    from tqdm import tqdm

    from bench.machine import cpu_flags
    from bench.machine import code_commit

    commit = code_commit()  # before the run: the code that runs, not what may be edited meanwhile
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
            "cpu_flags": flags, "seed": cfg.seed, "commit": commit,
        })
        out.append(s)
    return out


def cpus_text(cpus: Sequence[int]) -> str:
    return ",".join(map(str, cpus))


def _f(v, fmt: str) -> str:
    return "-".rjust(int(fmt.split(".")[0])) if v is None else format(v, fmt)


def _interval(lo: float, hi: float) -> str:
    return "[-]" if math.isnan(lo) or math.isnan(hi) else f"[{lo:.2f}, {hi:.2f}]"


def table(rows: list[dict]) -> str:
    head = f"{'row':<10} {'T':>4} {'req':>4} {'tokens':>6} {'tok/s':>7} {'95% interval':>16} {'p50_ms':>9} " \
           f"{'p95_ms':>9} {'accept':>7} {'server tok/s':>12}"
    lines = [head]
    for r in rows:
        lines.append(f"{r['row']:<10} {r['temperature']:4.2g} {r['requests']:4d} {r['generated']:6d} "
                     f"{r['tokens_per_s']:7.2f} {_interval(r['tokens_per_s_lo'], r['tokens_per_s_hi']):>16} "
                     f"{_f(r['latency_p50_ms'], '9.1f')} {_f(r['latency_p95_ms'], '9.1f')} "
                     f"{_f(r['acceptance'], '7.1%')} {_f(r['server_tokens_per_s'], '12.2f')}")
    return "\n".join(lines)


def ratios(rows: list[dict], records: list[dict]) -> list[str]:
    """One line per temperature and pair of `records` (ratio_records): tokens/s ratio with its paired
    95% interval, the 50/50 headline first and then code and prose apart; the sqs-cloud / llama-ar
    line leads with the issue's latency target (our cloud-only p50 within 1.2x of llama-server's)."""
    by = {(r["row"], r["temperature"]): r for r in rows}
    out = []
    for t in sorted({r["temperature"] for r in records}):
        for name_a, name_b in PAIRS:
            recs = [x for x in records if x["temperature"] == t and (x["row_a"], x["row_b"]) == (name_a, name_b)]
            if not recs:
                continue
            parts = [f"x{x['ratio']:.2f} {_interval(x['lo'], x['hi'])}" if x["kind"] == "all" else
                     f"{x['kind']} x{x['ratio']:.2f} {_interval(x['lo'], x['hi'])}" for x in recs]
            speed = "tokens/s " + parts[0] + (f" ({', '.join(parts[1:])})" if parts[1:] else "")
            a, b = by[(name_a, t)], by[(name_b, t)]
            if (name_a, name_b) == ("sqs-cloud", "llama-ar") and b["latency_p50_ms"]:
                x = a["latency_p50_ms"] / b["latency_p50_ms"]
                speed = f"p50 latency x{x:.2f} (target <= 1.2: {'met' if x <= 1.2 else 'missed'}), " + speed
            out.append(f"T={t:g}: {name_a} / {name_b} {speed}")
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
    p.add_argument("--llama-server-model", metavar="FILE.gguf",
                   help="the GGUF llama-server serves (default: the target's own file); give it the file our "
                        "cloud's auto choice kept (its start log), so that both sides run the same weights")
    p.add_argument("--engine", default="llama", choices=ENGINES,
                   help="our cloud's engine (llama: the same GGUF as llama-server, through llama-cpp-python)")
    p.add_argument("--temperatures", nargs="+", type=float, default=[0.0, 1.0])
    p.add_argument("--prompts", type=int, default=4, help="code prompts (bench.prompts.CODE_PROMPTS), each once per row")
    p.add_argument("--prose-prompts", type=int, default=0, metavar="N",
                   help="prose prompts (offline Wikipedia summaries) after the code ones, each once per row; "
                        "results are then also split by kind (issue 20: --prompts 8 --prose-prompts 8)")
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
    p.add_argument("--out", metavar="DIR",
                   help="write DIR/llama_server.csv, DIR/llama_server_ratios.csv and DIR/llama_server_samples.csv")
    p.add_argument("--no-progress", action="store_true")


def _fail(msg: str) -> int:
    print(f"sqs-bench llama-server: error: {msg}", file=sys.stderr)
    return 2


def main(args) -> int:
    """sqs-bench llama-server: 0, or 2 with one line on stderr."""
    from bench.machine import cpu_flags, write_csv
    from bench.prompts import CODE_PROMPTS, wiki_prompts
    from sqs_models.engines import model_gguf

    if args.prompts < 0 or args.prose_prompts < 0 or args.prompts + args.prose_prompts == 0:
        return _fail("--prompts and --prose-prompts must be >= 0 and give at least one prompt")
    if args.llama_server_model and not Path(args.llama_server_model).is_file():
        return _fail(f"--llama-server-model {args.llama_server_model}: no such file")
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
            target_gguf = args.llama_server_model or target_gguf
        code, prose = list(CODE_PROMPTS[:n]), wiki_prompts(args.prose_prompts)
        cfg = BenchConfig(binary, target, draft, target_gguf, draft_gguf, code + prose,
                          list(args.temperatures), max_new, server_cpus, edge_cpus, threads, engine=engine,
                          draft_len=args.draft_len, draft_n_max=args.draft_n_max, seed=args.seed, rows=tuple(args.rows),
                          ignore_eos=args.quick, slot_ctx=256 if args.quick else 1024,
                          kinds=["code"] * len(code) + ["prose"] * len(prose))
        try:
            rows = run(cfg, progress=not args.no_progress)
        except LlamaServerError as exc:
            return _fail(str(exc))
    print(f"target {target}, draft {draft}; {len(code)} code + {len(prose)} prose prompt(s) x {max_new} new tokens; "
          f"commit {rows[0]['commit'] if rows else '?'}; cloud side on CPU(s) "
          f"{cpus_text(server_cpus)} with {threads} thread(s), our edge on {cpus_text(edge_cpus)}; our cloud engine {engine}; "
          f"llama-server {server_version(binary) or '?'}; CPU flags [{cpu_flags()}]"
          + "".join(f"; {note}" for note in {r["llama_server_note"] for r in rows} if note))
    print(table(rows))
    records = ratio_records(rows)
    for line in ratios(rows, records):
        print(line)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        commit = rows[0]["commit"] if rows else None
        files = {"llama_server.csv": (rows, CSV_COLUMNS),
                 "llama_server_ratios.csv": ([{**r, "commit": commit} for r in records], RATIO_COLUMNS),
                 "llama_server_samples.csv": (sample_records(rows), SAMPLE_COLUMNS)}
        for name, (recs, columns) in files.items():
            write_csv(recs, out / name, columns)
            print(f"wrote {out / name}")
    return 0

