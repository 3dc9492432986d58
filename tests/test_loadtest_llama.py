"""sqs-loadtest's llama-server rows say what ran and what it cost: the llama-server process's CPU per
committed token, its pid and arguments per level, its version and note for the run. Needs the built
llama-server (`make llama-server`); skips without it, or fails under SQS_REQUIRE_INTEGRATION=1."""

from __future__ import annotations

import csv
import json

import pytest


@pytest.fixture(scope="module")
def binary(llama_server_binary: str) -> str:
    return llama_server_binary


def test_llama_server_rows_charge_its_process_cpu_to_tokens(binary, tmp_path):
    from loadtest.runner import LoadTestConfig, run_load_test

    cfg = LoadTestConfig(clients=(2,), requests=6, duration_s=60, warmup=1, max_new_tokens=16, draft_len=4,
                         progress=False, llama_server=True, llama_server_binary=binary, llama_server_threads=1)
    report = run_load_test(cfg)
    assert "error" not in report.llama_server and report.llama_server["version"]
    assert "note" in report.llama_server
    (lv,) = report.llama_levels
    s = lv.summary()
    assert s["ok"] == 6 and s["tokens"] == 6 * 16
    server, cpu = s["server"], s["cloud_cpu"]
    assert server["args"][0] == binary and "--parallel" in server["args"]
    assert server["args"][server["args"].index("--parallel") + 1] == "2"
    assert cpu["pids"] == [server["pid"]] and cpu["processes"] == ["llama-server"] and cpu["reason"] == ""
    assert cpu["scope"] == "llama-server process" and cpu["cpu_s"] >= 0
    assert s["cloud_cpu_ms_per_token"] == pytest.approx(cpu["cpu_s"] * 1e3 / s["tokens"])
    assert len(s["loadavg_at_start"]) == 3
    # our level beside it: the in-process cloud, this process
    ours = report.levels[0].summary()
    assert ours["cloud_cpu"]["scope"] == "process incl. edges" and ours["cloud_cpu_ms_per_token"] > 0

    report.write_json(tmp_path / "r.json")
    report.write_csv(tmp_path / "r.csv")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["llama_server"]["levels"][0]["server"]["pid"] == server["pid"]
    rows = [r for r in csv.DictReader((tmp_path / "r.csv").open()) if r["system"] == "llama-server"]
    assert len(rows) == 6 and all(r["cloud_cpu_scope"] == "llama-server process" for r in rows)
    assert all(r["server"].startswith(f"llama-server {report.llama_server['version']}: --model ") for r in rows)
    assert all(r["cloud_ms_cpu_per_token"] != "" for r in rows)
    assert "cloud_cpu_ms/tok" in report.table().splitlines()[-2]  # the llama-server table's head
