"""CachedLM.logits_batch (one forward pass for several sessions) against its naive oracle.

The oracle is per-session unbatched CachedLM.logits on a twin LM that saw the same contexts. Tiny
model, fp32, tolerance 1e-4: sessions of different cached lengths (one empty) and different
numbers of new tokens, after crops and re-opens; afterwards every session's cache holds exactly its
own tokens (a later unbatched call still matches a full recompute).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sqs_models.cached_lm import CachedLM  # noqa: E402
from sqs_models.registry import load_model  # noqa: E402

ATOL = 1e-4





@pytest.mark.parametrize("seed", [0, 1])
def test_batched_logits_equal_per_session_logits_over_a_walk(full_recompute, tiny_target, seed):
    m = tiny_target
    rng = np.random.default_rng(seed)
    S = 4
    batched = [CachedLM(m.model, m.vocab_size) for _ in range(S)]
    oracle = [CachedLM(m.model, m.vocab_size) for _ in range(S)]
    # Different prefix lengths: 1 (an empty cache: everything is fed), 7, 30, 61.
    contexts = [rng.integers(0, m.vocab_size, size=n).tolist() for n in (1, 7, 30, 61)]
    for step in range(12):
        wants = []
        for i in range(S):
            if step:  # what rounds do: accept some drafts, roll back the rest, append new drafts
                back = int(rng.integers(0, 6))
                keep = max(1, len(contexts[i]) - back)
                contexts[i] = contexts[i][:keep] + rng.integers(0, m.vocab_size, size=int(rng.integers(1, 9))).tolist()
            wants.append(int(rng.integers(1, min(len(contexts[i]), 9) + 1)))
        subset = sorted(rng.choice(S, size=int(rng.integers(2, S + 1)), replace=False).tolist())
        got = CachedLM.logits_batch([batched[i] for i in subset], [contexts[i] for i in subset],
                                    [wants[i] for i in subset])
        for j, i in enumerate(subset):
            want = oracle[i].logits(contexts[i], wants[i])
            assert got[j].shape == want.shape == (wants[i], m.vocab_size) and got[j].dtype == np.float32
            np.testing.assert_allclose(got[j], want, rtol=0, atol=ATOL, err_msg=f"step {step} session {i}")
            assert batched[i]._tokens == list(contexts[i])
            assert batched[i]._cache.get_seq_length() == len(contexts[i])
    # Each cache holds exactly its own tokens: a later unbatched call matches a full recompute.
    for i in range(S):
        ctx = contexts[i] + [5, 6, 7]
        np.testing.assert_allclose(batched[i].logits(ctx, 4), full_recompute(m.model, m.vocab_size, ctx, 4), rtol=0,
                                   atol=ATOL)


def test_one_forward_pass_serves_the_whole_batch(tiny_target, monkeypatch):
    m = tiny_target
    lms = [CachedLM(m.model, m.vocab_size) for _ in range(3)]
    ctxs = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [12] * 20]
    for lm, ctx in zip(lms, ctxs):
        lm.logits(ctx, 1)
    calls = []
    real = type(m.model).forward

    def counting(self, *a, **kw):
        calls.append(kw["input_ids"].shape)
        return real(self, *a, **kw)

    monkeypatch.setattr(type(m.model), "forward", counting)
    out = CachedLM.logits_batch(lms, [c + [40, 41] for c in ctxs], [3, 3, 3])
    assert calls == [torch.Size([3, 3])]  # ONE pass, batch 3: the last cached token is fed again for its row, + 2
    assert [o.shape for o in out] == [(3, m.vocab_size)] * 3


def test_a_batch_refuses_lms_of_different_models_or_the_same_lm_twice(tiny_target):
    m = tiny_target
    other = load_model("tiny", role="draft")
    a, b = CachedLM(m.model, m.vocab_size), CachedLM(other.model, other.vocab_size)
    with pytest.raises(ValueError):
        CachedLM.logits_batch([a, b], [[1, 2], [1, 2]], [1, 1])
    with pytest.raises(ValueError):
        CachedLM.logits_batch([a, a], [[1, 2], [1, 2]], [1, 1])
