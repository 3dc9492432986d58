"""sqs-bench run: the paper's experiments, measured, resumable, every policy side by side.

Each (setting, prompt) pair is one real generation: a sqs-cloud process on its own CPUs, the edge
(this process, the draft engine) on the others, over loopback gRPC. Each finished generation is
appended at once to DIR/runs.jsonl (one JSON record: the setting, the prompt, its seed, totals and
the compact per-round trace the link model prices), so a run that stops can go on with --resume,
and everything reported (bench/paper_report.py) is recomputed from that file alone.

Settings (per temperature): cloud-only decoding, K-SQS and C-SQS with a fixed plan (at most
--draft-len drafts per batch, fewer when the uplink budget B runs out, as in the paper), the round
planner (--draft-len/--k/--ell auto, pipelined) as one more policy, and optionally the baselines
(dense QS, token-only, fp16 top-K, dense fp32). Every setting sees the same prompts with the same
seeds (prompt i: seed + i), so settings compare paired, prompt by prompt.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from bench.cloudproc import cloud_engine, free_port, pin_edge, split_cpus, start_cloud, stop_process
from bench.machine import code_commit, cpu_flags, loadavg_1m

AUTO = "auto"


@dataclass(frozen=True)
class BenchSetting:
    """One policy at one temperature. draft_len: the most drafts per batch (a fixed plan; the
    budget B may stop a batch earlier), 0 for cloud-only, "auto" for the round planner (then K
    and ell are planned too where the sparsifier has them)."""

    scheme: str
    temperature: float
    k: int = 8
    beta0: float = 0.01
    eta: float = 0.001
    alpha: float = 0.0005
    ell: int = 100
    budget_bits: float = 5000.0
    draft_len: int | str = 8

    @property
    def adaptive(self) -> bool:
        return self.draft_len == AUTO

    @property
    def label(self) -> str:
        if self.scheme == "none":
            return "cloud-only"
        if self.adaptive:
            return {"topk": "planner K-SQS", "conformal": "planner C-SQS"}.get(self.scheme, f"planner {self.scheme}")
        if self.scheme in ("topk", "fp16-topk"):
            name = f"{self.scheme} K={self.k}"
        elif self.scheme == "conformal":
            name = f"C-SQS b0={self.beta0:g} eta={self.eta:g}"
        else:
            name = {"dense": "dense QS", "token": "token-only", "fp32": "dense fp32",
                    "invariant": "invariant"}.get(self.scheme, self.scheme)
        return f"{name} L<={self.draft_len}"

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def grid(temperatures: Iterable[float], ks: Iterable[int], betas: Iterable[float], etas: Iterable[float], *,
         draft_len: int = 8, baselines: bool = False, planner: bool = True, alpha: float = 0.0005, ell: int = 100,
         budget_bits: float = 5000.0) -> list[BenchSetting]:
    out = []
    for t in temperatures:
        common = dict(temperature=t, ell=ell, budget_bits=budget_bits, draft_len=draft_len)
        out.append(BenchSetting("none", t, draft_len=0))
        if baselines:
            out += [BenchSetting(s, **common) for s in ("fp32", "dense", "token")]
            out.append(BenchSetting("fp16-topk", k=8, **common))
        out += [BenchSetting("topk", k=k, **common) for k in ks]
        out += [BenchSetting("conformal", beta0=b, eta=e, alpha=alpha, **common) for b in betas for e in etas]
        out.append(BenchSetting("invariant", **common))  # token ids only, Gumbel-max agreement
        if planner:
            out.append(BenchSetting("topk", t, ell=ell, budget_bits=budget_bits, draft_len=AUTO))
            out.append(BenchSetting("invariant", t, ell=ell, budget_bits=budget_bits, draft_len=AUTO))
    return out


@dataclass(frozen=True)
class Prompt:
    kind: str  # "code" | "prose"
    index: int  # within its kind; the seed of a generation is seed + index
    text: str


def bench_prompts(per_kind: int) -> list[Prompt]:
    """per_kind code prompts and per_kind prose prompts (offline Wikipedia summaries)."""
    from bench.prompts import CODE_PROMPTS, wiki_prompts

    code = [CODE_PROMPTS[i % len(CODE_PROMPTS)] + ("" if i < len(CODE_PROMPTS) else "\n")
            for i in range(per_kind)]
    return [Prompt("code", i, t) for i, t in enumerate(code)] + [
        Prompt("prose", i, t) for i, t in enumerate(wiki_prompts(per_kind))]


@dataclass(frozen=True)
class RunContext:
    """What every record of one run shares; part of each record's identity for --resume."""

    draft_model: str
    target_model: str
    draft_engine: str  # requested: auto | torch | llama
    target_engine: str
    max_new_tokens: int
    seed: int
    link_rate_bps: float  # the link the planner plans for (fixed plans do not depend on it)
    link_rtt_ms: float


def record_key(ctx: RunContext, st: BenchSetting, p: Prompt) -> str:
    return json.dumps({"ctx": asdict(ctx), "setting": json.loads(st.key()), "prompt": [p.kind, p.index, p.text]},
                      sort_keys=True)


def load_records(path: Path) -> list[dict]:
    """Records of runs.jsonl; a torn last line (a run killed mid-write) is dropped."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _options(st: BenchSetting, seed: int) -> dict:
    """The generation options (edge/options.py names) of one setting."""
    if st.scheme == "none":
        return {"sparsifier": "topk", "draft_len": 0, "temperature": st.temperature, "seed": seed}
    return {
        "sparsifier": st.scheme, "k": AUTO if st.adaptive and st.scheme in ("topk", "fp16-topk") else st.k,
        "ell": AUTO if st.adaptive else st.ell, "draft_len": st.draft_len, "budget_bits": st.budget_bits,
        "beta0": st.beta0, "eta": st.eta, "alpha": st.alpha, "temperature": st.temperature, "seed": seed,
        # Fixed plans as the paper prices them (draft, then send, then verify); the planner as deployed.
        "no_pipeline": not st.adaptive,
    }


def make_record(ctx: RunContext, st: BenchSetting, p: Prompt, g, engines: dict, ratio: float, flags: str,
                commit: str | None = None) -> dict:
    """One generation as a JSON-able record: identity, totals, and per round the few numbers the
    link model needs (compute and network split, wire bytes, drafts)."""
    s = g.stats
    recs = s.records
    betas = [r.beta for r in recs if r.beta is not None]
    return {
        "key": record_key(ctx, st, p), "ctx": asdict(ctx), "setting": asdict(st), "label": st.label,
        "kind": p.kind, "index": p.index, "seed": ctx.seed + p.index, "stop_reason": g.stop_reason,
        "generated": s.generated, "rounds": s.rounds, "drafted": s.drafted, "accepted": s.accepted,
        "tested": s.tested, "resampled": s.resampled, "bonus": s.bonus, "plain": s.plain,
        "zero_draft_rounds": sum(1 for r in recs if not r.drafted),
        "max_drafts_in_round": max((r.drafted for r in recs), default=0),
        "formula_bits": s.formula_bits, "honest_bits": s.honest_bits, "payload_bytes": s.uplink_payload_bytes,
        "message_bytes": s.uplink_message_bytes, "uplink_wire_bytes": s.uplink_wire_bytes,
        "downlink_wire_bytes": s.downlink_wire_bytes, "setup_wire_bytes": s.setup_wire_bytes,
        **{f"{part}_ms": v for part, v in s.latency_ms.items()},
        "forward_ms": sum(r.forward_ms for r in recs), "wall_s": s.wall_s,
        "final_beta": betas[-1] if betas else None,
        "counted_positions": g.counted_positions, "mean_dropped_mass": g.mean_dropped_mass,
        "theorem2_bound": g.theorem2_bound,  # this generation's own (the controller starts afresh per generation)
        "accepted_by_position": s.accepted_by_position, "tested_by_position": s.tested_by_position,
        # per round, in the order of paper_report.TOTAL_MS..PLAIN: total, uplink, downlink, verify (ms);
        # uplink, downlink wire bytes; drafted, accepted, plain
        "trace": [[round(r.total_ms, 3), round(r.uplink_ms, 3), round(r.downlink_ms, 3), round(r.verify_ms, 3),
                   r.uplink_wire_bytes or r.message_bytes, r.downlink_wire_bytes, r.drafted, r.accepted, r.plain]
                  for r in recs],
        "verify_step_ratio": ratio, "vocab_size": engines["vocab_size"], "draft_engine_detail": engines["draft"], "target_engine_detail": engines["target"],
        "cpu_flags": flags, "finished_unix": time.time(),
        # what ran and beside what: a record says its commit and the machine's load when it finished
        "commit": commit, "loadavg_1m": loadavg_1m(),
    }


def run(settings: list[BenchSetting], prompts: list[Prompt], ctx: RunContext, records_path: Path, *,
        show_progress: bool = True) -> list[dict]:
    """Generate every (setting, prompt) pair not yet in records_path, appending one record each.
    Returns all records of this context (old and new), in settings x prompts order."""
    from tqdm import tqdm

    from bench.link_model import LinkModel
    from edge.client import ClientConfig
    from edge.generate import run_to_end
    from edge.runtime import EdgeRuntime
    from sqs_models.engines import load_engine

    done = {r["key"]: r for r in load_records(records_path)}
    # Prompt by prompt, every setting in turn: a slow drift of the machine's speed (another job,
    # thermal) then falls on all settings alike instead of on whichever ran last.
    todo = [(st, p) for p in prompts for st in settings if record_key(ctx, st, p) not in done]
    print(f"{len(settings) * len(prompts) - len(todo)} of {len(settings) * len(prompts)} generations already in "
          f"{records_path}; {len(todo)} to run", flush=True)
    if todo:
        edge_cpus, cloud_cpus = split_cpus()
        pin_edge(edge_cpus)  # before the draft loads: llama.cpp sizes its thread pool by the CPUs it may use
        draft = load_engine(ctx.draft_model, "draft", engine=ctx.draft_engine)
        port = free_port()
        log_path = records_path.with_name("cloud.log")
        cloud = start_cloud(ctx.target_model, port, cloud_cpus, engine=ctx.target_engine, log_path=log_path)
        engines = {"draft": f"{draft.kind}: {draft.detail}", "target": cloud_engine(log_path),
                   "vocab_size": draft.vocab_size}
        commit = code_commit()
        flags = cpu_flags()
        planned_link = LinkModel(ctx.link_rate_bps, ctx.link_rate_bps, ctx.link_rtt_ms)
        measured = EdgeRuntime(draft, ClientConfig(f"127.0.0.1:{port}"))
        modelled = measured.wrapped(planned_link.around)  # the planner plans for the analytic link
        bar = tqdm(total=len(todo), disable=not show_progress, desc="sqs-bench run", unit="gen")
        try:
            with open(records_path, "a") as out:
                for st, p in todo:
                    seed = ctx.seed + p.index
                    runtime = modelled if st.adaptive else measured
                    gen = runtime.start(runtime.encode(p.text), runtime.draft_config(_options(st, seed)),
                                        max_new_tokens=ctx.max_new_tokens)
                    result = run_to_end(gen)
                    g = planned_link.priced(result) if st.adaptive else result
                    drafter = gen.drafter
                    passes = drafter.costs.passes
                    ratio = passes.predict(9) / max(passes.predict(1), 1e-9) if passes else float("nan")
                    rec = make_record(ctx, st, p, g, engines, ratio, flags, commit)
                    out.write(json.dumps(rec) + "\n")
                    out.flush()
                    os.fsync(out.fileno())
                    done[rec["key"]] = rec
                    bar.set_postfix_str(f"{st.label} T={st.temperature:g}")
                    bar.update()
        finally:
            bar.close()
            stop_process(cloud)
    return [done[record_key(ctx, st, p)] for st in settings for p in prompts]


def main_run(args) -> int:
    from bench.paper_report import report

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records_path = out / "runs.jsonl"
    if records_path.exists() and not args.resume:
        print(f"sqs-bench run: {records_path} exists: pass --resume to go on with it, or use another --out")
        return 2
    if args.quick:
        ctx = RunContext("tiny", "tiny", "torch", "torch", 16, args.seed, args.link_rate, args.link_rtt_ms)
        settings = grid([0.0, 1.0], [2, 8], [0.02], [0.001], draft_len=8, baselines=True, planner=True)
        prompts = bench_prompts(1)
        cloud_only_prompts = prompts
    else:
        ctx = RunContext(args.draft_model, args.target_model, args.draft_engine, args.target_engine,
                         args.max_new_tokens, args.seed, args.link_rate, args.link_rtt_ms)
        settings = grid(args.temperatures, args.ks, args.betas, args.etas, draft_len=args.draft_len,
                        baselines=args.baselines, planner=not args.no_planner, alpha=args.alpha, ell=args.ell,
                        budget_bits=args.budget_bits)
        prompts = bench_prompts(args.prompts)
        # Cloud-only's cost per token does not depend on the prompt's draftability: fewer prompts do.
        cloud_only_prompts = [p for p in prompts if p.index < args.cloud_only_prompts]
    t0 = time.perf_counter()
    # Cloud-only rows on their (smaller) prompt set, all others on the full one.
    run([st for st in settings if st.scheme == "none"], cloud_only_prompts, ctx, records_path,
        show_progress=not args.no_progress)
    run([st for st in settings if st.scheme != "none"], prompts, ctx, records_path, show_progress=not args.no_progress)
    print(f"generation took {time.perf_counter() - t0:.0f} s")
    # The report covers every record of the file, so a run that adds settings (--resume with other
    # temperatures, say) reports them together with the earlier ones.
    return report(load_records(records_path), out, args.link_rate, args.link_rtt_ms)


def main_report(args) -> int:
    """Rebuild results.csv, link_sweep.csv, the tables and the plots from DIR/runs.jsonl."""
    from bench.paper_report import report

    out = Path(args.results)
    records = load_records(out / "runs.jsonl")
    if not records:
        print(f"sqs-bench report: no records in {out / 'runs.jsonl'}")
        return 2
    return report(records, out, args.link_rate, args.link_rtt_ms)
