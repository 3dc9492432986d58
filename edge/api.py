"""Edge HTTP API (FastAPI): applications ask the edge for continuations over HTTP.

  POST /v1/generate          JSON in, JSON out: text, token_ids and the stats of `sqs-edge generate --json`
  POST /v1/generate/stream   the same, as server-sent events: one `tokens` event per round, then `done`
  GET  /healthz              200 when the cloud answers its health check, 503 otherwise
  GET  /metrics              Prometheus (common/metrics.py)
  GET  /docs, /openapi.json  OpenAPI

Model and network work runs in a thread pool, never on the event loop; each request has its own
KV cache and cloud session, sharing the draft model's weights.

A generation rides out cloud restarts and link outages exactly like `sqs-edge generate` (the same
ClientConfig: resend, re-open with the accepted context, for outage_window_s), and a cloud that
does not answer at all is a 503 within connect_timeout_s. When the HTTP client goes away (plain or
streaming), the generation is cancelled within a round or a poll interval and its cloud session
closed. A request the cloud refuses at session open (its limits: prompt length, top_k) is a 422.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field, create_model

from common.metrics import Metrics
from edge import options
from edge.client import Cancelled, ClientConfig, CloudClient, CloudError
from edge.drafter import DraftConfig, Drafter
from edge.generate import GenerationResult, generate

log = logging.getLogger("sqs.edge")


@dataclass(frozen=True)
class EdgeServerConfig:
    cloud: str = "127.0.0.1:50051"
    draft_model: str = "tiny"
    dtype: str | None = None
    host: str = "0.0.0.0"
    port: int = 8080
    max_concurrency: int = 4  # generations running at once (threads)
    connect_timeout_s: float = ClientConfig.connect_timeout_s  # a cloud down at the start: 503 after this
    outage_window_s: float = ClientConfig.outage_window_s  # a running generation rides out outages this long
    retries: int | None = None  # optional cap on the retries of one round (ClientConfig.retries)
    disconnect_poll_s: float = 0.25  # how often a running request checks that its HTTP client is still there
    draft_len: int | str = "auto"  # for requests that name none: "auto" (planned per round), N, or 0


def _request_fields() -> dict:
    fields = options.request_fields()
    # Omitted: the server's --draft-len (auto unless set), so `sqs-edge serve --draft-len N` sets a default.
    fields["draft_len"] = (fields["draft_len"][0] | None,
                           Field(None, description=options.BY_NAME["draft_len"].help + "; omitted: the server's"))
    return fields


# The request body: the prompt and the generation options of edge/options.py (same names, ranges;
# NaN and infinities refused with 422).
GenerateRequest = create_model(
    "GenerateRequest", __base__=BaseModel, prompt=(str, Field(min_length=1, max_length=100_000)), **_request_fields()
)


class GenerateResponse(BaseModel):
    text: str
    token_ids: list[int]
    stop_reason: str
    stats: dict


class EdgeService:
    """What the routes delegate to: the draft model, the generation threads, the metrics, and one
    generation run with its cancellation. Torch and network work runs on `executor`, never on the
    event loop. `model` (a sqs_models LoadedModel) is loaded by `load()` when not given."""

    def __init__(self, config: EdgeServerConfig, model=None) -> None:
        self.config = config
        self.model = model
        self.metrics = Metrics()
        self.executor = ThreadPoolExecutor(max_workers=config.max_concurrency, thread_name_prefix="generate")
        self._active = 0  # generations running: the sessions gauge
        self._active_lock = threading.Lock()

    async def load(self) -> None:
        if self.model is None:
            from sqs_models.registry import load_model

            self.model = await asyncio.get_running_loop().run_in_executor(
                self.executor, lambda: load_model(self.config.draft_model, role="draft", dtype=self.config.dtype)
            )

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    def _count_active(self, delta: int) -> None:
        with self._active_lock:
            self._active += delta
            self.metrics.sessions.set(self._active)

    def run(self, req: GenerateRequest, on_tokens=None, cancel: threading.Event | None = None) -> GenerationResult:
        """One generation, in a worker thread; refusals are HTTPException, a set `cancel` is Cancelled."""
        from sqs_models.cached_lm import CachedLM

        config, m = self.config, self.model
        try:
            if req.draft_len is None:
                req = req.model_copy(update={"draft_len": config.draft_len})
            dcfg = DraftConfig.from_options(req, m.vocab_size)
        except ValueError as exc:
            raise HTTPException(422, detail=str(exc)) from None
        prompt_ids = list(m.tokenizer.encode(req.prompt))
        if not prompt_ids:
            raise HTTPException(422, detail="the prompt encodes to no tokens")
        drafter = Drafter(CachedLM(m.model, m.vocab_size), dcfg, m.eos_token_ids)
        self._count_active(+1)
        try:
            cc = ClientConfig(config.cloud, connect_timeout_s=config.connect_timeout_s,
                              outage_window_s=config.outage_window_s, retries=config.retries)
            with CloudClient(cc, cancel=cancel) as client:  # closing it closes the cloud session
                result = generate(prompt_ids, drafter, client, max_new_tokens=req.max_new_tokens,
                                  vocab_fingerprint=m.fingerprint, on_tokens=on_tokens, metrics=self.metrics)
            log.info("generation session=%s sparsifier=%s tokens=%d rounds=%d", result.session_id,
                     dcfg.scheme.scheme.value, result.stats.generated, result.stats.rounds)
            return result
        except CloudError as exc:
            raise HTTPException(_http_status(exc), detail=str(exc)) from None
        finally:
            self._count_active(-1)

    def response_of(self, result: GenerationResult) -> dict:
        return GenerateResponse(
            text=self.model.tokenizer.decode(result.token_ids), token_ids=result.token_ids,
            stop_reason=result.stop_reason, stats=result.stats.summary(),
        ).model_dump()

    async def generate(self, req: GenerateRequest, is_disconnected) -> dict:
        """The whole response body; Cancelled when the HTTP client went away (polled every
        disconnect_poll_s)."""
        cancel = threading.Event()
        job = asyncio.get_running_loop().run_in_executor(self.executor, self.run, req, None, cancel)
        try:
            while not (await asyncio.wait({job}, timeout=self.config.disconnect_poll_s))[0]:
                if await is_disconnected():
                    log.info("HTTP client went away; cancelling its generation")
                    cancel.set()
                    break
        finally:
            if not job.done():
                cancel.set()
        return self.response_of(await job)

    def stream(self, req: GenerateRequest, is_disconnected) -> tuple[threading.Event, AsyncIterator[str]]:
        """(cancel, server-sent events): one `tokens` event per round, then `done` (or `error`)."""
        loop = asyncio.get_running_loop()
        cancel = threading.Event()
        queue: asyncio.Queue = asyncio.Queue()
        tok = self.model.tokenizer
        emitted: list[int] = []
        printed = [""]

        def on_tokens(new: list[int]) -> None:
            emitted.extend(new)
            text = tok.decode(emitted)
            delta, printed[0] = text[len(printed[0]):], text
            loop.call_soon_threadsafe(queue.put_nowait, ("tokens", {"token_ids": new, "text": delta}))

        def work() -> None:
            try:
                result = self.run(req, on_tokens, cancel)
                loop.call_soon_threadsafe(queue.put_nowait, ("done", self.response_of(result)))
            except Cancelled:
                log.info("HTTP client went away; streamed generation cancelled")
            except HTTPException as exc:
                loop.call_soon_threadsafe(queue.put_nowait, ("error", {"status": exc.status_code, "detail": exc.detail}))
            except Exception as exc:  # the stream must end with an event, never hang
                log.exception("stream generation failed")
                loop.call_soon_threadsafe(queue.put_nowait, ("error", {"status": 500, "detail": str(exc)}))

        self.executor.submit(work)

        async def events():
            while True:
                try:
                    kind, data = await asyncio.wait_for(queue.get(), timeout=self.config.disconnect_poll_s)
                except asyncio.TimeoutError:  # no round finished (a long round, an outage): still wanted?
                    kind = None
                if await is_disconnected():
                    cancel.set()
                    return
                if kind is None:
                    continue
                yield f"event: {kind}\ndata: {json.dumps(data)}\n\n"
                if kind in ("done", "error"):
                    return

        return cancel, events()

    async def health(self) -> tuple[dict, bool]:
        """(body, healthy): healthy when the cloud answers its health check and the model is loaded."""
        cloud = self.config.cloud
        ok, detail = await asyncio.get_running_loop().run_in_executor(None, _cloud_health, cloud)
        body = {"status": "ok" if ok else "unavailable", "cloud": cloud, "cloud_status": detail,
                "draft_model": self.config.draft_model, "model_loaded": self.model is not None}
        return body, ok and self.model is not None


def create_app(config: EdgeServerConfig, model=None) -> FastAPI:
    """The app: routes wired to an EdgeService; `model` is loaded at startup when not given."""
    service = EdgeService(config, model)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.load()
        yield
        service.shutdown()

    app = FastAPI(title="SQS-SD edge", version="1", lifespan=lifespan,
                  description="Speculative decoding with a local draft model and a cloud verifier.")

    @app.post("/v1/generate", response_model=GenerateResponse)
    async def generate_endpoint(req: GenerateRequest, request: Request):
        try:
            return await service.generate(req, request.is_disconnected)
        except Cancelled:
            return Response(status_code=499)  # nobody reads it: the client closed the request

    @app.post("/v1/generate/stream")
    async def generate_stream(req: GenerateRequest, request: Request):
        cancel, events = service.stream(req, request.is_disconnected)
        return _CancellingStream(cancel, events, media_type="text/event-stream")

    @app.get("/healthz")
    async def healthz():
        body, healthy = await service.health()
        return JSONResponse(body, status_code=200 if healthy else 503)

    @app.get("/metrics")
    async def metrics_endpoint():
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError):
        # FastAPI's own handler echoes the input, and a NaN or an infinity in it cannot be written as
        # JSON (a 500): say where and why, and repr() the value.
        detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", ""),
                   "input": repr(e.get("input"))} for e in exc.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    app.state.metrics = service.metrics
    app.state.service = service
    return app


class _CancellingStream(StreamingResponse):
    """A streaming response that cancels its generation however the response ends (a failed send
    to a client that went away included)."""

    def __init__(self, cancel: threading.Event, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._cancel = cancel

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._cancel.set()


def _http_status(exc: CloudError) -> int:
    if exc.at_open and exc.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
        return 422  # beyond the cloud's limits (prompt length, top_k): the request, not the gateway
    if exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED, None):
        return 503
    if exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return 429
    return 502  # the cloud refused the request (e.g. a tokenizer mismatch): a gateway problem


def _cloud_health(target: str) -> tuple[bool, str]:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = grpc.insecure_channel(target)
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="sqs.v1.Verifier"), timeout=1.5)
        return reply.status == health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.RpcError as exc:
        return False, f"{exc.code().name}: {exc.details()}"
    finally:
        channel.close()


def serve(config: EdgeServerConfig) -> None:
    import uvicorn

    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level="info")
