"""Whether llama.cpp's extra weight buffer types may be used for a GGUF on this CPU: decided by a
child process that tries, so a crash never takes one of our processes down.

    ok, why = extra_bufts_ok(path)        # probed once per (file, CPU flags, llama-cpp-python version)

llama.cpp's "extra buffer types" repack weights at load for the CPU's fastest kernels (the
runtime repack of Q4_0/Q4_K/IQ4_NL in groups of rows, AMX tiles on CPUs with AMX). On a Xeon with
AMX (amx_bf16 amx_tile avx512_bf16) llama-cpp-python 0.3.36 built with GGML_NATIVE dies by
SIGSEGV in the first decode of the PyPI Q4_K_M file, and llama-server dies the same way with its
defaults (docs/DESIGN.md section 10 saw SIGILL on another AMX VM); ``arch_prctl(
ARCH_REQ_XCOMP_PERM, XTILEDATA)`` does not help, ``use_extra_bufts = False`` (llama-server:
``--no-repack``) does. The cause is ggml's AMX buffer type (a SIGILL at ``tilezero`` in
ggml_backend_amx_mul_mat on the VM of docs/RESULTS.md section 0i), so the project now builds
llama.cpp without AMX (scripts/llama_build_flags.sh) and the repack, which runs without it, stays
on. The probe stays: another CPU, library or flag may crash again. So before a process of ours
loads a GGUF with them, a child process
(:func:`sqs_models.llama_lm.probe_decode`) loads it with them and decodes a prefill and passes of
1, 4, 9 and 17 rows; if the child dies by a signal, fails or hangs past the timeout, the extra buffer types
stay off for that file. The decision is kept in a JSON file (``llama-probe.json`` in the state
directory, see :func:`sqs_models.pass_table.state_dir`), keyed by the file (path, size, mtime), a
hash of the CPU flags and the llama-cpp-python version, and logged in one line when made.

Override: ``SQS_LLAMA_EXTRA_BUFTS=0`` or ``=1`` skips the probe (read here, where the decision is
made, and nowhere else); ``LlamaModel(..., extra_bufts=False/True)`` decides for one model.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Sequence

__all__ = ["ENV", "PROBE_ROWS", "probe_key", "extra_bufts_ok", "run_probe", "describe_exit"]

log = logging.getLogger("sqs.models")

ENV = "SQS_LLAMA_EXTRA_BUFTS"
PROBE_ROWS = (1, 4, 9, 17)  # passes the child decodes after a 32-token prefill
PROBE_TIMEOUT_S = 300.0
_lock = threading.Lock()  # one probe at a time in a process, and one writer of the cache file


def probe_key(path: Path) -> str:
    """(file, CPU flags, llama-cpp-python build) as one string: a decision holds for this key only."""
    from .pass_table import cpu_fingerprint, llama_build

    st = path.stat()
    return (f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|cpu:{cpu_fingerprint()}"
            f"|llama-cpp-python:{llama_build()}")


def describe_exit(rc: int | None) -> str:
    """"killed by SIGSEGV", "exit 1", "timed out"."""
    if rc is None:
        return "timed out"
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit {rc}"


def run_probe(path: Path, command: Sequence[str] | None = None, timeout_s: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """Run the child on ``path``: (True, "decoded ...") when it exits 0, else (False, why).

    command: the child's argv (tests hand in one that crashes); default llama_lm.probe_decode."""
    cmd = list(command) if command is not None else [
        sys.executable, "-c", f"import sys; from sqs_models.llama_lm import probe_decode; probe_decode(sys.argv[1], "
                              f"{PROBE_ROWS!r})", str(path)]
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout_s,
                              cwd=Path(__file__).resolve().parents[1])
    except subprocess.TimeoutExpired:
        return False, f"probe {describe_exit(None)} after {timeout_s:g} s"
    if proc.returncode == 0:
        last = (proc.stdout.strip().splitlines() or ["ok"])[-1]
        return True, last
    tail = (proc.stderr.strip().splitlines() or [""])[-1][:160] if proc.returncode > 0 else ""  # a signal: its name says it
    return False, f"probe {describe_exit(proc.returncode)}" + (f": {tail}" if tail else "")


def _read(cache: Path) -> dict:
    try:
        return json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}


def extra_bufts_ok(path: str | Path, *, cache: Path | None = None, command: Sequence[str] | None = None,
                   timeout_s: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """(use extra buffer types?, why) for the GGUF at ``path``; probes once per key (see the module doc)."""
    forced = os.environ.get(ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1", f"{ENV}={forced}"
    from .pass_table import state_dir

    path = Path(path)
    cache = cache or state_dir() / "llama-probe.json"
    key = probe_key(path)
    with _lock:
        known = _read(cache).get(key)
        if known is not None:
            return bool(known["extra_bufts"]), f"{known['why']} (probed before, {cache})"
        ok, why = run_probe(path, command, timeout_s)
        # entries of files that are gone (tests' temporary GGUFs) are dropped as the file is rewritten
        table = {k: v for k, v in _read(cache).items() if Path(k.split("|", 1)[0]).exists()}
        table[key] = {"extra_bufts": ok, "why": why}
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=1))
        tmp.replace(cache)
    log.info("llama.cpp extra buffer types (repack/AMX) for %s: %s (%s)", path.name,
             "on" if ok else "OFF: loading with them crashes or fails here", why)
    return ok, why
