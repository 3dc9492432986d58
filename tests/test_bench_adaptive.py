"""sqs-bench adaptive end to end on the tiny pair, one small cell: the CSV a reader relies on."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from bench.adaptive import COLUMNS, POLICIES


@pytest.mark.slow
def test_adaptive_bench_writes_every_policy_per_cell(tmp_path):
    cmd = [sys.executable, "-m", "bench.cli", "adaptive", "--out", str(tmp_path), "--draft-model", "tiny",
           "--target-model", "tiny", "--temperatures", "1", "--rates", "1e6", "--rtts", "50", "--prompts", "1",
           "--max-new-tokens", "6", "--no-progress"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "adaptive.csv")))
    assert rows and list(rows[0]) == COLUMNS
    assert {r["policy"] for r in rows} == {p.name for p in POLICIES}
    assert {r["prompt_kind"] for r in rows} == {"code", "prose"}
    for r in rows:
        assert r["link"] == "analytic" and float(r["tokens_per_s"]) > 0 and int(r["generated"]) == 6
        if r["policy"] == "cloud-only":
            assert float(r["mean_draft_len"]) == 0.0
        if r["policy"].startswith("fixed-L2"):
            assert 0 < float(r["mean_draft_len"]) <= 2
    assert (tmp_path / "adaptive.png").stat().st_size > 0
    assert "best fixed" in out.stdout and "verify(9)/step ratio" in out.stdout
