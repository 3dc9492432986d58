"""sqs-bench: the quick paper run writes the promised CSV columns and plots; the codec bench round-trips."""

from __future__ import annotations

import csv
import json
import re
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
def test_quick_run_writes_results_and_plots_and_resumes(tmp_path):
    cmd = [sys.executable, "-m", "bench.cli", "run", "--quick", "--no-progress", "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert set(DESIGN_COLUMNS) <= set(rows[0])
    records = [json.loads(line) for line in open(tmp_path / "runs.jsonl")]
    assert all(r["commit"] and r["loadavg_1m"] is not None and r["cpu_flags"] for r in records)
    # 2 temperatures x (cloud-only + 4 baselines + 2 K-SQS + 1 C-SQS + invariant + the planner on K-SQS and on invariant)
    assert len(rows) == 22
    schemes = {r["scheme"] for r in rows}
    assert schemes == {"none", "fp32", "fp16-topk", "dense", "token", "topk", "conformal", "invariant"}
    for r in rows:
        assert int(r["generated"]) == 32 and int(r["prompts"]) == 2  # 1 code + 1 prose prompt x 16 tokens
        assert r["cpu_flags"] and r["target_engine"] and r["draft_engine"]
        if r["scheme"] == "none":
            assert int(r["drafted"]) == 0 and float(r["formula_bits_per_draft"]) == 0
            assert r["link_cost_model"] == "streaming"
            # one RTT per generation, not per round (streamed plain: one round per generation)
            if int(r["rounds"]) > int(r["prompts"]):
                assert float(r["model_ms_per_token"]) < float(r["model_ms_per_token_round_trip"])
            else:
                assert float(r["model_ms_per_token"]) == pytest.approx(float(r["model_ms_per_token_round_trip"]))
        else:
            assert int(r["accepted"]) <= int(r["tested"]) <= int(r["drafted"])
        if r["drafted"] != "0" and r["max_draft_len"] != "auto":
            lo, hi = float(r["position_acceptance_lo"]), float(r["position_acceptance_hi"])
            assert lo - 1e-9 <= float(r["position_acceptance_rate"]) <= hi + 1e-9
            assert int(r["max_drafts_in_round"]) <= 8
        if r["scheme"] == "conformal":
            assert r["final_beta"] != "" and r["theorem2_held"] == "2/2"
    for png in ("latency_resampling_vs_temperature.png", "bits_vs_acceptance.png", "link_sweep.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sweep = list(csv.DictReader(open(tmp_path / "link_sweep.csv")))
    assert len(sweep) == 22 * 6 * 4
    assert len(list(csv.DictReader(open(tmp_path / "prompts.csv")))) == 44
    assert "results.csv" in out.stdout and "cloud-only" in out.stdout

    # A second run refuses to overwrite; --resume finds every generation done and reports the same.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "--resume" in again.stdout
    before = (tmp_path / "results.csv").read_text()
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "0 to run" in resumed.stdout and (tmp_path / "results.csv").read_text() == before


def test_codec_bench_rows_are_consistent():
    dists = zipf_dists(2000, 16)
    row = bench_scheme(dists, SchemeConfig("topk", 2000, k=8))
    assert row.mean_support == 8
    assert row.formula_bits <= row.honest_bits <= row.packed_bits_per_draft + 1e-9
    zd = bench_scheme(dists, SchemeConfig("dense", 2000, drop_zeros=True))
    dense = bench_scheme(dists, SchemeConfig("dense", 2000))
    assert zd.honest_bits < dense.honest_bits  # zero-drop: same q_hat, fewer bits


def test_a_cloud_that_cannot_serve_fails_with_its_last_line():
    from bench.cloudproc import free_port, start_cloud

    with pytest.raises(RuntimeError) as exc:
        start_cloud("no-such-model", free_port(), timeout_s=120)
    assert "\n" not in str(exc.value) and str(exc.value).strip()


def test_sampling_bench_times_each_operation_and_its_baseline_is_the_whole_race(capsys):
    """`sqs-bench sampling` prints one row per operation; its baseline (the replaced dense path) must
    be the race over all V uniforms of its Philox stream, or the side-by-side compares other work."""
    import numpy as np

    from bench.cli import main as bench_main
    from bench.sampling_bench import whole_vocabulary_race

    for i, p in enumerate(zipf_dists(3000, 6, seed=4)):
        key = np.array([7, ((i & 0xFFFF_FFFF) << 24) | 0x6DB1E5], dtype=np.uint64)
        u = np.random.Generator(np.random.Philox(key=key)).random(p.size)
        assert whole_vocabulary_race(p, 7, i) == int(np.argmin(-np.log1p(-u) / p))
    with pytest.raises(SystemExit) as done:
        bench_main(["sampling", "--vocab", "3000", "--n", "2", "--repeats", "1"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for what in ("target_probs T=1", "target_probs T=0.7", "gumbel_token (lazy blocks)",
                 "whole-vocabulary race (one Philox stream)"):
        assert re.search(re.escape(what) + r"\s+3000\s+\d+\.\d{3}\n", out), what
