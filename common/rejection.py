"""Target distributions and lossless verification of a draft batch (speculative sampling).

For n = 1..L accept x_n with probability min(1, p_n(x_n) / q_n(x_n)), where q_n is exactly the
quantized draft distribution that was sent; at the first rejection sample from the residual
norm(max(0, p_n - q_n)) (from p_n when that is empty); if all L are accepted sample the bonus token
from p_{L+1}. Randomness comes only from the generator passed in: one uniform per verified
position, one more for the new token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

# A residual with less total mass than this is floating-point noise around q == p (the rejection
# itself then had probability ~0); sample from p instead of normalising noise.
RESIDUAL_EPS = 1e-12


def target_probs(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """Sampling distribution p over the vocabulary, float64 [..., V]; never edits `logits`.

    T = 0 gives a one-hot row at the argmax (lowest id on ties). Otherwise softmax(logits / T),
    then top-k (keep the k largest; 0 = off), then top-p (keep the smallest set of most probable
    tokens whose mass reaches top_p; 1 = off), renormalised.
    """
    if temperature < 0 or not np.isfinite(temperature):
        raise ValueError("temperature must be finite and >= 0")
    if not 0.0 < top_p <= 1.0:
        raise ValueError("top_p must lie in (0, 1]")
    if top_k < 0:
        raise ValueError("top_k must be >= 0")
    if temperature == 0:
        x = np.asarray(logits, dtype=np.float64)
        out = np.zeros_like(x)
        np.put_along_axis(out, np.argmax(x, axis=-1)[..., None], 1.0, axis=-1)
        return out
    # One float64 array written once, then in place (the same values as out-of-place steps): each
    # pass over a [V] row after a forward pass reads cold memory. The maximum is taken on the input
    # (float32 logits: half the bytes); max(x / T) = max(x) / T exactly, as float division by T > 0 is
    # monotone and correctly rounded, and at T = 1 the division is skipped (x / 1 = x).
    x = np.asarray(logits)
    top = np.max(x, axis=-1, keepdims=True).astype(np.float64)
    if temperature == 1:
        p = np.subtract(x, top, dtype=np.float64)
    else:
        p = np.divide(x, temperature, dtype=np.float64)
        p -= top / temperature
    np.exp(p, out=p)
    p /= p.sum(axis=-1, keepdims=True)
    v = p.shape[-1]
    if 0 < top_k < v:
        kth = -np.partition(-p, top_k - 1, axis=-1)[..., top_k - 1 : top_k]
        p = np.where(p >= kth, p, 0.0)
        p /= p.sum(axis=-1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-p, axis=-1, kind="stable")  # most probable first
        sorted_p = np.take_along_axis(p, order, axis=-1)
        mass_before = np.cumsum(sorted_p, axis=-1) - sorted_p
        keep_sorted = mass_before < top_p  # keeps the token that crosses top_p, always >= 1
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(axis=-1, keepdims=True)
    return p


def sample(probs: np.ndarray, rng: np.random.Generator) -> int:
    """One draw from a 1-D non-negative weight vector (need not sum to 1); never a zero entry."""
    cdf = np.cumsum(probs, dtype=np.float64)
    total = cdf[-1]
    if not total > 0:
        raise ValueError("cannot sample from a distribution with no mass")
    idx = int(np.searchsorted(cdf, rng.random() * total, side="right"))
    if idx >= cdf.size or probs[idx] <= 0:  # u*total rounded up to the last step
        idx = int(np.flatnonzero(probs > 0)[-1])
    return idx


@dataclass(frozen=True)
class SparseRow:
    """A draft distribution given on its support: q(x) = probs[i] for x = tokens[i], else 0."""

    tokens: np.ndarray  # int64 [K], strictly increasing
    probs: np.ndarray  # float64 [K], sums to 1


def verify_sparse(
    draft_tokens: Sequence[int], rows: Sequence[SparseRow], target: np.ndarray, rng: np.random.Generator
) -> tuple[int, int]:
    """verify() with draft rows given on their supports (what the cloud decodes).

    target: float64 [L+1, V]. Returns (accepted count T in [0, L], new token id).
    """
    n_drafts = len(draft_tokens)
    if len(rows) != n_drafts or target.shape[0] != n_drafts + 1:
        raise ValueError(f"{n_drafts} drafts need {n_drafts} draft rows and {n_drafts + 1} target rows")
    for n, (x, row) in enumerate(zip(draft_tokens, rows)):
        pos = int(np.searchsorted(row.tokens, x))
        if pos >= row.tokens.size or row.tokens[pos] != x or row.probs[pos] <= 0:
            raise ValueError(f"draft {n}: token {x} has no draft probability")
        q_x, p_x = float(row.probs[pos]), float(target[n, x])
        if rng.random() * q_x < p_x:  # P(accept) = min(1, p/q)
            continue
        residual = target[n].copy()
        residual[row.tokens] = np.maximum(0.0, residual[row.tokens] - row.probs)
        if residual.sum() <= RESIDUAL_EPS:
            residual = target[n]
        return n, sample(residual, rng)
    return n_drafts, sample(target[n_drafts], rng)


def verify(
    draft_tokens: Sequence[int], draft_probs: np.ndarray, target_probs: np.ndarray, rng: np.random.Generator
) -> tuple[int, int]:
    """Lossless verification of L drafts.

    draft_tokens: L ints; draft_probs: float64 [L, V], the exact q_hat rows that were sent;
    target_probs: float64 [L+1, V] after the target's temperature/top-k/top-p (one-hot for T = 0).
    Returns (accepted, token): the accepted count and the resampled or bonus token.
    """
    q = np.asarray(draft_probs, dtype=np.float64)
    rows = []
    for row in q if len(draft_tokens) else []:
        tokens = np.flatnonzero(row > 0)
        rows.append(SparseRow(tokens=tokens, probs=row[tokens]))
    return verify_sparse(draft_tokens, rows, np.asarray(target_probs, dtype=np.float64), rng)
