"""Codec microbenchmark: time and bits per draft token for every scheme, one table.

Edge = sparsify + quantize + sample + pack; cloud = unpack + rebuild q_hat. Distributions are
Zipf-like next-token distributions over the whole vocabulary (ranks randomly permuted, exponent
drawn per position so both peaked and flat contexts occur). Bits: the paper's formula, the honest
count (sum of log2 of the packed radices, token index included), and the real packed bytes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from common import batch_format
from common.schemes import Scheme, SchemeConfig, describe, draw


@dataclass
class CodecRow:
    vocab: int
    scheme: str
    k: str
    mean_support: float
    edge_us: float
    cloud_us: float
    formula_bits: float
    honest_bits: float
    packed_bits_per_draft: float
    payload_bytes_per_batch: float


def zipf_dists(vocab: int, n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, vocab + 1, dtype=np.float64)
    out = []
    for _ in range(n):
        s = rng.uniform(1.05, 2.5)  # 1.05: flat, uncertain context; 2.5: one dominant token
        w = ranks**-s
        q = np.empty(vocab)
        q[rng.permutation(vocab)] = w / w.sum()
        out.append(q)
    return out


def bench_scheme(dists: list[np.ndarray], cfg: SchemeConfig, batch: int = 8, beta: float | None = None) -> CodecRow:
    rng = np.random.default_rng(1)
    edge_s = cloud_s = 0.0
    formula = honest = packed_bits = payload = 0.0
    supports = []
    n_batches = len(dists) // batch
    batch_format.pack([draw(describe(q, cfg, beta=beta), cfg.ell, rng) for q in dists[:batch]], cfg)  # warm-up
    for b in range(n_batches):
        qs = dists[b * batch : (b + 1) * batch]
        t0 = time.perf_counter()
        drafts = [draw(describe(q, cfg, beta=beta), cfg.ell, rng) for q in qs]
        packed = batch_format.pack(drafts, cfg)
        t1 = time.perf_counter()
        decoded = batch_format.unpack(len(drafts), packed.payload, packed.raw, cfg)
        t2 = time.perf_counter()
        if [d.token for d in decoded] != [d.token for d in drafts]:
            raise AssertionError("round trip mismatch")
        edge_s += t1 - t0
        cloud_s += t2 - t1
        formula += packed.formula_bits
        honest += packed.honest_bits
        packed_bits += packed.packed_bits
        payload += packed.payload_bytes
        supports += [d.support.size for d in drafts]
    n = n_batches * batch
    k_label = str(cfg.k) if cfg.scheme in (Scheme.TOPK, Scheme.FP16_TOPK) else (f"beta={beta}" if beta else "-")
    return CodecRow(
        cfg.vocab_size, cfg.scheme.value + ("+zd" if cfg.drop_zeros else ""), k_label, float(np.mean(supports)),
        edge_s / n * 1e6, cloud_s / n * 1e6, formula / n, honest / n, packed_bits / n, payload / n_batches,
    )


def run(vocabs=(50257, 151936), ks=(1, 4, 16, 64), betas=(0.01, 0.001), n: int = 64) -> list[CodecRow]:
    rows = []
    for v in vocabs:
        dists = zipf_dists(v, n)
        for k in ks:
            rows.append(bench_scheme(dists, SchemeConfig(Scheme.TOPK, v, k=k)))
            if k > 1:
                rows.append(bench_scheme(dists, SchemeConfig(Scheme.TOPK, v, k=k, drop_zeros=True)))
        for beta in betas:
            rows.append(bench_scheme(dists, SchemeConfig(Scheme.CONFORMAL, v), beta=beta))
            rows.append(bench_scheme(dists, SchemeConfig(Scheme.CONFORMAL, v, drop_zeros=True), beta=beta))
        rows.append(bench_scheme(dists[:16], SchemeConfig(Scheme.DENSE, v)))
        rows.append(bench_scheme(dists[:16], SchemeConfig(Scheme.DENSE, v, drop_zeros=True)))
        rows.append(bench_scheme(dists, SchemeConfig(Scheme.TOKEN, v)))
        rows.append(bench_scheme(dists, SchemeConfig(Scheme.FP16_TOPK, v, k=16)))
        rows.append(bench_scheme(dists[:16], SchemeConfig(Scheme.FP32, v)))
    return rows


def format_table(rows: list[CodecRow]) -> str:
    head = (f"{'V':>7} {'scheme':<15} {'K':<11} {'mean K':>8} {'edge us':>9} {'cloud us':>9} "
            f"{'formula b':>10} {'honest b':>10} {'packed b':>10} {'bytes/batch8':>12}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.vocab:>7} {r.scheme:<15} {r.k:<11} {r.mean_support:>8.1f} {r.edge_us:>9.0f} {r.cloud_us:>9.0f} "
            f"{r.formula_bits:>10.1f} {r.honest_bits:>10.1f} {r.packed_bits_per_draft:>10.1f} "
            f"{r.payload_bytes_per_batch:>12.1f}"
        )
    lines.append("edge = sparsify+quantize+sample+pack per draft; cloud = unpack+rebuild per draft; bits per draft; "
                 "honest = sum log2 packed radices (token index included); packed = ceil over the batch of 8, /8")
    return "\n".join(lines)
