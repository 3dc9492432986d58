"""Tools of the session-survival tests (issue 12): an in-process cloud whose verifier the test can
hook, a TCP relay whose downlink the test can freeze, a real `sqs-cloud` process, and one fixed-plan
generation through a cloud (fixed K, ell and draft length, no pipelined drafting: its tokens depend
on the seed only).
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
from typing import Callable

import grpc

from cloud.quotas import QuotaConfig
from cloud.server import CloudConfig, create_server, load_target
from cloud.verifier import RoundResult, Session, Verifier, VerifierConfig
from common import codec
from common.schemes import SchemeConfig
from edge.client import ClientConfig, CloudClient
from edge.drafter import DraftConfig
from edge.generate import GenerationResult
from edge.runtime import EdgeRuntime

PROMPT = "The quick brown fox"
FAST_RETRY = dict(backoff_s=0.05, backoff_max_s=0.5)  # the edge's backoff, shortened for tests

_TARGET = None
_DRAFT = None
_DRAFT_ENGINE = None


def target():
    """(TargetInfo, new_lm) of the tiny target, loaded once per test process."""
    global _TARGET
    if _TARGET is None:
        _TARGET = load_target("tiny")
    return _TARGET


def draft_model():
    global _DRAFT
    if _DRAFT is None:
        from sqs_models.registry import load_model

        _DRAFT = load_model("tiny", role="draft")
    return _DRAFT


def draft_engine():
    """The tiny draft behind the torch engine (what the edge runtime and the HTTP API take)."""
    global _DRAFT_ENGINE
    if _DRAFT_ENGINE is None:
        from sqs_models.engines import load_engine

        _DRAFT_ENGINE = load_engine("tiny", "draft", engine="torch")
    return _DRAFT_ENGINE


class HookedVerifier(Verifier):
    """The tiny target's verifier with hooks around every round (called in the worker thread).

    before(session, batch) runs before the round (outside the session lock); after(session, result)
    after a computed round; on_replay(session) after a replayed one.
    """

    def __init__(self, before=None, after=None, on_replay=None, **config) -> None:
        info, new_lm = target()
        super().__init__(info, new_lm, VerifierConfig(**config))
        self.before, self.after, self.on_replay = before, after, on_replay
        self.computed = 0
        self.replays = 0

    def verify(self, session: Session, msg, **streamed) -> RoundResult:
        if self.before:
            self.before(session, msg)
        result = super().verify(session, msg, **streamed)
        if result.replayed:
            self.replays += 1
            if self.on_replay:
                self.on_replay(session)
        else:
            self.computed += 1
            if self.after:
                self.after(session, result)
        return result


class Cloud:
    """sqs-cloud's server in this process on its own event-loop thread (no calibration, no metrics port)."""

    def __init__(self, port: int = 0, verifier: Verifier | None = None, quotas: QuotaConfig = QuotaConfig(),
                 **verifier_config) -> None:
        self.verifier = verifier or HookedVerifier(**verifier_config)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        cfg = CloudConfig(model="tiny", host="127.0.0.1", port=port, metrics_port=0, calibrate=False, quotas=quotas)
        self.running = asyncio.run_coroutine_threadsafe(create_server(cfg, self.verifier), self.loop).result(60)
        self.port = self.running.port
        self.address = f"127.0.0.1:{self.port}"

    def sessions_gauge(self) -> float:
        return self.running.metrics.registry.get_sample_value("sqs_active_sessions")

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.running.stop(0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


class RestartingCloud:
    """A Cloud that stops, and starts anew on the same port, when `when(session)` first holds after
    a computed round: that round's verdict is lost with the old cloud (the edge must resend into
    the new one and re-open its session there). `clouds` lists the cloud(s) in order."""

    def __init__(self, when) -> None:
        self.clouds: list[Cloud] = []
        self.stopped = threading.Event()

        def after(session, result):
            if not self.stopped.is_set() and when(session):
                threading.Thread(target=self._swap, daemon=True).start()
                self.stopped.wait(30)

        self.clouds.append(Cloud(after=after))
        self.address = self.clouds[0].address

    def _swap(self) -> None:
        port = self.clouds[0].port
        self.clouds[0].stop()
        self.stopped.set()
        self.clouds.append(Cloud(port=port))

    def stop(self) -> None:
        for cloud in self.clouds[1:] if self.stopped.is_set() else self.clouds:
            cloud.stop()


class Relay:
    """A TCP relay edge -> cloud whose downlink (cloud -> edge) the test can freeze and thaw:
    frozen bytes are held, not lost, and delivered in order on thaw."""

    def __init__(self, target_port: int) -> None:
        self._target = ("127.0.0.1", target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._thawed = threading.Event()
        self._thawed.set()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def freeze(self) -> None:
        self._thawed.clear()

    def thaw(self) -> None:
        self._thawed.set()

    def _accept(self) -> None:
        while True:
            try:
                edge, _ = self._listener.accept()
                cloud = socket.create_connection(self._target)
            except OSError:
                return
            self._sockets += [edge, cloud]
            threading.Thread(target=self._pump, args=(edge, cloud, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(cloud, edge, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, downlink: bool) -> None:
        try:
            while data := src.recv(65536):
                if downlink:
                    self._thawed.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.thaw()
        self._listener.close()
        for s in self._sockets:
            s.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll `condition` (a state another thread changes) until true; AssertionError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.02)


def start_cloud_process(port: int) -> subprocess.Popen:
    """A real sqs-cloud process (tiny pair) on 127.0.0.1:port; not waited for."""
    return subprocess.Popen(
        [sys.executable, "-m", "cloud", "--model", "tiny", "--host", "127.0.0.1", "--port", str(port),
         "--metrics-port", "0", "--workers", "2", "--log-level", "WARNING"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def wait_serving(address: str, process: subprocess.Popen, timeout_s: float = 90.0) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if process.poll() is not None:
                raise AssertionError(f"sqs-cloud exited ({process.returncode}): {process.stderr.read()}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service="sqs.v1.Verifier"), timeout=1,
                                   wait_for_ready=True)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"sqs-cloud on {address} not serving within {timeout_s} s")


def draft_config(seed: int, temperature: float = 1.0) -> DraftConfig:
    m = draft_model()
    # No pipelined drafting: how many drafts a batch drafted ahead holds depends on when the verdict
    # lands, so with it the tokens of a seed depend on timing (still lossless in distribution).
    return DraftConfig(scheme=SchemeConfig("topk", vocab_size=m.vocab_size, k=4, ell=100), max_draft_len=4,
                       temperature=temperature, seed=seed, pipeline=False)


def open_request(context=None, seed: int = 0) -> codec.OpenRequest:
    m = draft_model()
    cfg = draft_config(seed)
    ids = list(context) if context is not None else list(m.tokenizer.encode(PROMPT))
    return codec.OpenRequest(ids, codec.Sampling(cfg.temperature, 0, 1.0, seed), cfg.scheme, m.fingerprint, 4)


def run_generation(address: str, seed: int, *, max_new_tokens: int = 40, on_tokens=None,
                   client: CloudClient | None = None, **client_config) -> GenerationResult:
    """One fixed-plan generation at T = 1 (K = 4, ell = 100, 4 drafts) through the cloud at address
    (or through `client`, which the caller made and closes); on_tokens(tokens) after each round."""
    engine = draft_engine()
    runtime = EdgeRuntime(engine, ClientConfig(address, **{**FAST_RETRY, **client_config}),
                          connect=None if client is None else (lambda cancel: client))
    generation = runtime.start(runtime.encode(PROMPT), draft_config(seed), max_new_tokens=max_new_tokens)
    for r in generation:
        if on_tokens is not None:
            on_tokens(r.tokens)
    return generation.result


def pooled_chisquare_p(counts, expected) -> float:
    """Chi-square p-value of observed `counts` [V] against `expected` [V] (same total up to rounding),
    the bins with fewer than 5 expected pooled into one."""
    import numpy as np
    from scipy import stats

    counts, expected = np.asarray(counts, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    return float(stats.chisquare(obs[keep], exp[keep] * obs.sum() / exp[keep].sum()).pvalue)
