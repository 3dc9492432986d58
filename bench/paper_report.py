"""The report of `sqs-bench run`, recomputed from DIR/runs.jsonl alone (bench/paper.py writes it).

What is measured and what is modelled:
  * acceptance, resampling, bits and wire bytes are measured (real generations, real gRPC bytes);
  * compute (draft, cloud verify) is measured per round on this machine's CPUs;
  * the network time is modelled: each round's measured loopback network time is replaced by
    bytes * 8 / rate + RTT at the link asked for. So every "model" latency is a modelled latency.
  * cloud-only decoding is priced as a streaming service would run it: one request, then one
    target step per token streamed back, so one RTT per generation, not per token
        ms = RTT + sum(cloud time per round) + (first request + all replies) bytes * 8 / rate.
    The per-round-trip price (one RTT per round) is kept in its own column for comparison.
  * speculative rounds:  ms = sum over rounds (measured total - measured network + RTT + bytes * 8 / rate).

Rates are ratios of sums over prompts (accepted / tested positions, honest bits / committed
tokens, modelled ms / committed tokens), and their 95% intervals come from a bootstrap over
prompts (2,000 resamples, fixed seed). Settings share prompts and seeds, so comparisons between
two settings at one temperature resample the same prompts for both (paired).
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path

import numpy as np

from bench.machine import write_csv

BOOTSTRAP = 2000
RATES_BPS = [64e3, 256e3, 1e6, 4e6, 16e6, 100e6]
RTTS_MS = [1, 10, 50, 200]

COLUMNS = [
    "policy", "scheme", "k", "beta0", "eta", "alpha", "ell", "budget_bits", "max_draft_len", "temperature",
    "draft_model", "target_model", "draft_engine", "target_engine", "vocab_size", "prompts", "prompts_code",
    "prompts_prose", "max_new_tokens", "seed",
    "rounds", "generated", "drafted", "accepted", "tested", "resampled", "bonus", "plain", "zero_draft_rounds",
    "max_drafts_in_round",
    "position_acceptance_rate", "position_acceptance_lo", "position_acceptance_hi", "acceptance_rate",
    "resampling_rate", "resampling_lo", "resampling_hi", "accepted_per_round", "mean_accepted_length",
    "drafts_per_batch", "per_position_acceptance",
    "honest_bits_per_token", "honest_bits_per_token_lo", "honest_bits_per_token_hi",
    "uplink_wire_bytes_per_token", "downlink_wire_bytes_per_token", "formula_bits_per_token",
    "formula_bits_per_draft", "honest_bits_per_draft", "payload_bytes_per_batch", "wire_bytes_per_batch",
    "wire_bytes_per_token", "downlink_wire_bytes_per_batch",
    "draft_ms", "uplink_ms", "verify_ms", "downlink_ms", "total_ms", "tokens_per_s",
    "link_rate_bps", "link_rtt_ms", "link_cost_model", "model_ms_per_token", "model_ms_per_token_lo",
    "model_ms_per_token_hi", "model_tokens_per_s", "model_ms_per_token_round_trip",
    "model_ms_per_token_parallel_verify",
    "final_beta", "mean_dropped_mass", "theorem2_bound", "theorem2_held",
    "verify_step_ratio", "cpu_flags",
]


# --- pricing on a link ---------------------------------------------------------------------------

# A record's "trace" has one row per round (bench/paper.py make_record), these fields in this order:
TOTAL_MS, UPLINK_MS, DOWNLINK_MS, VERIFY_MS, UPLINK_BYTES, DOWNLINK_BYTES, DRAFTED, ACCEPTED, PLAIN = range(9)

def _round_ms(t: list, rate: float, rtt: float) -> float:
    network_ms = rtt + (t[UPLINK_BYTES] + t[DOWNLINK_BYTES]) * 8e3 / rate
    return t[TOTAL_MS] - t[UPLINK_MS] - t[DOWNLINK_MS] + network_ms


def priced_ms(rec: dict, rate: float, rtt: float, *, streaming: bool = True, step_ms: float | None = None) -> float:
    """A generation's modelled time (ms) on a link of `rate` bit/s both ways and `rtt` ms.

    streaming: cloud-only priced as a streaming service (one RTT per generation); False: one RTT
    per round. step_ms: the what-if of a verify pass costing one target step (an accelerator)."""
    tr = rec["trace"]
    if not tr:
        return 0.0
    if rec["setting"]["scheme"] == "none" and streaming:
        wire = tr[0][UPLINK_BYTES] + sum(t[DOWNLINK_BYTES] for t in tr)  # one request, every reply
        return rtt + sum(t[VERIFY_MS] for t in tr) + wire * 8e3 / rate
    if step_ms is None:
        return sum(_round_ms(t, rate, rtt) for t in tr)
    return sum(_round_ms(t, rate, rtt) - t[VERIFY_MS] + step_ms * (1 + t[PLAIN]) for t in tr)


# --- bootstrap over prompts ----------------------------------------------------------------------

def ratio_ci(num, den, num_b=None, den_b=None, *, paired: bool = True, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of sum(num)/sum(den) or, with a second sample b, of the ratio of
    the two ratios (a / b). paired: a and b are aligned by prompt and resampled together."""
    rng = np.random.default_rng(seed)
    num, den = np.asarray(num, float), np.asarray(den, float)
    if len(num) < 2:
        return float("nan"), float("nan")
    idx = rng.integers(0, len(num), (BOOTSTRAP, len(num)))
    with np.errstate(divide="ignore", invalid="ignore"):
        stat = num[idx].sum(1) / den[idx].sum(1)
        if num_b is not None:
            nb, db = np.asarray(num_b, float), np.asarray(den_b, float)
            jdx = idx if paired else rng.integers(0, len(nb), (BOOTSTRAP, len(nb)))
            stat = stat / (nb[jdx].sum(1) / db[jdx].sum(1))
    stat = stat[np.isfinite(stat)]
    if not len(stat):
        return float("nan"), float("nan")
    lo, hi = np.percentile(stat, [2.5, 97.5])
    return float(lo), float(hi)


def _div(a: float, b: float) -> float:
    return a / b if b else 0.0


# --- one row per setting ---------------------------------------------------------------------------

def group(records: list[dict]) -> "OrderedDict[str, list[dict]]":
    """Records by setting (and run context), in the order they first appear."""
    out: OrderedDict[str, list[dict]] = OrderedDict()
    for r in records:
        key = json.dumps([r["ctx"], r["setting"]], sort_keys=True)
        out.setdefault(key, []).append(r)
    for recs in out.values():
        recs.sort(key=lambda r: (r["kind"], r["index"]))
    return out


def step_ms_by_temperature(groups) -> dict[float, float]:
    """Cloud-only: cloud time per committed token, per temperature (the what-if's step cost)."""
    out = {}
    for recs in groups.values():
        st = recs[0]["setting"]
        if st["scheme"] == "none":
            cloud_ms = sum(t[VERIFY_MS] for r in recs for t in r["trace"])
            out[st["temperature"]] = _div(cloud_ms, sum(r["generated"] for r in recs))
    return out


def aggregate(recs: list[dict], rate: float, rtt: float, step_ms: float | None) -> dict:
    st, ctx = recs[0]["setting"], recs[0]["ctx"]
    S = {f: sum(r[f] for r in recs) for f in (
        "rounds", "generated", "drafted", "accepted", "tested", "resampled", "bonus", "plain", "zero_draft_rounds",
        "formula_bits", "honest_bits", "payload_bytes", "uplink_wire_bytes", "downlink_wire_bytes", "draft_ms",
        "uplink_ms", "verify_ms", "downlink_ms", "total_ms", "wall_s")}
    rounds, gen = max(S["rounds"], 1), S["generated"]
    spec_rounds = S["rounds"] - S["zero_draft_rounds"]
    acc_pos = [sum(x) for x in _zip_pad([r["accepted_by_position"] for r in recs])]
    tested_pos = [sum(x) for x in _zip_pad([r["tested_by_position"] for r in recs])]
    ms = [priced_ms(r, rate, rtt) for r in recs]
    gens = [r["generated"] for r in recs]
    model_ms = _div(sum(ms), gen)
    conformal = st["scheme"] == "conformal"
    counted = [r for r in recs if r.get("mean_dropped_mass") is not None and r["counted_positions"]]
    bounds = [r for r in counted if r.get("theorem2_bound") is not None]
    n_pos = sum(r["counted_positions"] for r in counted)
    pa = ratio_ci([r["accepted"] for r in recs], [r["tested"] for r in recs])
    rs = ratio_ci([r["resampled"] for r in recs], [r["rounds"] for r in recs])
    hb = ratio_ci([r["honest_bits"] for r in recs], gens)
    lat = ratio_ci(ms, gens)
    # The edge's fitted verify(9)/step cost ratio; only rounds with drafts measure multi-row passes.
    ratios = [r["verify_step_ratio"] for r in recs if r["drafted"] and r.get("verify_step_ratio") is not None
              and math.isfinite(r["verify_step_ratio"])]
    return {
        "policy": recs[0]["label"], "scheme": st["scheme"],
        "k": st["k"] if st["scheme"] in ("topk", "fp16-topk") and st["draft_len"] != "auto" else "",
        "beta0": st["beta0"] if conformal else "", "eta": st["eta"] if conformal else "",
        "alpha": st["alpha"] if conformal else "", "ell": st["ell"] if st["draft_len"] != "auto" else "auto",
        "budget_bits": st["budget_bits"], "max_draft_len": st["draft_len"], "temperature": st["temperature"],
        "draft_model": ctx["draft_model"], "target_model": ctx["target_model"],
        "draft_engine": recs[0]["draft_engine_detail"], "target_engine": recs[0]["target_engine_detail"],
        "vocab_size": recs[0].get("vocab_size", ""), "prompts": len(recs),
        "prompts_code": sum(r["kind"] == "code" for r in recs), "prompts_prose": sum(r["kind"] == "prose" for r in recs),
        "max_new_tokens": ctx["max_new_tokens"], "seed": ctx["seed"],
        **{f: S[f] for f in ("rounds", "generated", "drafted", "accepted", "tested", "resampled", "bonus", "plain",
                             "zero_draft_rounds")},
        "max_drafts_in_round": max(r["max_drafts_in_round"] for r in recs),
        "position_acceptance_rate": _div(S["accepted"], S["tested"]), "position_acceptance_lo": pa[0],
        "position_acceptance_hi": pa[1], "acceptance_rate": _div(S["accepted"], S["drafted"]),
        "resampling_rate": S["resampled"] / rounds, "resampling_lo": rs[0], "resampling_hi": rs[1],
        "accepted_per_round": S["accepted"] / rounds, "mean_accepted_length": _div(S["accepted"], spec_rounds),
        "drafts_per_batch": S["drafted"] / rounds,
        "per_position_acceptance": ";".join(f"{_div(a, t):.3f}" for a, t in list(zip(acc_pos, tested_pos))[:8]),
        "honest_bits_per_token": _div(S["honest_bits"], gen), "honest_bits_per_token_lo": hb[0],
        "honest_bits_per_token_hi": hb[1], "uplink_wire_bytes_per_token": _div(S["uplink_wire_bytes"], gen),
        "downlink_wire_bytes_per_token": _div(S["downlink_wire_bytes"], gen),
        "formula_bits_per_token": _div(S["formula_bits"], gen),
        "formula_bits_per_draft": _div(S["formula_bits"], S["drafted"]),
        "honest_bits_per_draft": _div(S["honest_bits"], S["drafted"]),
        "payload_bytes_per_batch": S["payload_bytes"] / rounds, "wire_bytes_per_batch": S["uplink_wire_bytes"] / rounds,
        "wire_bytes_per_token": _div(S["uplink_wire_bytes"], gen),
        "downlink_wire_bytes_per_batch": S["downlink_wire_bytes"] / rounds,
        **{f"{p}_ms": S[f"{p}_ms"] / rounds for p in ("draft", "uplink", "verify", "downlink", "total")},
        "tokens_per_s": _div(gen, S["wall_s"]),
        "link_rate_bps": rate, "link_rtt_ms": rtt,
        "link_cost_model": "streaming" if st["scheme"] == "none" else "per round",
        "model_ms_per_token": model_ms, "model_ms_per_token_lo": lat[0], "model_ms_per_token_hi": lat[1],
        "model_tokens_per_s": _div(1e3, model_ms),
        "model_ms_per_token_round_trip": _div(sum(priced_ms(r, rate, rtt, streaming=False) for r in recs), gen),
        "model_ms_per_token_parallel_verify": _div(sum(priced_ms(r, rate, rtt, step_ms=step_ms) for r in recs), gen)
        if step_ms is not None and st["scheme"] != "none" else "",
        "final_beta": float(np.mean([r["final_beta"] for r in recs if r["final_beta"] is not None]))
        if conformal and any(r["final_beta"] is not None for r in recs) else "",
        "mean_dropped_mass": sum(r["mean_dropped_mass"] * r["counted_positions"] for r in counted) / n_pos
        if n_pos else "",
        # Theorem 2 holds per generation (each starts from beta_1): the token-weighted mean of the
        # per-generation bounds, and in how many generations the dropped mass stayed within its own.
        "theorem2_bound": sum(r["theorem2_bound"] * r["counted_positions"] for r in bounds)
        / sum(r["counted_positions"] for r in bounds) if bounds else "",
        "theorem2_held": f"{sum(r['mean_dropped_mass'] <= r['theorem2_bound'] + 1e-12 for r in bounds)}/{len(bounds)}"
        if bounds else "",
        "verify_step_ratio": float(np.median(ratios)) if ratios else "",
        "cpu_flags": recs[0]["cpu_flags"],
    }


def _zip_pad(lists: list[list[int]]) -> list[tuple[int, ...]]:
    n = max((len(x) for x in lists), default=0)
    return list(zip(*[list(x) + [0] * (n - len(x)) for x in lists])) if lists else []


# --- comparisons -------------------------------------------------------------------------------------

def _paired(a: list[dict], b: list[dict]) -> tuple[list[dict], list[dict]]:
    """The prompts two settings share, aligned."""
    kb = {(r["kind"], r["index"]): r for r in b}
    common = [r for r in a if (r["kind"], r["index"]) in kb]
    return common, [kb[(r["kind"], r["index"])] for r in common]


def latency_ratio(a: list[dict], b: list[dict], rate: float, rtt: float) -> tuple[float, float, float]:
    """Modelled ms/token of a over b, with its 95% interval (paired when they share prompts)."""
    pa, pb = _paired(a, b)
    # Paired when both ran the same prompts; cloud-only runs on fewer prompts (its cost per token
    # does not depend on the prompt), so against it every prompt of each side counts, unpaired.
    paired = len(pa) == len(a) == len(b) and len(pa) >= 2
    if not paired:
        pa, pb = a, b
    num_a, den_a = [priced_ms(r, rate, rtt) for r in pa], [r["generated"] for r in pa]
    num_b, den_b = [priced_ms(r, rate, rtt) for r in pb], [r["generated"] for r in pb]
    point = _div(_div(sum(num_a), sum(den_a)), _div(sum(num_b), sum(den_b)))
    lo, hi = ratio_ci(num_a, den_a, num_b, den_b, paired=paired)
    return point, lo, hi


def comparisons(groups, rate: float, rtt: float) -> list[dict]:
    """Per temperature: C-SQS vs K-SQS (each fixed pair with one max draft length), and the
    planner vs each fixed plan and vs cloud-only."""
    by_t: dict[float, list[list[dict]]] = {}
    for recs in groups.values():
        by_t.setdefault(recs[0]["setting"]["temperature"], []).append(recs)
    out = []
    for t, sets in sorted(by_t.items()):
        fixed = [s for s in sets if s[0]["setting"]["scheme"] != "none" and s[0]["setting"]["draft_len"] != "auto"]
        ks = [s for s in fixed if s[0]["setting"]["scheme"] == "topk"]
        cs = [s for s in fixed if s[0]["setting"]["scheme"] == "conformal"]
        planners = [s for s in sets if s[0]["setting"]["draft_len"] == "auto"]
        cloud = [s for s in sets if s[0]["setting"]["scheme"] == "none"]
        for k in ks:
            for c in cs:
                if c[0]["setting"]["draft_len"] == k[0]["setting"]["draft_len"]:
                    out.append(_compare(t, c, k, rate, rtt))
        for p in planners:
            out += [_compare(t, p, f, rate, rtt) for f in fixed] + [_compare(t, p, c, rate, rtt) for c in cloud]
        for s in fixed:
            out += [_compare(t, s, c, rate, rtt) for c in cloud]
    return out


def _compare(t: float, a: list[dict], b: list[dict], rate: float, rtt: float) -> dict:
    point, lo, hi = latency_ratio(a, b, rate, rtt)
    pa, pb = _paired(a, b)
    verdict = "a faster" if hi < 1 else "b faster" if lo > 1 else "not resolved"
    paired = len(pa) == len(a) == len(b)
    return {"temperature": t, "a": a[0]["label"], "b": b[0]["label"],
            "paired_prompts": len(pa) if paired else f"{len(a)} vs {len(b)} (unpaired)",
            "ms_ratio_a_over_b": point, "lo": lo, "hi": hi, "verdict": verdict}


# --- output ------------------------------------------------------------------------------------------

def _ci(v: float, lo: float, hi: float, fmt: str) -> str:
    if isinstance(lo, str) or not math.isfinite(lo):
        return format(v, fmt)
    return f"{format(v, fmt)} [{format(lo, fmt)}, {format(hi, fmt)}]"


def format_table(rows: list[dict]) -> str:
    head = (f"{'T':>4} {'policy':<32} {'n':>3} {'pos.accept [95% CI]':>22} {'resamp':>6} {'acc.len':>7} "
            f"{'honest b/tok [95% CI]':>25} {'up B/tok':>8} {'down B/tok':>10} {'formula b/tok':>13} "
            f"{'model ms/tok [95% CI]':>26} {'loopback tok/s':>14}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['temperature']:>4.2f} {r['policy']:<32} {r['prompts']:>3} "
            f"{_ci(r['position_acceptance_rate'], r['position_acceptance_lo'], r['position_acceptance_hi'], '.3f'):>22} "
            f"{r['resampling_rate']:>6.1%} {r['mean_accepted_length']:>7.2f} "
            f"{_ci(r['honest_bits_per_token'], r['honest_bits_per_token_lo'], r['honest_bits_per_token_hi'], '.0f'):>25} "
            f"{r['uplink_wire_bytes_per_token']:>8.1f} {r['downlink_wire_bytes_per_token']:>10.1f} "
            f"{r['formula_bits_per_token']:>13.1f} "
            f"{_ci(r['model_ms_per_token'], r['model_ms_per_token_lo'], r['model_ms_per_token_hi'], '.0f'):>26} "
            f"{r['tokens_per_s']:>14.2f}")
    return "\n".join(lines)


def format_comparisons(comps: list[dict]) -> str:
    lines = [f"{'T':>4} {'a':<32} {'b':<32} {'n':>3} {'ms/token a / b [95% CI]':>26}  verdict"]
    for c in comps:
        lines.append(f"{c['temperature']:>4.2f} {c['a']:<32} {c['b']:<32} {str(c['paired_prompts']):>3} "
                     f"{_ci(c['ms_ratio_a_over_b'], c['lo'], c['hi'], '.3f'):>26}  {c['verdict']}")
    return "\n".join(lines)


def markdown(rows: list[dict], comps: list[dict]) -> str:
    """The headline table and the paired comparisons as Markdown (DIR/tables.md, for RESULTS.md)."""
    def ci(r: dict, value: str, interval: str, fmt: str, pct: bool = False) -> str:
        """`value` with its interval columns `interval`_lo/_hi, as "v [lo, hi]" (percent with pct)."""
        k = 100.0 if pct else 1.0
        return _ci(k * r[value], k * r[f"{interval}_lo"], k * r[f"{interval}_hi"], fmt)

    out = ["| T | policy | prompts | position acceptance % [95% CI] | resampling % [95% CI] | mean accepted length "
           "| per-position acceptance (1..4) | honest bits / token [95% CI] | wire B / token up | down "
           "| formula bits / token (reference) | modelled ms / token [95% CI] | final beta |",
           "|" + "---|" * 13]
    for r in rows:
        spec = bool(r["drafted"])
        out.append("| " + " | ".join([
            f"{r['temperature']:g}", r["policy"], str(r["prompts"]),
            ci(r, "position_acceptance_rate", "position_acceptance", ".1f", pct=True) if spec else "",
            ci(r, "resampling_rate", "resampling", ".1f", pct=True) if spec else "",
            f"{r['mean_accepted_length']:.2f}" if spec else "",
            " ".join(r["per_position_acceptance"].split(";")[:4]) if spec else "",
            ci(r, "honest_bits_per_token", "honest_bits_per_token", ".0f") if spec else "0",
            f"{r['uplink_wire_bytes_per_token']:.1f}", f"{r['downlink_wire_bytes_per_token']:.1f}",
            f"{r['formula_bits_per_token']:.0f}", ci(r, "model_ms_per_token", "model_ms_per_token", ".0f"),
            f"{r['final_beta']:.4f}" if r["final_beta"] != "" else ""]) + " |")
    if comps:
        out += ["", "| T | a | b | paired prompts | modelled ms/token a / b [95% CI] | verdict |", "|---|---|---|---|---|---|"]
        for c in comps:
            out.append(f"| {c['temperature']:g} | {c['a']} | {c['b']} | {c['paired_prompts']} | "
                       f"{_ci(c['ms_ratio_a_over_b'], c['lo'], c['hi'], '.3f')} | {c['verdict']} |")
    return "\n".join(out) + "\n"


def write_sweep(groups, path: Path, steps: dict[float, float]) -> None:
    out = []
    for recs in groups.values():
        t, gen = recs[0]["setting"]["temperature"], sum(r["generated"] for r in recs)
        for rate in RATES_BPS:
            for rtt in RTTS_MS:
                ms = _div(sum(priced_ms(r, rate, rtt) for r in recs), gen)
                pv = (_div(sum(priced_ms(r, rate, rtt, step_ms=steps[t]) for r in recs), gen)
                      if t in steps and recs[0]["setting"]["scheme"] != "none" else "")
                out.append({"policy": recs[0]["label"], "temperature": t, "rate_bps": rate, "rtt_ms": rtt,
                            "model_ms_per_token": ms, "model_tokens_per_s": _div(1e3, ms),
                            "model_ms_per_token_parallel_verify": pv})
    write_csv(out, path, list(out[0]))


def write_prompts(groups, path: Path, rate: float, rtt: float) -> None:
    rows = []
    for recs in groups.values():
        for r in recs:
            rows.append({"policy": r["label"], "temperature": r["setting"]["temperature"], "kind": r["kind"],
                         "index": r["index"], "seed": r["seed"], "generated": r["generated"], "rounds": r["rounds"],
                         "drafted": r["drafted"], "accepted": r["accepted"], "tested": r["tested"],
                         "resampled": r["resampled"], "honest_bits": r["honest_bits"],
                         "uplink_wire_bytes": r["uplink_wire_bytes"], "downlink_wire_bytes": r["downlink_wire_bytes"],
                         "model_ms": priced_ms(r, rate, rtt), "final_beta": r["final_beta"],
                         "stop_reason": r["stop_reason"]})
    write_csv(rows, path, list(rows[0]))


def plot(rows: list[dict], groups, out: Path, rate: float, rtt: float) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from cycler import cycler

    plt.rcParams["axes.prop_cycle"] = cycler(color=plt.get_cmap("tab20").colors)
    files: list[Path] = []
    labels = list(OrderedDict.fromkeys(r["policy"] for r in rows))

    def save(fig, name: str) -> None:
        fig.tight_layout()
        files.append(out / name)
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)

    def err(rs, v, lo, hi):
        ys = [r[v] for r in rs]
        los = [y - r[lo] if isinstance(r[lo], float) and math.isfinite(r[lo]) else 0 for y, r in zip(ys, rs)]
        his = [r[hi] - y if isinstance(r[hi], float) and math.isfinite(r[hi]) else 0 for y, r in zip(ys, rs)]
        return ys, [los, his]

    colors = {label: plt.get_cmap("tab10").colors[i % 10] for i, label in enumerate(labels)}  # one per policy
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.8))
    for label in labels:
        rs = sorted((r for r in rows if r["policy"] == label), key=lambda r: r["temperature"])
        xs = [r["temperature"] for r in rs]
        style = "-o" if label.startswith(("topk", "C-SQS", "planner")) else "--x"
        for ax, (v, lo, hi) in zip(axes, (("model_ms_per_token", "model_ms_per_token_lo", "model_ms_per_token_hi"),
                                           ("resampling_rate", "resampling_lo", "resampling_hi"),
                                           ("position_acceptance_rate", "position_acceptance_lo",
                                            "position_acceptance_hi"))):
            if v != "model_ms_per_token" and label == "cloud-only":
                continue
            ys, e = err(rs, v, lo, hi)
            ax.errorbar(xs, ys, yerr=e, fmt=style, capsize=3, label=label, color=colors[label])
    axes[0].set(xlabel="temperature", ylabel="modelled ms per committed token",
                title=f"Latency (measured compute, modelled {rate / 1e6:g} Mbit/s {rtt:g} ms link), 95% CI")
    axes[1].set(xlabel="temperature", ylabel="rounds ending in a resample / rounds", title="Resampling rate (paper's)")
    axes[2].set(xlabel="temperature", ylabel="accepted / tested positions", title="Position-level acceptance")
    axes[0].legend(fontsize=7)
    save(fig, "latency_resampling_vs_temperature.png")

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for label in labels:
        rs = [r for r in rows if r["policy"] == label and r["drafted"]]
        if rs:
            ax.plot([r["honest_bits_per_token"] for r in rs], [r["position_acceptance_rate"] for r in rs], "o",
                    label=label, alpha=0.8)
    ax.set_xscale("log")
    ax.set(xlabel="honest (sent) bits per committed token (log)", ylabel="accepted / tested positions",
           title="Bits sent vs acceptance, all temperatures")
    ax.legend(fontsize=7)
    save(fig, "bits_vs_acceptance.png")

    temps = sorted({r["temperature"] for r in rows})
    t_mid = temps[len(temps) // 2]
    fig, ax = plt.subplots(figsize=(8, 5))
    for recs in groups.values():
        if recs[0]["setting"]["temperature"] != t_mid:
            continue
        gen = sum(r["generated"] for r in recs)
        ax.plot(RATES_BPS, [_div(sum(priced_ms(r, x, 50.0) for r in recs), gen) for x in RATES_BPS], "-o",
                label=recs[0]["label"])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set(xlabel="link rate (bit/s), RTT 50 ms", ylabel="modelled ms per committed token",
           title=f"Link sweep at T={t_mid:g}")
    ax.legend(fontsize=7)
    save(fig, "link_sweep.png")
    return files


def report(records: list[dict], out: Path, rate: float, rtt: float) -> int:
    groups = group(records)
    steps = step_ms_by_temperature(groups)
    pooled = _div(sum(steps.values()), len(steps)) if steps else None
    rows = [aggregate(recs, rate, rtt, steps.get(recs[0]["setting"]["temperature"], pooled))
            for recs in groups.values()]
    rows.sort(key=lambda r: r["temperature"])  # stable: settings in run order within a temperature
    write_csv(rows, out / "results.csv", COLUMNS)
    write_sweep(groups, out / "link_sweep.csv", steps)
    write_prompts(groups, out / "prompts.csv", rate, rtt)
    comps = comparisons(groups, rate, rtt)
    if comps:
        write_csv(comps, out / "comparisons.csv", list(comps[0]))
    files = plot(rows, groups, out, rate, rtt)
    (out / "tables.md").write_text(markdown(rows, comps))
    r0 = rows[0]
    measured = [r["verify_step_ratio"] for r in rows if r["verify_step_ratio"] != ""]
    ratio = f"{min(measured):.2f}-{max(measured):.2f} (median per setting)" if measured else "n/a"
    print(f"draft {r0['draft_model']} ({r0['draft_engine']}), target {r0['target_model']} ({r0['target_engine']}); "
          f"CPU flags [{r0['cpu_flags']}]; verify(9)/step measured {ratio}; "
          f"{r0['max_new_tokens']} new tokens per prompt; model columns: measured compute and bytes, "
          f"modelled link {rate / 1e6:g} Mbit/s both ways, {rtt:g} ms RTT; cloud-only priced as streaming")
    print(format_table(rows))
    if comps:
        print("\nPaired comparisons (same prompts and seeds; ratio < 1: a is faster)")
        print(format_comparisons(comps))
    print("wrote " + ", ".join(str(f) for f in [out / "results.csv", out / "link_sweep.csv", out / "prompts.csv",
                                                 *([out / "comparisons.csv"] if comps else []), out / "tables.md", *files]))
    return 0
