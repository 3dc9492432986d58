"""A shaped edge <-> cloud link out of network namespaces, veth pairs, tbf and the delaying relay.

    sqs-edge-S  [veth-e 10.201.0.1/30] ---- [10.201.0.2/30 veth-le]  sqs-link-S  [veth-lc 10.201.0.5/30] ---- [10.201.0.6/30 veth-c]  sqs-cloud-S
                                             tbf downlink rate (egress)             tbf uplink rate (egress)
                                             linksim.relay 10.201.0.2:PORT -> 10.201.0.6:PORT, --delay-ms each way

S is a suffix unique to the run, so parallel runs do not collide. All addresses exist only inside
the namespaces made here (the veths are created directly inside them, never in the host namespace).
The edge connects to the relay in sqs-link (10.201.0.2), which forwards to sqs-cloud (10.201.0.6).
tbf sits on the egress of the link namespace's two interfaces: toward the cloud (uplink) and toward
the edge (downlink). Delay comes from the relay (the kernel here has no netem).

Needs root. Everything is torn down by NetnsLink.close() (processes killed, namespaces deleted).
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cloud.health import NotServing, Probe, wait_serving

REPO = Path(__file__).resolve().parent.parent

EDGE_IP, LINK_EDGE_IP = "10.201.0.1", "10.201.0.2"  # 10.201.0.0/30
LINK_CLOUD_IP, CLOUD_IP = "10.201.0.5", "10.201.0.6"  # 10.201.0.4/30
PREFIX = 30
EDGE_IF, LINK_EDGE_IF, LINK_CLOUD_IF, CLOUD_IF = "veth-e", "veth-le", "veth-lc", "veth-c"
MIN_BURST = 1600  # bytes: one full Ethernet frame (1514) must fit in the bucket or tbf drops it

_UNITS = {  # tc's units: "kbit" = 1000 bit/s, "kbps" = 1000 *bytes*/s, "Kibit" = 1024 bit/s
    "bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
    "kibit": 1024, "mibit": 1024**2, "gibit": 1024**3,
    "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9,
    "kibps": 8 * 1024, "mibps": 8 * 1024**2,
}


class NetnsError(RuntimeError):
    """A one-line reason the topology could not be built or used."""


def parse_rate(s: str | float | int) -> int:
    """tc-style rate ('256kbit', '2mbit', '1Mbit', '32kbps', 256000) -> bits per second."""
    if isinstance(s, (int, float)):
        return int(s)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", s)
    if not m:
        raise ValueError(f"not a rate: {s!r}")
    unit = m.group(2).lower() or "bit"
    if unit not in _UNITS:
        raise ValueError(f"unknown rate unit in {s!r} (use bit, kbit, mbit, gbit, kbps, ...)")
    bits = float(m.group(1)) * _UNITS[unit]
    if bits < 8000:
        raise ValueError(f"rate {s!r} is below 8 kbit/s")
    return int(bits)


def auto_burst(rate_bps: int) -> int:
    """Smallest sensible bucket: one full frame, or 1 ms of traffic at fast rates."""
    return max(MIN_BURST, math.ceil(rate_bps / 8 / 1000))


def default_python() -> str:
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


@dataclass
class LinkConfig:
    uplink_rate: str = "256kbit"
    downlink_rate: str = "2mbit"
    delay_ms: float = 10.0  # one-way, each direction, in the relay
    jitter_ms: float = 0.0
    loss: float = 0.0  # relay: probability a chunk is held back as if retransmitted
    loss_penalty_ms: float = 200.0
    uplink_delay_ms: float | None = None
    downlink_delay_ms: float | None = None
    burst: int | None = None  # bytes; None: auto_burst(rate)
    tbf_latency_ms: float = 500.0  # how long a packet may wait in the tbf queue before it is dropped
    port: int = 50051
    suffix: str | None = None

    @property
    def uplink_bps(self) -> int:
        return parse_rate(self.uplink_rate)

    @property
    def downlink_bps(self) -> int:
        return parse_rate(self.downlink_rate)


@dataclass
class EdgeRun:
    result: dict  # the edge's --json object
    interfaces: dict  # counter deltas over the edge run: {"edge/veth-e": {...}, ...}
    qdisc: dict  # tbf stat deltas: {"uplink": {...}, "downlink": {...}}
    relay: dict  # relay byte deltas over the run
    wall_s: float
    command: list[str] = field(default_factory=list)
    stderr: str = ""


def _held(relay_stats: dict) -> int:
    return sum(c.get("held_back_chunks", 0) for c in relay_stats.get("per_connection", []))


def _run(cmd: list[str], check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        msg = (p.stderr or p.stdout).strip().splitlines()
        raise NetnsError(f"{' '.join(cmd)}: {msg[-1] if msg else f'exit status {p.returncode}'}")
    return p


class NetnsLink:
    """Build with setup(), start_relay(), start_cloud(); run_edge() as often as wanted; close()."""

    def __init__(self, config: LinkConfig = LinkConfig(), python: str | None = None) -> None:
        self.config = config
        self.python = python or default_python()
        suffix = config.suffix or f"{os.getpid()}-{secrets.token_hex(3)}"
        self.ns = {role: f"sqs-{role}-{suffix}" for role in ("edge", "link", "cloud")}
        self._made: list[str] = []
        self._procs: dict[str, subprocess.Popen] = {}
        self._tmp = tempfile.TemporaryDirectory(prefix="sqs-netns-")
        self.workdir = Path(self._tmp.name)
        self.relay_stats = self.workdir / "relay.json"
        self.uplink_bps = config.uplink_bps
        self.downlink_bps = config.downlink_bps

    # --- topology -------------------------------------------------------------------------------

    def setup(self) -> "NetnsLink":
        if os.geteuid() != 0:
            raise NetnsError("must run as root (network namespaces, veth and tc need CAP_NET_ADMIN)")
        ns = self.ns
        for name in ns.values():
            p = _run(["ip", "netns", "add", name], check=False)
            if p.returncode != 0:
                raise NetnsError(f"cannot create network namespace {name}: {p.stderr.strip() or 'ip netns add failed'}")
            self._made.append(name)
        for name in ns.values():
            # No IPv6 (router solicitations, MLD) so interface counters only carry the experiment.
            _run(["ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                  "net.ipv6.conf.default.disable_ipv6=1"], check=False)
            _run(["ip", "-n", name, "link", "set", "lo", "up"])
        # veths created directly inside the namespaces: nothing appears in the host namespace.
        _run(["ip", "-n", ns["edge"], "link", "add", EDGE_IF, "type", "veth", "peer", "name", LINK_EDGE_IF,
              "netns", ns["link"]])
        _run(["ip", "-n", ns["link"], "link", "add", LINK_CLOUD_IF, "type", "veth", "peer", "name", CLOUD_IF,
              "netns", ns["cloud"]])
        for name, dev, ip in ((ns["edge"], EDGE_IF, EDGE_IP), (ns["link"], LINK_EDGE_IF, LINK_EDGE_IP),
                              (ns["link"], LINK_CLOUD_IF, LINK_CLOUD_IP), (ns["cloud"], CLOUD_IF, CLOUD_IP)):
            _run(["ip", "-n", name, "addr", "add", f"{ip}/{PREFIX}", "dev", dev])
            _run(["ip", "-n", name, "link", "set", dev, "up"])
        self.set_rates(self.config.uplink_rate, self.config.downlink_rate)
        return self

    def set_rates(self, uplink_rate: str | int | None = None, downlink_rate: str | int | None = None) -> None:
        """(Re)install tbf on the link namespace's egress: toward the cloud (uplink), toward the edge."""
        for dev, rate in ((LINK_CLOUD_IF, uplink_rate), (LINK_EDGE_IF, downlink_rate)):
            if rate is None:
                continue
            bps = parse_rate(rate)
            burst = self.config.burst or auto_burst(bps)
            _run(["tc", "-n", self.ns["link"], "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{bps}bit",
                  "burst", str(burst), "latency", f"{self.config.tbf_latency_ms:g}ms"])
            if dev == LINK_CLOUD_IF:
                self.uplink_bps = bps
            else:
                self.downlink_bps = bps

    def burst_bytes(self, direction: str = "uplink") -> int:
        bps = self.uplink_bps if direction == "uplink" else self.downlink_bps
        return self.config.burst or auto_burst(bps)

    # --- processes ------------------------------------------------------------------------------

    def _env(self) -> dict:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        return env

    def _spawn(self, role: str, ns: str, args: list[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{role}.log", "w")
        p = subprocess.Popen(["ip", "netns", "exec", ns, self.python, *args], cwd=REPO, env=self._env(),
                             stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._procs[role] = p
        return p

    def log_tail(self, role: str, n: int = 5) -> str:
        try:
            lines = (self.workdir / f"{role}.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(lines[-n:])

    def _wait_until(self, role: str, ready: Callable[[], bool], timeout_s: float) -> None:
        p = self._procs[role]
        deadline = time.monotonic() + timeout_s
        while not ready():
            if p.poll() is not None:
                raise NetnsError(f"{role} exited with {p.returncode}: {self.log_tail(role)}")
            if time.monotonic() >= deadline:
                raise NetnsError(f"{role} not ready within {timeout_s:.0f} s: {self.log_tail(role)}")
            time.sleep(0.05)

    def _check_in(self, role: str) -> Probe:
        """`sqs-cloud check` run inside the `role` namespace (this process's namespace cannot reach it)."""
        def probe(address: str, timeout_s: float) -> str | None:
            p = subprocess.run(["ip", "netns", "exec", self.ns[role], self.python, "-m", "cloud", "check", address,
                                "--timeout", f"{timeout_s:g}"], cwd=REPO, env=self._env(), capture_output=True,
                               text=True, timeout=timeout_s + 60)
            return None if p.returncode == 0 else (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1]

        return probe

    def start_relay(self, timeout_s: float = 30) -> None:
        c = self.config
        args = ["-m", "linksim.relay", "--listen", f"{LINK_EDGE_IP}:{c.port}", "--target", f"{CLOUD_IP}:{c.port}",
                "--delay-ms", f"{c.delay_ms:g}", "--jitter-ms", f"{c.jitter_ms:g}", "--stats-file",
                str(self.relay_stats), "--quiet"]
        if c.loss:
            args += ["--loss", f"{c.loss:g}", "--loss-penalty-ms", f"{c.loss_penalty_ms:g}"]
        if c.uplink_delay_ms is not None:
            args += ["--uplink-delay-ms", f"{c.uplink_delay_ms:g}"]
        if c.downlink_delay_ms is not None:
            args += ["--downlink-delay-ms", f"{c.downlink_delay_ms:g}"]
        self._spawn("relay", self.ns["link"], args)
        self._wait_until("relay", self.relay_stats.exists, timeout_s)  # written once the relay listens

    def start_cloud(self, model: str = "tiny", timeout_s: float = 120, extra: list[str] = ()) -> None:
        """Start sqs-cloud in its namespace; return once its health check says SERVING."""
        # --insecure: plaintext between namespaces of this machine, on purpose (the link measures SQS's own
        # bytes; sqs-bench tls measures what TLS adds).
        proc = self._spawn("cloud", self.ns["cloud"], ["-m", "cloud", "--model", model, "--host", CLOUD_IP, "--port",
                                                       str(self.config.port), "--metrics-port", "0", "--insecure",
                                                       *extra])
        # Probed over the cloud namespace's own address (its loopback): no byte on the measured veths.
        # One Python per probe, so once a second: faster polling would slow the cloud's start-up.
        try:
            wait_serving(f"{CLOUD_IP}:{self.config.port}", timeout_s, process=proc, probe=self._check_in("cloud"),
                         interval_s=1.0)
        except NotServing as exc:
            raise NetnsError(f"{exc}; cloud log: {self.log_tail('cloud')}") from None

    # --- measurements ---------------------------------------------------------------------------

    def interfaces(self) -> dict:
        """{"edge/veth-e": {tx_bytes, rx_bytes, tx_packets, rx_packets, tx_dropped}, ...} (ip -s link)."""
        out = {}
        for role, dev in (("edge", EDGE_IF), ("link", LINK_EDGE_IF), ("link", LINK_CLOUD_IF), ("cloud", CLOUD_IF)):
            j = json.loads(_run(["ip", "-n", self.ns[role], "-s", "-j", "link", "show", "dev", dev]).stdout)[0]
            s = j["stats64"]
            out[f"{role}/{dev}"] = {"tx_bytes": s["tx"]["bytes"], "rx_bytes": s["rx"]["bytes"],
                                    "tx_packets": s["tx"]["packets"], "rx_packets": s["rx"]["packets"],
                                    "tx_dropped": s["tx"]["dropped"]}
        return out

    def qdiscs(self) -> dict:
        """tbf stats (tc -s qdisc) of the uplink (toward the cloud) and downlink (toward the edge)."""
        out = {}
        for direction, dev in (("uplink", LINK_CLOUD_IF), ("downlink", LINK_EDGE_IF)):
            j = json.loads(_run(["tc", "-n", self.ns["link"], "-s", "-j", "qdisc", "show", "dev", dev]).stdout)
            q = next((q for q in j if q.get("kind") == "tbf"), {})
            opts = q.get("options", {})
            out[direction] = {"dev": dev, "rate_bps": int(opts.get("rate", 0)) * 8, "burst": opts.get("burst"),
                              "latency_us": opts.get("lat"),
                              **{k: q.get(k, 0) for k in ("bytes", "packets", "drops", "overlimits", "requeues")}}
        return out

    def relay_counts(self) -> dict:
        try:
            return json.loads(self.relay_stats.read_text())
        except (OSError, ValueError):
            return {"uplink_bytes": 0, "downlink_bytes": 0, "connections": 0, "open_connections": 0}

    def _settled_relay(self, before_conns: int, timeout_s: float = 5.0) -> dict:
        """Relay counters once the edge's connection(s) have closed (the relay writes them on close)."""
        deadline = time.monotonic() + timeout_s
        r = self.relay_counts()
        while time.monotonic() < deadline:
            r = self.relay_counts()
            if r.get("connections", 0) > before_conns and r.get("open_connections", 1) == 0:
                break
            time.sleep(0.05)
        return r

    def run_edge(self, edge_args: list[str], timeout_s: float = 120) -> EdgeRun:
        """One `python -m edge generate --cloud LINK:PORT ... --json` in the edge namespace."""
        cmd = [self.python, "-m", "edge", "generate", "--cloud", f"{LINK_EDGE_IP}:{self.config.port}", "--insecure",
               *edge_args, "--json"]
        if0, q0, r0 = self.interfaces(), self.qdiscs(), self.relay_counts()
        t0 = time.monotonic()
        try:
            p = subprocess.run(["ip", "netns", "exec", self.ns["edge"], *cmd], cwd=REPO, env=self._env(),
                               capture_output=True, text=True, timeout=timeout_s, start_new_session=True)
        except subprocess.TimeoutExpired as exc:
            raise NetnsError(f"edge did not finish within {timeout_s:.0f} s") from exc
        wall = time.monotonic() - t0
        if p.returncode != 0:
            err = p.stderr.strip().splitlines()
            raise NetnsError(f"edge exited with {p.returncode}: {err[-1] if err else ''}; "
                             f"cloud: {self.log_tail('cloud', 2)}; relay: {self.log_tail('relay', 2)}")
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        if not lines:
            raise NetnsError(f"edge printed no JSON: {p.stdout[-300:]!r}")
        result = json.loads(lines[-1])
        r1 = self._settled_relay(r0.get("connections", 0))
        if1, q1 = self.interfaces(), self.qdiscs()
        ifd = {k: {f: if1[k][f] - if0[k][f] for f in if1[k]} for k in if1}
        qd = {}
        for d in q1:
            qd[d] = {k: (q1[d][k] - q0[d][k] if k in ("bytes", "packets", "drops", "overlimits", "requeues")
                         else q1[d][k]) for k in q1[d]}
        relay = {"uplink_bytes": r1.get("uplink_bytes", 0) - r0.get("uplink_bytes", 0),
                 "downlink_bytes": r1.get("downlink_bytes", 0) - r0.get("downlink_bytes", 0),
                 "connections": r1.get("connections", 0) - r0.get("connections", 0),
                 "open_connections": r1.get("open_connections", 0),
                 "held_back_chunks": _held(r1) - _held(r0)}
        return EdgeRun(result, ifd, qd, relay, wall, cmd, p.stderr)

    # --- teardown -------------------------------------------------------------------------------

    def _ns_pids(self, name: str) -> list[int]:
        p = _run(["ip", "netns", "pids", name], check=False)
        return [int(x) for x in p.stdout.split() if x.isdigit()]

    def close(self) -> None:
        """Kill what we started (by pid), then any process left in our namespaces, then delete them."""
        for role, p in list(self._procs.items()):
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGTERM)
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
                except (OSError, subprocess.TimeoutExpired):
                    pass
        self._procs.clear()
        for name in self._made:
            for pid in self._ns_pids(name):  # only processes inside a namespace this object created
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        for name in reversed(self._made):
            for _ in range(20):
                if _run(["ip", "netns", "del", name], check=False).returncode == 0:
                    break
                time.sleep(0.1)
        self._made.clear()
        self._tmp.cleanup()

    def __enter__(self) -> "NetnsLink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def uplink_time_model(result: dict, rate_bps: int, delay_ms: float, burst: int, slack_bytes_per_round: int = 100
                      ) -> dict:
    """Bounds on the sum over rounds of uplink_ms from the edge's wire bytes and the link settings.

    Per round r with B_r wire bytes: the relay adds delay_ms, and tbf lets at most `burst` bytes pass
    at line rate before the rest goes at `rate`, so uplink_ms_r >= delay + max(0, B_r - burst) * 8 / rate.
    B_r may include up to slack_bytes_per_round of HTTP/2 control frames written after the message
    (WINDOW_UPDATE, PING ack), which the cloud's receive timestamp does not wait for. Summed:
        lower = rounds * delay + max(0, U - rounds * (burst + slack)) * 8 / rate
        nominal = rounds * delay + U * 8 / rate          (what a plain rate + delay model predicts)
    """
    rounds = result["rounds"]
    u = result["uplink_wire_bytes"]
    serial_ms = u * 8 / rate_bps * 1e3
    lower = rounds * delay_ms + max(0, u - rounds * (burst + slack_bytes_per_round)) * 8 / rate_bps * 1e3
    return {"rounds": rounds, "uplink_wire_bytes": u, "rate_bps": rate_bps, "delay_ms": delay_ms, "burst": burst,
            "serialization_ms": serial_ms, "nominal_ms": rounds * delay_ms + serial_ms, "lower_bound_ms": lower,
            "measured_ms": result["uplink_ms"]}
