"""sqs-bench: benchmarks that print their figures.

  sqs-bench codec [--quick]      time and bits per draft token for every scheme
  sqs-bench run --out DIR        the paper's experiments, all policies side by side: results.csv, plots,
                                 paired comparisons with bootstrap intervals (--resume goes on)
  sqs-bench report --results DIR rebuild every table and plot from DIR/runs.jsonl
  sqs-bench e2e                  a few schemes through a real cloud process, printed
  sqs-bench batching             would a batched (multi-session) verify pass raise cloud throughput?
  sqs-bench engines              step and multi-row pass cost, RSS, KL vs fp32 per engine x model x threads
  sqs-bench llama-server         llama.cpp's llama-server (AR and its own SD) next to our cloud-only and SD paths
  sqs-bench tls                  wire bytes per committed token with TLS off, on, and mutual (one run)
"""

from __future__ import annotations

import argparse
import sys

from bench.engines import ENGINE_SPECS
from common.lm import ENGINES
from edge.options import int_or_auto


def _parse_scheme(spec: str) -> dict:
    """'topk:8' -> {scheme: topk, k: 8}; 'conformal:0.01' -> beta0 0.01; 'none', 'dense', ..."""
    name, _, arg = spec.partition(":")
    if not arg:
        return {"scheme": name}
    return {"scheme": name, "k": int(arg)} if name in ("topk", "fp16-topk") else {"scheme": name, "beta0": float(arg)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="sqs-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("codec", help="codec microbenchmark (time and bits per draft token)")
    c.add_argument("--quick", action="store_true", help="fewer distributions, V = 50257 only")
    c.add_argument("--n", type=int, default=64, help="distributions per setting")
    sm = sub.add_parser("sampling", help="the cloud's per-token sampling at T > 0: target_probs, gumbel_token "
                                         "and the whole-vocabulary race it replaced, side by side (ms)")
    sm.add_argument("--vocab", type=int, default=151_936)
    sm.add_argument("--n", type=int, default=32, help="Zipf-like laws (peaked to flat)")
    sm.add_argument("--repeats", type=int, default=5, help="calls per law; the best is kept")
    e = sub.add_parser("e2e", help="real end-to-end runs, schemes side by side (cloud process + edge)")
    e.add_argument("--draft-model", default="tiny")
    e.add_argument("--target-model", default="tiny")
    e.add_argument("--schemes", nargs="+", default=["none", "topk:8", "conformal:0.01"],
                   help="none | topk:K | conformal:BETA0 | dense | token | fp16-topk:K | fp32")
    e.add_argument("--temperatures", nargs="+", type=float, default=[0.0, 1.0])
    e.add_argument("--prompts", type=int, default=1, help="code prompts (bench.prompts.CODE_PROMPTS)")
    e.add_argument("--max-new-tokens", type=int, default=48)
    e.add_argument("--draft-len", type=int_or_auto, default="auto", help="auto (planned per round) or a fixed N")
    e.add_argument("--budget-bits", type=float, default=5000.0)
    e.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run", help="the paper's experiments: all policies side by side -> results.csv + plots")
    r.add_argument("--out", required=True, help="output directory (runs.jsonl holds every generation)")
    r.add_argument("--resume", action="store_true", help="go on with DIR/runs.jsonl: run only what it lacks")
    r.add_argument("--quick", action="store_true", help="tiny pair, small grid: about a minute")
    r.add_argument("--draft-model", default="qwen2.5-coder-0.5b")
    r.add_argument("--target-model", default="qwen2.5-coder-1.5b")
    r.add_argument("--draft-engine", default="auto", choices=ENGINES,
                   help="edge engine (auto: llama.cpp where installed with the model's GGUF)")
    r.add_argument("--target-engine", default="auto", choices=ENGINES,
                   help="cloud engine (auto: the cheaper verify pass, measured at start)")
    r.add_argument("--temperatures", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    r.add_argument("--ks", nargs="+", type=int, default=[8], help="K-SQS settings (fixed plans)")
    r.add_argument("--betas", nargs="+", type=float, default=[0.01], help="C-SQS beta0 settings")
    r.add_argument("--etas", nargs="+", type=float, default=[0.001], help="C-SQS learning rates")
    r.add_argument("--alpha", type=float, default=0.0005)
    r.add_argument("--ell", type=int, default=100)
    r.add_argument("--budget-bits", type=float, default=5000.0)
    r.add_argument("--draft-len", type=int, default=8,
                   help="fixed plans: at most N drafts per batch (the budget B may stop a batch earlier)")
    r.add_argument("--no-planner", action="store_true", help="leave out the round planner (--draft-len auto) rows")
    r.add_argument("--baselines", action="store_true", help="also dense QS, token-only, fp16 top-8, dense fp32")
    r.add_argument("--prompts", type=int, default=8, help="prompts per kind (code and prose)")
    r.add_argument("--cloud-only-prompts", type=int, default=2,
                   help="prompts per kind for cloud-only rows (its cost per token does not depend on the prompt)")
    r.add_argument("--max-new-tokens", type=int, default=64)
    r.add_argument("--link-rate", type=float, default=1e6, help="headline link rate, bit/s")
    r.add_argument("--link-rtt-ms", type=float, default=50.0)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--no-progress", action="store_true")
    ad = sub.add_parser("adaptive", help="planned rounds vs fixed plans vs cloud-only per link cell -> adaptive.csv")
    ad.add_argument("--out", required=True, help="output directory")
    ad.add_argument("--quick", action="store_true", help="tiny pair, 2+2 prompts x 16 tokens: under two minutes")
    ad.add_argument("--draft-model", default="qwen2.5-coder-0.5b")
    ad.add_argument("--target-model", default="qwen2.5-coder-1.5b")
    ad.add_argument("--temperatures", nargs="+", type=float, default=[0.0, 1.0])
    ad.add_argument("--rates", nargs="+", type=float, default=[64e3, 1e6, 100e6], help="link rates, bit/s")
    ad.add_argument("--rtts", nargs="+", type=float, default=[5.0, 50.0, 200.0], help="link RTTs, ms")
    ad.add_argument("--prompts", type=int, default=4, help="prompts per kind (code, prose)")
    ad.add_argument("--max-new-tokens", type=int, default=32)
    ad.add_argument("--seed", type=int, default=0)
    ad.add_argument("--no-progress", action="store_true")
    rp = sub.add_parser("report", help="rebuild every table and plot from DIR/runs.jsonl")
    rp.add_argument("--results", required=True, help="directory holding runs.jsonl")
    rp.add_argument("--link-rate", type=float, default=1e6)
    rp.add_argument("--link-rtt-ms", type=float, default=50.0)
    b = sub.add_parser("batching", help="one batched verify pass vs separate passes, on the target model")
    b.add_argument("--model", default="qwen2.5-coder-1.5b")
    b.add_argument("--sessions", nargs="+", type=int, default=[1, 2, 4, 8])
    b.add_argument("--new-tokens", type=int, default=9, help="L+1 tokens verified per session")
    b.add_argument("--prefix", type=int, default=32)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--threads", type=int, default=0)
    en = sub.add_parser("engines", help="forward-pass cost, memory and fidelity of each engine (torch, llama.cpp)")
    en.add_argument("--models", nargs="+", default=["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
    en.add_argument("--engines", nargs="+", default=["torch-fp32", "torch-bf16", "llama"],
                    choices=ENGINE_SPECS,
                    help="torch = the dtype measured at load; llama = llama.cpp on the GGUF")
    en.add_argument("--threads", nargs="+", type=int, default=[1])
    en.add_argument("--repeats", type=int, default=3, help="timed passes per row count (the fastest counts)")
    en.add_argument("--positions", type=int, default=32, help="positions compared with torch fp32")
    en.add_argument("--cell-timeout-s", type=float, default=900.0)
    en.add_argument("--out", help="directory for engines.csv")
    from bench import llama_compare, tls_bench

    llama_compare.register(sub)
    tls_bench.register(sub)
    a = ap.parse_args(argv)
    if a.cmd == "llama-server":
        sys.exit(llama_compare.main(a))
    if a.cmd == "tls":
        sys.exit(tls_bench.main(a))
    if a.cmd == "engines":
        from bench.engines import main_engines

        sys.exit(main_engines(a))
    if a.cmd == "adaptive":
        from bench.adaptive import main_adaptive

        sys.exit(main_adaptive(a))
    if a.cmd == "batching":
        from bench.batching import main_batching

        sys.exit(main_batching(a))
    if a.cmd == "report":
        from bench.paper import main_report

        sys.exit(main_report(a))
    if a.cmd == "run":
        from bench.paper import main_run

        sys.exit(main_run(a))
    if a.cmd == "e2e":
        import tempfile
        from pathlib import Path

        from bench.paper import BenchSetting, RunContext, bench_prompts, run
        from bench.paper_report import report

        settings = [BenchSetting(**_parse_scheme(s), temperature=t, budget_bits=a.budget_bits,
                                 draft_len=0 if s == "none" else a.draft_len)
                    for t in a.temperatures for s in a.schemes]
        ctx = RunContext(a.draft_model, a.target_model, "auto", "auto", a.max_new_tokens, a.seed, 1e6, 50.0)
        prompts = [p for p in bench_prompts(max(a.prompts, 1)) if p.kind == "code"][: a.prompts]
        with tempfile.TemporaryDirectory() as d:
            records = run(settings, prompts, ctx, Path(d) / "runs.jsonl")
            report(records, Path(d), 1e6, 50.0)
    if a.cmd == "sampling":
        from bench.machine import cpu_flags
        from bench.sampling_bench import format_rows, run as run_sampling

        print(f"CPU flags: {cpu_flags()}")
        print(format_rows(run_sampling(a.vocab, a.n, a.repeats)))
    if a.cmd == "codec":
        from bench.codec_bench import format_table, run

        rows = run(vocabs=(50257,), n=16) if a.quick else run(n=a.n)
        print(format_table(rows))
    sys.exit(0)


if __name__ == "__main__":
    main()
