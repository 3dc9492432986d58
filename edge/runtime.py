"""The edge runtime: a loaded draft engine and a way to reach the cloud, running generations.

    runtime = EdgeRuntime.load(DraftSpec("qwen2.5-coder-0.5b", engine="auto"), ClientConfig("cloud:50051"))
    config = runtime.draft_config(options)               # generation options -> DraftConfig
    for r in runtime.start(runtime.encode(prompt), config, max_new_tokens=64):
        print(runtime.decode(r.tokens))                 # one round at a time
    result = runtime.generate(prompt_ids, config, max_new_tokens=64)   # or all at once

Everything that runs a generation (sqs-edge generate and serve, sqs-loadtest, the benchmarks, the
tests) goes through this one object; none of them builds a Drafter or a CloudClient itself. Each
generation gets its own draft KV cache (`engine.new_lm()`) and its own cloud session, closed when
the generation ends however it ends (done, error, cancel, a consumer that stops reading).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Callable

from common.allocator import keep_freed_memory
from common.metrics import Metrics
from edge.client import ClientConfig, CloudClient
from edge.drafter import DraftConfig, Drafter
from edge.generate import Cloud, Generation, GenerationResult, RoundOutput, run_to_end
from edge.options import token_of
from edge.stop_text import StopText


@dataclass(frozen=True)
class DraftSpec:
    """Which draft model the edge loads, and how (sqs_models.engines.load_engine)."""

    model: str = "tiny"  # a name of sqs_models.registry or a local model directory
    engine: str = "auto"  # common.lm.ENGINES
    dtype: str | None = None  # torch engine only; None = measured at load
    threads: int = 0  # llama.cpp threads (0 = the CPUs this process may use)

    @classmethod
    def from_args(cls, a: Any, threads: int = 0) -> "DraftSpec":
        """From the flags of edge/options.add_runtime_args."""
        return cls(a.draft_model, engine=a.engine, dtype=a.dtype, threads=threads)


def client_config_from_args(a: Any, **overrides: Any) -> ClientConfig:
    """ClientConfig from the flags of edge/options.add_runtime_args; ValueError for a bad value."""
    return ClientConfig(a.cloud, **{"transport": a.transport, "connect_wait_s": a.wait_for_cloud,
                                    "outage_window_s": a.outage_window, "tls_ca": a.tls_ca, "tls_cert": a.tls_cert,
                                    "tls_key": a.tls_key, "token": token_of(a), "insecure": a.insecure, **overrides})


# How a generation reaches the cloud: a client for one session, given the generation's cancel
# event. The default is a CloudClient on the runtime's ClientConfig; a benchmark wraps it (an
# analytic link) and a unit test replaces it (an in-process verifier).
Connect = Callable[[threading.Event | None], Cloud]


class EdgeRuntime:
    def __init__(self, engine: Any, client: ClientConfig | None, *, metrics: Metrics | None = None,
                 connect: Connect | None = None) -> None:
        """engine: a loaded sqs_models.engines.Engine (new_lm, tokenizer, vocab_size,
        eos_token_ids, fingerprint); client: how to reach the cloud (None: not known yet, see
        with_cloud; such a runtime encodes and configures but cannot run); metrics: observed per round."""
        self.engine = engine
        self.client_config = client
        self.metrics = metrics
        self._connect = connect or self._cloud_client
        self._active = 0  # generations running (the sessions gauge)
        self._lock = threading.Lock()

    def _cloud_client(self, cancel: threading.Event | None) -> CloudClient:
        if self.client_config is None:
            raise RuntimeError("this edge runtime has no cloud yet (EdgeRuntime.with_cloud)")
        return CloudClient(self.client_config, cancel=cancel)

    @classmethod
    def load(cls, spec: DraftSpec, client: ClientConfig | None = None, *,
             metrics: Metrics | None = None) -> "EdgeRuntime":
        """Load the draft engine of `spec`. Raises ModelNotInstalled / EngineUnavailable / ValueError
        (one line each) for a model or engine that cannot run here."""
        from sqs_models.engines import load_engine

        keep_freed_memory()  # every draft row is sparsified from [V] arrays
        engine = load_engine(spec.model, "draft", engine=spec.engine, dtype=spec.dtype, threads=spec.threads)
        return cls(engine, client, metrics=metrics)

    def with_cloud(self, client: ClientConfig) -> "EdgeRuntime":
        """The same engine and metrics, reaching the cloud through `client`."""
        return EdgeRuntime(self.engine, client, metrics=self.metrics)

    def wrapped(self, around: Callable[[Cloud], Cloud]) -> "EdgeRuntime":
        """The same engine and metrics, each session's client wrapped (bench/link_model.py)."""
        inner = self._connect
        return EdgeRuntime(self.engine, self.client_config, metrics=self.metrics,
                           connect=lambda cancel: around(inner(cancel)))

    # -- text and options ---------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def encode(self, prompt: str) -> list[int]:
        """Token ids of a prompt; ValueError when it encodes to none."""
        ids = [int(t) for t in self.engine.tokenizer.encode(prompt)]
        if not ids:
            raise ValueError("the prompt encodes to no tokens")
        return ids

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.engine.tokenizer.decode(list(token_ids))

    def text_stream(self, stop: Sequence[str] = (), stop_ids: Sequence[int] = ()) -> StopText:
        """Incremental detokenization of a generation's tokens (push per round, flush at the end),
        optionally cut at stop strings / stop tokens (edge/stop_text.py)."""
        return StopText(self.decode, stop, stop_ids)

    def draft_config(self, source: Any, **overrides: Any) -> DraftConfig:
        """DraftConfig from generation options (edge/options.py names) held by an argparse
        namespace, an HTTP request, a mapping or a config object; ValueError with the reason."""
        return DraftConfig.from_options(source, self.engine.vocab_size, **overrides)

    # -- generations --------------------------------------------------------------------------
    def start(self, prompt_ids: Sequence[int], config: DraftConfig, *, max_new_tokens: int,
              cancel: threading.Event | None = None, lm: Any = None, previews: bool = False) -> "EdgeGeneration":
        """A generation to iterate round by round (nothing runs before the first next()).

        lm: a draft LM (engine.new_lm()) to reuse, e.g. one per load-test client: its KV cache
        follows whatever context it is given; default a new one for this generation.
        previews: also yield the tokens of a streamed plain round as they arrive (RoundOutput with
        record None, edge/generate.py), for a consumer that shows tokens as they come."""
        return EdgeGeneration(self, list(prompt_ids), config, max_new_tokens, cancel, lm, previews)

    def generate(self, prompt_ids: Sequence[int], config: DraftConfig, *, max_new_tokens: int,
                 cancel: threading.Event | None = None) -> GenerationResult:
        return run_to_end(self.start(prompt_ids, config, max_new_tokens=max_new_tokens, cancel=cancel))

    def _count_active(self, delta: int) -> None:
        with self._lock:
            self._active += delta
            if self.metrics is not None:
                self.metrics.sessions.set(self._active)


class EdgeGeneration:
    """One generation of a runtime: iterate for RoundOutput, then read `result` (and `drafter`).

    The cloud session is opened at the first next() and closed when the iteration ends, raises,
    or is closed (`close()`, or the iterator garbage-collected)."""

    def __init__(self, runtime: EdgeRuntime, prompt_ids: list[int], config: DraftConfig, max_new_tokens: int,
                 cancel: threading.Event | None, lm: Any = None, previews: bool = False) -> None:
        self.runtime = runtime
        self.prompt_ids = prompt_ids
        self.config = config
        self.max_new_tokens = max_new_tokens
        self.cancel = cancel
        self.previews = previews
        e = runtime.engine
        self.drafter = Drafter(lm if lm is not None else e.new_lm(), config, e.eos_token_ids)
        self.result: GenerationResult | None = None
        self._rounds: Iterator[RoundOutput] | None = None

    def __iter__(self) -> Iterator[RoundOutput]:
        if self._rounds is None:
            self._rounds = self._run()
        return self._rounds

    def close(self) -> None:
        """End the generation between rounds (its cloud session is closed)."""
        if self._rounds is not None:
            self._rounds.close()  # type: ignore[attr-defined]

    def _run(self) -> Iterator[RoundOutput]:
        rt = self.runtime
        sparsifier = self.config.scheme.scheme.value
        rt._count_active(+1)
        client = rt._connect(self.cancel)
        try:
            g = Generation(self.prompt_ids, self.drafter, client, max_new_tokens=self.max_new_tokens,
                           vocab_fingerprint=rt.engine.fingerprint, previews=self.previews)
            for r in g:
                if rt.metrics is not None and r.record is not None:
                    rt.metrics.observe_record(sparsifier, r.record)
                yield r
            self.result = g.result
        finally:
            close = getattr(client, "close", None)
            if close is not None:
                close()  # closes the cloud session
            rt._count_active(-1)
