"""sqs-loadtest: the runner in-process with the tiny pair, error accounting, interrupts, loopback-only."""

from __future__ import annotations

import csv
import json
import os
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
    assert len(s["loadavg_at_start"]) == 3


def _check_cpu(s: dict, scope: str, short: bool = False) -> None:
    """The cloud CPU per committed token of a level whose cloud is this process (a short level may
    take less than one clock tick of CPU: then only >= 0)."""
    cpu = s["cloud_cpu"]
    assert cpu["pids"] == [os.getpid()] and cpu["scope"] == scope and cpu["reason"] == ""
    assert cpu["cpu_s"] >= 0 if short else cpu["cpu_s"] > 0
    assert s["cloud_cpu_ms_per_token"] == pytest.approx(cpu["cpu_s"] * 1e3 / s["tokens"])
    assert s["cloud_cpu_cores"] == pytest.approx(cpu["cpu_s"] / s["wall_s"])


def test_levels_1_and_4_in_process_cloud(tmp_path):
    """No --cloud: the runner starts its own verifier; N = 1 then N = 4, outputs written and parseable."""
    cfg = LoadTestConfig(clients=(1, 4), requests=6, duration_s=60, warmup=1, **FAST)
    report = run_load_test(cfg)
    assert report.cloud_in_process and report.cloud_address.startswith("127.0.0.1:")
    assert report.target_model == "tiny" and report.draft_model == "tiny" and not report.interrupted
    assert [lv.clients for lv in report.levels] == [1, 4]
    for lv in report.levels:
        _check_level(lv.summary(), lv.clients, 6, 8)
        _check_cpu(lv.summary(), "process incl. edges")
        # in-process, the cloud's figure holds the edges: none of their own
        assert lv.summary()["edge_cpu"] is None and lv.summary()["edge_cpu_cores"] is None
    assert {r.client for r in report.levels[1].records} <= set(range(4))

    report.write_json(tmp_path / "r.json")
    report.write_csv(tmp_path / "r.csv")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["tool"] == "sqs-loadtest" and data["config"]["clients"] == [1, 4]
    assert [lv["clients"] for lv in data["levels"]] == [1, 4]
    for lv in data["levels"]:
        _check_level(lv, lv["clients"], 6, 8)
        _check_cpu(lv, "process incl. edges")
    # what ran: the commit, the CPU, the cloud's engine and batching as it reports them, the edges' plan
    assert data["run"]["cpu_flags"] and data["run"]["cpu_fingerprint"] and "commit" in data["run"]
    cloud = data["cloud"]
    assert cloud["batching"] == {"on": True, "window_ms": 2.0, "max_rows": 64, "rejoin": 1.0,
                                 "source": "reported by the cloud"}
    assert cloud["engine"] == "torch" and cloud["engine_source"] == "reported by the cloud"  # asked: auto
    assert cloud["weight_type"] == cloud["dtype"] == "float32" and cloud["workers"] == cfg.cloud_workers
    assert cloud["cpu"]["pids"] == [os.getpid()] and data["config"]["batch_window_ms"] == 2.0
    edge = data["edge"]
    assert edge["engine"] in ("torch", "llama") and edge["options"]["draft_len"] == 4
    assert edge["plan"]["draft_len"] == 4 and edge["plan"]["scheme"] == "topk" and edge["plan"]["pipeline"] is True
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert len(rows) == 12
    assert {r["clients"] for r in rows} == {"1", "4"}
    assert all(r["status"] == "OK" and r["ok"] == "1" and int(r["tokens"]) == 8 for r in rows)
    assert all(float(r["ttft_ms"]) <= float(r["latency_ms"]) for r in rows)
    assert sorted(int(r["request"]) for r in rows if r["clients"] == "4") == list(range(6))
    assert len({r["seed"] for r in rows}) == 12  # every request has its own seed
    by_level = {lv["clients"]: lv for lv in data["levels"]}
    for r in rows:
        assert float(r["cloud_ms_cpu_per_token"]) == pytest.approx(
            by_level[int(r["clients"])]["cloud_cpu_ms_per_token"], abs=1e-3)
        assert r["cloud_cpu_scope"] == "process incl. edges" and r["cpu_flags"] == data["run"]["cpu_flags"]
        assert r["commit"] == (data["run"]["commit"] or "") and r["loadavg_1m"]
        assert "batching window 2 ms" in r["server"] and "engine torch float32 (reported by the cloud)" in r["server"]
    assert "clients" in report.table() and len(report.table().splitlines()) == 3
    assert "cloud_cpu_ms/tok" in report.table() and "process incl. edges" in report.header()


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
    # nothing listens there: no process to charge, the record says why
    assert s["cloud_cpu_ms_per_token"] is None and s["cloud_cpu"]["cpu_s"] is None
    assert "no TCP socket listens" in s["cloud_cpu"]["reason"] and "--cloud-pid" in s["cloud_cpu"]["reason"]


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
    if s["cancelled"]:  # their CPU was spent, their tokens are not counted: no figure
        assert s["cloud_cpu_ms_per_token"] is None and "cancelled" in s["cloud_cpu"]["reason"]


def test_cli_against_a_running_cloud(cloud, tmp_path, capsys):
    out = tmp_path / "o.json"
    rc = cli_run(["--cloud", cloud.address, "--clients", "2", "--requests", "2", "--warmup", "0",
                  "--max-new-tokens", "4", "--no-progress", "--json-out", str(out), "--csv-out", str(tmp_path / "o.csv")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "p95_ms" in printed and "external" in printed
    data = json.loads(out.read_text())
    assert data["levels"][0]["ok"] == 2
    assert len(list(csv.DictReader((tmp_path / "o.csv").open()))) == 2
    # the cloud fixture serves in this process: the listener of its port is this pid
    cpu = data["cloud"]["cpu"]
    assert cpu["pids"] == [os.getpid()] and cpu["source"] == f"listener of port {cloud.port}"
    _check_cpu(data["levels"][0], "cloud process", short=True)
    # an external cloud's batching is not reported, and this process's batch options never reached it
    assert data["cloud"]["batching"]["on"] is None and data["cloud"]["engine"] is None
    assert data["config"]["batch_window_ms"] is None and data["config"]["cloud_workers"] is None
    assert "batching unknown" in printed


def test_cli_reads_the_external_clouds_engine_and_batching_from_its_metrics(cloud, tmp_path, free_port):
    """--cloud-metrics: what the cloud runs comes from its sqs_cloud_info, as sqs-cloud --metrics-port serves it."""
    from prometheus_client import start_http_server

    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=cloud.running.metrics.registry)
    before = cloud.running.verifier.pass_stats()
    try:
        out = tmp_path / "o.json"
        assert cli_run(["--cloud", cloud.address, "--cloud-metrics", f"127.0.0.1:{port}", "--clients", "2",
                        "--requests", "4", "--warmup", "0", "--max-new-tokens", "4", "--no-progress",
                        "--json-out", str(out), "--csv-out", str(tmp_path / "o.csv")]) == 0
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    after = cloud.running.verifier.pass_stats()
    data = json.loads(out.read_text())
    # the level's passes, read from the cloud's sqs_pass_* histograms: the verifier's own counts
    b = data["levels"][0]["cloud_batching"]
    assert b["source"] == "the sqs_pass_* histograms of --cloud-metrics"
    assert (b["passes"], b["rounds"], b["rows"]) == (after.passes - before.passes, after.items - before.items,
                                                      after.rows - before.rows)
    assert b["passes"] > 0 and b["sessions_per_pass"] == pytest.approx(b["rounds"] / b["passes"])
    c = data["cloud"]
    assert c["engine"] == "torch" and c["engine_source"] == "reported by the cloud" and c["weight_type"]
    assert c["batching"] == {"on": True, "window_ms": 2.0, "max_rows": 64, "rejoin": 1.0,
                                 "source": "reported by the cloud"}
    assert c["cloud_reports"] == {f"127.0.0.1:{port}": cloud.running.info.labels()}
    row = next(csv.DictReader((tmp_path / "o.csv").open()))
    assert "engine torch" in row["server"] and "batching window 2 ms" in row["server"]


def test_cli_cloud_pid_is_summed_and_checked(cloud, tmp_path):
    """--cloud-pid names the cloud's processes (here this one, twice over: a set)."""
    out = tmp_path / "o.json"
    assert cli_run(["--cloud", cloud.address, "--cloud-pid", str(os.getpid()), str(os.getpid()), "--clients", "1",
                    "--requests", "2", "--warmup", "0", "--max-new-tokens", "4", "--no-progress",
                    "--json-out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["cloud"]["cpu"]["source"] == "--cloud-pid" and data["cloud"]["cpu"]["pids"] == [os.getpid()]
    _check_cpu(data["levels"][0], "cloud process", short=True)
    # an external cloud: the edges (this process) are measured apart, over the same phase
    s = data["levels"][0]
    edge = s["edge_cpu"]
    assert edge["pids"] == [os.getpid()] and edge["scope"] == "this process (the edges)" and edge["reason"] == ""
    assert s["edge_cpu_cores"] == pytest.approx(edge["cpu_s"] / s["wall_s"])


def test_scraped_pass_counts_are_refused_across_a_restart_or_a_silent_replica(free_port):
    from loadtest.replica_counts import pass_totals
    from loadtest.runner import _scraped_batching_delta

    before = {"passes": 10.0, "rounds": 30.0, "rows": 90.0}
    assert _scraped_batching_delta(before, {"passes": 14.0, "rounds": 38.0, "rows": 110.0}) == {
        "passes": 4, "rounds": 8, "rows": 20, "sessions_per_pass": 2.0,
        "source": "the sqs_pass_* histograms of --cloud-metrics"}
    assert _scraped_batching_delta(before, {"passes": 2.0, "rounds": 3.0, "rows": 9.0}) is None  # restarted
    assert _scraped_batching_delta(None, before) is None and _scraped_batching_delta(before, None) is None
    assert pass_totals([f"127.0.0.1:{free_port()}"], timeout_s=0.5) is None  # nothing listens there


def test_a_replica_killed_mid_answer_is_a_failed_scrape_not_a_crash():
    """The soak kills replicas while the meter scrapes them: an answer cut short (IncompleteRead, an
    HTTPException rather than an OSError) once ended a soak with a traceback. It must count as a
    failed scrape like a refused connection."""
    import socket
    import threading

    from loadtest.replica_counts import ReplicaMeter, scrape

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    port = srv.getsockname()[1]

    def cut_short():
        for _ in range(3):
            conn, _ = srv.accept()
            conn.recv(4096)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4285\r\n\r\nsqs_batches_total 3\n")
            conn.close()

    threading.Thread(target=cut_short, daemon=True).start()
    try:
        with pytest.raises(OSError, match="IncompleteRead"):
            scrape(f"127.0.0.1:{port}", timeout_s=2.0)
        meter = ReplicaMeter([f"127.0.0.1:{port}"])
        meter.sample()
        meter.sample()
        assert meter._failed[0] == 2
    finally:
        srv.close()


def test_batching_off_is_recorded_as_applied():
    report = run_load_test(LoadTestConfig(clients=(1,), requests=2, warmup=0, batch_window_ms=0, **FAST))
    c = report.to_dict()["cloud"]
    b = c["batching"]
    assert b["on"] is False and b["window_ms"] is None and b["max_rows"] is None
    assert b["source"] == c["engine_source"] == "reported by the cloud" and c["engine"] == "torch"
    assert "cloud batching off" in report.header() and report.levels[0].summary()["cloud_batching"] is None


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
    assert cli_run(["--cloud-pid", "1", "--no-progress"]) == 2  # an in-process cloud is this process
    assert cli_run(["--cloud", "127.0.0.1:1", "--cloud-pid", "0", "--no-progress"]) == 2
    assert cli_run(["--clients", "0", "--no-progress"]) == 2
    assert cli_run(["--requests", "0", "--no-progress"]) == 2
    assert all(line.startswith("sqs-loadtest: error:") for line in capsys.readouterr().err.strip().splitlines())
