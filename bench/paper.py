"""The paper's experiments, measured: every scheme side by side in one run, results.csv and plots.

Each setting runs real generations (a sqs-cloud process, the edge library path on loopback) and
keeps per-round measurements: compute times (draft, verify), wire bytes each way, drafts, accepted.
From those, an analytic model gives the latency at any link: per round
    draft + up_wire_bytes * 8 / rate + RTT + verify + down_wire_bytes * 8 / rate
(measured compute and measured bytes; only the link is modelled), reported for a grid of rates and
RTTs and, in results.csv, at the headline link.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

from bench.cloudproc import free_port, merge_stats, pin_edge, split_cpus, start_cloud
from common.schemes import SchemeConfig
from common.stats import GenerationStats

CSV_COLUMNS = [
    "scheme", "k", "beta0", "eta", "alpha", "ell", "budget_bits", "temperature", "draft_model", "target_model",
    "vocab_size", "prompts", "rounds", "generated", "drafted", "accepted", "resampled", "bonus",
    "acceptance_rate", "resampling_rate", "accepted_per_round", "drafts_per_batch", "formula_bits_per_draft",
    "honest_bits_per_draft", "formula_bits_per_token", "payload_bytes_per_batch", "wire_bytes_per_batch",
    "wire_bytes_per_token", "downlink_wire_bytes_per_batch", "draft_ms", "uplink_ms", "verify_ms", "downlink_ms",
    "total_ms", "latency_ms_per_token", "tokens_per_s", "mean_dropped_mass", "theorem2_bound",
    "link_rate_bps", "link_rtt_ms", "link_latency_ms_per_token", "link_tokens_per_s",
    "link_latency_ms_per_token_parallel_verify",
]


@dataclass(frozen=True)
class BenchSetting:
    scheme: str
    temperature: float
    k: int = 8
    beta0: float = 0.01
    eta: float = 0.001
    alpha: float = 0.0005
    ell: int = 100
    budget_bits: float = 5000.0

    @property
    def label(self) -> str:
        if self.scheme in ("topk", "fp16-topk"):
            return f"{self.scheme} K={self.k}"
        if self.scheme == "conformal":
            return f"C-SQS b0={self.beta0:g} eta={self.eta:g}"
        return {"none": "cloud-only AR", "dense": "dense QS", "token": "token-only", "fp32": "dense fp32"}.get(
            self.scheme, self.scheme)


@dataclass
class SettingResult:
    setting: BenchSetting
    stats: GenerationStats = field(default_factory=GenerationStats)
    dropped_mass_sum: float = 0.0
    counted_positions: int = 0


def grid(temperatures, ks, betas, etas, baselines=True, alpha=0.0005, ell=100, budget_bits=5000.0):
    out = []
    for t in temperatures:
        if baselines:
            out += [BenchSetting("none", t), BenchSetting("fp32", t), BenchSetting("fp16-topk", t, k=8),
                    BenchSetting("dense", t), BenchSetting("token", t)]
        out += [BenchSetting("topk", t, k=k, ell=ell, budget_bits=budget_bits) for k in ks]
        out += [BenchSetting("conformal", t, beta0=b, eta=e, alpha=alpha, ell=ell, budget_bits=budget_bits)
                for b in betas for e in etas]
    return out


def run(settings: list[BenchSetting], prompts: list[str], draft_model: str, target_model: str,
        max_new_tokens: int, max_draft_len: int | str = "auto", seed: int = 0,
        show_progress: bool = True) -> list[SettingResult]:
    from tqdm import tqdm

    from edge.client import ClientConfig, CloudClient
    from edge.drafter import DraftConfig, Drafter
    from edge.options import AUTO, BY_NAME
    from edge.generate import generate
    from sqs_models.cached_lm import CachedLM
    from sqs_models.registry import load_model

    m = load_model(draft_model, role="draft")
    port = free_port()
    edge_cpus, cloud_cpus = split_cpus()
    cloud = start_cloud(target_model, port, cloud_cpus)
    pin_edge(edge_cpus)
    results = []
    bar = tqdm(total=len(settings) * len(prompts), disable=not show_progress, desc="sqs-bench", unit="gen")
    try:
        for st in settings:
            res = SettingResult(st)
            for i, prompt in enumerate(prompts):
                cfg = DraftConfig(
                    scheme=SchemeConfig(st.scheme, m.vocab_size, k=st.k, ell=st.ell, beta0=st.beta0, eta=st.eta,
                                        alpha=st.alpha),
                    max_draft_len=None if max_draft_len == AUTO else BY_NAME["draft_len"].check(max_draft_len),
                    budget_bits=st.budget_bits,
                    temperature=st.temperature,
                    seed=seed + i,
                )
                drafter = Drafter(CachedLM(m.model, m.vocab_size), cfg, m.eos_token_ids)
                with CloudClient(ClientConfig(f"127.0.0.1:{port}")) as client:
                    g = generate(m.tokenizer.encode(prompt), drafter, client, max_new_tokens=max_new_tokens,
                                 vocab_fingerprint=m.fingerprint)
                merge_stats(res.stats, g.stats)
                if g.mean_dropped_mass is not None:
                    res.dropped_mass_sum += g.mean_dropped_mass * g.counted_positions
                    res.counted_positions += g.counted_positions
                bar.set_postfix_str(f"{st.label} T={st.temperature:g}")
                bar.update()
            results.append(res)
    finally:
        bar.close()
        cloud.terminate()
        cloud.wait(30)
    return results


def link_latency(r: dict, rate_bps: float, rtt_ms: float, verify_ms: float | None = None) -> float:
    """Analytic ms per generated token for a results row on a link of `rate_bps` (both ways) and
    `rtt_ms`: rounds x (draft + verify + RTT) + wire bytes x 8 / rate, over generated tokens.

    verify_ms replaces the measured per-round verify time (the parallel-verify what-if).
    The model is linear, so the per-round means in the row give the same sum as the rounds.
    """
    rounds, generated = float(r["rounds"]), float(r["generated"])
    if not generated:
        return float("nan")
    per_round = float(r["draft_ms"]) + (float(r["verify_ms"]) if verify_ms is None else verify_ms) + rtt_ms
    wire_bits = (float(r["wire_bytes_per_batch"]) + float(r["downlink_wire_bytes_per_batch"])) * 8 * rounds
    return (rounds * per_round + wire_bits / rate_bps * 1e3) / generated


def parallel_verify_ms(rows: list[dict]) -> dict[float, float]:
    """Per temperature, the cloud-only (L = 0) round's measured verify time: what one verify pass
    costs when a forward over L+1 tokens costs one step (an accelerator), the what-if column."""
    return {float(r["temperature"]): float(r["verify_ms"]) for r in rows if r["scheme"] == "none"}


def row(res: SettingResult, draft_model: str, target_model: str, vocab: int, n_prompts: int) -> dict:
    st, s = res.setting, res.stats
    r = max(s.rounds, 1)
    per_tok = max(s.accepted + s.rounds, 1)
    mean_dropped = res.dropped_mass_sum / res.counted_positions if res.counted_positions else None
    # Theorem 2 over all counted positions of the setting: alpha + (|b1| + 1 + eta*alpha) / (eta * T_total)
    bound = (st.alpha + (abs(st.beta0) + 1 + st.eta * st.alpha) / (st.eta * res.counted_positions)
             if st.scheme == "conformal" and st.eta > 0 and res.counted_positions else None)
    return {
        "scheme": st.scheme, "k": st.k if st.scheme in ("topk", "fp16-topk") else "",
        "beta0": st.beta0 if st.scheme == "conformal" else "", "eta": st.eta if st.scheme == "conformal" else "",
        "alpha": st.alpha if st.scheme == "conformal" else "", "ell": st.ell, "budget_bits": st.budget_bits,
        "temperature": st.temperature, "draft_model": draft_model, "target_model": target_model,
        "vocab_size": vocab, "prompts": n_prompts, "rounds": s.rounds, "generated": s.generated,
        "drafted": s.drafted, "accepted": s.accepted, "resampled": s.resampled, "bonus": s.bonus,
        "acceptance_rate": s.acceptance_rate, "resampling_rate": s.resampling_rate,
        "accepted_per_round": s.accepted / r, "drafts_per_batch": s.drafted / r,
        "formula_bits_per_draft": s.formula_bits / s.drafted if s.drafted else 0.0,
        "honest_bits_per_draft": s.honest_bits / s.drafted if s.drafted else 0.0,
        "formula_bits_per_token": s.formula_bits / per_tok,
        "payload_bytes_per_batch": s.uplink_payload_bytes / r, "wire_bytes_per_batch": s.uplink_wire_bytes / r,
        "wire_bytes_per_token": s.uplink_wire_bytes / per_tok,
        "downlink_wire_bytes_per_batch": s.downlink_wire_bytes / r,
        **{f"{p}_ms": s.latency_ms[p] / r for p in ("draft", "uplink", "verify", "downlink", "total")},
        "latency_ms_per_token": s.latency_ms["total"] / max(s.generated, 1),
        "tokens_per_s": s.tokens_per_s,
        "mean_dropped_mass": mean_dropped if mean_dropped is not None else "",
        "theorem2_bound": bound if bound is not None else "",
    }


def add_link_columns(rows: list[dict], rate_bps: float, rtt_ms: float) -> None:
    """The headline-link columns, measured compute and, as a what-if, parallel verify."""
    pv = parallel_verify_ms(rows)
    for r in rows:
        ms = link_latency(r, rate_bps, rtt_ms)
        t = float(r["temperature"])
        ms_pv = link_latency(r, rate_bps, rtt_ms, pv.get(t)) if t in pv else float("nan")
        r.update(link_rate_bps=rate_bps, link_rtt_ms=rtt_ms, link_latency_ms_per_token=ms,
                 link_tokens_per_s=1e3 / ms if ms and math.isfinite(ms) else 0.0,
                 link_latency_ms_per_token_parallel_verify=ms_pv)


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(rows)


RATES_BPS = [64e3, 256e3, 1e6, 4e6, 16e6, 100e6]
RTTS_MS = [1, 10, 50, 200]


def write_sweep(rows: list[dict], path: Path) -> list[dict]:
    pv = parallel_verify_ms(rows)
    out = []
    for r in rows:
        t = float(r["temperature"])
        for rate in RATES_BPS:
            for rtt in RTTS_MS:
                ms = link_latency(r, rate, rtt)
                out.append({"scheme": label_of(r), "temperature": t, "rate_bps": rate, "rtt_ms": rtt,
                            "latency_ms_per_token": ms, "tokens_per_s": 1e3 / ms if ms else 0.0,
                            "latency_ms_per_token_parallel_verify": link_latency(r, rate, rtt, pv.get(t))
                            if t in pv else float("nan")})
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(out[0]))
        w.writeheader()
        w.writerows(out)
    return out


def label_of(r: dict) -> str:
    return BenchSetting(r["scheme"], float(r["temperature"]), k=int(r["k"] or 8), beta0=float(r["beta0"] or 0.01),
                        eta=float(r["eta"]) if r["eta"] != "" else 0.001).label


def plot(rows: list[dict], out: Path, headline: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from cycler import cycler

    plt.rcParams["axes.prop_cycle"] = cycler(color=plt.get_cmap("tab20").colors)  # > 10 schemes: no repeats
    files = []
    by = {(label_of(r), float(r["temperature"])): r for r in rows}
    labels = sorted({k[0] for k in by}, key=lambda x: (x.split()[0], len(x), x))
    temps = sorted({k[1] for k in by})
    pv = parallel_verify_ms(rows)

    def save(fig, name: str) -> None:
        fig.tight_layout()
        files.append(out / name)
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(18, 4.8))
    for label in labels:
        xs = [t for t in temps if (label, t) in by]
        style = "-o" if label.startswith(("topk", "C-SQS")) else "--x"
        axes[0].plot(xs, [float(by[(label, t)]["link_latency_ms_per_token"]) for t in xs], style, label=label)
        axes[1].plot(xs, [float(by[(label, t)]["link_latency_ms_per_token_parallel_verify"]) for t in xs], style,
                     label=label)
        axes[2].plot(xs, [float(by[(label, t)]["resampling_rate"]) for t in xs], style, label=label)
    axes[0].set(xlabel="temperature", ylabel="ms per generated token", title=f"Latency, measured compute ({headline})")
    axes[1].set(xlabel="temperature", ylabel="ms per generated token",
                title="What-if: verify pass costs one step (accelerator)")
    axes[2].set(xlabel="temperature", ylabel="resampled rounds / rounds", title="Resampling rate")
    axes[2].legend(fontsize=7, ncol=2)
    save(fig, "latency_resampling_vs_temperature.png")

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for label in labels:
        pts = [(float(by[(label, t)]["formula_bits_per_draft"]), float(by[(label, t)]["acceptance_rate"]))
               for t in temps if (label, t) in by and int(by[(label, t)]["drafted"])]
        if pts:
            ax.plot(*zip(*pts), "o", label=label, alpha=0.8)
    ax.set_xscale("log")
    ax.set(xlabel="formula bits per draft token (log)", ylabel="acceptance rate (accepted / drafted)",
           title="Bits vs acceptance, all schemes and temperatures")
    ax.legend(fontsize=7, ncol=2)
    save(fig, "bits_vs_acceptance.png")

    t_mid = temps[len(temps) // 2]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    for label in labels:
        if (label, t_mid) not in by:
            continue
        r = by[(label, t_mid)]
        axes[0].plot(RATES_BPS, [link_latency(r, x, 50) for x in RATES_BPS], "-o", label=label)
        if t_mid in pv:
            axes[1].plot(RATES_BPS, [link_latency(r, x, 50, pv[t_mid]) for x in RATES_BPS], "-o", label=label)
    for ax, title in zip(axes, ("measured compute", "what-if: verify pass = one step")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set(xlabel="link rate (bit/s), RTT 50 ms", ylabel="ms per generated token",
               title=f"Link sweep at T={t_mid:g}, {title}")
    axes[1].legend(fontsize=7, ncol=2)
    save(fig, "link_sweep.png")
    return files


def format_headline(rows: list[dict]) -> str:
    head = (f"{'T':>4} {'scheme':<24} {'acc':>6} {'resamp':>6} {'acc/rnd':>7} {'drafts/b':>8} {'fbits/draft':>11} "
            f"{'fbits/tok':>9} {'wireB/tok':>9} {'link ms/tok':>11} {'link tok/s':>10} {'pv ms/tok':>9} "
            f"{'loopback tok/s':>14}")
    lines = [head, "-" * len(head)]
    for r in rows:
        label = label_of(r)
        lines.append(
            f"{r['temperature']:>4.2f} {label:<24} {r['acceptance_rate']:>6.1%} {r['resampling_rate']:>6.1%} "
            f"{r['accepted_per_round']:>7.2f} {r['drafts_per_batch']:>8.2f} {r['formula_bits_per_draft']:>11.1f} "
            f"{r['formula_bits_per_token']:>9.1f} {r['wire_bytes_per_token']:>9.1f} "
            f"{r['link_latency_ms_per_token']:>11.1f} {r['link_tokens_per_s']:>10.2f} "
            f"{r['link_latency_ms_per_token_parallel_verify']:>9.1f} {r['tokens_per_s']:>14.2f}"
        )
    return "\n".join(lines)


def main_run(args) -> int:
    from bench.prompts import wiki_prompts
    from sqs_models.registry import load_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        draft, target = "tiny", "tiny"
        settings = grid([0.0, 1.0], [2, 8], [0.02], [0.001])
        prompts, max_new = wiki_prompts(1), 16
    else:
        draft, target = args.draft_model, args.target_model
        settings = grid(args.temperatures, args.ks, args.betas, args.etas, baselines=not args.no_baselines,
                        alpha=args.alpha, ell=args.ell, budget_bits=args.budget_bits)
        prompts, max_new = wiki_prompts(args.prompts), args.max_new_tokens
    results = run(settings, prompts, draft, target, max_new, max_draft_len=args.draft_len, seed=args.seed,
                  show_progress=not args.no_progress)
    vocab = load_model(draft, role="draft").vocab_size
    rows = [row(r, draft, target, vocab, len(prompts)) for r in results]
    add_link_columns(rows, args.link_rate, args.link_rtt_ms)
    write_csv(rows, out / "results.csv")
    write_sweep(rows, out / "link_sweep.csv")
    headline = f"{args.link_rate / 1e6:g} Mbit/s, {args.link_rtt_ms:g} ms RTT"
    files = plot(rows, out, headline)
    print(f"draft {draft}, target {target}, vocab {vocab}, {len(prompts)} prompt(s) x {max_new} new tokens; "
          f"link columns: analytic at {headline} from measured compute and wire bytes; pv = what-if with a "
          f"verify pass costing one cloud-only step")
    print(format_headline(rows))
    print(f"wrote {out / 'results.csv'}, {out / 'link_sweep.csv'}, " + ", ".join(str(f) for f in files))
    return 0


def main_report(args) -> int:
    """Rebuild link_sweep.csv, the link columns and the plots from an existing results.csv."""
    out = Path(args.results)
    rows = list(csv.DictReader(open(out / "results.csv")))
    add_link_columns(rows, args.link_rate, args.link_rtt_ms)
    write_csv(rows, out / "results.csv")
    write_sweep(rows, out / "link_sweep.csv")
    files = plot(rows, out, f"{args.link_rate / 1e6:g} Mbit/s, {args.link_rtt_ms:g} ms RTT")
    for r in rows:  # numbers as read back from CSV are strings
        for key in ("temperature", "acceptance_rate", "resampling_rate", "accepted_per_round", "drafts_per_batch",
                    "formula_bits_per_draft", "formula_bits_per_token", "wire_bytes_per_token", "tokens_per_s"):
            r[key] = float(r[key])
    print(format_headline(rows))
    print("wrote " + ", ".join(str(f) for f in [out / "results.csv", out / "link_sweep.csv", *files]))
    return 0
