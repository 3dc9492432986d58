"""llama.cpp batched across sessions: one llama_context, one sequence id per session (llama-server's slots).

    shared = BatchedLlama(model, max_seqs=64)        # model: a LlamaModel (the GGUF, loaded once)
    lm = shared.new_lm()                             # one per session, bound to a sequence id
    rows = lm.logits(context, want)                  # float32 [want, V], the LlamaLM contract
    out = BatchedLlamaLM.logits_batch(lms, contexts, wants)   # ONE llama_decode for all of them

Each :class:`BatchedLlamaLM` keeps its own prefix tracking, exactly as
:class:`sqs_models.llama_lm.LlamaLM`: the longest common prefix of its cached tokens and the new
context is kept, the rest is removed from ITS sequence (``llama_memory_seq_rm(mem, seq, keep, -1)``,
the rollback after a rejection), and only the tokens after it are fed. ``logits_batch`` puts every
session's new tokens in one ``llama_batch``, each under its sequence id at its own positions, with
the logits flag set on the wanted rows only, and decodes it (in chunks of ``n_batch`` tokens when it
is longer), so the weights are read once for all the sessions' rows: on a CPU, where a row alone
costs ~55 ms and ~28 ms in a 40-row pass (docs/DESIGN.md section 11), that is where capacity comes
from. The rows come back in batch order (llama.cpp keeps flagged outputs contiguous in that order).

The KV cache is unified (``kv_unified``): one buffer of ``n_ctx`` cells for all sequences, each
cell tagged with its sequence, attention masked per sequence. So a session may use any share of it;
when the cells of every session plus the new tokens would not fit, the context is recreated with
twice the room (every session then re-prefills once, on its next call), as LlamaLM grows its own.

Guarantees, each tested against per-session LlamaLMs (tests/test_llama_batched.py):

* Same rows per session as an unbatched LlamaLM, up to float rounding of other matmul shapes.
* A bad item (want out of range, a token outside the vocabulary, a context past the model's
  window, a closed LM) is refused with ValueError before any cache is touched, so the caller (the
  verifier) can run the items one by one and only that session fails.
* A failed ``llama_decode`` drops the cache of the sequences in that call only (they re-prefill
  next time); the other sessions' sequences are not touched.
* A closed or garbage-collected LM's sequence is cleared and its id reused. More sessions than
  ``max_seqs`` get a second shared context (never a crash); ``logits_batch`` decodes each context's
  sessions together, one decode per context.

Thread safety: one lock per shared context around every llama call on it. Callers keep the LM
contract: one thread at a time per LM (the verifier's session lock).
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from typing import Sequence

import numpy as np

from .llama_lm import INITIAL_CTX, N_BATCH, N_UBATCH, LlamaModel

__all__ = ["BatchedLlama", "BatchedLlamaLM", "MAX_SEQS"]

MAX_SEQS = 256  # llama.cpp's LLAMA_MAX_SEQ in 0.3.x: a context refuses n_seq_max above it


class BatchedLlama:
    """Per-session LMs over shared llama_contexts of `max_seqs` sequences each (made as needed)."""

    def __init__(self, model: LlamaModel, *, max_seqs: int = 64, initial_ctx: int = INITIAL_CTX) -> None:
        if not 1 <= max_seqs <= MAX_SEQS:
            raise ValueError(f"max_seqs must lie in [1, {MAX_SEQS}]")
        self.model = model
        self.max_seqs = max_seqs
        self.initial_ctx = initial_ctx
        self._lock = threading.Lock()
        self._contexts: list[_SharedContext] = []

    def new_lm(self) -> BatchedLlamaLM:
        with self._lock:
            for shared in self._contexts:
                lm = shared.new_lm()
                if lm is not None:
                    return lm
            shared = _SharedContext(self.model, self.max_seqs, self.initial_ctx)
            self._contexts.append(shared)
            return shared.new_lm()

    @property
    def contexts(self) -> int:
        """llama_contexts made so far (more than one only past max_seqs live sessions)."""
        return len(self._contexts)

    def close(self) -> None:
        with self._lock:
            for shared in self._contexts:
                with shared.lock:
                    shared.free()
            self._contexts = []


class _SharedContext:
    """One llama_context with a unified KV cache, its sequence ids and the lock around it."""

    def __init__(self, owner: LlamaModel, max_seqs: int, initial_ctx: int) -> None:
        self.owner = owner  # keeps the model alive while this context exists
        self.lc = owner._lc
        self.max_seqs = max_seqs
        self.initial_ctx = initial_ctx
        self.lock = threading.Lock()  # every llama call on ctx/mem, and every lm._tokens change
        self.ctx = None
        self.mem = None
        self.batch = None
        self.n_ctx = 0
        self.n_batch = 0
        self._free = list(range(max_seqs - 1, -1, -1))  # ids ready to hand out (pop from the end: 0 first)
        self._released: deque[int] = deque()  # ids of closed LMs, still to clear (under the lock)
        # The LM of each id handed out, until its release is reaped; changed and read under the lock
        # only (a WeakValueDictionary would change under a reader when the GC runs in another thread).
        self._lms: dict[int, weakref.ref[BatchedLlamaLM]] = {}

    def new_lm(self) -> BatchedLlamaLM | None:
        """An LM on a free sequence id, or None when all max_seqs are taken."""
        with self.lock:
            self.reap()
            if not self._free:
                return None
            lm = BatchedLlamaLM(self, self._free.pop())
            self._lms[lm.seq] = weakref.ref(lm)
            return lm

    def live(self) -> list[BatchedLlamaLM]:
        """The LMs holding a sequence id (lock held)."""
        return [lm for lm in (r() for r in self._lms.values()) if lm is not None]

    def release(self, seq: int) -> None:
        """A closed LM's id: cleared now if nobody is decoding, else by the next call (never
        blocks: __del__ may run in a thread that holds the lock)."""
        self._released.append(seq)
        if self.lock.acquire(blocking=False):
            try:
                self.reap()
            finally:
                self.lock.release()

    def reap(self) -> None:
        """Clear the released sequences and make their ids free again (lock held)."""
        while self._released:
            seq = self._released.popleft()
            self._lms.pop(seq, None)
            if self.mem is not None:
                self.lc.llama_memory_seq_rm(self.mem, seq, -1, -1)
            self._free.append(seq)

    def reserve(self, cells: int) -> None:
        """A context with at least `cells` KV cells; a new one (every sequence empty) when it grows."""
        if self.ctx is not None and cells <= self.n_ctx:
            return
        size = max(self.initial_ctx, 2 * self.n_ctx)
        while size < cells:
            size *= 2
        self.free()
        lc = self.lc
        params = lc.llama_context_default_params()
        threads = self.owner.threads
        # As LlamaLM's own context, but max_seqs sequences in one unified KV buffer (any session
        # may use any share of it).
        for name, value in dict(n_ctx=size, n_batch=min(N_BATCH, size), n_ubatch=min(N_UBATCH, size),
                                n_seq_max=self.max_seqs, kv_unified=True, n_threads=threads,
                                n_threads_batch=threads, no_perf=True).items():
            setattr(params, name, value)
        ctx = lc.llama_init_from_model(self.owner._model, params)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {size} tokens for {self.max_seqs} sequences")
        n_batch = int(lc.llama_n_batch(ctx))
        self.ctx, self.mem, self.n_ctx, self.n_batch = ctx, lc.llama_get_memory(ctx), size, n_batch
        self.batch = lc.llama_batch_init(n_batch, 0, 1)

    def free(self) -> None:
        """Free the context; every LM on it starts again from an empty cache."""
        for lm in self.live():
            lm._tokens = []
        if self.batch is not None:
            self.lc.llama_batch_free(self.batch)
        if self.ctx is not None:
            self.lc.llama_free(self.ctx)
        self.ctx = self.mem = self.batch = None
        self.n_ctx = 0

    def drop(self, lms: Sequence[BatchedLlamaLM]) -> None:
        """Forget the cache of these sessions' sequences (after a failed decode; lock held)."""
        for lm in lms:
            if self.mem is not None:
                self.lc.llama_memory_seq_rm(self.mem, lm.seq, -1, -1)
            lm._tokens = []

    def decode(self, lms: Sequence[BatchedLlamaLM], contexts: Sequence[Sequence[int]],
               wants: Sequence[int]) -> list[np.ndarray]:
        """The rows of every (lm, context, want) on this context: one llama_batch, n_batch tokens a call."""
        with self.lock:
            self.reap()
            mine = {id(lm) for lm in lms}
            others = sum(len(lm._tokens) for lm in self.live() if id(lm) not in mine)
            self.reserve(others + sum(len(ctx) for ctx in contexts))  # the cells in use after this decode
            keeps = [lm._common_prefix(ctx, want) for lm, ctx, want in zip(lms, contexts, wants)]
            lc = self.lc
            for lm, keep in zip(lms, keeps):
                if len(lm._tokens) > keep:
                    if not lc.llama_memory_seq_rm(self.mem, lm.seq, keep, -1):
                        lc.llama_memory_seq_rm(self.mem, lm.seq, -1, -1)
                        keep = 0
                    del lm._tokens[keep:]
            # Every token to feed: (session index, token, position, wanted row?), sessions in order.
            feed = []
            for i, (lm, ctx, want) in enumerate(zip(lms, contexts, wants)):
                keep = len(lm._tokens)
                first_out = len(ctx) - want
                feed += [(i, int(ctx[p]), p, p >= first_out) for p in range(keep, len(ctx))]
            V, n_vocab = self.owner.vocab_size, self.owner.n_vocab
            rows = [np.full((want, V), -np.inf, dtype=np.float32) for want in wants]  # [want_i, V] each
            filled = [0] * len(lms)
            batch = self.batch
            for start in range(0, len(feed), self.n_batch):
                chunk = feed[start:start + self.n_batch]
                outs = []
                for j, (i, tok, pos, out) in enumerate(chunk):
                    batch.token[j] = tok
                    batch.pos[j] = pos
                    batch.n_seq_id[j] = 1
                    batch.seq_id[j][0] = lms[i].seq
                    batch.logits[j] = out
                    if out:
                        outs.append(i)
                batch.n_tokens = len(chunk)
                rc = lc.llama_decode(self.ctx, batch)
                if rc != 0:
                    # A failed decode may have cached part of the batch: drop these sequences (they
                    # re-prefill next time); the other sessions' sequences were not in it.
                    self.drop(lms)
                    raise RuntimeError(f"llama_decode returned {rc} ({len(chunk)} tokens of {len(lms)} sessions)")
                for i, tok, _, _ in chunk:
                    lms[i]._tokens.append(tok)
                if outs:
                    ptr = lc.llama_get_logits(self.ctx)  # the flagged rows, contiguous, in batch order
                    got = np.ctypeslib.as_array(ptr, shape=(len(outs), n_vocab))  # [outs, n_vocab]
                    for r, i in enumerate(outs):
                        rows[i][filled[i], :n_vocab] = got[r]
                        filled[i] += 1
            return rows


class BatchedLlamaLM:
    """One session's sequence in a shared llama_context; same contract as LlamaLM.logits."""

    # logits_batch feeds each session its own new tokens, unpadded: a prompt's prefill can share
    # a pass with other sessions' one-row steps (cloud/verifier.py prefills_in_passes).
    ragged_batch = True

    def __init__(self, shared: _SharedContext, seq: int) -> None:
        self._shared = shared
        self.seq = seq
        self._tokens: list[int] = []  # tokens of this sequence in the KV cache, in order
        self._closed = False

    def _common_prefix(self, context: Sequence[int], want: int) -> int:
        keep = 0
        limit = min(len(self._tokens), len(context) - want)  # the last `want` tokens must be fed for their rows
        while keep < limit and self._tokens[keep] == context[keep]:
            keep += 1
        return keep

    def _check(self, context: Sequence[int], want: int) -> None:
        """ValueError for an item that must not enter a shared decode."""
        n = len(context)
        if self._closed:
            raise ValueError("this LM was closed")
        if not 1 <= want <= n:
            raise ValueError(f"want={want} must lie in [1, len(context)={n}]")
        owner = self._shared.owner
        if n > owner.n_ctx_train:
            raise ValueError(f"context of {n} tokens exceeds the model's window of {owner.n_ctx_train}")
        bad = next((t for t in context if not 0 <= int(t) < owner.n_vocab), None)
        if bad is not None:
            raise ValueError(f"token {bad} is outside the model's vocabulary of {owner.n_vocab}")

    def logits(self, context: Sequence[int], want: int) -> np.ndarray:
        """Next-token logits after each of the last `want` positions of context: float32 [want, V].

        Row i predicts the token after context[len(context) - want + i].
        """
        return self.logits_batch([self], [context], [want])[0]

    @staticmethod
    def logits_batch(lms: Sequence[BatchedLlamaLM], contexts: Sequence[Sequence[int]],
                     wants: Sequence[int]) -> list[np.ndarray]:
        """`[lm.logits(context, want) for ...]` with ONE llama_decode per shared context (one in all
        unless there are more sessions than max_seqs). Every lm appears once; a bad item raises
        ValueError before any cache changes; a failed decode drops only these sessions' caches."""
        if not (len(lms) == len(contexts) == len(wants)):
            raise ValueError("lms, contexts and wants must have the same length")
        if len({id(lm) for lm in lms}) != len(lms):
            raise ValueError("a batch needs distinct LMs")
        for i, (lm, ctx, want) in enumerate(zip(lms, contexts, wants)):
            if not isinstance(lm, BatchedLlamaLM):
                raise ValueError(f"item {i}: {type(lm).__name__} is not a BatchedLlamaLM")
            try:
                lm._check(ctx, want)
            except ValueError as exc:
                raise ValueError(f"item {i}: {exc}") from None
        groups: dict[int, list[int]] = {}
        for i, lm in enumerate(lms):
            groups.setdefault(id(lm._shared), []).append(i)
        if len({id(lm._shared.owner) for lm in lms}) > 1:
            raise ValueError("a batch needs LMs over one model")
        out: list[np.ndarray | None] = [None] * len(lms)
        for idx in groups.values():
            shared = lms[idx[0]]._shared
            rows = shared.decode([lms[i] for i in idx], [contexts[i] for i in idx], [wants[i] for i in idx])
            for i, r in zip(idx, rows):
                out[i] = r
        return out  # type: ignore[return-value]

    def close(self) -> None:
        """Give the sequence back (its cache is cleared before the id is reused)."""
        if not self._closed:
            self._closed = True
            self._tokens = []
            self._shared.release(self.seq)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass
