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

How the noise is drawn, and why: a sample reads only the few tokens that can win the race, so the
V uniforms of a position are laid out to be read lazily. The vocabulary is cut into blocks of
BLOCK ids. For each block the key gives first the block's minimum m (the law of the least of
BLOCK i.i.d. uniforms) and which id holds it; every other id of the block holds m + (1 - m) c with
c uniform, i.e. a uniform conditioned to lie above m. Jointly that is exactly BLOCK i.i.d. uniforms
for every block, independent of p, so the coupling above is untouched. A block none of whose ids
can finish the race before a time already reached is never expanded (_open_ids): a sample over
V = 151,936 reads ~2.4k block minima and a few blocks instead of 151,936 uniforms. The uniforms are
counter-based (splitmix64's outputs at key + index), so any id is random access and the values are
the same on every machine.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# Domain separation: the noise of a position never coincides with the edge's draft draws
# ([seed, position, 0xED6E]) or the cloud's acceptance uniforms ([seed, round start]).
_DOMAIN = 0x6D_B1_E5
BLOCK = 64  # ids per block of the lazy layout
# Below this many support entries the noise is read at the support instead of block by block.
_SPARSE_LIMIT = 64
_FIRST_BLOCKS = 4  # blocks of least bound read first, for a finishing time to prune the rest

_M64 = 0xFFFF_FFFF_FFFF_FFFF
_GOLDEN = 0x9E37_79B9_7F4A_7C15
_C1, _C2 = 0xBF58_476D_1CE4_E5B9, 0x94D0_49BB_1331_11EB
_TO_UNIT = 1.0 / 9007199254740992.0  # 2^-53: the top 53 bits as a double in [0, 1)


def _mix_int(z: int) -> int:
    """splitmix64's finaliser on one Python int (64-bit wrapping): a bijective avalanche mix."""
    z = ((z ^ (z >> 30)) * _C1) & _M64
    z = ((z ^ (z >> 27)) * _C2) & _M64
    return z ^ (z >> 31)


def _mix(z: np.ndarray) -> np.ndarray:
    """_mix_int over uint64 [...] (numpy's uint64 arithmetic wraps)."""
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(_C1)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(_C2)
    return z ^ (z >> np.uint64(31))


class _Noise:
    """The uniforms U(v) of one (seed, position), read at any ids (the lazy block layout above)."""

    def __init__(self, seed: int, position: int) -> None:
        k = _mix_int(_mix_int(seed & _M64) ^ ((position & 0xFFFF_FFFF) << 24) ^ _DOMAIN)
        self._heads_key = np.uint64(_mix_int((k + _GOLDEN) & _M64))
        self._rest_key = np.uint64(_mix_int((k + 2 * _GOLDEN) & _M64))

    @staticmethod
    def _unit(key: np.uint64, counters: np.ndarray) -> np.ndarray:
        """float64 [n] in [0, 1): splitmix64's outputs mix(key + (i + 1) G) at counters i."""
        z = key + (counters.astype(np.uint64) + np.uint64(1)) * np.uint64(_GOLDEN)
        return (_mix(z) >> np.uint64(11)) * _TO_UNIT

    def heads(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the id holding each block's minimum, the minimum): int64 [n], float64 [n]. Every block
        is BLOCK ids wide, past the vocabulary's end too: a subset of i.i.d. uniforms is i.i.d.,
        so the layout does not depend on V."""
        blocks = np.asarray(blocks, dtype=np.int64)
        ab = self._unit(self._heads_key, (2 * blocks[:, None] + np.arange(2)).ravel())
        a, b = ab[0::2], ab[1::2]
        argmin = blocks * BLOCK + (a * BLOCK).astype(np.int64)  # a < 1, so the offset is < BLOCK
        # The least of BLOCK uniforms: P(min > x) = (1 - x)^BLOCK, so min = 1 - (1 - b)^(1/BLOCK),
        # written to keep its small values exact.
        return argmin, -np.expm1(np.log1p(-b) / BLOCK)

    def at(self, tokens: np.ndarray) -> np.ndarray:
        """U(v) at token ids (int [n], >= 0): float64 [n] in [0, 1)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        argmin, least = self.heads(tokens // BLOCK)
        c = self._unit(self._rest_key, tokens)
        # Above the block's minimum: uniform on [least, 1) (the sum rounds below 1 for least < 1/2).
        return np.where(tokens == argmin, least, least + (1.0 - least) * c)


def uniforms_at(seed: int, position: int, tokens: np.ndarray) -> np.ndarray:
    """U_position(v) for the given token ids only, equal to uniforms(...)[tokens]."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.size and tokens.min() < 0:
        raise ValueError("token ids must be >= 0")
    return _Noise(seed, position).at(tokens)


def uniforms(seed: int, position: int, size: int) -> np.ndarray:
    """U_position(v) for v in [0, size): float64 [size] i.i.d. in [0, 1), the same on every machine."""
    return _Noise(seed, position).at(np.arange(size))


def gumbel_token(probs: np.ndarray, seed: int, position: int) -> int:
    """argmax_v log probs[v] + G_position(v): an exact draw from probs (float [V], need not sum to 1).

    A one-token support (T = 0's one-hot) is that token without any noise."""
    p = np.asarray(probs, dtype=np.float64)
    mass = p > 0
    n = int(np.count_nonzero(mass))  # the support's size; its ids only when it is small
    if n == 0:
        raise ValueError("cannot sample from a distribution with no mass")
    noise = _Noise(seed, position)
    if n <= _SPARSE_LIMIT:
        near = np.flatnonzero(mass)
        if n == 1:
            return int(near[0])
    else:
        near = _open_ids(p, noise)
    race = -np.log1p(-noise.at(near)) / p[near]  # Exp(1) / p; log1p(-u) keeps u = 0 finite
    return int(near[int(np.argmin(race))])


def _open_ids(p: np.ndarray, noise: _Noise) -> np.ndarray:
    """The ids (ascending, p > 0) of every block that may hold the race's winner or a tie with it.

    No id of block b finishes before LB(b) = E(b's minimum) / (b's largest p): its uniform is at
    least the minimum and its p at most the largest. The few blocks of least LB give a finishing
    time `best` that the winner cannot beat, so only blocks with LB(b) <= best can hold it (the
    slack covers float rounding); their ids, in ascending order, race as the whole vocabulary
    would, so the argmin (lowest id on ties) is the same token."""
    blocks = np.arange(-(-p.size // BLOCK))
    top = np.maximum.reduceat(p, blocks * BLOCK)  # each block's largest p (the last may be short)
    _, least = noise.heads(blocks)
    with np.errstate(divide="ignore"):
        lb = np.where(top > 0, -np.log1p(-least) / np.where(top > 0, top, 1.0), np.inf)
    first = np.argpartition(lb, _FIRST_BLOCKS)[:_FIRST_BLOCKS] if lb.size > _FIRST_BLOCKS else blocks
    ids = _ids_of(np.sort(first), p)
    best = float(np.min(-np.log1p(-noise.at(ids)) / p[ids]))
    return _ids_of(np.flatnonzero(lb <= best * (1.0 + 1e-9)), p)


def _ids_of(blocks: np.ndarray, p: np.ndarray) -> np.ndarray:
    """The ids with p > 0 of `blocks` (ascending int [n]), ascending."""
    ids = (blocks[:, None] * BLOCK + np.arange(BLOCK)).ravel()
    ids = ids[ids < p.size]
    return ids[p[ids] > 0]


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
