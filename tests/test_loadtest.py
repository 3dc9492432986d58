"""sqs-loadtest: the runner in-process with the tiny pair, error accounting, interrupts, loopback-only."""

from __future__ import annotations

import csv
import json
import threading
import time

import pytest

import loadtest.runner
from loadtest.cli import run as cli_run
from loadtest.runner import LoadTestConfig, check_loopback, run_load_test

FAST = dict(max_new_tokens=8, draft_len=4, progress=False)


def _check_level(s: dict, clients: int, requests: int, max_new_tokens: int) -> None:
    assert s["clients"] == clients
    assert s["requests"] == s["ok"] == requests
    assert s["errors"] == 0 and s["errors_by_status"] == {} and s["cancelled"] == 0
    assert s["stopped_by"] == "requests"
    assert s["warmup_requests"] == clients and s["warmup_errors"] == 0
    lat, ttft = s["latency_ms"], s["ttft_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert 0 < ttft["mean"] <= lat["mean"] and ttft["p95"] <= lat["max"]
    assert s["tokens"] == requests * max_new_tokens  # tiny has no EOS
    assert s["wall_s"] > 0 and s["tokens_per_s"] > 0 and s["requests_per_s"] > 0
    assert s["tokens_per_s"] == pytest.approx(s["tokens"] / s["wall_s"])
    assert 0 <= s["accepted"] <= s["drafted"] and s["drafted"] > 0
    assert 0.0 <= s["acceptance_rate"] <= 1.0


def test_levels_1_and_4_in_process_cloud(tmp_path):
    """No --cloud: the runner starts its own verifier; N = 1 then N = 4, outputs written and parseable."""
    cfg = LoadTestConfig(clients=(1, 4), requests=6, duration_s=60, warmup=1, **FAST)
    report = run_load_test(cfg)
    assert report.cloud_in_process and report.cloud_address.startswith("127.0.0.1:")
    assert report.target_model == "tiny" and report.draft_model == "tiny" and not report.interrupted
    assert [lv.clients for lv in report.levels] == [1, 4]
    for lv in report.levels:
        _check_level(lv.summary(), lv.clients, 6, 8)
    assert {r.client for r in report.levels[1].records} <= set(range(4))

    report.write_json(tmp_path / "r.json")
    report.write_csv(tmp_path / "r.csv")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["tool"] == "sqs-loadtest" and data["config"]["clients"] == [1, 4]
    assert [lv["clients"] for lv in data["levels"]] == [1, 4]
    for lv in data["levels"]:
        _check_level(lv, lv["clients"], 6, 8)
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert len(rows) == 12
    assert {r["clients"] for r in rows} == {"1", "4"}
    assert all(r["status"] == "OK" and r["ok"] == "1" and int(r["tokens"]) == 8 for r in rows)
    assert all(float(r["ttft_ms"]) <= float(r["latency_ms"]) for r in rows)
    assert sorted(int(r["request"]) for r in rows if r["clients"] == "4") == list(range(6))
    assert len({r["seed"] for r in rows}) == 12  # every request has its own seed
    assert "clients" in report.table() and len(report.table().splitlines()) == 3


@pytest.mark.timeout(15)  # does not hang: every request fails within its 0.5 s connect timeout
def test_dead_port_counts_errors_by_status_and_does_not_hang(free_port):
    cfg = LoadTestConfig(clients=(2,), requests=3, duration_s=20, warmup=1, cloud=f"127.0.0.1:{free_port()}",
                         connect_timeout_s=0.5, retries=0, **FAST)
    report = run_load_test(cfg)
    s = report.levels[0].summary()
    assert s["requests"] == 3 and s["ok"] == 0 and s["errors"] == 3
    assert set(s["errors_by_status"]) <= {"UNAVAILABLE", "DEADLINE_EXCEEDED"}
    assert sum(s["errors_by_status"].values()) == 3
    assert s["warmup_errors"] == 2
    assert s["tokens"] == 0 and s["latency_ms"]["p50"] is None and s["acceptance_rate"] is None
    assert all(r.error for r in report.levels[0].records)
    assert "DEADLINE_EXCEEDED" in report.table() or "UNAVAILABLE" in report.table()


def test_stop_ends_the_level_promptly(cloud):
    """What Ctrl-C does: no new request starts, in-flight ones are cancelled, the report is kept."""
    stop = threading.Event()
    cfg = LoadTestConfig(clients=(2, 4), requests=100_000, duration_s=60, warmup=0, cloud=cloud.address,
                         max_new_tokens=64, draft_len=4, progress=False)
    batches = cloud.running.metrics.registry.get_sample_value
    before = batches("sqs_batches_total", {"sparsifier": "topk"}) or 0.0
    box: list = []
    t = threading.Thread(target=lambda: box.append(run_load_test(cfg, stop=stop)), daemon=True)
    t.start()
    deadline = time.monotonic() + 60
    while (batches("sqs_batches_total", {"sparsifier": "topk"}) or 0.0) <= before:  # the level is running
        assert t.is_alive() and time.monotonic() < deadline, "the N = 2 level verified no batch"
        time.sleep(0.01)
    stop.set()
    t.join(15)
    assert not t.is_alive() and box
    report = box[0]
    assert report.interrupted and len(report.levels) == 1  # the N = 4 level never started
    s = report.levels[0].summary()
    assert s["stopped_by"] == "interrupted" and s["errors"] == 0


def test_cli_against_a_running_cloud(cloud, tmp_path, capsys):
    out = tmp_path / "o.json"
    rc = cli_run(["--cloud", cloud.address, "--clients", "2", "--requests", "2", "--warmup", "0",
                  "--max-new-tokens", "4", "--no-progress", "--json-out", str(out), "--csv-out", str(tmp_path / "o.csv")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "p95_ms" in printed and "external" in printed
    assert json.loads(out.read_text())["levels"][0]["ok"] == 2
    assert len(list(csv.DictReader((tmp_path / "o.csv").open()))) == 2


@pytest.mark.parametrize("target", ["127.0.0.1:50051", "127.9.8.7:1", "localhost:50051", "[::1]:50051"])
def test_loopback_targets_are_accepted(target):
    assert check_loopback(target) == target
    assert check_loopback("::1:50051") == "[::1]:50051"


@pytest.mark.parametrize("target", ["10.0.0.5:50051", "example.com:50051", "0.0.0.0:50051", "[::ffff:127.0.0.1]:1",
                                    "192.168.1.2:443", "[2001:db8::1]:50051"])
def test_cli_refuses_a_non_loopback_cloud(target, capsys, monkeypatch):
    def must_not_run(*a, **kw):
        raise AssertionError("refused too late: the load test started")

    monkeypatch.setattr(loadtest.runner, "run_load_test", must_not_run)
    assert cli_run(["--cloud", target, "--no-progress"]) == 2  # refused before any model is loaded
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a loopback address" in err and err.startswith("sqs-loadtest: error:")


def test_cli_usage_errors(capsys):
    assert cli_run(["--cloud", "127.0.0.1", "--no-progress"]) == 2  # no port
    assert cli_run(["--clients", "0", "--no-progress"]) == 2
    assert cli_run(["--requests", "0", "--no-progress"]) == 2
    assert all(line.startswith("sqs-loadtest: error:") for line in capsys.readouterr().err.strip().splitlines())
