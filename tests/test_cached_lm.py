"""sqs_models.cached_lm.CachedLM against its naive oracle: a full forward pass without any cache.

Whatever the sequence of contexts (extend, crop back, crop and extend with other tokens, a fresh
context sharing nothing), the cached logits must equal a recompute of the whole context. Tiny
model, fp32, tolerance 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sqs_models.cached_lm import CachedLM  # noqa: E402

ATOL = 1e-4





def next_context(rng: np.random.Generator, context: list[int], vocab: int, max_len: int) -> list[int]:
    """One step of an arbitrary walk over contexts, as the edge and the cloud make them."""
    n = len(context)
    move = rng.choice(4, p=[0.4, 0.2, 0.3, 0.1])
    back = int(rng.integers(1, 9))  # a rollback drops at most a batch of drafts
    if move == 0:  # extend: an accepted round
        keep, grow = n, int(rng.integers(1, 10))
    elif move == 1:  # crop only: a rejection rolls back
        keep, grow = max(1, n - back), 0
    elif move == 2:  # crop, then other tokens: the resampled token and the next drafts
        keep, grow = max(1, n - back), int(rng.integers(1, 10))
    else:  # a context sharing nothing (a re-opened session)
        keep, grow = 0, int(rng.integers(1, 33))
    return (context[:keep] + rng.integers(0, vocab, size=grow).tolist())[:max_len]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cached_logits_equal_a_full_recompute_after_any_crop_extend_walk(full_recompute, tiny_target, seed):
    m = tiny_target
    lm = CachedLM(m.model, m.vocab_size)
    rng = np.random.default_rng(seed)
    context = rng.integers(0, m.vocab_size, size=5).tolist()
    for step in range(40):
        context = next_context(rng, context, m.vocab_size, max_len=160)
        want = int(rng.integers(1, min(len(context), 9) + 1))
        got = lm.logits(context, want)
        assert got.shape == (want, m.vocab_size) and got.dtype == np.float32
        np.testing.assert_allclose(got, full_recompute(m.model, m.vocab_size, context, want), rtol=0, atol=ATOL,
                                   err_msg=f"seed {seed} step {step}: len {len(context)} want {want}")


def test_asking_again_for_rows_already_cached_recomputes_them(full_recompute, tiny_target):
    """Same context twice with want > 1: the rows must come back (the cache is cropped to refeed them)."""
    m = tiny_target
    lm = CachedLM(m.model, m.vocab_size)
    context = list(range(1, 20))
    first = lm.logits(context, 1)
    again = lm.logits(context, 6)
    np.testing.assert_allclose(again[-1], first[0], rtol=0, atol=ATOL)
    np.testing.assert_allclose(again, full_recompute(m.model, m.vocab_size, context, 6), rtol=0, atol=ATOL)


@pytest.mark.parametrize("want", [0, 4])
def test_want_outside_the_context_is_refused(tiny_target, want):
    lm = CachedLM(tiny_target.model, tiny_target.vocab_size)
    with pytest.raises(ValueError):
        lm.logits([1, 2, 3], want)
