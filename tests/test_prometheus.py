"""A real Prometheus scraping a real sqs-cloud and a real `sqs-edge serve` (tiny models, loopback).

Uses the shipped deploy/prometheus/prometheus.yml with its targets moved to loopback ports and a
1 s scrape interval, runs generations (directly against the cloud on the library path, and through
the edge's HTTP API), waits for the sqs_* series to appear in Prometheus, then evaluates every
PromQL expression of the Grafana dashboard for both processes. Also runs the compose file's cloud
and edge healthcheck commands against the live processes. Needs /usr/bin/prometheus
(scripts/install_test_deps.sh installs Debian's package; see tests/conftest.py for when it skips).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from cloud.health import check

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"
RATE_WINDOW = "1m"  # stands in for Grafana's $__rate_interval
# Process start-up: about 10 s on 2 idle cores (torch import); generous for a loaded machine.
STARTUP_S = 90


def stop_all(procs, timeout: float = 8.0) -> None:
    """SIGTERM every process at once, then wait (kill what outlives the timeout)."""
    running = [p for p in procs if p.poll() is None]
    for p in running:
        p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in running:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def http_json(url: str, data: dict | None = None, timeout: float = 10.0) -> tuple[int, dict]:
    body = json.dumps(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def wait_until(predicate, timeout: float, what: str, procs: dict[str, subprocess.Popen], interval: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        for name, p in procs.items():
            if p.poll() is not None:
                pytest.fail(f"{name} exited with {p.returncode} while waiting for {what}:\n{_tail(p)}")
        try:
            last = predicate()
            if last:
                return last
        except (OSError, urllib.error.URLError) as exc:
            last = exc
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def _tail(p: subprocess.Popen) -> str:
    log = getattr(p, "log_path", None)
    return Path(log).read_text()[-3000:] if log and Path(log).exists() else ""


def compose_healthcheck(service: str, port: int) -> list[str]:
    """The compose healthcheck of `service` as a command for this machine, aimed at `port` instead of
    the fixed container port: `sqs-cloud` is this venv's, `python` this interpreter."""
    test = yaml.safe_load(COMPOSE.read_text())["services"][service]["healthcheck"]["test"]
    assert test[0] == "CMD", test
    exe = {"python": sys.executable, "sqs-cloud": str(Path(sys.executable).with_name("sqs-cloud"))}[test[1]]
    container_port = {"cloud": 50051, "edge": 8080}[service]
    args = [a.replace(f"127.0.0.1:{container_port}", f"127.0.0.1:{port}") for a in test[2:]]
    if "--tls-ca" in args:  # the containers' certificate paths: this loopback cloud is plaintext (the
        i = args.index("--tls-ca")  # stack test in test_deploy.py runs the check with TLS)
        del args[i:i + 2]
    return [exe, *args]


def scrape_config(tmp: Path, cloud_metrics: int, edge_port: int, prom_port: int) -> Path:
    """deploy/prometheus/prometheus.yml with loopback targets and a 1 s scrape interval."""
    cfg = yaml.safe_load(PROMETHEUS_YML.read_text())
    cfg["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    moved = {"cloud:9101": f"127.0.0.1:{cloud_metrics}", "edge:8080": f"127.0.0.1:{edge_port}",
             "localhost:9090": f"127.0.0.1:{prom_port}"}
    jobs = []
    for job in cfg["scrape_configs"]:
        if job["job_name"] == "envoy":
            continue  # no Envoy here (tests/test_envoy_replicas.py runs one)
        for dns in job.pop("dns_sd_configs", []):  # the cloud replicas by DNS: the one cloud here
            job.setdefault("static_configs", []).append({"targets": [f"{n}:{dns['port']}" for n in dns["names"]]})
        for sc in job["static_configs"]:
            sc["targets"] = [moved[t] for t in sc["targets"]]
        jobs.append(job)
    cfg["scrape_configs"] = jobs
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def spawn(name: str, cmd: list[str], tmp: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    log = tmp / f"{name}.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SQS_")}
    full_env.update(env or {})
    proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    proc.log_path = str(log)  # type: ignore[attr-defined]
    return proc


@pytest.mark.slow
def test_prometheus_scrapes_cloud_and_edge_and_dashboard_queries_work(tmp_path, prometheus, free_port, run_generation,
                                                                     dashboard, dashboard_exprs):
    grpc_port, metrics_port, edge_port, prom_port = (free_port() for _ in range(4))
    procs: dict[str, subprocess.Popen] = {}
    try:
        procs["sqs-cloud"] = spawn("cloud", [sys.executable, "-m", "cloud", "--model", "tiny", "--host", "127.0.0.1",
                                             "--port", str(grpc_port), "--metrics-port", str(metrics_port)], tmp_path)
        procs["sqs-edge"] = spawn("edge", [sys.executable, "-m", "edge", "serve", "--cloud", f"127.0.0.1:{grpc_port}",
                                           "--draft-model", "tiny", "--host", "127.0.0.1", "--port", str(edge_port)],
                                  tmp_path)
        config = scrape_config(tmp_path, metrics_port, edge_port, prom_port)
        procs["prometheus"] = spawn("prometheus", [
            prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"], tmp_path)
        prom = f"http://127.0.0.1:{prom_port}"

        def query(expr: str) -> list[dict]:
            url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
            status, body = http_json(url)
            assert status == 200 and body.get("status") == "success", (expr, status, body)
            return body["data"]["result"]

        # Wait cheaply (in-process probes), then run the compose healthchecks once each, as compose
        # would run them (ports moved by env): spawning a Python per poll would starve the startup.
        wait_until(lambda: check(f"127.0.0.1:{grpc_port}") is None, STARTUP_S, "sqs-cloud to serve", procs)
        wait_until(lambda: _http_ok(f"http://127.0.0.1:{edge_port}/healthz"), STARTUP_S, "sqs-edge /healthz", procs)
        wait_until(lambda: _http_ok(f"{prom}/-/ready"), STARTUP_S, "prometheus to be ready", procs)
        for service, port in (("cloud", grpc_port), ("edge", edge_port)):
            hc = subprocess.run(compose_healthcheck(service, port), env={**os.environ, "SQS_EDGE_PORT": str(edge_port)},
                                capture_output=True, text=True, timeout=30)
            assert hc.returncode == 0, f"the compose healthcheck of {service} failed: {hc.stderr[-2000:]}"

        def generate_once() -> None:
            run_generation(f"127.0.0.1:{grpc_port}", "Hello", max_new_tokens=12)
            # Fixed plans: the auto plan may rightly decode plainly on the tiny pair, leaving no drafts to count.
            for body in ({"prompt": "Hello", "max_new_tokens": 12, "draft_len": 4},
                         {"prompt": "Hello", "max_new_tokens": 12, "sparsifier": "conformal", "temperature": 1.0,
                          "draft_len": 4}):
                status, out = http_json(f"http://127.0.0.1:{edge_port}/v1/generate", body, timeout=30)
                assert status == 200 and len(out["token_ids"]) == 12, (status, out)

        generate_once()
        for job in ("cloud", "edge"):
            wait_until(lambda: _positive(query(f'sum(sqs_batches_total{{job="{job}"}})')), 30,
                       f"sqs_batches_total from {job}", procs)
            wait_until(lambda: _positive(query(f'sum(sqs_batch_latency_seconds_bucket{{job="{job}"}})')), 30,
                       f"sqs_batch_latency_seconds_bucket from {job}", procs)

        # Counters appear with their first value, so rate() needs a later increase: generate again.
        # (The series already have a sample; the waits below cover the next scrape's lag.)
        time.sleep(1.0)
        generate_once()

        for job in ("edge", "cloud"):
            for expr in dashboard_exprs:
                promql = (expr.replace("$__rate_interval", RATE_WINDOW).replace("$job", job)
                          .replace("$sparsifier", ".*"))
                # The cloud never sets the conformal threshold (the edge's controller owns it).
                must_have_data = not (job == "cloud" and "sqs_conformal_threshold" in expr)
                if must_have_data:
                    wait_until(lambda: query(promql), 10, f"data for {promql!r}", procs)
                else:
                    query(promql)  # still valid PromQL
        # Every part on the edge; the cloud observes only its verify time.
        parts = {job: {r["metric"]["part"] for r in query(
            f'histogram_quantile(0.95, sum by (le, part) (rate(sqs_batch_latency_seconds_bucket{{job="{job}"}}'
            f'[{RATE_WINDOW}])))')} for job in ("edge", "cloud")}
        assert parts == {"edge": {"draft", "uplink", "verify", "downlink", "total"}, "cloud": {"verify"}}
        # The dashboard's sparsifier variable (label_values) as Prometheus answers it.
        status, body = http_json(f"{prom}/api/v1/label/sparsifier/values?"
                                 + urllib.parse.urlencode({"match[]": 'sqs_batches_total{job="edge"}'}))
        assert status == 200 and {"topk", "conformal"} <= set(body["data"])
        assert any("sparsifier" in json.dumps(v) for v in dashboard["templating"]["list"])
        # What the cloud runs, as applied: one info sample from the sqs-cloud process (torch for tiny,
        # batching at the default 2 ms window), none from the edge (it shares the exporter, never sets it).
        info = query("sqs_cloud_info")
        assert [r["metric"]["job"] for r in info] == ["cloud"] and info[0]["value"][1] == "1", info
        labels = info[0]["metric"]
        assert labels["model"] == "tiny" and labels["engine"] == "torch" and labels["weight_type"], labels
        assert (labels["batching"], labels["batch_window_ms"], labels["batch_max_rows"]) == ("on", "2", "64"), labels
    finally:
        stop_all(list(procs.values()))


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (OSError, urllib.error.URLError):
        return False


def _positive(result: list[dict]) -> bool:
    return bool(result) and all(float(r["value"][1]) > 0 for r in result)
