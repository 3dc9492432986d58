"""sqs-bench engines: the pass table of each engine x weight type x model x threads (what one
forward pass scoring r rows costs), and how far each engine's next-token distributions are from
torch fp32 and from the torch bf16 reference on the same positions.

    sqs-bench engines [--models qwen2.5-coder-0.5b qwen2.5-coder-1.5b]
                      [--engines torch-fp32 torch-bf16 llama-Q4_K_M llama-Q4_0 llama-Q8_0]
                      [--threads 1 2] [--repeats 3] [--positions 32] [--out DIR]

Every cell (engine, model, threads) runs in its own Python process, so its load time and resident
memory are its own. In that process:

* load time: the engine's load (for torch, from the bf16 cache and a cast; for llama.cpp, the GGUF);
* passes: on a warm cache of a 32-token prefix, the time of feeding 1 (the step), 2, 3, 5, 9, 17 and
  33 new tokens and getting a logits row for each (the verify pass of L = rows - 1 drafts), the
  fastest of --repeats after one warm-up (other processes only add time); ratio = pass / step;
* quality: the logits of the last --positions positions of a fixed code-and-prose text, from one
  pass; the parent computes KL(p_ref || p_engine) (mean over positions, natural log) and the top-1
  agreement against the torch-fp32 and the torch-bf16 cells of the same model (which run first);
* predicted committed tok/s (sqs_models.pass_table, acceptance 0.7 per position): plain
  (1000 / step) and speculative (the best L), what ``--engine auto`` compares;
* RSS: VmRSS after the measurements and VmHWM (peak), MB.

Engines: ``torch-fp32``, ``torch-bf16``, ``torch`` (the dtype sqs_models.engines measures at load,
for the target role), ``llama`` (llama.cpp on the model's own GGUF, Q4_K_M for the Qwen pair),
``llama-<TYPE>`` (llama.cpp on that weight type, made once from the model's GGUF by
sqs_models.quantize and refused, with its KL and top-1, outside that module's tolerance); llama
cells are skipped with a note when llama-cpp-python or the GGUF is missing. A llama detail ending
in "no repack" ran without llama.cpp's extra buffer types (they crash this CPU:
sqs_models.llama_probe). CPU flags are printed with the table.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.machine import cpu_flags
from sqs_models.pass_table import ACCEPTANCE_PRIOR, predict
from sqs_models.quantize import QUALITY_TEXT as TEXT
from sqs_models.quantize import compare_logits as compare

ROWS = (1, 2, 3, 5, 9, 17, 33)
PREFIX = 32
LLAMA_TYPES = ("Q4_K_M", "Q4_0", "Q8_0")
ENGINE_SPECS = ("torch-fp32", "torch-bf16", "torch", "llama", *(f"llama-{t}" for t in LLAMA_TYPES))
REFERENCES = ("torch-fp32", "torch-bf16")  # run first per model: the quality columns compare with them


def _mem_mb() -> tuple[float, float]:
    vals = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                vals[key] = int(rest.split()[0]) / 1024
    return vals.get("VmRSS", float("nan")), vals.get("VmHWM", float("nan"))


def run_cell(spec: str, model: str, threads: int, repeats: int, positions: int, ref_out: str | None) -> dict:
    """One cell, in this process: load, time the passes, save the quality logits to ref_out (.npy)."""
    import torch

    from sqs_models.engines import load_engine

    torch.set_num_threads(threads)
    if spec == "llama":
        kw = {"engine": "llama", "threads": threads}
    elif spec.startswith("llama-"):
        from sqs_models.engines import model_gguf
        from sqs_models.quantize import source_type

        wtype = spec.removeprefix("llama-")
        same = source_type(model_gguf(model)) == wtype  # the model's own file: no weight_type needed
        kw = {"engine": "llama", "threads": threads, "weight_type": None if same else wtype}
    elif spec == "torch":
        kw = {"engine": "torch"}
    else:
        kw = {"engine": "torch", "dtype": {"torch-fp32": "float32", "torch-bf16": "bfloat16"}[spec]}
    t0 = time.perf_counter()
    eng = load_engine(model, "target", **kw)
    load_s = time.perf_counter() - t0
    text_ids = list(eng.tokenizer.encode(TEXT))
    if len(text_ids) < PREFIX + max(ROWS) or len(text_ids) <= positions:
        raise RuntimeError(f"the benchmark text encodes to only {len(text_ids)} tokens")
    base, extra = text_ids[:PREFIX], text_ids[PREFIX:PREFIX + max(ROWS)]
    lm = eng.new_lm()
    lm.logits(base, want=1)  # prefill, not timed
    times = {}
    for rows in ROWS:
        ctx = base + extra[:rows]
        lm.logits(ctx, want=rows)  # warm-up of this shape (the cache crops back to the prefix each time)
        samples = []
        for _ in range(repeats):
            t = time.perf_counter()
            lm.logits(ctx, want=rows)
            samples.append((time.perf_counter() - t) * 1e3)
        times[rows] = min(samples)
    quality = eng.new_lm().logits(text_ids, want=positions)  # [positions, V], fresh cache
    if ref_out:
        np.save(ref_out, quality.astype(np.float32))
    rss, hwm = _mem_mb()
    return {"engine": spec, "detail": eng.detail, "model": model, "threads": threads, "load_s": load_s,
            "rss_mb": rss, "peak_rss_mb": hwm, "ms": {str(r): ms for r, ms in times.items()}}


def _available(spec: str, model: str) -> str | None:
    """None when the cell can run, else why not."""
    from sqs_models.engines import EngineUnavailable, resolve_engine
    from sqs_models.install import REAL_MODELS, is_installed

    if model in REAL_MODELS and not is_installed(model):
        return f"{model} not installed (sqs-models install {model})"
    if spec.startswith("llama"):
        try:
            resolve_engine("llama", model)
        except (EngineUnavailable, ValueError) as exc:
            return str(exc)
    return None


def format_table(rows: list[dict]) -> str:
    head = ["engine", "model", "thr", "load s", "RSS MB (peak)", "step ms"] + \
           [f"{r} rows ms (x)" for r in ROWS[1:]] + ["KL vs fp32", "top-1", "KL vs bf16", "top-1 bf16",
                                                       "tok/s plain", "tok/s spec (L)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['engine']} | {r['model']} | {r['threads']} | skipped: {r['error']} |")
            continue
        step = r["ms"]["1"]
        passes = [f"{r['ms'][str(n)]:.0f} ({r['ms'][str(n)] / step:.2f})" for n in ROWS[1:]]
        quality = ["" if r.get(k) is None else (f"{r[k]:.1e}" if k.startswith("kl") else f"{r[k]:.2f}")
                   for k in ("kl", "top1", "kl_bf16", "top1_bf16")]
        p = predict(r["engine"], {int(n): ms for n, ms in r["ms"].items()}, ACCEPTANCE_PRIOR)
        name = r["detail"] if r["engine"] == "torch" else r["engine"] + (" (no repack)" if "no repack" in
                                                                          r.get("detail", "") else "")
        lines.append("| " + " | ".join([
            name, r["model"].removeprefix("qwen2.5-coder-"),
            str(r["threads"]), f"{r['load_s']:.1f}", f"{r['rss_mb']:.0f} ({r['peak_rss_mb']:.0f})", f"{step:.0f}",
            *passes, *quality, f"{p.plain_tok_s:.1f}", f"{p.spec_tok_s:.1f} ({p.drafts})"]) + " |")
    return "\n".join(lines)


def main_engines(args) -> int:
    specs = list(args.engines)
    # the references first per model (fp32, then bf16): the quality columns compare with them.
    specs.sort(key=lambda s: REFERENCES.index(s) if s in REFERENCES else len(REFERENCES))
    flags = cpu_flags()
    print(f"CPU flags: {flags}; {os.cpu_count()} CPUs; repeats {args.repeats}, prefix {PREFIX} tokens, "
          f"quality over the last {args.positions} positions of a fixed text", flush=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="sqs-engines-") as tmp:
        for model in args.models:
            for threads in args.threads:
                refs: dict[str, str] = {}
                for spec in specs:
                    why = _available(spec, model)
                    if why is not None:
                        rows.append({"engine": spec, "model": model, "threads": threads, "error": why})
                        print(f"  {spec} {model} x{threads}: skipped ({why})", flush=True)
                        continue
                    out = str(Path(tmp) / f"{spec}-{model}-{threads}.npy")
                    cell = {"spec": spec, "model": model, "threads": threads, "repeats": args.repeats,
                            "positions": args.positions, "out": out}
                    t0 = time.perf_counter()
                    proc = subprocess.run([sys.executable, "-m", "bench.engines", json.dumps(cell)],
                                          capture_output=True, text=True, timeout=args.cell_timeout_s)
                    if proc.returncode != 0:
                        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                        rows.append({"engine": spec, "model": model, "threads": threads,
                                     "error": f"exit {proc.returncode}: {tail[0][:160]}"})
                        print(f"  {spec} {model} x{threads}: failed: {tail[0][:200]}", flush=True)
                        continue
                    r = json.loads(proc.stdout.strip().splitlines()[-1])
                    if spec in REFERENCES:
                        refs[spec] = out
                    for ref, suffix in (("torch-fp32", ""), ("torch-bf16", "_bf16")):
                        r["kl" + suffix] = r["top1" + suffix] = None
                        if ref in refs:
                            r["kl" + suffix], r["top1" + suffix] = compare(np.load(refs[ref]), np.load(out))
                    rows.append(r)
                    print(f"  {spec} {model} x{threads}: step {r['ms']['1']:.0f} ms, 9 rows {r['ms']['9']:.0f} ms "
                          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    print(format_table(rows))
    if args.out:
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "engines.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["engine", "detail", "model", "threads", "load_s", "rss_mb", "peak_rss_mb",
                        *[f"ms_{n}" for n in ROWS], *[f"ratio_{n}" for n in ROWS[1:]], "kl_vs_fp32", "top1_vs_fp32",
                        "kl_vs_bf16", "top1_vs_bf16", "pred_plain_tok_s", "pred_spec_tok_s", "pred_spec_drafts",
                        "cpu_flags", "error"])
            for r in rows:
                ms = r.get("ms", {})
                step = ms.get("1")
                ratios = [ms[str(n)] / step for n in ROWS[1:]] if step else [""] * (len(ROWS) - 1)
                p = predict(r["engine"], {int(n): v for n, v in ms.items()}, ACCEPTANCE_PRIOR) if step else None
                pred = [p.plain_tok_s, p.spec_tok_s, p.drafts] if p else ["", "", ""]
                w.writerow([r["engine"], r.get("detail", ""), r["model"], r["threads"], r.get("load_s", ""),
                            r.get("rss_mb", ""), r.get("peak_rss_mb", ""), *[ms.get(str(n), "") for n in ROWS],
                            *ratios, r.get("kl", ""), r.get("top1", ""), r.get("kl_bf16", ""), r.get("top1_bf16", ""),
                            *pred, flags, r.get("error", "")])
        print(f"wrote {out_dir / 'engines.csv'}")
    return 0 if any("error" not in r for r in rows) else 1


if __name__ == "__main__":  # one cell: python -m bench.engines '{"spec": ..., ...}' -> one JSON line
    c = json.loads(sys.argv[1])
    result = run_cell(c["spec"], c["model"], c["threads"], c["repeats"], c["positions"], c.get("out"))
    print(json.dumps(result))
