"""sqs-cloud: serve the target-model verifier over gRPC (metrics on HTTP /metrics), or probe one.

  sqs-cloud [--model NAME --port PORT ...]     serve (every option also has an SQS_* variable)
  sqs-cloud check HOST:PORT [--timeout S] [--tls-ca F [--tls-cert F --tls-key F]]
                                               exit 0 if that cloud is SERVING, else 1 and why
  sqs-cloud gen-certs DIR [--client CN ...]    a CA, a server and a client certificate with keys
  sqs-cloud token NAME --token-file F          add a bearer token for NAME, print it once

The link to the edges: --tls-cert/--tls-key serve TLS; with --tls-client-ca, mutual TLS (the edge's
certificate CN is its identity); --token-file F checks bearer tokens (NAME SHA256 lines, read again
on SIGHUP). Without TLS the cloud listens on loopback only, unless --insecure is said.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from common.allocator import keep_freed_memory

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
    ap.add_argument("--expect-sessions", type=int, default=int(env("SQS_EXPECT_SESSIONS", "1")), metavar="N",
                    help="auto predicts for N edges served at once (their rounds share passes): 1 (default) keeps "
                         "the fastest single client; a busy cloud may keep an engine whose wide passes are cheap")
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
    ap.add_argument("--batch-rejoin", type=float, default=float(env("SQS_BATCH_REJOIN", "1")), metavar="SHARE",
                    help="a shared pass waits for the sessions the last pass served to send their next round, "
                         "at most SHARE of that pass's duration (fuller passes: less CPU a token); 0 disables")
    ap.add_argument("--log-level", default=env("SQS_LOG_LEVEL", "INFO"))
    ap.add_argument("--log-format", choices=["text", "json"], default=env("SQS_LOG_FORMAT", "text"))
    t = ap.add_argument_group("the link to the edges (TLS, identities, quotas)")
    t.add_argument("--tls-cert", default=env("SQS_TLS_CERT"), metavar="F", help="server certificate (PEM)")
    t.add_argument("--tls-key", default=env("SQS_TLS_KEY"), metavar="F", help="its private key (PEM)")
    t.add_argument("--tls-client-ca", default=env("SQS_TLS_CLIENT_CA"), metavar="F",
                   help="mutual TLS: only edges with a certificate of this CA connect; its CN is their identity")
    t.add_argument("--token-file", default=env("SQS_TOKEN_FILE"), metavar="F",
                   help="bearer tokens: 'NAME SHA256HEX' lines (sqs-cloud token adds one); reread on SIGHUP")
    t.add_argument("--insecure", action="store_true", default=env("SQS_INSECURE", "") == "1",
                   help="allow plaintext on a non-loopback address (SQS_INSECURE=1)")
    t.add_argument("--quota-sessions", type=int, default=int(env("SQS_QUOTA_SESSIONS", "0")), metavar="N",
                   help="open sessions per identity (0 = no limit)")
    t.add_argument("--quota-rounds", type=float, default=float(env("SQS_QUOTA_ROUNDS", "0")), metavar="R",
                   help="verification requests per second per identity (0 = no limit)")
    t.add_argument("--quota-rows", type=float, default=float(env("SQS_QUOTA_ROWS", "0")), metavar="R",
                   help="rows (drafts + 1 + plain steps) per second per identity (0 = no limit)")
    t.add_argument("--quota-burst", type=float, default=float(env("SQS_QUOTA_BURST_S", "1")), metavar="S",
                   help="a rate quota's bucket holds this many seconds of it")
    a = ap.parse_args(argv)
    tls, quotas = _link_config(ap, a)
    if a.batch_window_ms < 0 or a.batch_max_rows < 1 or not a.batch_rejoin >= 0:
        ap.error("--batch-window-ms and --batch-rejoin must be >= 0 and --batch-max-rows >= 1")
    if a.expect_sessions < 1:
        ap.error("--expect-sessions must be >= 1")
    if a.engine == "llama" and a.dtype:
        ap.error("--dtype applies to the torch engine; llama.cpp runs the GGUF's own quantization")
    setup_logging(a.log_level, a.log_format)
    if a.torch_threads > 0:
        import torch

        torch.set_num_threads(a.torch_threads)
    return CloudConfig(
        model=a.model, dtype=a.dtype, engine=a.engine, expect_sessions=a.expect_sessions,
        threads=max(a.torch_threads, 0), host=a.host, port=a.port,
        metrics_port=a.metrics_port, workers=a.workers,
        verifier=VerifierConfig(max_sessions=a.max_sessions, session_ttl_s=a.session_ttl,
                                batch_window_ms=a.batch_window_ms, batch_max_rows=a.batch_max_rows,
                                batch_rejoin=a.batch_rejoin),
        tls=tls, token_file=Path(a.token_file) if a.token_file else None, quotas=quotas,
    )


def is_loopback(host: str) -> bool:
    if host.strip("[]") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _link_config(ap: argparse.ArgumentParser, a: argparse.Namespace):
    """(ServerTLS or None, QuotaConfig) from the flags; ap.error for a combination that cannot work."""
    from cloud.quotas import QuotaConfig
    from cloud.tls import ServerTLS

    if bool(a.tls_cert) != bool(a.tls_key):
        ap.error("--tls-cert and --tls-key go together")
    if a.tls_client_ca and not a.tls_cert:
        ap.error("--tls-client-ca needs --tls-cert/--tls-key (mutual TLS is TLS)")
    if not a.tls_cert and not a.insecure and not is_loopback(a.host):
        ap.error(f"listening on {a.host} without TLS: give --tls-cert/--tls-key (`sqs-cloud gen-certs DIR` makes "
                 f"them), listen on 127.0.0.1, or say --insecure (SQS_INSECURE=1) to serve plaintext")
    if a.token_file:
        from cloud.auth import TokenTable

        try:
            TokenTable(Path(a.token_file))  # read again by the server; an error here is one line
        except (OSError, ValueError) as exc:
            ap.error(f"--token-file: {exc}")
    tls = ServerTLS(Path(a.tls_cert), Path(a.tls_key), Path(a.tls_client_ca) if a.tls_client_ca else None) \
        if a.tls_cert else None
    try:
        quotas = QuotaConfig(max_sessions=a.quota_sessions, rounds_per_s=a.quota_rounds, rows_per_s=a.quota_rows,
                             burst_s=a.quota_burst)
    except ValueError as exc:
        ap.error(f"quota: {exc}")
    return tls, quotas


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
    if running.auth is not None and running.auth.tokens is not None:
        loop.add_signal_handler(signal.SIGHUP, running.auth.tokens.reload)  # revoke or add tokens live
    await stop.wait()
    await running.stop(config.grace_s)


def check_main(argv: list[str]) -> int:
    """sqs-cloud check HOST:PORT [--timeout S]: the grpc.health.v1 status of sqs.v1.Verifier."""
    from cloud.health import check
    from sqs_rpc.service import SERVICE_NAME

    ap = argparse.ArgumentParser(prog="sqs-cloud check", description=check_main.__doc__)
    ap.add_argument("address", metavar="HOST:PORT")
    ap.add_argument("--timeout", type=float, default=3.0, metavar="S", help="seconds to wait for the answer")
    ap.add_argument("--tls-ca", default=os.environ.get("SQS_TLS_CA"), metavar="F",
                    help="the cloud speaks TLS: trust this CA")
    ap.add_argument("--tls-cert", metavar="F", help="mutual TLS: this client certificate ...")
    ap.add_argument("--tls-key", metavar="F", help="... and its key")
    a = ap.parse_args(argv)
    if not a.timeout > 0:
        ap.error("--timeout must be > 0")
    if bool(a.tls_cert) != bool(a.tls_key) or (a.tls_cert and not a.tls_ca):
        ap.error("--tls-cert and --tls-key go together, with --tls-ca")
    host, _, port = a.address.rpartition(":")
    if not host or not port.isdigit():
        ap.error(f"expected HOST:PORT, got {a.address!r}")
    credentials = None
    if a.tls_ca:
        import grpc

        try:
            read = lambda f: Path(f).read_bytes() if f else None  # noqa: E731
            credentials = grpc.ssl_channel_credentials(read(a.tls_ca), read(a.tls_key), read(a.tls_cert))
        except OSError as exc:
            print(f"sqs-cloud check: {exc}", file=sys.stderr)
            return 1
    reason = check(a.address, a.timeout, credentials=credentials)
    if reason is not None:
        print(f"sqs-cloud check: {reason}", file=sys.stderr)
        return 1
    print(f"{a.address}: {SERVICE_NAME} SERVING")
    return 0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["check"]:  # serving has no positional arguments, so the word is unambiguous
        sys.exit(check_main(argv[1:]))
    if argv[:1] == ["gen-certs"]:
        from cloud.tls import main_gen_certs

        sys.exit(main_gen_certs(argv[1:]))
    if argv[:1] == ["token"]:
        from cloud.auth import main_token

        sys.exit(main_token(argv[1:]))
    config = parse_args(argv)
    keep_freed_memory()  # every session's step samples from [V] arrays on the passes' core
    try:
        asyncio.run(serve(config))
    except Exception as exc:  # one line for the operator, not a traceback
        from sqs_models.registry import ModelNotInstalled

        from sqs_models.engines import EngineUnavailable

        if isinstance(exc, (ModelNotInstalled, OSError, EngineUnavailable)):
            print(f"sqs-cloud: error: {exc}", file=sys.stderr)
            sys.exit(2)
        raise
