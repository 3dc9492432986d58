"""sqs-loadtest through Envoy: the cloud CPU column charges the replicas (found as the listeners of
their --cloud-metrics ports), never the router in front of them. Needs Envoy (deploy/envoy/
requirements.txt); skips without it, or fails under SQS_REQUIRE_INTEGRATION=1."""

from __future__ import annotations

import pytest

from loadtest.replicas import EnvoyUnavailable, ReplicaSet, envoy_binary
from tests.conftest import require_tool


@pytest.fixture(scope="module")
def replicas():
    try:
        envoy_binary()
    except EnvoyUnavailable as exc:
        require_tool(str(exc))
    with ReplicaSet(2, model="tiny", log_level="INFO") as rs:
        yield rs


@pytest.mark.slow
def test_the_cloud_cpu_is_the_replicas_not_envoy(replicas):
    from loadtest.runner import LoadTestConfig, run_load_test

    base = dict(clients=(2,), requests=4, duration_s=60, warmup=0, cloud=replicas.address, max_new_tokens=8,
                draft_len=4, progress=False)
    report = run_load_test(LoadTestConfig(**base, cloud_metrics=tuple(replicas.metrics_addresses)))
    pids = sorted(r.proc.pid for r in replicas.replicas)
    cpu = report.cloud_info["cpu"]
    assert cpu["pids"] == pids and cpu["source"] == "listeners of --cloud-metrics ports", cpu
    s = report.levels[0].summary()
    assert s["ok"] == 4 and s["cloud_cpu"]["pids"] == pids and s["cloud_cpu"]["cpu_s"] >= 0
    assert s["cloud_cpu"]["scope"] == "cloud processes" and s["cloud_cpu_ms_per_token"] is not None

    alone = run_load_test(LoadTestConfig(**base))  # only Envoy's address: its listener is the router
    s = alone.levels[0].summary()
    assert s["ok"] == 4 and s["cloud_cpu_ms_per_token"] is None
    assert "envoy" in s["cloud_cpu"]["reason"] and "--cloud-pid" in s["cloud_cpu"]["reason"]
    assert "envoy" in alone.header()
