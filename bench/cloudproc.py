"""Running the two sides on one machine for benchmarks: a sqs-cloud process on its own CPUs, the
edge (this process) on the others, and adding up generation statistics."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from cloud.health import NotServing, wait_serving
from common.stats import GenerationStats


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def split_cpus() -> tuple[set[int], set[int]]:
    """(edge cpus, cloud cpus): halves of this process's CPUs, so that on one machine the two
    sides do not fight over cores (co-located torch processes spinning on the same cores run
    several times slower than either alone; on separate machines each has its own)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return set(cpus), set(cpus)
    half = len(cpus) // 2
    return set(cpus[:half]), set(cpus[half:])


def pin_edge(cpus: set[int]) -> None:
    import torch

    os.sched_setaffinity(0, cpus)
    torch.set_num_threads(len(cpus))


def start_cloud(model: str, port: int, cpus: set[int] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cloud", "--model", model, "--port", str(port), "--metrics-port", "0",
           "--host", "127.0.0.1", "--log-level", "WARNING"]
    if cpus:
        cmd += ["--torch-threads", str(len(cpus))]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
    )
    try:
        wait_serving(f"127.0.0.1:{port}", 300, process=proc)
    except NotServing as exc:
        if proc.poll() is None:
            proc.kill()
        raise RuntimeError(f"{exc}; stderr: {proc.stderr.read()[-500:]}") from None
    return proc


def merge_stats(acc: GenerationStats, s: GenerationStats) -> None:
    for f in ("rounds", "drafted", "accepted", "resampled", "bonus", "generated", "formula_bits", "honest_bits",
              "uplink_payload_bytes", "uplink_message_bytes", "uplink_wire_bytes", "downlink_wire_bytes",
              "setup_wire_bytes", "wall_s", "reopens"):
        setattr(acc, f, getattr(acc, f) + getattr(s, f))
    for k, v in s.latency_ms.items():
        acc.latency_ms[k] += v
