"""llama.cpp behind the LM protocol: one GGUF shared by many per-session KV caches.

    model = LlamaModel(path, threads=2)       # loads (mmaps) the GGUF once
    lm = model.new_lm()                       # one per session: its own llama_context
    rows = lm.logits(context, want)           # float32 [want, V], as CachedLM

Uses llama-cpp-python's low-level C API (0.3.x): ``llama_decode`` on a ``llama_batch`` whose
``logits`` flags are set only for the last ``want`` tokens, so llama.cpp computes and copies just
those rows. ``Llama(logits_all=True)`` would instead preallocate n_ctx x 151,936 floats and
compute the lm_head for every prompt token (docs/DESIGN.md section 10).

The KV cache follows the context exactly as in :class:`sqs_models.cached_lm.CachedLM`: the longest
common prefix with the previous context is kept, the rest is removed with
``llama_memory_seq_rm(mem, 0, keep, -1)`` (the rollback after a rejection), and only the tokens
after it are decoded. A session's context starts small (``n_ctx`` 512 tokens of KV memory) and is
recreated with twice the room when a context outgrows it (the cache is refilled once), so idle or
short sessions do not each hold the model's full 32k window.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["LlamaModel", "LlamaLM", "llama_cpp_version", "probe_decode"]

# A session's first KV window and the tokens one llama_decode call takes. Small ubatches keep
# each context's compute buffer small (its worst case scales with n_ubatch x vocab).
INITIAL_CTX = 512
N_BATCH = 256
N_UBATCH = 128

_init_lock = threading.Lock()
_backend_ready = False


def _lib():
    """Import llama_cpp (loads the shared library) and initialise the backend once."""
    global _backend_ready
    import llama_cpp

    with _init_lock:
        if not _backend_ready:
            if not logging.getLogger("llama-cpp-python").level:
                # llama-cpp-python prints every llama.cpp log line unless its logger says otherwise.
                logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
            llama_cpp.llama_backend_init()
            _backend_ready = True
    return llama_cpp


def llama_cpp_version() -> str | None:
    """The installed llama-cpp-python version, or None (without importing it)."""
    import importlib.metadata as md

    try:
        return md.version("llama-cpp-python")
    except md.PackageNotFoundError:
        return None


class LlamaModel:
    """A GGUF loaded by llama.cpp on the CPU; :meth:`new_lm` makes per-session LMs over it.

    threads: llama.cpp threads for every decode (0 = the CPUs this process may run on).
    vocab_size: logits width to return; rows wider than llama.cpp's vocabulary are padded with
        -inf (never happens for the Qwen pair: both say 151,936).
    extra_bufts: llama.cpp's extra weight buffer types (runtime repack, AMX): None = as a child
        process found for this file on this CPU (sqs_models.llama_probe: they crash some AMX
        CPUs), True/False = as told. ``self.extra_bufts`` says what was used.
    """

    def __init__(self, path: str | Path, *, threads: int = 0, vocab_size: int | None = None,
                 extra_bufts: bool | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {self.path}")
        if extra_bufts is None:
            from .llama_probe import extra_bufts_ok

            extra_bufts, _ = extra_bufts_ok(self.path)
        self.extra_bufts = bool(extra_bufts)
        lc = _lib()
        self.threads = threads if threads > 0 else len(os.sched_getaffinity(0))
        params = lc.llama_model_default_params()
        params.n_gpu_layers = 0
        params.use_extra_bufts = self.extra_bufts
        model = lc.llama_model_load_from_file(str(self.path).encode(), params)
        if not model:
            raise RuntimeError(f"llama.cpp could not load {self.path}")
        self._lc = lc
        self._model = model
        vocab = lc.llama_model_get_vocab(model)
        self.n_vocab = int(lc.llama_vocab_n_tokens(vocab))
        self.vocab_size = int(vocab_size) if vocab_size is not None else self.n_vocab
        if self.vocab_size < self.n_vocab:
            raise ValueError(f"vocab_size {self.vocab_size} < llama.cpp's vocabulary {self.n_vocab}")
        self.n_ctx_train = int(lc.llama_model_n_ctx_train(model))
        buf = (b"\0" * 256)
        lc.llama_model_desc(model, buf, len(buf))
        self.description = buf.split(b"\0", 1)[0].decode(errors="replace")  # e.g. "qwen2 1.5B Q4_K - Medium"
        self._lms: weakref.WeakSet[LlamaLM] = weakref.WeakSet()

    def new_lm(self) -> LlamaLM:
        lm = LlamaLM(self)
        self._lms.add(lm)
        return lm

    def close(self) -> None:
        """Free the model (and any context still open on it)."""
        for lm in list(self._lms):
            lm.close()
        if self._model:
            self._lc.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


class LlamaLM:
    """One session's KV cache on a :class:`LlamaModel`; same contract as CachedLM.logits."""

    def __init__(self, owner: LlamaModel) -> None:
        self._owner = owner  # keeps the model alive while this context exists
        self._lc = owner._lc
        self._ctx = None
        self._mem = None
        self._batch = None
        self._n_ctx = 0
        self._tokens: list[int] = []  # tokens whose key/values are in the cache, in order

    def _reserve(self, n: int) -> None:
        """A context with room for n tokens; a new one (empty cache) when the old is too small."""
        if self._ctx is not None and n <= self._n_ctx:
            return
        limit = self._owner.n_ctx_train
        if n > limit:
            raise ValueError(f"context of {n} tokens exceeds the model's window of {limit}")
        size = max(INITIAL_CTX, 2 * self._n_ctx)
        while size < n:
            size *= 2
        size = min(size, limit)
        self._free_ctx()
        lc = self._lc
        params = lc.llama_context_default_params()
        params.n_ctx = size
        params.n_batch = min(N_BATCH, size)
        params.n_ubatch = min(N_UBATCH, size)
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = self._owner.threads
        params.no_perf = True
        ctx = lc.llama_init_from_model(self._owner._model, params)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {size} tokens")
        self._ctx = ctx
        self._mem = lc.llama_get_memory(ctx)
        self._n_ctx = size
        self._n_batch = int(lc.llama_n_batch(ctx))
        self._batch = lc.llama_batch_init(self._n_batch, 0, 1)
        self._tokens = []

    def logits(self, context: Sequence[int], want: int) -> np.ndarray:
        """Next-token logits after each of the last `want` positions of context: float32 [want, V].

        Row i predicts the token after context[len(context) - want + i].
        """
        n = len(context)
        if not 1 <= want <= n:
            raise ValueError(f"want={want} must lie in [1, len(context)={n}]")
        self._reserve(n)
        lc = self._lc
        keep = 0
        limit = min(len(self._tokens), n - want)  # the last `want` tokens must be fed to get their rows
        while keep < limit and self._tokens[keep] == context[keep]:
            keep += 1
        if len(self._tokens) > keep:
            if not lc.llama_memory_seq_rm(self._mem, 0, keep, -1):
                lc.llama_memory_clear(self._mem, True)
                keep = 0
            del self._tokens[keep:]
        new = [int(t) for t in context[keep:]]
        first_out = len(new) - want  # index in `new` of the first token whose row is returned
        owner = self._owner
        rows = np.full((want, owner.vocab_size), -np.inf, dtype=np.float32)  # [want, V]
        filled = 0
        batch = self._batch
        for start in range(0, len(new), self._n_batch):
            chunk = new[start:start + self._n_batch]
            n_out = 0
            for i, tok in enumerate(chunk):
                batch.token[i] = tok
                batch.pos[i] = keep + start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                out = start + i >= first_out
                batch.logits[i] = out
                n_out += out
            batch.n_tokens = len(chunk)
            rc = lc.llama_decode(self._ctx, batch)
            if rc != 0:
                lc.llama_memory_clear(self._mem, True)  # a failed decode may leave part of it cached
                self._tokens = []
                raise RuntimeError(f"llama_decode returned {rc} ({len(chunk)} tokens at position {keep + start})")
            self._tokens.extend(chunk)
            if n_out:
                ptr = lc.llama_get_logits(self._ctx)  # the flagged rows, contiguous, in batch order
                out_rows = np.ctypeslib.as_array(ptr, shape=(n_out, owner.n_vocab))
                rows[filled:filled + n_out, : owner.n_vocab] = out_rows
                filled += n_out
        return rows

    def _free_ctx(self) -> None:
        if self._batch is not None:
            self._lc.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            self._lc.llama_free(self._ctx)
            self._ctx = None
            self._mem = None
        self._n_ctx = 0
        self._tokens = []

    def close(self) -> None:
        self._free_ctx()

    def __del__(self) -> None:
        try:
            self._free_ctx()
        except Exception:  # interpreter shutdown
            pass


def probe_decode(path: str, rows: Sequence[int] = (1, 4, 9, 17)) -> None:
    """What sqs_models.llama_probe's child process runs: load ``path`` WITH llama.cpp's extra buffer
    types and decode a 32-token prefill and a pass of each of ``rows``; it returns (and the child
    exits 0) only if every pass gives finite logits. Crashing here is the point: never call it in
    a process that must survive."""
    m = LlamaModel(path, threads=1, extra_bufts=True)
    lm = m.new_lm()
    n = m.n_vocab
    ctx = [(7 + 13 * i) % n for i in range(32)]
    lm.logits(ctx, want=1)
    for r in rows:
        out = lm.logits(ctx + [(11 + 17 * i) % n for i in range(r)], want=r)[:, :n]
        if out.shape[0] != r or not np.isfinite(out).all():
            raise SystemExit(f"{r}-row pass returned non-finite logits")
    print(f"decoded a prefill and passes of {', '.join(map(str, rows))} rows with them", flush=True)
    m.close()
