"""The load test's configuration: LoadTestConfig (the generation options of edge/options.py plus the
load: levels, requests, duration, cloud), the built-in prompts and the loopback-only check."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from edge.options import GenerationOptions

DEFAULT_PROMPTS: tuple[str, ...] = (
    "def fibonacci(n):",
    "The quick brown fox",
    "import numpy as np\n",
    "class Stack:\n    def push(self, item):",
    "Once upon a time",
    "SELECT name FROM users WHERE",
    "for i in range(10):",
    "# Return the sum of a list\n",
)

_LOOPBACK_V4 = ipaddress.ip_network("127.0.0.0/8")
_LOOPBACK_V6 = ipaddress.ip_address("::1")


def check_loopback(target: str) -> str:
    """`target` (HOST:PORT) if HOST is 127.0.0.0/8, localhost or ::1, else ValueError (one line).

    Returns the target with an IPv6 host bracketed ("::1:50051" -> "[::1]:50051").
    """
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--cloud must be HOST:PORT, got {target!r}")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if bare.lower() == "localhost":
        return f"{bare}:{port}"
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        ip = None
    if ip is not None and ((ip.version == 4 and ip in _LOOPBACK_V4) or ip == _LOOPBACK_V6):
        return f"[{bare}]:{port}" if ip.version == 6 else f"{bare}:{port}"
    raise ValueError(
        f"--cloud {target!r} is not a loopback address (127.0.0.0/8, localhost or ::1); "
        "sqs-loadtest only loads a cloud on this machine"
    )


@dataclass(frozen=True)
class LoadTestConfig(GenerationOptions):
    clients: tuple[int, ...] = (1,)  # concurrency levels, run in turn
    requests: int = 32  # measured requests per level, all clients together
    duration_s: float = 30.0  # measured phase per level (whichever of requests/duration comes first)
    warmup: int = 1  # unmeasured requests per client before each level's measured phase
    cloud: str | None = None  # HOST:PORT on loopback; None = start a cloud in this process
    # the external cloud's processes whose CPU each level charges to its tokens (summed, e.g. replicas);
    # empty: the listeners of cloud_metrics' ports, else of the cloud's port (loadtest/provenance.py)
    cloud_pids: tuple[int, ...] = ()
    target_model: str = "tiny"  # for the in-process cloud
    draft_model: str = "tiny"
    dtype: str | None = None
    engine: str = "auto"  # auto | torch | llama (sqs_models.engines), draft and in-process target
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    max_new_tokens: int = 32  # the generation options come from edge/options.py; seed: the first request's,
    # every request of the run gets its own (seed, seed + 1, ...)
    connect_timeout_s: float = 10.0
    round_timeout_s: float = 60.0
    retries: int = 0  # a load test counts failures instead of hiding them behind retries
    meter: bool = False  # byte-counting relay per client (adds a copy of every byte in Python)
    cloud_workers: int = 2  # torch threads of the in-process cloud
    batch_window_ms: float = 2.0  # in-process cloud: cross-session batched verification window (0 = off)
    batch_max_rows: int = 64  # in-process cloud: rows of one batched forward pass at most
    # > 0: the simulated edges' draft steps share batched passes of one draft model (loadtest/edge_batching.py)
    edge_batch_window_ms: float = 0.0
    progress: bool = True  # tqdm bar on stderr
    # llama.cpp's llama-server side by side (loadtest/llama_levels.py): after our levels, one level per
    # N of `clients` against `llama-server --parallel N`, same prompts, max_new_tokens, temperature
    llama_server: bool = False
    llama_server_binary: str | None = None  # None: the one `make llama-server` built
    llama_server_model: str | None = None  # a GGUF path or a model name; None: target_model's GGUF
    llama_server_cpus: tuple[int, ...] | None = None  # its CPU affinity; None: this process's
    llama_server_threads: int = 0  # 0: one per llama_server_cpus CPU (all of this process's without)
    # Cloud replicas' /metrics (HOST:PORT each, loopback): per-replica rounds and sessions in the report
    cloud_metrics: tuple[str, ...] = ()
    # The soak (loadtest/soak.py): clients[0] clients for soak_minutes against `cloud` (or `replicas`
    # sqs-cloud processes behind Envoy that it starts), a replica killed every kill_every_s seconds
    # (kill_cmd through the shell, or SIGKILL to one of its own replicas and a restart after
    # restart_after_s), latency percentiles per window_s, and verify_tokens requests (every resynced
    # one first) re-run solo against an in-process cloud to check their tokens (-1: all)
    soak: bool = False
    soak_minutes: float = 10.0
    replicas: int = 3
    kill_every_s: float = 0.0
    kill_cmd: str | None = None
    restart_after_s: float = 0.0
    window_s: float = 30.0
    verify_tokens: int = 0

    def validate(self) -> None:
        if not self.clients or any(n < 1 for n in self.clients):
            raise ValueError("--clients needs one or more values >= 1")
        if self.requests < 1:
            raise ValueError("--requests must be >= 1")
        if not self.duration_s > 0:
            raise ValueError("--duration-s must be > 0")
        if self.warmup < 0:
            raise ValueError("--warmup must be >= 0")
        from edge.options import options_from

        options_from(self)  # the generation options, checked as everywhere (edge/options.py)
        if not self.prompts:
            raise ValueError("no prompts")
        if self.connect_timeout_s <= 0 or self.round_timeout_s <= 0:
            raise ValueError("timeouts must be > 0")
        if self.retries < 0:
            raise ValueError("--retries must be >= 0")
        if self.cloud_workers < 1:
            raise ValueError("--cloud-workers must be >= 1")
        if not self.edge_batch_window_ms >= 0:
            raise ValueError("--edge-batch-window-ms must be >= 0")
        if self.batch_window_ms < 0 or self.batch_max_rows < 1:
            raise ValueError("--batch-window-ms must be >= 0 and --batch-max-rows >= 1")
        if self.cloud is not None:
            check_loopback(self.cloud)
        if self.cloud_pids and (self.cloud is None or min(self.cloud_pids) < 1):
            raise ValueError("--cloud-pid needs --cloud and pids >= 1 (an in-process cloud is this process)")
        for address in self.cloud_metrics:
            check_loopback(address)
        if self.soak:
            if not self.soak_minutes > 0 or not self.window_s > 0:
                raise ValueError("--soak-minutes and --window-s must be > 0")
            if self.replicas < 1 or self.kill_every_s < 0 or self.restart_after_s < 0:
                raise ValueError("--replicas must be >= 1, --kill-every-s and --restart-after-s >= 0")
            if self.kill_every_s and self.cloud is not None and not self.kill_cmd:
                raise ValueError("--kill-every-s against an external --cloud needs --kill-cmd (what kills a replica)")
            if self.llama_server:
                raise ValueError("--soak and --llama-server do not combine")
        if self.llama_server_threads < 0:
            raise ValueError("--llama-server-threads must be >= 0")
        if self.llama_server_cpus is not None and (not self.llama_server_cpus or min(self.llama_server_cpus) < 0):
            raise ValueError("--llama-server-cpus needs CPU ids >= 0")
