"""sqs-cloud: serve the target-model verifier over gRPC (metrics on HTTP /metrics), or probe one.

  sqs-cloud [--model NAME --port PORT ...]     serve (every option also has an SQS_* variable)
  sqs-cloud check HOST:PORT [--timeout S]      exit 0 if that cloud is SERVING, else 1 and why
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported when serving only: `check` needs grpc alone
    from cloud.server import CloudConfig


def parse_args(argv: list[str] | None = None) -> CloudConfig:
    from cloud.server import CloudConfig
    from cloud.config import VerifierConfig
    from common.lm import ENGINES
    from common.logs import setup_logging

    env = os.environ.get
    ap = argparse.ArgumentParser(prog="sqs-cloud", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=env("SQS_TARGET_MODEL", "tiny"),
                    help="tiny | qwen2.5-coder-1.5b | qwen2.5-coder-0.5b | smollm2-135m | a local HF directory")
    ap.add_argument("--dtype", default=env("SQS_DTYPE"), choices=[None, "float32", "bfloat16"],
                    help="torch engine dtype (default: the cheaper verify pass of bf16 and fp32, measured at start)")
    ap.add_argument("--engine", default=env("SQS_ENGINE", "auto"), choices=ENGINES,
                    help="auto (default): the engine and weight type (torch bf16/fp32, llama.cpp per GGUF type) "
                         "whose pass table, measured once per machine, predicts the most committed tokens/s")
    ap.add_argument("--host", default=env("SQS_HOST", "0.0.0.0"))
    ap.add_argument("--port", type=int, default=int(env("SQS_PORT", "50051")))
    ap.add_argument("--metrics-port", type=int, default=int(env("SQS_METRICS_PORT", "9101")), help="0 disables")
    ap.add_argument("--workers", type=int, default=int(env("SQS_WORKERS", "2")))
    ap.add_argument("--torch-threads", type=int, default=int(env("SQS_TORCH_THREADS", "0")),
                    help="intra-op threads for torch (0 = torch's default: all cores)")
    ap.add_argument("--max-sessions", type=int, default=int(env("SQS_MAX_SESSIONS", "64")))
    ap.add_argument("--session-ttl", type=float, default=float(env("SQS_SESSION_TTL_S", "600")))
    ap.add_argument("--batch-window-ms", type=float, default=float(env("SQS_BATCH_WINDOW_MS", "2")), metavar="MS",
                    help="cross-session batched verification: a round waits at most MS for other sessions' rounds "
                         "to share its forward pass (never when it is the only session attached); 0 disables")
    ap.add_argument("--batch-max-rows", type=int, default=int(env("SQS_BATCH_MAX_ROWS", "64")),
                    help="rows (L+1 per round) of one batched forward pass at most")
    ap.add_argument("--log-level", default=env("SQS_LOG_LEVEL", "INFO"))
    ap.add_argument("--log-format", choices=["text", "json"], default=env("SQS_LOG_FORMAT", "text"))
    a = ap.parse_args(argv)
    if a.batch_window_ms < 0 or a.batch_max_rows < 1:
        ap.error("--batch-window-ms must be >= 0 and --batch-max-rows >= 1")
    if a.engine == "llama" and a.dtype:
        ap.error("--dtype applies to the torch engine; llama.cpp runs the GGUF's own quantization")
    setup_logging(a.log_level, a.log_format)
    if a.torch_threads > 0:
        import torch

        torch.set_num_threads(a.torch_threads)
    return CloudConfig(
        model=a.model, dtype=a.dtype, engine=a.engine, threads=max(a.torch_threads, 0), host=a.host, port=a.port,
        metrics_port=a.metrics_port, workers=a.workers,
        verifier=VerifierConfig(max_sessions=a.max_sessions, session_ttl_s=a.session_ttl,
                                batch_window_ms=a.batch_window_ms, batch_max_rows=a.batch_max_rows),
    )


async def serve(config: CloudConfig) -> None:
    from prometheus_client import start_http_server

    from cloud.server import create_server

    running = await create_server(config)
    if config.metrics_port:
        start_http_server(config.metrics_port, addr=config.host, registry=running.metrics.registry)
    print(f"sqs-cloud: model {running.verifier.target.name} on port {running.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await running.stop(config.grace_s)


def check_main(argv: list[str]) -> int:
    """sqs-cloud check HOST:PORT [--timeout S]: the grpc.health.v1 status of sqs.v1.Verifier."""
    from cloud.health import check
    from common.service import SERVICE_NAME

    ap = argparse.ArgumentParser(prog="sqs-cloud check", description=check_main.__doc__)
    ap.add_argument("address", metavar="HOST:PORT")
    ap.add_argument("--timeout", type=float, default=3.0, metavar="S", help="seconds to wait for the answer")
    a = ap.parse_args(argv)
    if not a.timeout > 0:
        ap.error("--timeout must be > 0")
    host, _, port = a.address.rpartition(":")
    if not host or not port.isdigit():
        ap.error(f"expected HOST:PORT, got {a.address!r}")
    reason = check(a.address, a.timeout)
    if reason is not None:
        print(f"sqs-cloud check: {reason}", file=sys.stderr)
        return 1
    print(f"{a.address}: {SERVICE_NAME} SERVING")
    return 0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["check"]:  # serving has no positional arguments, so the word is unambiguous
        sys.exit(check_main(argv[1:]))
    config = parse_args(argv)
    try:
        asyncio.run(serve(config))
    except Exception as exc:  # one line for the operator, not a traceback
        from sqs_models.registry import ModelNotInstalled

        from sqs_models.engines import EngineUnavailable

        if isinstance(exc, (ModelNotInstalled, OSError, EngineUnavailable)):
            print(f"sqs-cloud: error: {exc}", file=sys.stderr)
            sys.exit(2)
        raise
