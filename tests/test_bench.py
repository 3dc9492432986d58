"""sqs-bench: the quick paper run writes the promised CSV columns and plots; the codec bench round-trips."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from bench.codec_bench import bench_scheme, zipf_dists
from common.schemes import SchemeConfig

DESIGN_COLUMNS = (
    "scheme k beta0 eta alpha ell budget_bits temperature rounds generated drafted accepted resampled "
    "acceptance_rate resampling_rate formula_bits_per_draft wire_bytes_per_batch draft_ms uplink_ms verify_ms "
    "downlink_ms total_ms tokens_per_s draft_model target_model vocab_size"
).split()


@pytest.mark.slow
def test_quick_run_writes_results_and_plots(tmp_path):
    # A fixed plan: the grid compares descriptions, and the auto plan may decode the tiny pair plainly.
    out = subprocess.run([sys.executable, "-m", "bench.cli", "run", "--quick", "--no-progress", "--draft-len", "8",
                          "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert set(DESIGN_COLUMNS) <= set(rows[0])
    assert len(rows) == 16  # 2 temperatures x (5 baselines + 2 K-SQS + 1 C-SQS)
    schemes = {r["scheme"] for r in rows}
    assert schemes == {"none", "fp32", "fp16-topk", "dense", "token", "topk", "conformal"}
    for r in rows:
        assert int(r["generated"]) == 16
        if r["scheme"] == "none":
            assert int(r["drafted"]) == 0 and float(r["formula_bits_per_draft"]) == 0
        else:
            assert int(r["accepted"]) <= int(r["drafted"])
        if r["scheme"] == "conformal":
            assert float(r["mean_dropped_mass"]) <= float(r["theorem2_bound"])
    for png in ("latency_resampling_vs_temperature.png", "bits_vs_acceptance.png", "link_sweep.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sweep = list(csv.DictReader(open(tmp_path / "link_sweep.csv")))
    assert len(sweep) == 16 * 6 * 4
    assert "results.csv" in out.stdout and "cloud-only AR" in out.stdout


def test_codec_bench_rows_are_consistent():
    dists = zipf_dists(2000, 16)
    row = bench_scheme(dists, SchemeConfig("topk", 2000, k=8))
    assert row.mean_support == 8
    assert row.formula_bits <= row.honest_bits <= row.packed_bits_per_draft + 1e-9
    zd = bench_scheme(dists, SchemeConfig("dense", 2000, drop_zeros=True))
    dense = bench_scheme(dists, SchemeConfig("dense", 2000))
    assert zd.honest_bits < dense.honest_bits  # zero-drop: same q_hat, fewer bits
