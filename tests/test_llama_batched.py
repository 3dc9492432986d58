"""llama.cpp batched across sessions (sqs_models/llama_batched.py) against per-session LlamaLMs.

The oracle: every row BatchedLlamaLM.logits_batch returns equals the row a session's own LlamaLM
(own llama_context) gives for the same context, within ATOL, over a seeded random walk of
sessions that extend, roll back after a rejection, share prefixes, join and leave, with more
sessions than one context holds and a KV cache that has to grow. Then the failure modes: a bad item
is refused before any cache changes, a failed llama_decode drops only the sequences of its call,
closed sessions give their sequence ids back with nothing of theirs left in the cache.

On the tiny target's GGUF (F32, bench/tiny_gguf.py), so CI needs no Qwen model.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[llama]')")

from sqs_models.llama_batched import BatchedLlama, BatchedLlamaLM  # noqa: E402

# Logits of the tiny target are O(5). The batched and the per-session pass differ by float rounding
# only: llama.cpp's CPU flash attention accumulates V in F16 in KV-cell order, and a session's cells
# lie in another order in the shared cache (measured over the walk below: up to 1.9e-3; 1.1e-4 with
# flash attention off; 7e-5 between one-token steps and one multi-row pass of a LlamaLM alone).
# A stale or misplaced cache entry moves them by O(1) (checked in the walk, as a negative control).
ATOL = 5e-3


@pytest.fixture(scope="module")
def model(tiny_llama_target):
    return tiny_llama_target


def assert_rows_equal(got: np.ndarray, ref: np.ndarray, what) -> None:
    assert got.shape == ref.shape and got.dtype == np.float32, what
    assert np.abs(got - ref).max() <= ATOL, (what, float(np.abs(got - ref).max()))


def test_random_walk_equals_per_session_passes(model):
    """60 steps; each a random subset of live sessions in one logits_batch call."""
    rng = np.random.default_rng(20)
    shared = BatchedLlama(model, max_seqs=4, initial_ctx=64)  # 6+ sessions: a second context; growth past 64 cells
    prompt = rng.integers(0, 128, size=12).tolist()  # the prefix some sessions share

    class Session:
        def __init__(self):
            self.lm = shared.new_lm()
            self.ref = model.new_lm()
            self.context = (prompt if rng.random() < 0.5 else []) + rng.integers(0, 128, size=int(rng.integers(1, 20))).tolist()

    sessions = [Session() for _ in range(6)]
    joined = left = 0
    for step in range(60):
        if rng.random() < 0.15 and len(sessions) > 2:  # a session leaves (GC gives its sequence back)
            sessions.pop(int(rng.integers(len(sessions))))
            left += 1
            gc.collect()
        if rng.random() < 0.2:  # one joins
            sessions.append(Session())
            joined += 1
        chosen = [s for s in sessions if rng.random() < 0.7] or sessions[:1]
        wants = []
        for s in chosen:
            move = rng.random()
            if move < 0.3 and len(s.context) > 3:  # rejection: roll back, then new drafts
                s.context = s.context[: int(rng.integers(1, len(s.context)))]
            if move < 0.9 or len(s.context) > 200:
                s.context = s.context[:200] + rng.integers(0, 128, size=int(rng.integers(1, 7))).tolist()
            wants.append(int(rng.integers(1, min(len(s.context), 8) + 1)))
        got = BatchedLlamaLM.logits_batch([s.lm for s in chosen], [s.context for s in chosen], wants)
        for s, want, rows in zip(chosen, wants, got):
            assert_rows_equal(rows, s.ref.logits(s.context, want), (step, len(s.context), want))
        if step == 30:  # the tolerance tells a wrong cache apart: one cached token off
            s = chosen[0]
            off = s.context[:-2] + [(s.context[-2] + 1) % 128] + s.context[-1:]
            assert np.abs(model.new_lm().logits(off, 1) - got[0][-1:]).max() > 20 * ATOL
    assert joined and left
    assert shared.contexts >= 2  # past max_seqs live sessions: a second context, no crash
    assert max(c.n_ctx for c in shared._contexts) > 64  # the unified cache grew


def test_single_session_logits_is_the_llama_lm_contract(model):
    shared = BatchedLlama(model, max_seqs=2)
    lm, ref = shared.new_lm(), model.new_lm()
    ctx = list(range(30))
    for c, want in [(ctx[:10], 1), (ctx, 20), (ctx[:25] + [1, 2], 3), (ctx[:5], 5)]:
        assert_rows_equal(lm.logits(c, want), ref.logits(c, want), (len(c), want))
    for want in (0, 6):
        with pytest.raises(ValueError):
            lm.logits(ctx[:5], want)


def test_sequence_ids_are_recycled_with_nothing_left_in_the_cache(model):
    shared = BatchedLlama(model, max_seqs=2)
    a, b = shared.new_lm(), shared.new_lm()
    a.logits(list(range(40)), 1)
    b.logits(list(range(50, 90)), 1)
    seq_a = a.seq
    del a
    gc.collect()
    c = shared.new_lm()  # a's id, its cells cleared
    assert c.seq == seq_a and shared.contexts == 1
    ctx = list(range(40))[:20] + [7, 7, 7]  # shares a prefix with what a had cached under that id
    assert_rows_equal(c.logits(ctx, 4), model.new_lm().logits(ctx, 4), "recycled id")
    b.close()
    b.close()  # idempotent
    with pytest.raises(ValueError):
        b.logits([1, 2], 1)
    d, e = shared.new_lm(), shared.new_lm()  # b's id, then a second context (2 per context)
    assert shared.contexts == 2 and {d.seq, c.seq} == {0, 1}
    out = BatchedLlamaLM.logits_batch([c, d, e], [ctx, [1, 2, 3], [4, 5]], [1, 2, 1])
    for rows, cx, w in zip(out, [ctx, [1, 2, 3], [4, 5]], [1, 2, 1]):
        assert_rows_equal(rows, model.new_lm().logits(cx, w), (cx, w))


def test_a_bad_item_is_refused_before_any_cache_changes(model):
    shared = BatchedLlama(model, max_seqs=4)
    lms = [shared.new_lm() for _ in range(3)]
    ctxs = [list(range(10)), list(range(20, 45)), [3] * 7]
    BatchedLlamaLM.logits_batch(lms, ctxs, [1, 1, 1])
    cached = [list(lm._tokens) for lm in lms]
    bad = [ctxs[0][:5] + [1, 2], ctxs[1] + [model.n_vocab + 3], ctxs[2] + [9]]  # item 1: not a token
    with pytest.raises(ValueError, match="item 1"):
        BatchedLlamaLM.logits_batch(lms, bad, [2, 1, 1])
    assert [lm._tokens for lm in lms] == cached  # nothing cropped, nothing fed
    with pytest.raises(ValueError, match="item 2"):
        BatchedLlamaLM.logits_batch(lms, ctxs, [1, 1, 8])  # want > len(context)
    with pytest.raises(ValueError, match="distinct"):
        BatchedLlamaLM.logits_batch([lms[0], lms[0]], ctxs[:2], [1, 1])
    # The others, run without the bad item, are exact.
    out = BatchedLlamaLM.logits_batch([lms[0], lms[2]], [bad[0], bad[2]], [2, 1])
    for rows, c, w in zip(out, [bad[0], bad[2]], [2, 1]):
        assert_rows_equal(rows, model.new_lm().logits(c, w), (c, w))


def test_a_failed_decode_drops_only_the_sequences_of_its_call(model, monkeypatch):
    """The second llama_decode of a split batch fails (its first chunk is already cached): the
    sessions of that call re-prefill, the session outside it keeps its cache, all rows stay exact."""
    shared = BatchedLlama(model, max_seqs=4)
    a, b, outside = shared.new_lm(), shared.new_lm(), shared.new_lm()
    rng = np.random.default_rng(3)
    ca, cb, co = (rng.integers(0, 128, size=n).tolist() for n in (200, 180, 30))
    outside.logits(co, 1)
    kept = list(outside._tokens)
    real = llama_cpp.llama_decode
    calls = []

    def failing(ctx, batch):
        calls.append(batch.n_tokens)
        return 1 if len(calls) == 2 else real(ctx, batch)  # 1: llama.cpp's "no KV slot"

    monkeypatch.setattr(llama_cpp, "llama_decode", failing)
    with pytest.raises(RuntimeError, match="llama_decode returned 1"):
        BatchedLlamaLM.logits_batch([a, b], [ca, cb], [3, 5])  # 380 tokens: two chunks of n_batch 256
    monkeypatch.setattr(llama_cpp, "llama_decode", real)
    assert len(calls) == 2
    assert a._tokens == [] and b._tokens == []  # dropped: they re-prefill
    assert outside._tokens == kept  # untouched
    co2 = co + [5, 6]
    out = BatchedLlamaLM.logits_batch([a, b, outside], [ca, cb, co2], [3, 5, 3])
    for rows, c, w in zip(out, [ca, cb, co2], [3, 5, 3]):
        assert_rows_equal(rows, model.new_lm().logits(c, w), (len(c), w))
    assert len(outside._tokens) == len(co2)  # it kept its prefix and fed only the new tokens


def test_lms_of_another_model_or_class_are_refused(model):
    shared = BatchedLlama(model, max_seqs=2)
    with pytest.raises(ValueError, match="not a BatchedLlamaLM"):
        BatchedLlamaLM.logits_batch([shared.new_lm(), model.new_lm()], [[1], [2]], [1, 1])
    with pytest.raises(ValueError, match="same length"):
        BatchedLlamaLM.logits_batch([shared.new_lm()], [[1], [2]], [1])
