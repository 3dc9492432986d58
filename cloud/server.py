"""Builds the cloud gRPC server: Verifier + health + reflection, metrics over HTTP.

The port is bound first, without SO_REUSEPORT (grpc turns it on by default, and then two clouds on
one port silently split the sessions between them): a second process on a taken port fails at once
with a clear OSError, before any model is loaded. A timer task reaps expired and orphaned sessions
so the sessions gauge follows them without waiting for a request.

What serves is said once at start, as applied (CloudInfo: the engine loaded, its weight type, dtype and
threads; cross-session batching on only when the window is open AND the target LM has a batched pass):
on /metrics as sqs_cloud_info, and on RunningCloud.info for in-process users (the load test's records).

With `tls` the port speaks TLS only (grpc.ssl_server_credentials; with a client CA, mutual TLS:
the handshake refuses edges without a certificate of that CA). With a token file or a client CA,
every RPC but health is authenticated first (cloud/auth.py: AuthInterceptor) and the servicer knows
the caller's identity: sessions are their opener's, and quotas (cloud/quotas.py) are per identity.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from cloud.auth import AuthInterceptor, Authenticator, TokenTable
from cloud.config import TargetInfo, VerifierConfig
from cloud.quotas import QuotaConfig, Quotas
from cloud.servicer import VerifierServicer, add_to_server
from cloud.tls import ServerTLS
from cloud.verifier import Verifier
from common.lm import LM
from common.metrics import Metrics
from sqs_rpc.service import SERVICE_NAME

if TYPE_CHECKING:  # for hints only: the engines module is imported when a model is loaded
    from sqs_models.engines import Engine

log = logging.getLogger("sqs.cloud")


@dataclass(frozen=True)
class CloudConfig:
    model: str = "tiny"
    dtype: str | None = None  # torch engine: None = measured (bf16 vs fp32) for the Qwen pair, fp32 for tiny
    engine: str = "auto"  # auto | torch | llama (auto: the most committed tok/s predicted by pass tables)
    expect_sessions: int = 1  # auto predicts for this many concurrent sessions sharing passes
    threads: int = 0  # llama.cpp threads (0 = all CPUs this process may use)
    host: str = "0.0.0.0"
    port: int = 50051  # 0 = any free port (tests)
    metrics_port: int = 9101  # 0 = no metrics HTTP server
    workers: int = 2  # threads running torch work
    max_message_bytes: int = 16 * 1024 * 1024
    grace_s: float = 5.0
    calibrate: bool = True  # time forward passes by rows before serving (edges plan rounds with them)
    pass_table_cache: Path | None = None  # pass tables by engine and machine (None: ~/.cache/sqs-sd/pass-tables.json)
    verifier: VerifierConfig = VerifierConfig()
    tls: ServerTLS | None = None  # None: plaintext (sqs-cloud allows it on loopback, or with --insecure)
    token_file: Path | None = None  # bearer tokens (cloud/auth.py); None: no token check
    quotas: QuotaConfig = QuotaConfig()  # per identity; all off by default


def load_target(model: str, dtype: str | None = None, engine: str = "auto", threads: int = 0, batch_seqs: int = 0):
    """(TargetInfo, factory of per-session LMs) for a registered model name or directory.

    The engine (torch or llama.cpp, see sqs_models.engines) only decides how p is computed;
    batch_seqs > 0 (cross-session batching on): llama.cpp's LMs share contexts of that many sequences.
    """
    info, eng = load_target_engine(model, dtype, engine, threads)
    return info, eng.lm_factory(batch_seqs)


def load_target_engine(model: str, dtype: str | None = None, engine: str = "auto", threads: int = 0,
                       pass_rows: Sequence[int] | None = None, table_cache: Path | None = None,
                       expect_sessions: int = 1):
    """(TargetInfo, sqs_models.engines.Engine): ``engine="auto"`` keeps the engine and weight type whose
    pass table (rows ``pass_rows``) predicts the most committed tokens per second for
    ``expect_sessions`` concurrent sessions."""
    from sqs_models.engines import load_engine

    eng = load_engine(model, "target", engine=engine, dtype=dtype, threads=threads, pass_rows=pass_rows,
                      table_cache=table_cache, sessions=expect_sessions)
    log.info("target %s: %s", eng.name, eng.detail)
    info = TargetInfo(eng.name, eng.vocab_size, eng.fingerprint, tuple(eng.eos_token_ids))
    return info, eng


def calibration_rows(config: VerifierConfig) -> tuple[int, ...]:
    """The rows of the start-up pass table: calibrate_rows up to batch_max_rows (and that row count)."""
    rows = [r for r in config.calibrate_rows if r <= config.batch_max_rows]
    if any(r > config.batch_max_rows for r in config.calibrate_rows):
        rows.append(config.batch_max_rows)
    return tuple(sorted(set(rows)))


def target_pass_table(engine, rows: Sequence[int], cache: Path | None) -> tuple[dict[int, float], bool]:
    """(ms by rows, read from the cache?) of the loaded target engine (sqs_models.engines.engine_pass_table)."""
    from sqs_models.engines import engine_pass_table

    return engine_pass_table(engine, rows, cache)


def time_target_passes(new_lm: Callable[[], LM], vocab_size: int, rows: Sequence[int]) -> dict[int, float]:
    """Warm-cache forward time (ms, fastest of 3) of a pass scoring r rows, for each r in `rows`, on a
    scratch LM of the target: the table the edges plan with before any round has run (every
    round refines it, cloud/verifier.py). Measured here, where the engine is loaded."""
    from sqs_models.engines import time_passes

    return time_passes(new_lm(), vocab_size, rows)


@dataclass(frozen=True)
class CloudInfo:
    """What this cloud runs, as applied at start (exported as sqs_cloud_info, common/metrics.py).

    engine, weight_type, dtype, detail, threads: of the Engine that create_server loaded; None when it
    was handed a ready Verifier (tests, benchmarks), whose engine it cannot see. batching: the verifier
    has a pass batcher (window > 0) and its LMs have ``logits_batch`` (cloud/verifier.py shares passes
    only then); the window and row limit are the verifier's config either way.
    """

    model: str
    engine: str | None
    weight_type: str | None
    dtype: str | None
    detail: str | None
    batching: bool
    batch_window_ms: float
    batch_max_rows: int
    batch_rejoin: float  # a shared pass waits for the last pass's sessions at most this share of it
    threads: int | None  # llama.cpp threads, or torch's intra-op threads, when this process loaded the engine
    workers: int  # threads running the target's passes (CloudConfig.workers)

    def labels(self) -> dict[str, str]:
        """sqs_cloud_info's labels: None as "" (Prometheus' "not known"), numbers as plain text."""
        def text(v: object) -> str:
            return "" if v is None else f"{v:g}" if isinstance(v, float) else str(v)

        return {"model": self.model, "engine": text(self.engine), "weight_type": text(self.weight_type),
                "dtype": text(self.dtype), "detail": text(self.detail), "batching": "on" if self.batching else "off",
                "batch_window_ms": text(self.batch_window_ms), "batch_max_rows": text(self.batch_max_rows),
                "batch_rejoin": text(self.batch_rejoin), "threads": text(self.threads), "workers": text(self.workers)}


def _engine_threads(engine: "Engine") -> int | None:
    """The threads the loaded engine computes with: llama.cpp's (its LlamaModel), else torch's."""
    if engine.kind == "llama":
        return getattr(engine.model, "threads", None)
    import torch  # already imported: the torch engine is loaded

    return torch.get_num_threads()


def _batched_lms(verifier: Verifier) -> bool:
    """Does the verifier's LM factory give LMs with a batched pass? One scratch LM is made and closed
    to find out (cheap: torch's CachedLM wraps the loaded model; llama's takes a free sequence id),
    since the verifier decides by the type of its sessions' LMs (Verifier._forward)."""
    lm = verifier.sessions.new_lm()
    try:
        return hasattr(type(lm), "logits_batch")
    finally:
        close = getattr(lm, "close", None)
        if callable(close):
            close()


def cloud_info(verifier: Verifier, engine: "Engine | None", workers: int) -> CloudInfo:
    """The facts of CloudInfo for a verifier (and the Engine it was built on, None if not known)."""
    vc = verifier.config
    batching = verifier.pass_stats() is not None and _batched_lms(verifier)  # pass_stats: None without a batcher
    return CloudInfo(
        model=verifier.target.name,
        engine=engine.kind if engine is not None else None,
        weight_type=engine.weight_type if engine is not None else None,
        dtype=engine.dtype if engine is not None else None,
        detail=engine.detail if engine is not None else None,
        batching=batching, batch_window_ms=float(vc.batch_window_ms), batch_max_rows=vc.batch_max_rows,
        batch_rejoin=float(vc.batch_rejoin), threads=_engine_threads(engine) if engine is not None else None, workers=workers)


@dataclass
class RunningCloud:
    server: grpc.aio.Server
    port: int
    verifier: Verifier
    metrics: Metrics
    health: HealthServicer
    executor: ThreadPoolExecutor
    reaper: asyncio.Task | None = None
    round_executor: ThreadPoolExecutor | None = None  # rounds, with cross-session batching on
    auth: Authenticator | None = None  # its token table is reloaded on SIGHUP (cloud/cli.py)
    info: CloudInfo | None = None  # what serves, as applied (also sqs_cloud_info on /metrics)

    async def stop(self, grace_s: float = 5.0) -> None:
        if self.reaper is not None:
            self.reaper.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.round_executor is not None:
            self.round_executor.shutdown(wait=False, cancel_futures=True)


async def reap_sessions(verifier: Verifier, metrics: Metrics, interval_s: float) -> None:
    """Every interval_s: drop expired and orphaned sessions, refresh the sessions gauge."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            verifier.reap()
            metrics.sessions.set(verifier.active_sessions)
        except Exception:  # the timer must outlive any one failure
            log.exception("session reaper failed")


def bind(server: grpc.aio.Server, host: str, port: int, credentials: grpc.ServerCredentials | None = None) -> int:
    """Bind host:port (0 = any free port), TLS with `credentials`, or raise OSError saying why."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise OSError(
            f"cannot listen on {host}:{port}: the port is taken (another sqs-cloud?) or the address is not "
            f"available here"
        )
    return bound


async def create_server(config: CloudConfig, verifier: Verifier | None = None, metrics: Metrics | None = None) -> RunningCloud:
    """Start serving; with config.port == 0 the bound port is in the result."""
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        # Find dead edges (killed, or a link gone): their streams end and their sessions become orphans.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.so_reuseport", 0),
    ]
    metrics = metrics or Metrics()
    tokens = TokenTable(config.token_file) if config.token_file else None  # a bad file fails before the model
    auth = Authenticator(tokens, mtls=config.tls is not None and config.tls.client_ca is not None,
                         on_failure=lambda reason: metrics.auth_failures.labels(reason).inc())
    server = grpc.aio.server(options=options, interceptors=[AuthInterceptor(auth)] if auth.enabled else None)
    credentials = config.tls.credentials() if config.tls else None  # unreadable files: OSError, before the model
    port = bind(server, config.host, config.port, credentials)  # before the model: a taken port fails in a second
    engine = None
    if verifier is None:
        vc = config.verifier
        info, engine = load_target_engine(config.model, config.dtype, config.engine, config.threads,
                                          calibration_rows(vc), config.pass_table_cache, config.expect_sessions)
        verifier = Verifier(info, engine.lm_factory(vc.max_sessions if vc.batch_window_ms > 0 else 0), vc)
    verifier.on_pass = metrics.observe_pass
    verifier.on_rows_dropped = metrics.observe_rows_dropped
    executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="verify")
    round_executor = None
    vc = verifier.config
    if vc.batch_window_ms > 0:
        # A round's thread waits in the batcher for its share of the pass: one thread per session
        # that may share a pass (the batcher runs one pass at a time, so torch work stays serial).
        round_executor = ThreadPoolExecutor(max_workers=max(config.workers, min(vc.max_sessions, vc.batch_max_rows)),
                                            thread_name_prefix="round")
    add_to_server(VerifierServicer(verifier, metrics, executor, round_executor, Quotas(config.quotas)), server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    if config.calibrate:
        loop, how = asyncio.get_running_loop(), "measured"
        if engine is not None:  # cached per engine and machine: a restart does not measure again
            measured, cached = await loop.run_in_executor(executor, target_pass_table, engine, calibration_rows(vc),
                                                          config.pass_table_cache)
            how = "cached" if cached else how
        else:
            measured = await loop.run_in_executor(
                executor, time_target_passes, verifier.sessions.new_lm, verifier.target.vocab_size, vc.calibrate_rows)
        verifier.record_passes(measured)
        table = verifier.pass_table()
        log.info("forward pass ms by rows (%s; every pass refines it): %s", how,
                 {r: round(ms, 1) for r, ms in table.items()})
    # Before serving, so that the first scrape already says what serves (a scratch LM may take a moment).
    info = await asyncio.get_running_loop().run_in_executor(executor, cloud_info, verifier, engine, config.workers)
    metrics.set_cloud_info(info.labels())
    await server.start()
    await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    reaper = asyncio.get_running_loop().create_task(
        reap_sessions(verifier, metrics, verifier.config.reap_interval_s), name="session-reaper"
    )
    log.info("verifier %s serving on %s:%d; cross-session batching %s", verifier.target.name, config.host, port,
             f"window {vc.batch_window_ms:g} ms, {vc.batch_max_rows} rows at most, rejoin {vc.batch_rejoin:g}"
             if info.batching
             else "off" if vc.batch_window_ms <= 0 else "off (the target LM has no batched pass)")
    log.info("link: %s; identities: %s; quotas per identity: %s",
             ("mutual TLS" if config.tls.client_ca else "TLS") if config.tls else "PLAINTEXT",
             "bearer tokens" if tokens else "client certificate CN" if auth.mtls else "none (one anonymous client)",
             config.quotas if config.quotas.enabled else "none")
    return RunningCloud(server, port, verifier, metrics, health, executor, reaper, round_executor, auth, info)
