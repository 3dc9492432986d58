"""OpenAI-compatible routes of the edge daemon (docs/DESIGN.md section 8), for the clients that
speak nothing else (the `openai` package, LangChain, editors' assistants, curl recipes):

  GET  /v1/models, /v1/models/{id}  the model this daemon serves (its draft/target pair)
  POST /v1/completions              prompt -> text
  POST /v1/chat/completions         messages -> the model's own chat template -> the assistant's turn

The visible text (stop tokens and strings, multi-byte characters) is edge/stop_text.py.

Both POST routes answer one JSON object, or with `stream: true` server-sent events (`data: {chunk}`
lines, blank-line separated, then `data: [DONE]`; `stream_options.include_usage` adds a last chunk
with `choices: []` and the usage, every chunk before it carrying `usage: null`). Every response has
`usage` and, as llama-server's `timings`, one `timings` object of speculation figures (rounds,
acceptance, uplink bits and wire bytes per completion token, time to first token).

Requests, as OpenAI's servers take them: unknown fields are ignored; fields whose meaning this server
cannot honour (logprobs, tools, response_format other than text, n > 1, echo, penalties, ...) get a
400 naming them. Defaults are OpenAI's: temperature 1, top_p 1, max_tokens 16 on completions and up
to the end of the turn (4096) on chat, a fresh random seed when none is given. Extensions, as vLLM
and llama-server accept them: top_k, stop_token_ids, return_token_ids (adds prompt_token_ids and
choices[].token_ids) and every edge generation option by its edge/options.py name (sparsifier, k,
ell, draft_len, ...). `top_p`/`top_k` reach the cloud's sampling: the output stays lossless.

Stop: generation ends at the first stop token (the engine's EOS, the chat template's end of turn,
stop_token_ids) or stop string, even when the string spans tokens or rounds; neither is returned, and
a stream never shows text that could still turn out to be the start of a stop string. A chat needs
the tokenizer's chat template (apply_chat_template with add_generation_prompt); a model without one
(the tiny pair) answers 400 saying so.

Errors are OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for bad input
(validation included: never FastAPI's 422 on these routes), 401 without the configured key, 404 for
an unknown model or route under /v1, 503 with Retry-After while the cloud does not answer or the
daemon is at its limit of generations, 500 never for input. A stream that fails after it started
ends with a `data: {"error": ...}` event (the official client raises APIError). Without an API key
any Bearer the client sends is ignored; with one (`--api-key` / SQS_API_KEY) every /v1/* route needs
`Authorization: Bearer <key>` (compared in constant time); /healthz, /metrics and /docs stay open.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.stats import GenerationStats
from edge import options, sse
from edge.client import Cancelled, CloudError
from edge.generate import RoundOutput
from edge.stop_text import StopText

log = logging.getLogger("sqs.edge")

MAX_TOKENS = int(options.BY_NAME["max_new_tokens"].high)
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
RETRY_AFTER_S = {"busy": 1, "cloud": 5}
SEED_LIMIT = 2**63  # the edge's seeds are in [0, 2^63); OpenAI's are any 64-bit integer


# --- errors ---------------------------------------------------------------------------------------

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 429: "rate_limit_error",
               502: "server_error", 503: "service_unavailable_error"}


class OpenAIError(Exception):
    """An error answered in OpenAI's shape; `headers` go out with it (Retry-After, x-should-retry)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = dict(headers or {})
        if status >= 500 and status != 503:
            self.headers.setdefault("x-should-retry", "false")  # retrying cannot help (the official client would)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def owns(path: str) -> bool:
    """Whether a path answers errors in OpenAI's shape: /v1/* except the edge's own /v1/generate."""
    return path.startswith("/v1/") and not (path == "/v1/generate" or path.startswith("/v1/generate/"))


def _validation_error(exc: RequestValidationError) -> OpenAIError:
    """FastAPI's 422 as OpenAI's 400: where and why (the input itself is not echoed)."""
    parts, param = [], None
    for e in exc.errors():
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        where = ".".join(loc)
        param = param or where or None
        parts.append(f"{where}: {e.get('msg', 'invalid')}" if where else str(e.get("msg", "invalid")))
    return OpenAIError(400, "; ".join(parts) or "invalid request", param=param, code="invalid_value")


def _cloud_error(exc: CloudError, status: int) -> OpenAIError:
    """A CloudError with the status edge.api gives it (422: the request is beyond the cloud's limits)."""
    if status == 422:
        return OpenAIError(400, str(exc), code="cloud_refused")
    if status in (429, 503):
        kind = "busy" if status == 429 else "cloud"
        return OpenAIError(status, str(exc), code="cloud_unavailable", headers={"Retry-After": str(RETRY_AFTER_S[kind])})
    return OpenAIError(status, str(exc), code="cloud_error")


# --- requests -------------------------------------------------------------------------------------

class StreamOptions(BaseModel):
    include_usage: bool = False


# Edge generation options accepted as extensions (OpenAI's own names map onto the others).
_MAPPED = ("max_new_tokens", "temperature", "top_k", "top_p", "seed")


def _extension_fields() -> dict[str, tuple[Any, Any]]:
    fields = {name: (t | None, f) for name, (t, f) in options.request_fields().items() if name not in _MAPPED}
    for name, (t, f) in fields.items():
        f.default = None  # omitted: the option's default (draft_len: the server's --draft-len)
        f.description = f"extension: {f.description}"
    return fields


EXTENSIONS = tuple(_extension_fields())

_Number = Annotated[float, Field(allow_inf_nan=False)]
_Text = Annotated[str, Field(max_length=100_000)]


class _Request(BaseModel):
    """Fields both routes share."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="the id of GET /v1/models (or the draft's or the target's name)")
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS, description="tokens to generate at most")
    temperature: _Number | None = Field(None, ge=0, le=100, description="default 1; 0 = greedy")
    top_p: _Number | None = Field(None, gt=0, le=1, description="default 1 (off)")
    top_k: int | None = Field(None, ge=-1, description="extension; 0 or -1 = off")
    seed: int | None = Field(None, ge=-SEED_LIMIT, lt=SEED_LIMIT, description="default: a fresh random seed")
    stop: Annotated[str, Field(max_length=1000)] | list[Annotated[str, Field(max_length=1000)]] | None = Field(
        None, description="up to 16 strings; generation ends before the first of them, which is not returned")
    stop_token_ids: list[int] | None = Field(None, max_length=64, description="extension: tokens that also end it")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=128, description="1 (larger: 400)")
    user: str | None = None
    return_token_ids: bool | None = Field(False, description="extension: prompt_token_ids and choices[].token_ids")
    # Known, and refused with a 400 unless off (see REFUSED)
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: _Number | None = None
    frequency_penalty: _Number | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None


_Prompt = _Text | list[_Text] | list[int] | list[list[int]]
CompletionRequest = create_model(
    "CompletionRequest", __base__=_Request,
    prompt=(_Prompt, Field(description="a string (or a list of one string, or token ids)")),
    echo=(bool | None, None), suffix=(str | None, None), best_of=(int | None, None),
    **_extension_fields(),
)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: _Text | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: _Text | list[TextPart] | None = None
    name: str | None = None


ChatRequest = create_model(
    "ChatRequest", __base__=_Request,
    messages=(list[ChatMessage], Field(min_length=1, max_length=1000)),
    max_completion_tokens=(int | None, Field(None, ge=1, le=MAX_TOKENS, description="preferred to max_tokens")),
    parallel_tool_calls=(bool | None, None),
    **_extension_fields(),
)

_off = lambda v: v is None or v is False or v == 0 or v == {} or v == []  # noqa: E731
REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    # field: (it asks for nothing, why we cannot honour it)
    "n": (lambda v: v in (None, 1), "only n = 1 is served (one generation per request)"),
    "best_of": (lambda v: v in (None, 1), "only best_of = 1 is served"),
    "echo": (_off, "echo is not supported"),
    "suffix": (lambda v: not v, "suffix (insertion) is not supported"),
    "logprobs": (lambda v: v is None or v is False, "logprobs are not supported: the cloud verifies, the edge "
                 "never sees the target's probabilities"),
    "top_logprobs": (_off, "top_logprobs are not supported (see logprobs)"),
    "logit_bias": (_off, "logit_bias is not supported: it would change the target's distribution"),
    "presence_penalty": (_off, "presence_penalty is not supported: it would change the target's distribution"),
    "frequency_penalty": (_off, "frequency_penalty is not supported: it would change the target's distribution"),
    "response_format": (lambda v: not v or v.get("type") == "text", "only response_format {\"type\": \"text\"}"),
    "tools": (_off, "tools are not supported"),
    "tool_choice": (lambda v: v in (None, "none"), "tool_choice is not supported"),
    "functions": (_off, "functions are not supported"),
    "function_call": (lambda v: v in (None, "none"), "function_call is not supported"),
}


def _refuse_unsupported(req: BaseModel) -> None:
    for name, (fine, why) in REFUSED.items():
        if name in type(req).model_fields and not fine(getattr(req, name)):
            raise OpenAIError(400, f"{name}: {why}", param=name, code="unsupported_parameter")


# --- one request's generation ---------------------------------------------------------------------


class _Job:
    """One request's generation, as the OpenAI routes run it: visible text per round, the figures."""

    def __init__(self, service, prompt_ids: list[int], config, max_tokens: int, text: StopText) -> None:
        self.service = service
        self.prompt_ids = prompt_ids
        self.text = text
        self.stats = GenerationStats()
        self.cancel = threading.Event()
        self.generation = service.runtime.start(prompt_ids, config, max_new_tokens=max_tokens, cancel=self.cancel)
        self.sparsifier = config.scheme.scheme.value
        self.t0 = time.perf_counter()
        self.first_token_ms: float | None = None
        self.total_ms = 0.0

    def _step(self, r: RoundOutput) -> str:  # on the executor, after each round
        self.stats.add(r.record)
        if self.first_token_ms is None and r.tokens:
            self.first_token_ms = (time.perf_counter() - self.t0) * 1e3
        return self.text.push(r.tokens)

    async def deltas(self, is_disconnected) -> AsyncIterator[str]:
        """The text each round adds (possibly ''), then what the end releases. Raises Cancelled
        when the HTTP client is gone, CloudError from the cloud; the generation and its cloud
        session end with the iteration (EdgeService.each_round), at a stop as soon as it is seen."""
        try:
            async with aclosing(self.service.each_round(self.generation, is_disconnected, self._step)) as rounds:
                async for delta in rounds:
                    yield delta
                    if self.text.stopped:
                        return
            yield self.text.flush()
        finally:
            self.total_ms = (time.perf_counter() - self.t0) * 1e3

    @property
    def finish_reason(self) -> str:
        result = self.generation.result
        return "stop" if self.text.stopped or (result is not None and result.stop_reason == "eos") else "length"

    def usage(self) -> dict:
        n = len(self.text.tokens)
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": n, "total_tokens": len(self.prompt_ids) + n}

    def timings(self) -> dict:
        s, n = self.stats, max(len(self.text.tokens), 1)
        result = self.generation.result
        return {
            "rounds": s.rounds, "drafted": s.drafted, "accepted": s.accepted, "resampled": s.resampled,
            "plain": s.plain,
            "acceptance_rate": s.acceptance_rate, "acceptance_rate_definition": "accepted drafts / drafted tokens",
            "mean_accepted_per_round": s.accepted / s.rounds if s.rounds else 0.0,
            "uplink_formula_bits": s.formula_bits, "uplink_wire_bytes": s.uplink_wire_bytes,
            "uplink_formula_bits_per_token": s.formula_bits / n, "uplink_wire_bytes_per_token": s.uplink_wire_bytes / n,
            "per_token_definition": "per completion token (usage.completion_tokens); the rounds may have "
                                    "committed a few more tokens past a stop",
            "time_to_first_token_ms": round(self.first_token_ms or 0.0, 3), "total_ms": round(self.total_ms, 3),
            "tokens_per_s": len(self.text.tokens) / (self.total_ms / 1e3) if self.total_ms > 0 else 0.0,
            "sparsifier": self.sparsifier, "reopens": result.stats.reopens if result else None,
        }


# --- the two kinds of completion -----------------------------------------------------------------


@dataclass(frozen=True)
class _Kind:
    id_prefix: str
    object: str
    chunk_object: str
    chat: bool

    def choice(self, text: str, finish: str | None, *, final: bool, stream: bool) -> dict:
        if not self.chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        if not stream:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish}
        return {"index": 0, "delta": {"content": text} if text or not final else {}, "logprobs": None,
                "finish_reason": finish}


COMPLETION = _Kind("cmpl-", "text_completion", "text_completion", chat=False)
CHAT = _Kind("chatcmpl-", "chat.completion", "chat.completion.chunk", chat=True)


# --- the routes ---------------------------------------------------------------------------------


class OpenAIRoutes:
    """What the routes delegate to. `service` is the daemon's edge.api.EdgeService (runtime,
    executor, each_round, config); `cloud_status(CloudError) -> int` is edge.api's status mapping."""

    def __init__(self, service, cloud_status: Callable[[CloudError], int]) -> None:
        self.service = service
        self.cloud_status = cloud_status
        self.created = int(time.time())
        self.target_model: str | None = None  # the cloud's, learned from the first finished generation
        self.running = 0

    # -- models
    @property
    def model_id(self) -> str:
        return self.service.config.served_model_name or self.service.runtime.engine.name

    def models(self) -> list[dict]:
        engine = self.service.runtime.engine
        return [{"id": self.model_id, "object": "model", "created": self.created, "owned_by": "sqs-sd",
                 "draft_model": engine.name, "draft_engine": engine.detail, "target_model": self.target_model,
                 "cloud": self.service.config.cloud, "max_tokens": MAX_TOKENS}]

    def check_model(self, name: str | None) -> None:
        known = {self.model_id, self.service.runtime.engine.name, self.target_model}
        if name is not None and name not in known:
            raise OpenAIError(404, f"model {name!r} does not exist: this daemon serves {self.model_id!r}",
                              param="model", code="model_not_found")

    # -- requests
    def check(self, req: BaseModel) -> None:
        """What no route can serve: refused fields, an unknown model."""
        _refuse_unsupported(req)
        self.check_model(req.model)

    def job(self, req: BaseModel, prompt_ids: list[int], max_tokens: int, stop_ids: set[int]) -> _Job:
        """The generation of a checked request (nothing runs yet); 400 for a bad option."""
        rt = self.service.runtime
        source = {name: getattr(req, name) for name in EXTENSIONS if getattr(req, name) is not None}
        source.update(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=0 if req.top_k in (None, -1) else req.top_k,
            seed=secrets.randbits(63) if req.seed is None else req.seed % SEED_LIMIT,
            max_new_tokens=max_tokens,
        )
        source.setdefault("draft_len", self.service.config.draft_len)
        if req.seed is not None and "reproducible" not in req.model_fields_set:
            source["reproducible"] = True  # a seed reproduces an answer whatever the plan, as users expect
        try:
            config = rt.draft_config(source)
        except ValueError as exc:
            word = str(exc).split(" ", 1)[0]
            raise OpenAIError(400, str(exc), param=word if word in options.BY_NAME else None,
                              code="invalid_value") from None
        for t in req.stop_token_ids or ():
            if not 0 <= t < rt.engine.vocab_size:
                raise OpenAIError(400, f"stop_token_ids: {t} is not a token id of the vocabulary (0..{rt.engine.vocab_size - 1})",
                                  param="stop_token_ids", code="invalid_value")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or ())
        if len(stop) > 16:
            raise OpenAIError(400, f"stop: at most 16 stop strings, got {len(stop)}", param="stop", code="invalid_value")
        ids = set(rt.engine.eos_token_ids) | stop_ids | set(req.stop_token_ids or ())
        return _Job(self.service, prompt_ids, config, max_tokens, rt.text_stream(stop, sorted(ids)))

    def completion_prompt(self, prompt: Any) -> list[int]:
        rt = self.service.runtime
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise OpenAIError(400, f"prompt: one prompt per request (got {len(prompt)}); send them one by one",
                                  param="prompt", code="invalid_value")
            prompt = prompt[0]
        if isinstance(prompt, str):
            try:
                return rt.encode(prompt)
            except ValueError as exc:
                raise OpenAIError(400, f"prompt: {exc}", param="prompt", code="invalid_value") from None
        V = rt.engine.vocab_size
        if not prompt or any(not 0 <= t < V for t in prompt):
            raise OpenAIError(400, f"prompt: token ids must be a non-empty list of ids in 0..{V - 1}",
                              param="prompt", code="invalid_value")
        return list(prompt)

    def chat_prompt(self, messages: list[ChatMessage]) -> tuple[list[int], set[int]]:
        """Token ids of the messages through the model's chat template, and its end-of-turn token."""
        tok = self.service.runtime.tokenizer
        if not getattr(tok, "chat_template", None) or not hasattr(tok, "apply_chat_template"):
            raise OpenAIError(400, f"model {self.model_id!r} has no chat template: use /v1/completions with a "
                              "prompt", param="messages", code="no_chat_template")
        conversation = []
        for i, m in enumerate(messages):
            content = m.content
            if isinstance(content, list):
                if any(p.type != "text" or p.text is None for p in content):
                    raise OpenAIError(400, f"messages.{i}.content: only text parts are supported",
                                      param=f"messages.{i}.content", code="invalid_value")
                content = "".join(p.text for p in content)
            conversation.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
        try:
            ids = tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True)
            ids = [int(t) for t in ids["input_ids"]]
        except Exception as exc:  # jinja2's TemplateError (raise_exception in a template), a tokenizer's ValueError
            raise OpenAIError(400, f"messages: the chat template refused them: {exc}", param="messages",
                              code="invalid_value") from None
        eot = getattr(tok, "eos_token_id", None)
        return ids, {eot} if isinstance(eot, int) else set()

    # -- answers
    def admit(self) -> Callable[[], None]:
        """A generation slot, or 503 with Retry-After at the daemon's limit; returns its release."""
        if self.running >= self.service.config.max_generations:
            raise OpenAIError(503, f"the daemon is at its limit of {self.service.config.max_generations} generations "
                              "at once; retry shortly", code="server_busy",
                              headers={"Retry-After": str(RETRY_AFTER_S["busy"])})
        self.running += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.running -= 1

        return release

    async def answer(self, kind: _Kind, req: BaseModel, make_job: Callable[[], _Job], request: Request) -> Response:
        """The response to a checked request: admitted (or 503), then generated whole or streamed."""
        release = self.admit()
        streaming = False
        try:
            job = make_job()
            if req.stream:
                streaming = True
                return await self._stream(kind, req, job, request, release)
            return await self._whole(kind, req, job, request)
        finally:
            if not streaming:
                release()

    def _base(self, kind: _Kind, rid: str, obj: str) -> dict:
        return {"id": rid, "object": obj, "created": int(time.time()), "model": self.model_id}

    def _learn(self, job: _Job) -> None:
        if job.generation.result is not None and job.generation.result.target_model:
            self.target_model = job.generation.result.target_model

    async def _whole(self, kind: _Kind, req: BaseModel, job: _Job, request: Request) -> Response:
        parts = []
        try:
            async for delta in job.deltas(request.is_disconnected):
                parts.append(delta)
        except Cancelled:
            return Response(status_code=499)  # nobody reads it: the client closed the request
        except CloudError as exc:
            raise _cloud_error(exc, self.cloud_status(exc)) from None
        self._learn(job)
        choice = kind.choice("".join(parts), job.finish_reason, final=True, stream=False)
        body = {**self._base(kind, kind.id_prefix + uuid.uuid4().hex, kind.object), "choices": [choice],
                "usage": job.usage(), "timings": job.timings()}
        if req.return_token_ids:
            body["prompt_token_ids"] = job.prompt_ids
            choice["token_ids"] = list(job.text.tokens)
        return JSONResponse(body)

    async def _stream(self, kind: _Kind, req: BaseModel, job: _Job, request: Request,
                      release: Callable[[], None]) -> Response:
        deltas = job.deltas(request.is_disconnected)
        try:  # the session opens and the first round runs before the 200: its errors are HTTP errors
            first = await anext(deltas)
        except Cancelled:
            release()
            return Response(status_code=499)
        except CloudError as exc:
            release()
            raise _cloud_error(exc, self.cloud_status(exc)) from None
        except BaseException:
            release()
            raise
        base = self._base(kind, kind.id_prefix + uuid.uuid4().hex, kind.chunk_object)
        with_usage = bool(req.stream_options and req.stream_options.include_usage)
        extra = {"usage": None} if with_usage else {}

        def chunk(text: str, finish: str | None = None, **more) -> str:
            return sse.event({**base, "choices": [kind.choice(text, finish, final=finish is not None, stream=True)],
                              **extra, **more})

        async def body() -> AsyncIterator[str]:
            try:
                if kind.chat:
                    yield sse.event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                          "logprobs": None, "finish_reason": None}], **extra})
                if first:
                    yield chunk(first)
                async for delta in deltas:
                    if delta:
                        yield chunk(delta)
                self._learn(job)
                more = {"token_ids": list(job.text.tokens)} if req.return_token_ids else {}
                yield chunk("", job.finish_reason, timings=job.timings(), **more)
                if with_usage:
                    yield sse.event({**base, "choices": [], "usage": job.usage()})
                yield sse.event("[DONE]")
            except Cancelled:
                log.info("HTTP client went away; streamed completion cancelled")
            except CloudError as exc:
                yield sse.event(_cloud_error(exc, self.cloud_status(exc)).body())
            except Exception as exc:  # the stream must end with an event, never hang
                log.exception("streamed completion failed")
                yield sse.event(OpenAIError(500, f"internal error: {exc}", code="internal_error").body())

        def end() -> None:
            job.cancel.set()
            release()

        return sse.EndingStream(end, body(), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class BearerKey:
    """ASGI middleware: every /v1/* request needs `Authorization: Bearer <key>` (constant-time
    comparison); 401 in OpenAI's shape otherwise. Other paths (/healthz, /metrics, /docs) stay open."""

    def __init__(self, app, key: str) -> None:
        self.app = app
        self._key = key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)):
                why = "a wrong API key" if given else "no API key (Authorization: Bearer <key>)"
                err = OpenAIError(401, f"this daemon requires an API key; the request has {why}",
                                  code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def register(app: FastAPI, service, cloud_status: Callable[[CloudError], int]) -> OpenAIRoutes:
    """Add the OpenAI routes to `app` (after its own exception handlers: errors under owns() are
    answered in OpenAI's shape, the others as before), and the API key check when one is set."""
    routes = OpenAIRoutes(service, cloud_status)

    @app.get("/v1/models", tags=["openai"])
    async def list_models():
        return {"object": "list", "data": routes.models()}

    @app.get("/v1/models/{model_id:path}", tags=["openai"])
    async def get_model(model_id: str):
        for m in routes.models():
            if m["id"] == model_id:
                return m
        routes.check_model(model_id)  # a name it answers to, but not the id
        return routes.models()[0]

    @app.post("/v1/completions", tags=["openai"])
    async def completions(req: CompletionRequest, request: Request):  # type: ignore[valid-type]
        routes.check(req)
        prompt_ids = routes.completion_prompt(req.prompt)
        max_tokens = req.max_tokens or COMPLETION_DEFAULT_MAX_TOKENS
        return await routes.answer(COMPLETION, req, lambda: routes.job(req, prompt_ids, max_tokens, set()), request)

    @app.post("/v1/chat/completions", tags=["openai"])
    async def chat_completions(req: ChatRequest, request: Request):  # type: ignore[valid-type]
        routes.check(req)
        prompt_ids, eot = routes.chat_prompt(req.messages)
        max_tokens = req.max_completion_tokens or req.max_tokens or MAX_TOKENS
        return await routes.answer(CHAT, req, lambda: routes.job(req, prompt_ids, max_tokens, eot), request)

    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, exc: OpenAIError):
        return exc.response()

    def dispatch(exc_class: type, ours: Callable[[Any], OpenAIError]) -> None:
        theirs = app.exception_handlers.get(exc_class)

        async def handler(request: Request, exc):
            if owns(request.url.path) or theirs is None:
                return ours(exc).response()
            return await theirs(request, exc)

        app.add_exception_handler(exc_class, handler)

    dispatch(RequestValidationError, _validation_error)
    dispatch(StarletteHTTPException, lambda exc: OpenAIError(
        exc.status_code, {404: "no such route", 405: "method not allowed"}.get(exc.status_code, str(exc.detail)),
        code={404: "not_found", 405: "method_not_allowed"}.get(exc.status_code), headers=exc.headers))
    if service.config.api_key:
        app.add_middleware(BearerKey, key=service.config.api_key)
    return routes
