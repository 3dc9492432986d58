"""Shared public randomness keyed by (seed, position): Gumbel-max sampling and drafter-invariant
verification (Daliri, Musco, Suresh, "Coupling without Communication and Drafter-Invariant
Speculative Decoding", arXiv 2408.07978). Pure: numpy only.

The token at absolute position n is argmax_v(log p_n(v) + G_n(v)) with G_n(v) i.i.d. standard
Gumbel noise that both sides derive from the key alone, an exact sample from p_n. Written as an
exponential race, argmax_v log p(v) + G(v) = argmin_v E(v) / p(v) with E(v) = -log U(v) ~ Exp(1),
which needs no logarithm of p and skips p(v) = 0 (top-k / top-p warping, T = 0).

The edge drafts x_n = argmin_v E_n(v) / q_n(v) with the same noise; the cloud accepts a draft iff
it equals its own y_n and at the first mismatch commits y_n. The committed tokens are then exactly
the Gumbel-max tokens of p for this seed, whatever the drafter, the plan, the engine or the
batching ("plain decoding's tokens for this seed"), and a draft needs only its token id on the
wire. The price: P(x_n = y_n) >= (1 - TV(p, q)) / (1 + TV(p, q)) instead of rejection sampling's
1 - TV.

Cost of the noise: one Philox stream per position, V uniforms (V = 151,936: ~1 ms, measured with
numpy 2.4 on one core). It is drawn only when p has more than one token of mass (T = 0 is the
argmax; a one-token support needs none), and only over the support otherwise when the support is
small (random access to the counter-based stream: 4 uniforms per 256-bit block).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# Domain separation: the noise of a position never coincides with the edge's draft draws
# ([seed, position, 0xED6E]) or the cloud's acceptance uniforms ([seed, round start]).
_DOMAIN = 0x6D_B1_E5
# Below this many support entries the noise is read block by block instead of as one V-array.
_SPARSE_LIMIT = 64


def _generator(seed: int, position: int) -> np.random.Generator:
    key = np.array([seed & 0xFFFF_FFFF_FFFF_FFFF, ((position & 0xFFFF_FFFF) << 24) | _DOMAIN], dtype=np.uint64)
    return np.random.Generator(np.random.Philox(key=key))


def uniforms(seed: int, position: int, size: int) -> np.ndarray:
    """U_position(v) for v in [0, size): float64 [size] in [0, 1), the same on every machine."""
    return _generator(seed, position).random(size)


def uniforms_at(seed: int, position: int, tokens: np.ndarray) -> np.ndarray:
    """U_position(v) for the given token ids only, equal to uniforms(...)[tokens]."""
    tokens = np.asarray(tokens, dtype=np.int64)
    out = np.empty(tokens.size)
    # numpy's Philox4x64 yields 4 words (4 doubles) per counter block; advance(n) skips n blocks.
    for i, v in enumerate(tokens.tolist()):
        bits = _generator(seed, position).bit_generator
        bits.advance(v // 4)
        out[i] = np.random.Generator(bits).random(v % 4 + 1)[-1]
    return out


def gumbel_token(probs: np.ndarray, seed: int, position: int) -> int:
    """argmax_v log probs[v] + G_position(v): an exact draw from probs (float [V], need not sum to 1).

    A one-token support (T = 0's one-hot) is that token without any noise."""
    p = np.asarray(probs, dtype=np.float64)
    mass = p > 0
    n = int(np.count_nonzero(mass))  # the support's size; its ids only when it is small
    if n == 0:
        raise ValueError("cannot sample from a distribution with no mass")
    if n <= _SPARSE_LIMIT:
        support = np.flatnonzero(mass)
        if n == 1:
            return int(support[0])
        e = -np.log1p(-uniforms_at(seed, position, support))  # Exp(1); log1p(-u) keeps u = 0 finite
        return int(support[int(np.argmin(e / p[support]))])
    u = uniforms(seed, position, p.size)
    # The race's winner, exactly, without a logarithm over the whole vocabulary: the most probable
    # token's time E(t) / p(t) bounds the winning time, and E(v) / p(v) <= bound needs
    # u(v) <= 1 - exp(-p(v) * bound) <= p(v) * bound, a multiply-compare per entry. Only the
    # entries passing it (a handful) get E(v) / p(v), computed as the full race computes it, so
    # the argmin (lowest id on ties) is the same token. The slack covers float rounding.
    t = int(np.argmax(p))
    bound = float(-np.log1p(-u[t]) / p[t])
    near = np.flatnonzero(u <= p * (bound * (1.0 + 1e-9)))
    near = near[p[near] > 0]  # u = 0 exactly would pass at p = 0
    race = -np.log1p(-u[near]) / p[near]
    return int(near[int(np.argmin(race))])


def verify_invariant(draft_tokens: Sequence[int], target: np.ndarray, seed: int, start: int) -> tuple[int, int]:
    """Drafter-invariant verification of L token-only drafts continuing a context of `start` tokens.

    target: float64 [L+1, V], p after the target's temperature / top-k / top-p (one-hot at T = 0).
    Draft n (0-based) sits at absolute position start + n. Returns (accepted T, token): T drafts
    equal the target's own Gumbel-max tokens, and token is the target's token at the first
    mismatch, or the bonus token after all L."""
    n_drafts = len(draft_tokens)
    if target.shape[0] != n_drafts + 1:
        raise ValueError(f"{n_drafts} drafts need {n_drafts + 1} target rows")
    for n, x in enumerate(draft_tokens):
        y = gumbel_token(target[n], seed, start + n)
        if y != int(x):
            return n, y
    return n_drafts, gumbel_token(target[n_drafts], seed, start + n_drafts)
