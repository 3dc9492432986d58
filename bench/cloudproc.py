"""Running the two sides on one machine for benchmarks: a sqs-cloud process on its own CPUs, the
edge (this process) on the others, and adding up generation statistics."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

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


def start_cloud(model: str, port: int, cpus: set[int] | None = None, engine: str = "auto",
                log_path: str | Path | None = None, threads: int | None = None,
                timeout_s: float = 600.0) -> subprocess.Popen:
    """A sqs-cloud process serving ``model`` on 127.0.0.1:``port``, pinned to ``cpus``, once it serves.

    threads: torch threads (default: one per CPU of ``cpus``). log_path: its stderr at INFO level
    goes there (``cloud_engine(log_path)`` reads which engine and dtype it loaded); without it,
    warnings go to an unnamed temporary file, never to a pipe nobody reads (a chatty cloud would
    fill it and stall). Raises RuntimeError with the last line the cloud wrote when it does not serve.
    """
    cmd = [sys.executable, "-m", "cloud", "--model", model, "--port", str(port), "--metrics-port", "0",
           "--host", "127.0.0.1", "--engine", engine, "--log-level", "INFO" if log_path else "WARNING"]
    threads = threads or (len(cpus) if cpus else 0)
    if threads:
        cmd += ["--torch-threads", str(threads)]
    log = open(log_path, "w+") if log_path else tempfile.TemporaryFile("w+")
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, text=True,
                                preexec_fn=child_preexec(cpus))
        try:
            wait_serving(f"127.0.0.1:{port}", timeout_s, process=proc)
        except NotServing as exc:
            stop_process(proc)
            log.seek(0)
            lines = [ln for ln in log.read().splitlines() if ln.strip()]
            raise RuntimeError(f"{exc}: {lines[-1] if lines else '(no output)'}") from None
    finally:
        log.close()  # the child writes through its own descriptor
    return proc


def stop_process(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM, then SIGKILL after grace_s; returns once the process is gone."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(grace_s)


def child_preexec(cpus: set[int] | None = None):
    """preexec_fn of a benchmark's server process: pinned to `cpus`, and (Linux) sent SIGTERM
    when the benchmark dies (killed by a timeout, say), so no orphaned server keeps cores busy."""

    def setup() -> None:
        try:
            import ctypes
            import signal

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
        if cpus:
            os.sched_setaffinity(0, cpus)

    return setup


def cloud_engine(log_path: str | Path) -> str:
    """The engine line the cloud logged at start ("torch bfloat16 (measured), 1 threads", ...)."""
    for line in Path(log_path).read_text(errors="replace").splitlines():
        if " engine " in line and "loaded in" in line:
            return line.split(": engine ", 1)[-1].rsplit(", loaded in", 1)[0].strip()
    return "unknown"


def merge_stats(acc: GenerationStats, s: GenerationStats) -> None:
    for f in ("rounds", "drafted", "accepted", "resampled", "bonus", "generated", "formula_bits", "honest_bits",
              "uplink_payload_bytes", "uplink_message_bytes", "uplink_wire_bytes", "downlink_wire_bytes",
              "setup_wire_bytes", "wall_s", "reopens"):
        setattr(acc, f, getattr(acc, f) + getattr(s, f))
    for k, v in s.latency_ms.items():
        acc.latency_ms[k] += v
