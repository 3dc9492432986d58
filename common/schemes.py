"""What the edge describes for one draft position, per scheme (pure: numpy only).

Schemes (docs/DESIGN.md section 4):
  topk       K-SQS: top-K support, lattice counts
  conformal  C-SQS: threshold support (beta from the conformal controller), lattice counts
  dense      dense QS: K = V, lattice counts (the quantize-and-sample paper)
  token      K = 1: one-hot draft at the argmax
  invariant  drafter-invariant (common/gumbel.py): the token only, the Gumbel-max draw of q on the
             noise both sides derive from (seed, position); verified by agreement with p's draw
  fp16-topk  baseline: top-K support, fp16 values
  fp32       baseline: the dense full-precision q (what plain SD would send)
  none       no drafts: plain target decoding through the same service (the reference)

The draft token is sampled from exactly the distribution the cloud rebuilds (`Draft.probs`): for
lattice schemes counts / ell by an integer draw in [0, ell), for float schemes the sent float values
renormalised in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np

from common import lattice, sparsify
from common.gumbel import gumbel_token
from common.rejection import sample


# Ranking a support costs ~min(K, V-K) big-int binomials; a larger support than this would cost far
# more bits than any sensible uplink budget, so the edge trims it and the cloud refuses it.
MAX_RANKED_SUPPORT = 4096


class Scheme(str, Enum):
    TOPK = "topk"
    CONFORMAL = "conformal"
    DENSE = "dense"
    TOKEN = "token"
    FP16_TOPK = "fp16-topk"
    FP32 = "fp32"
    INVARIANT = "invariant"
    NONE = "none"

    @property
    def lattice(self) -> bool:
        return self in (Scheme.TOPK, Scheme.CONFORMAL, Scheme.DENSE, Scheme.TOKEN)


@dataclass(frozen=True)
class SchemeConfig:
    """How draft distributions are described. Both sides must hold the same one (set at open)."""

    scheme: Scheme
    vocab_size: int
    k: int = 8  # support size for topk / fp16-topk
    ell: int = 100  # lattice resolution
    drop_zeros: bool = False  # leave zero-count entries out of the support (same q_hat, fewer bits)
    beta0: float = 0.01  # C-SQS initial threshold
    eta: float = 0.001  # C-SQS learning rate
    alpha: float = 0.0005  # C-SQS target dropped mass

    def __post_init__(self) -> None:
        object.__setattr__(self, "scheme", Scheme(self.scheme))
        if self.vocab_size < 2:
            raise ValueError("vocab_size must be >= 2")
        if self.scheme in (Scheme.TOPK, Scheme.FP16_TOPK):
            if not 1 <= self.k <= self.vocab_size:
                raise ValueError(f"k must lie in [1, V={self.vocab_size}], got {self.k}")
            if min(self.k, self.vocab_size - self.k) > MAX_RANKED_SUPPORT:
                raise ValueError(f"k={self.k} exceeds the ranking limit of {MAX_RANKED_SUPPORT} support entries")
        if self.scheme.lattice and self.ell < 1:
            raise ValueError("ell must be >= 1")
        if self.drop_zeros and not self.scheme.lattice:
            raise ValueError("drop_zeros applies to lattice schemes only")

    @property
    def max_support(self) -> int:
        """Largest support a draft of this scheme can have."""
        if self.scheme in (Scheme.TOPK, Scheme.FP16_TOPK):
            k = self.k
        elif self.scheme in (Scheme.TOKEN, Scheme.INVARIANT):
            k = 1
        else:
            k = self.vocab_size
        return min(k, self.ell, MAX_RANKED_SUPPORT) if self.drop_zeros else k


@dataclass(frozen=True)
class Draft:
    """One drafted position as sent."""

    token: int  # the sampled draft token id
    support: np.ndarray  # int64 [K], strictly increasing token ids
    probs: np.ndarray  # float64 [K], q_hat on the support: exactly what the cloud verifies against
    counts: np.ndarray | None = None  # int64 [K], lattice counts (sum = ell); None for float schemes
    values: np.ndarray | None = None  # float16/float32 [K], the sent values for float schemes
    dropped_mass: float = 0.0  # sparsifier's dropped mass of q (before zero-drop)


def describe(q: np.ndarray, config: SchemeConfig, beta: float | None = None, max_support: int | None = None) -> Draft:
    """Sparsify and quantize q (float [V], sums to 1) without sampling; token is -1.

    Splitting this from the draw lets the edge price a position against the bit budget before it
    spends randomness on it. max_support caps a threshold support to its most probable entries
    (C-SQS under the bit budget); the mass the cap drops counts as dropped mass like any other.
    """
    s = config.scheme
    if s in (Scheme.TOPK, Scheme.FP16_TOPK):
        sup = sparsify.top_k(q, config.k)
    elif s == Scheme.TOKEN:
        sup = sparsify.token_only(q)
    elif s == Scheme.CONFORMAL:
        if beta is None:
            raise ValueError("the conformal scheme needs a threshold beta")
        sup = sparsify.threshold(q, beta)
        if max_support is not None and sup.tokens.size > max_support:
            sup = sparsify.top_k(q, max(1, max_support))
    elif s in (Scheme.DENSE, Scheme.FP32):
        sup = sparsify.dense(q)
    elif s == Scheme.INVARIANT:
        raise ValueError("the invariant scheme's draft is drawn, not described: draw_invariant")
    else:
        raise ValueError(f"scheme {s.value} sends no drafts")
    tokens = sup.tokens
    if min(tokens.size, config.vocab_size - tokens.size) > MAX_RANKED_SUPPORT:
        sup = sparsify.top_k(q, MAX_RANKED_SUPPORT)
        tokens = sup.tokens
    kept = np.asarray(q, dtype=np.float64)[tokens]
    if s.lattice:
        if not kept.sum() > 0:  # all kept mass underflowed: describe the argmax alone
            tokens, kept = tokens[[int(np.argmax(kept))]], np.ones(1)
        counts = lattice.quantize(kept, config.ell)
        if config.drop_zeros:
            nz = counts > 0
            tokens, counts = tokens[nz], counts[nz]
        return Draft(-1, tokens, lattice.dequantize(counts, config.ell), counts=counts, dropped_mass=sup.dropped_mass)
    values = kept.astype(np.float16 if s == Scheme.FP16_TOPK else np.float32)
    if not values.astype(np.float64).sum() > 0:  # fp16 underflow of every kept value
        values = (kept == kept.max()).astype(values.dtype)
    return Draft(-1, tokens, float_probs(values), values=values, dropped_mass=sup.dropped_mass)


def float_probs(values: np.ndarray) -> np.ndarray:
    """The one rebuild of a float-scheme draft distribution from the sent values (float64 [K])."""
    v = values.astype(np.float64)
    return v / v.sum()


def draw(draft: Draft, ell: int, rng: np.random.Generator) -> Draft:
    """Sample the draft token from exactly draft.probs; returns the draft with its token set."""
    if draft.counts is not None:
        u = int(rng.integers(ell))  # exact: P(index i) = counts[i] / ell
        index = int(np.searchsorted(np.cumsum(draft.counts), u, side="right"))
    else:
        index = sample(draft.probs, rng)
    return Draft(
        int(draft.support[index]), draft.support, draft.probs, draft.counts, draft.values, draft.dropped_mass
    )


def draw_invariant(q: np.ndarray, seed: int, position: int) -> Draft:
    """The invariant scheme's draft at an absolute position: the Gumbel-max token of q (float [V])
    on the noise keyed by (seed, position), sent as its id alone (q_hat: one-hot, for the format)."""
    token = gumbel_token(q, seed, position)
    return Draft(token, np.array([token], dtype=np.int64), np.ones(1),
                 dropped_mass=1.0 - float(np.asarray(q, dtype=np.float64)[token]))
