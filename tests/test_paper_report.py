"""bench/paper_report.py: the link pricing (streaming cloud-only vs per-round speculation) and the
bootstrap intervals over prompts, on hand-made records."""

from __future__ import annotations

import numpy as np
import pytest

from bench.paper_report import aggregate, latency_ratio, priced_ms, ratio_ci


def record(scheme: str, trace: list[list], kind: str = "code", index: int = 0, **extra) -> dict:
    gen = sum(t[7] + 1 + t[8] for t in trace)
    rec = {
        "ctx": {"draft_model": "d", "target_model": "t", "max_new_tokens": gen, "seed": 0},
        "setting": {"scheme": scheme, "temperature": 0.0, "k": 8, "beta0": 0.01, "eta": 0.001, "alpha": 0.0005,
                    "ell": 100, "budget_bits": 5000.0, "draft_len": 0 if scheme == "none" else 8},
        "label": scheme, "kind": kind, "index": index, "trace": trace, "generated": gen, "rounds": len(trace),
        "drafted": sum(t[6] for t in trace), "accepted": sum(t[7] for t in trace),
        "tested": sum(t[7] + (t[7] < t[6]) for t in trace), "resampled": sum(t[7] < t[6] for t in trace),
        "bonus": sum(t[7] == t[6] for t in trace), "plain": sum(t[8] for t in trace),
        "zero_draft_rounds": sum(t[6] == 0 for t in trace), "max_drafts_in_round": max(t[6] for t in trace),
        "formula_bits": 0.0, "honest_bits": 100.0 * sum(t[6] for t in trace), "payload_bytes": 0,
        "uplink_wire_bytes": sum(t[4] for t in trace), "downlink_wire_bytes": sum(t[5] for t in trace),
        "draft_ms": 0.0, "uplink_ms": 0.0, "verify_ms": sum(t[3] for t in trace), "downlink_ms": 0.0,
        "total_ms": sum(t[0] for t in trace), "wall_s": 1.0, "final_beta": None, "counted_positions": 0,
        "mean_dropped_mass": None, "theorem2_bound": None, "accepted_by_position": [], "tested_by_position": [],
        "verify_step_ratio": 1.3, "vocab_size": 10, "draft_engine_detail": "x", "target_engine_detail": "y",
        "cpu_flags": "avx2",
    }
    rec.update(extra)
    return rec


# trace row: total, uplink, downlink, verify (ms); up bytes, down bytes; drafted, accepted, plain
def test_cloud_only_is_priced_as_a_stream_with_one_rtt():
    rec = record("none", [[101.0, 0.5, 0.5, 100.0, 125, 125, 0, 0, 0]] * 10)  # 10 tokens, 100 ms of cloud each
    rate, rtt = 1e6, 50.0
    # one RTT, ten steps, the first request and every reply on the wire
    assert priced_ms(rec, rate, rtt) == pytest.approx(50 + 1000 + (125 + 10 * 125) * 8e3 / rate)
    per_round = priced_ms(rec, rate, rtt, streaming=False)
    assert per_round == pytest.approx(10 * (100 + 50 + 250 * 8e3 / rate))


def test_speculative_rounds_replace_network_time_and_what_if_replaces_verify():
    rec = record("topk", [[300.0, 10.0, 10.0, 150.0, 1000, 125, 4, 2, 0]])
    assert priced_ms(rec, 1e6, 20.0) == pytest.approx(300 - 20 + 20 + 1125 * 8e3 / 1e6)
    assert priced_ms(rec, 1e6, 20.0, step_ms=100.0) == pytest.approx(300 - 20 + 20 + 9.0 - 150 + 100)


def test_ratio_ci_brackets_the_ratio_of_sums_and_is_degenerate_for_identical_prompts():
    rng = np.random.default_rng(1)
    num, den = rng.integers(0, 10, 16), rng.integers(10, 20, 16)
    lo, hi = ratio_ci(num, den)
    assert lo <= num.sum() / den.sum() <= hi and hi - lo > 0
    assert ratio_ci([3] * 8, [4] * 8) == pytest.approx((0.75, 0.75))
    # paired: the same prompts in both samples cancel exactly
    assert ratio_ci(num, den, num, den) == pytest.approx((1.0, 1.0))


def test_latency_ratio_pairs_prompts_and_aggregate_counts_positions():
    fast = [record("conformal", [[100.0, 0, 0, 80.0, 100, 50, 4, 4, 0]], index=i) for i in range(4)]
    slow = [record("topk", [[100.0 + 10 * i, 0, 0, 80.0, 100, 50, 4, 1, 0]], index=i) for i in range(4)]
    point, lo, hi = latency_ratio(fast, slow, 1e6, 0.0)
    assert point < 1 and lo <= point <= hi < 1
    row = aggregate(slow, 1e6, 0.0, None)
    assert row["tested"] == 8 and row["accepted"] == 4 and row["position_acceptance_rate"] == 0.5
    assert row["acceptance_rate"] == 0.25  # accepted / drafted shifts with the batch length; the position rate does not
    assert row["honest_bits_per_token"] == pytest.approx(1600 / 8)
