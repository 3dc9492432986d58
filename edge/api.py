"""Edge HTTP API (FastAPI): applications ask the edge for continuations over HTTP.

  POST /v1/generate          JSON in, JSON out: text, token_ids and the stats of `sqs-edge generate --json`
  POST /v1/generate/stream   the same, as server-sent events: one `tokens` event per round, then `done`
  GET  /v1/models, POST /v1/completions, POST /v1/chat/completions
                             OpenAI-compatible (edge/openai_api.py), stream or not
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
import logging
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import grpc
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field, create_model

from common.metrics import Metrics
from edge import openai_api, options, sse
from edge.client import Cancelled, ClientConfig, CloudError, cloud_health
from edge.generate import GenerationResult, RoundOutput, run_to_end
from edge.runtime import DraftSpec, EdgeGeneration, EdgeRuntime

log = logging.getLogger("sqs.edge")


@dataclass(frozen=True)
class EdgeServerConfig:
    cloud: str = "127.0.0.1:50051"
    draft_model: str = "tiny"
    engine: str = "auto"  # draft engine (common.lm.ENGINES), as sqs-edge generate's --engine
    dtype: str | None = None
    host: str = "0.0.0.0"
    port: int = 8080
    max_concurrency: int = 4  # rounds running at once (threads); generations interleave round by round
    transport: str = ClientConfig.transport
    connect_timeout_s: float = ClientConfig.connect_timeout_s  # a cloud down at the start: 503 after this
    connect_wait_s: float = ClientConfig.connect_wait_s
    outage_window_s: float = ClientConfig.outage_window_s  # a running generation rides out outages this long
    retries: int | None = None  # optional cap on the retries of one round (ClientConfig.retries)
    disconnect_poll_s: float = 0.25  # how often a running request checks that its HTTP client is still there
    draft_len: int | str = "auto"  # for requests that name none: "auto" (planned per round), N, or 0
    api_key: str | None = field(default=None, repr=False)  # set: every /v1/* route needs Authorization: Bearer <key>
    served_model_name: str | None = None  # the model id of the OpenAI routes; default the draft model's name
    max_generations: int = 32  # OpenAI requests generating at once; beyond it 503 with Retry-After
    tls_ca: str | None = None  # the link to the cloud: ClientConfig's TLS files, token and --insecure
    tls_cert: str | None = None
    tls_key: str | None = None
    token: str | None = field(default=None, repr=False)
    insecure: bool = False

    def draft_spec(self) -> DraftSpec:
        return DraftSpec(self.draft_model, engine=self.engine, dtype=self.dtype)

    def client_config(self) -> ClientConfig:
        return ClientConfig(self.cloud, transport=self.transport, connect_timeout_s=self.connect_timeout_s,
                            connect_wait_s=self.connect_wait_s, outage_window_s=self.outage_window_s,
                            retries=self.retries, tls_ca=self.tls_ca, tls_cert=self.tls_cert, tls_key=self.tls_key,
                            token=self.token, insecure=self.insecure)


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
    """What the routes delegate to: the edge runtime (draft engine + cloud), the worker threads and
    the metrics. Model and network work runs on `executor`, never on the event loop. `engine` (a
    sqs_models Engine) is loaded by `load()` when not given."""

    def __init__(self, config: EdgeServerConfig, engine=None) -> None:
        self.config = config
        self.metrics = Metrics()
        self.runtime: EdgeRuntime | None = (
            EdgeRuntime(engine, config.client_config(), metrics=self.metrics) if engine is not None else None)
        self.executor = ThreadPoolExecutor(max_workers=config.max_concurrency, thread_name_prefix="generate")

    async def load(self) -> None:
        if self.runtime is None:
            spec, client = self.config.draft_spec(), self.config.client_config()
            self.runtime = await asyncio.get_running_loop().run_in_executor(
                self.executor, lambda: EdgeRuntime.load(spec, client, metrics=self.metrics))
            log.info("draft %s: %s", self.runtime.engine.name, self.runtime.engine.detail)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    def start(self, req: GenerateRequest, cancel: threading.Event, previews: bool = False) -> EdgeGeneration:
        """A generation for a request (nothing runs yet); a bad request is an HTTPException 422."""
        rt = self.runtime
        try:
            config = rt.draft_config(req, draft_len=self.config.draft_len if req.draft_len is None else req.draft_len)
            prompt_ids = rt.encode(req.prompt)
        except ValueError as exc:
            raise HTTPException(422, detail=str(exc)) from None
        return rt.start(prompt_ids, config, max_new_tokens=req.max_new_tokens, cancel=cancel, previews=previews)

    def run(self, generation: EdgeGeneration) -> GenerationResult:
        """A whole generation, in a worker thread; refusals are HTTPException, a set cancel is Cancelled."""
        try:
            result = run_to_end(generation)
        except CloudError as exc:
            raise HTTPException(_http_status(exc), detail=str(exc)) from None
        log.info("generation session=%s sparsifier=%s tokens=%d rounds=%d", result.session_id,
                 generation.config.scheme.scheme.value, result.stats.generated, result.stats.rounds)
        return result

    def response_of(self, result: GenerationResult) -> dict:
        return GenerateResponse(
            text=self.runtime.decode(result.token_ids), token_ids=result.token_ids,
            stop_reason=result.stop_reason, stats=result.stats.summary(),
        ).model_dump()

    async def generate(self, req: GenerateRequest, is_disconnected) -> dict:
        """The whole response body; Cancelled when the HTTP client went away (polled every
        disconnect_poll_s)."""
        cancel = threading.Event()
        generation = self.start(req, cancel)
        job = asyncio.get_running_loop().run_in_executor(self.executor, self.run, generation)
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

    async def each_round(self, generation: EdgeGeneration, is_disconnected,
                         step: Callable[[RoundOutput], Any] | None = None) -> AsyncIterator[Any]:
        """step(r) for each round r of `generation` (default r itself), one round at a time: next()
        and `step` run on the executor, never on the event loop. Raises Cancelled as soon as the HTTP
        client is gone (polled every disconnect_poll_s, within a long round or an outage too), and
        CloudError as the rounds raise it. However the iteration ends (done, error, client gone, a
        consumer that stops reading: iterate under contextlib.aclosing), the generation's cancel is
        set, which ends a round in flight, and the generation is closed off the event loop once no
        round runs, which closes its cloud session."""
        loop = asyncio.get_running_loop()
        rounds = iter(generation)
        end = object()

        def work():
            r = next(rounds, end)
            return r if r is end or step is None else step(r)

        pending = None
        try:
            while True:
                pending = loop.run_in_executor(self.executor, work)
                while not (await asyncio.wait({pending}, timeout=self.config.disconnect_poll_s))[0]:
                    if await is_disconnected():  # no round finished yet (a long round, an outage)
                        raise Cancelled("the HTTP client went away")
                out = pending.result()
                pending = None
                if await is_disconnected():
                    raise Cancelled("the HTTP client went away")
                if out is end:
                    return
                yield out
        finally:
            if generation.cancel is not None:
                generation.cancel.set()
            if pending is None:
                self._submit(generation.close)
            else:  # once the round in flight ends (its outcome, Cancelled most likely, is nobody's now)
                pending.add_done_callback(lambda f: (f.cancelled() or f.exception(), self._submit(generation.close)))

    async def events(self, req: GenerateRequest, cancel: threading.Event, is_disconnected) -> AsyncIterator[str]:
        """Server-sent events: one `tokens` event per round, then `done` (or `error`); the rounds run
        as each_round runs them (a client that goes away ends the generation and its cloud session)."""
        try:
            generation = self.start(req, cancel, previews=True)  # a streamed plain round's tokens as they come
            text = self.runtime.text_stream()
            async with aclosing(self.each_round(generation, is_disconnected)) as rounds:
                async for r in rounds:
                    yield sse.event({"token_ids": r.tokens, "text": text.push(r.tokens)}, "tokens")
            if rest := text.flush():  # a character the last tokens left open
                yield sse.event({"token_ids": [], "text": rest}, "tokens")
            yield sse.event(self.response_of(generation.result), "done")
        except Cancelled:
            log.info("HTTP client went away; streamed generation cancelled")
        except CloudError as exc:
            yield sse.event({"status": _http_status(exc), "detail": str(exc)}, "error")
        except HTTPException as exc:
            yield sse.event({"status": exc.status_code, "detail": exc.detail}, "error")
        except Exception as exc:  # the stream must end with an event, never hang
            log.exception("stream generation failed")
            yield sse.event({"status": 500, "detail": str(exc)}, "error")
        finally:
            cancel.set()

    def _submit(self, fn) -> None:
        try:
            self.executor.submit(fn)
        except RuntimeError:  # shutting down: the executor takes no more work
            fn()

    async def health(self) -> tuple[dict, bool]:
        """(body, healthy): healthy when the cloud answers its health check and the model is loaded."""
        cloud = self.config.cloud
        ok, detail = await asyncio.get_running_loop().run_in_executor(None, cloud_health, self.config.client_config())
        body = {"status": "ok" if ok else "unavailable", "cloud": cloud, "cloud_status": detail,
                "draft_model": self.config.draft_model, "model_loaded": self.runtime is not None,
                "draft_engine": f"{self.runtime.engine.kind}: {self.runtime.engine.detail}" if self.runtime else None}
        return body, ok and self.runtime is not None


def create_app(config: EdgeServerConfig, engine=None) -> FastAPI:
    """The app: routes wired to an EdgeService; the draft `engine` (sqs_models Engine) is loaded at
    startup when not given."""
    service = EdgeService(config, engine)

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
        cancel = threading.Event()
        return sse.EndingStream(cancel.set, service.events(req, cancel, request.is_disconnected))

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

    openai_api.register(app, service, _http_status)
    app.state.metrics = service.metrics
    app.state.service = service
    return app


def _http_status(exc: CloudError) -> int:
    if exc.at_open and exc.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
        return 422  # beyond the cloud's limits (prompt length, top_k): the request, not the gateway
    if exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED, None):
        return 503
    if exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return 429
    return 502  # the cloud refused the request (e.g. a tokenizer mismatch): a gateway problem


def serve(config: EdgeServerConfig) -> None:
    import uvicorn

    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level="info")
