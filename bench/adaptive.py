"""sqs-bench adaptive: the planned rounds against fixed plans and cloud-only decoding, one run.

Per cell (link rate x RTT x temperature x prompt kind) every policy generates the same prompts with
the same seeds through one real sqs-cloud process (its own CPUs) and the edge in this process:

  adaptive-topk        --draft-len auto --k auto --ell auto (K-SQS, the default; pipelined drafting)
  adaptive-topk-nopipe the same with --no-pipeline
  adaptive-conformal   --draft-len auto --ell auto (C-SQS)
  cloud-only           --draft-len 0 (plain target decoding; several steps per round trip)
  fixed-L<n>-topk8     --draft-len n --k 8 --ell 100, n in {2, 4, 8}
  fixed-L<n>-conformal --draft-len n --ell 100

The link is the analytic model of edge.generate.LinkModel (bits / rate + RTT, both directions at the
cell's rate): compute, bits and wire bytes are measured, the network time is modelled, and the
adaptive and cloud-only policies plan with that modelled link as they would with a measured one.
Fixed plans (without pipelining, as before the controller) do not depend on the link, so they
run once per (temperature, prompt) and their rounds are priced on every link. Nothing here is tuned on the data it reports.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench.machine import cpu_flags, write_csv
from bench.prompts import CODE_PROMPTS


RATES = (64e3, 1e6, 100e6)
RTTS = (5.0, 50.0, 200.0)
COLUMNS = [
    "link_rate_bps", "link_rtt_ms", "temperature", "prompt_kind", "policy", "tokens_per_s", "latency_ms_per_token",
    "mean_draft_len", "wire_bytes_per_token", "verify_step_ratio", "generated", "rounds", "drafted", "accepted",
    "plain", "prompts", "max_new_tokens", "link", "draft_model", "target_model", "cpu_flags",
]


@dataclass(frozen=True)
class Policy:
    name: str
    sparsifier: str
    draft_len: int | str
    k: int | str = "auto"
    ell: int | str = "auto"
    pipeline: bool = True

    @property
    def link_dependent(self) -> bool:
        return self.draft_len in ("auto", 0)


POLICIES = (
    Policy("adaptive-topk", "topk", "auto"),
    Policy("adaptive-topk-nopipe", "topk", "auto", pipeline=False),
    Policy("adaptive-conformal", "conformal", "auto"),
    Policy("cloud-only", "none", 0),
    # Fixed plans as before this controller (no pipelining): run once, priced on every link.
    *(Policy(f"fixed-L{n}-topk8", "topk", n, 8, 100, pipeline=False) for n in (2, 4, 8)),
    *(Policy(f"fixed-L{n}-conformal", "conformal", n, "auto", 100, pipeline=False) for n in (2, 4, 8)),
)


@dataclass
class Totals:
    generated: int = 0
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    plain: int = 0
    ms: float = 0.0
    wire_bytes: int = 0


def _options(p: Policy, temperature: float, seed: int):
    from edge.options import options_from

    return options_from({"sparsifier": p.sparsifier if p.draft_len != 0 else "topk", "k": p.k, "ell": p.ell,
                         "draft_len": p.draft_len, "temperature": temperature, "seed": seed,
                         "no_pipeline": not p.pipeline})


def run(out: Path, draft_model: str, target_model: str, prompts: dict[str, list[str]], temperatures, rates, rtts,
        max_new_tokens: int, seed: int = 0, progress: bool = True) -> list[dict]:
    from tqdm import tqdm

    from bench.cloudproc import free_port, pin_edge, split_cpus, start_cloud, stop_process
    from bench.link_model import LinkModel
    from edge.client import ClientConfig
    from edge.generate import run_to_end
    from edge.runtime import EdgeRuntime
    from sqs_models.engines import load_engine

    draft = load_engine(draft_model, "draft", engine="torch")
    port = free_port()
    edge_cpus, cloud_cpus = split_cpus()
    cloud = start_cloud(target_model, port, cloud_cpus)
    pin_edge(edge_cpus)
    flags = cpu_flags()
    ratio = [0.0]
    cells = [(r, rtt) for r in rates for rtt in rtts]
    n_gen = sum(len(v) for v in prompts.values()) * len(temperatures) * (
        sum(len(cells) if p.link_dependent else 1 for p in POLICIES))
    bar = tqdm(total=n_gen, disable=not progress, desc="sqs-bench adaptive", unit="gen")

    runtime = EdgeRuntime(draft, ClientConfig(f"127.0.0.1:{port}"))

    def one(p: Policy, prompt: str, temperature: float, s: int, link):
        rt = runtime.wrapped(link.around) if link is not None else runtime
        g = rt.start(rt.encode(prompt), rt.draft_config(_options(p, temperature, s)), max_new_tokens=max_new_tokens)
        result = run_to_end(g)
        if g.drafter.costs.passes:
            ratio[0] = g.drafter.costs.passes.predict(9) / max(g.drafter.costs.passes.predict(1), 1e-9)
        bar.update()
        return link.priced(result) if link is not None else result

    totals: dict[tuple, Totals] = {}

    def add(key, g, link) -> None:
        t = totals.setdefault(key, Totals())
        st = g.stats
        t.generated += st.generated
        t.rounds += st.rounds
        t.drafted += st.drafted
        t.accepted += st.accepted
        t.plain += st.plain
        t.wire_bytes += st.uplink_wire_bytes + st.downlink_wire_bytes
        t.ms += sum(link.round_ms(r) for r in st.records)  # every round priced on this cell's link

    try:
        for temperature in temperatures:
            for kind, ps in prompts.items():
                for i, prompt in enumerate(ps):
                    s = seed + i
                    for p in POLICIES:
                        if p.link_dependent:
                            for rate, rtt in cells:
                                link = LinkModel(rate, rate, rtt)
                                add((rate, rtt, temperature, kind, p.name), one(p, prompt, temperature, s, link), link)
                        else:
                            g = one(p, prompt, temperature, s, None)
                            for rate, rtt in cells:
                                add((rate, rtt, temperature, kind, p.name), g, LinkModel(rate, rate, rtt))
    finally:
        bar.close()
        stop_process(cloud)
    rows = []
    for (rate, rtt, temperature, kind, name), t in totals.items():
        rows.append({
            "link_rate_bps": rate, "link_rtt_ms": rtt, "temperature": temperature, "prompt_kind": kind,
            "policy": name, "tokens_per_s": t.generated / (t.ms / 1e3) if t.ms else 0.0,
            "latency_ms_per_token": t.ms / t.generated if t.generated else float("nan"),
            "mean_draft_len": t.drafted / t.rounds if t.rounds else 0.0,
            "wire_bytes_per_token": t.wire_bytes / t.generated if t.generated else 0.0,
            "verify_step_ratio": round(ratio[0], 3), "generated": t.generated, "rounds": t.rounds,
            "drafted": t.drafted, "accepted": t.accepted, "plain": t.plain, "prompts": len(prompts[kind]),
            "max_new_tokens": max_new_tokens, "link": "analytic", "draft_model": draft_model,
            "target_model": target_model, "cpu_flags": flags,
        })
    return rows


def summary(rows: list[dict]) -> tuple[str, list[str]]:
    """Per cell: tokens/s of each policy, adaptive vs the best fixed and vs cloud-only (ratios)."""
    cells: dict[tuple, dict[str, float]] = {}
    for r in rows:
        key = (r["link_rate_bps"], r["link_rtt_ms"], r["temperature"], r["prompt_kind"])
        cells.setdefault(key, {})[r["policy"]] = r["tokens_per_s"]
    lines = [f"{'rate':>8} {'rtt':>5} {'T':>4} {'kind':>5} {'adaptive':>9} {'best fixed':>22} {'cloud-only':>10} "
             f"{'ad/best':>7} {'ad/cloud':>8}"]
    misses = []
    for (rate, rtt, temperature, kind), by in sorted(cells.items()):
        ad = max(v for k, v in by.items() if k.startswith("adaptive"))
        fixed = {k: v for k, v in by.items() if k.startswith("fixed")}
        best = max(fixed, key=fixed.get)
        cloud = by.get("cloud-only", float("nan"))
        r_best, r_cloud = ad / max(fixed[best], 1e-12), ad / max(cloud, 1e-12)
        lines.append(f"{rate:8.0f} {rtt:5.0f} {temperature:4.1f} {kind:>5} {ad:9.2f} {best:>13} {fixed[best]:8.2f} "
                     f"{cloud:10.2f} {r_best:7.2f} {r_cloud:8.2f}")
        if r_best < 0.95 or r_cloud < 1.0:
            misses.append(f"rate {rate:g} rtt {rtt:g} T {temperature:g} {kind}: x{r_best:.2f} best fixed, "
                          f"x{r_cloud:.2f} cloud-only")
    return "\n".join(lines), misses


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = sorted({(r["link_rate_bps"], r["link_rtt_ms"], r["temperature"], r["prompt_kind"]) for r in rows})
    policies = [p.name for p in POLICIES]
    fig, ax = plt.subplots(figsize=(max(10, len(cells) * 0.45), 5))
    width = 0.8 / len(policies)
    for j, name in enumerate(policies):
        ys = [next((r["tokens_per_s"] for r in rows if (r["link_rate_bps"], r["link_rtt_ms"], r["temperature"],
                                                          r["prompt_kind"]) == c and r["policy"] == name), 0.0)
              for c in cells]
        ax.bar([i + j * width for i in range(len(cells))], ys, width, label=name)
    ax.set_xticks([i + 0.4 for i in range(len(cells))])
    ax.set_xticklabels([f"{c[0] / 1e6:g}M/{c[1]:g}ms/T{c[2]:g}/{c[3]}" for c in cells], rotation=90, fontsize=7)
    ax.set_ylabel("committed tokens/s (analytic link)")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main_adaptive(args) -> int:
    from bench.prompts import wiki_prompts

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        draft, target, n, max_new = "tiny", "tiny", 2, 16
        temperatures, rates, rtts = (0.0, 1.0), RATES, RTTS
    else:
        draft, target, n, max_new = args.draft_model, args.target_model, args.prompts, args.max_new_tokens
        temperatures, rates, rtts = args.temperatures, args.rates, args.rtts
    prompts = {"code": list(CODE_PROMPTS[:n]), "prose": wiki_prompts(n)}
    t0 = time.perf_counter()
    rows = run(out, draft, target, prompts, temperatures, rates, rtts, max_new, seed=args.seed,
               progress=not args.no_progress)
    write_csv(rows, out / "adaptive.csv", COLUMNS)
    plot(rows, out / "adaptive.png")
    table, misses = summary(rows)
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout if os.path.exists("/usr/bin/lscpu") else ""
    model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "")
    print(f"draft {draft}, target {target}; {n} code + {n} prose prompt(s) x {max_new} new tokens; link: analytic "
          f"(measured compute and wire bytes, modelled network time); CPU {model} [{cpu_flags()}]; "
          f"verify(9)/step ratio {rows[0]['verify_step_ratio'] if rows else float('nan')}; "
          f"{time.perf_counter() - t0:.0f} s")
    print(table)
    print("targets (adaptive >= 0.95x best fixed, >= 1.0x cloud-only): "
          + ("met in every cell" if not misses else f"missed in {len(misses)} cell(s):\n  " + "\n  ".join(misses)))
    print(f"wrote {out / 'adaptive.csv'}, {out / 'adaptive.png'}")
    return 0
