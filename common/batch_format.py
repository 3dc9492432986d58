"""A batch of drafts <-> packed bytes (one mixed-radix integer plus raw float values).

Per draft, in this order (radices in brackets; a field with radix 1 costs nothing):

  plain lattice schemes (topk, token, dense, conformal):
    support size K-1       [V]              conformal only (K varies)
    support subset rank    [C(V, K)]        combinatorial number system
    lattice counts rank    [C(ell+K-1, K-1)] compositions of ell into K non-negative parts
  drop_zeros (zero-count entries left out of the support):
    support size K'-1      [min(Kmax, ell)] then subset rank [C(V, K')] and positive counts
                                            [C(ell-1, K'-1)]. For C-SQS never more than the plain code
                                            (its size field shrinks from V); for top-K at most
                                            log2 min(K, ell) bits more when no count is zero, and far
                                            fewer when many are (top-64 at V = 50,257: 348 vs 862 bits);
                                            dense QS: 455 vs 1,053 bits. (An exact union code over
                                            sizes, sum_j C(V,j) C(ell-1,j-1), is never above plain
                                            top-K but spends 798 bits on that top-64: it prices every
                                            size as if zeros were rare, so it was dropped.)
  invariant (token only):
    the token id           [V]              (a 1-subset's rank is the token id)
  float baselines (fp16-topk, fp32):
    support subset rank    [C(V, K)]        values little-endian in `raw`
  every scheme:
    draft token index      [K]              position of the draft token in the support

The token index costs log2 K bits more than the paper's formula, which leaves the token out.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from common import bits, ranking
from common.lattice import dequantize
from common.packing import MixedRadixReader, MixedRadixWriter, PackingError, log2_int
from common.schemes import MAX_RANKED_SUPPORT, Draft, Scheme, SchemeConfig, float_probs


class PayloadError(ValueError):
    """A batch payload that is malformed or inconsistent with the session; str() is the reason."""


@dataclass(frozen=True)
class BatchBits:
    """A batch's cost in bits: the honest count (what is packed) and the paper's formula."""

    honest: float  # sum of log2 radices + raw bits: what the description really costs
    formula: float  # the paper's formula, summed over the drafts (no token index)


@dataclass(frozen=True)
class PackedBatch:
    payload: bytes  # the mixed-radix integer, little-endian, ceil(packed_bits / 8) bytes
    raw: bytes  # float values of the float baselines (empty for lattice schemes)
    packed_bits: int  # ceil(sum log2 radices) + 8 * len(raw)
    config: SchemeConfig  # the description the drafts were packed with
    support_sizes: tuple[int, ...]  # K of each draft

    @property
    def payload_bytes(self) -> int:
        return len(self.payload) + len(self.raw)

    @property
    def bits(self) -> BatchBits:
        """batch_bits of what was packed (computed when asked: the edge's drafter has them already)."""
        return batch_bits(self.config, self.support_sizes)

    @property
    def honest_bits(self) -> float:
        return self.bits.honest

    @property
    def formula_bits(self) -> float:
        return self.bits.formula


def draft_radices(config: SchemeConfig, k: int) -> list[int]:
    """Radices of one draft's mixed-radix fields when its support has k tokens."""
    v, ell = config.vocab_size, config.ell
    out = []
    if config.drop_zeros:
        out.append(config.max_support)
    elif config.scheme == Scheme.CONFORMAL:
        out.append(v)
    out.append(ranking.num_subsets(v, k))
    if config.scheme.lattice:
        out.append(ranking.num_compositions(ell, k, positive=config.drop_zeros))
    out.append(k)
    return out


@functools.lru_cache(maxsize=4096)
def draft_bits(config: SchemeConfig, k: int) -> tuple[float, float]:
    """(honest bits, formula bits) of one draft with support size k (cached: the drafter prices the
    same sizes again and again, and big supports cost milliseconds of big-integer binomials)."""
    honest = sum(log2_int(r) for r in draft_radices(config, k))
    if config.scheme == Scheme.FP16_TOPK:
        honest += 16 * k
    elif config.scheme == Scheme.FP32:
        honest += 32 * k
    return honest, bits.formula_bits(config, k)


def batch_bits(config: SchemeConfig, support_sizes: Iterable[int]) -> BatchBits:
    """The bits of a batch whose drafts have these support sizes: the one place a batch's bits are
    summed (the edge's drafter for its records, the cloud for its metrics, PackedBatch.bits)."""
    honest = formula = 0.0
    for k in support_sizes:
        h, f = draft_bits(config, int(k))
        honest += h
        formula += f
    return BatchBits(honest, formula)


def _check_draft(d: Draft, config: SchemeConfig) -> int:
    """Refuse a draft the format would silently turn into another one; returns the token index."""
    sup, k, v = d.support, int(d.support.size), config.vocab_size
    if k < 1 or sup[0] < 0 or sup[-1] >= v or np.any(np.diff(sup) <= 0):
        raise ValueError("support must be non-empty, strictly increasing and inside the vocabulary")
    if config.scheme in (Scheme.TOPK, Scheme.TOKEN, Scheme.INVARIANT, Scheme.DENSE, Scheme.FP16_TOPK, Scheme.FP32) \
            and not config.drop_zeros and k != config.max_support:
        raise ValueError(f"scheme {config.scheme.value} sends {config.max_support} support entries, draft has {k}")
    if config.drop_zeros and k > config.max_support:
        raise ValueError(f"zero-drop support of {k} exceeds {config.max_support}")
    index = int(np.searchsorted(sup, d.token))
    if index >= k or sup[index] != d.token or not d.probs[index] > 0:
        raise ValueError(f"draft token {d.token} is not a support entry with positive probability")
    if config.scheme.lattice:
        c = d.counts
        if c is None or c.size != k or int(c.sum()) != config.ell or np.any(c < (1 if config.drop_zeros else 0)):
            raise ValueError(f"counts must be {k} {'positive' if config.drop_zeros else 'non-negative'} "
                             f"integers summing to ell={config.ell}")
    elif config.scheme != Scheme.INVARIANT and (d.values is None or d.values.size != k):
        raise ValueError("float schemes need one value per support entry")
    return index


def pack(drafts: Sequence[Draft], config: SchemeConfig) -> PackedBatch:
    """Pack the drafts of one batch (the order is the draft order)."""
    v = config.vocab_size
    w = MixedRadixWriter()
    raw = bytearray()
    for d in drafts:
        index = _check_draft(d, config)
        k = int(d.support.size)
        fields = [ranking.rank_subset(d.support.tolist(), v)]
        if config.scheme.lattice:
            fields.append(ranking.rank_composition(d.counts.tolist(), positive=config.drop_zeros))
        fields.append(index)
        radices = draft_radices(config, k)
        if len(radices) > len(fields):  # a support-size field leads
            fields.insert(0, k - 1)
        for value, radix in zip(fields, radices):
            w.write(value, radix)
        if d.values is not None:
            raw += np.asarray(d.values).astype("<f2" if config.scheme == Scheme.FP16_TOPK else "<f4").tobytes()
    return PackedBatch(
        payload=w.to_bytes(),
        raw=bytes(raw),
        packed_bits=w.bits + 8 * len(raw),
        config=config,
        support_sizes=tuple(int(d.support.size) for d in drafts),
    )


def unpack(num_drafts: int, payload: bytes, raw: bytes, config: SchemeConfig) -> list[Draft]:
    """Inverse of pack; every inconsistency raises PayloadError with the reason."""
    v, ell = config.vocab_size, config.ell
    r = MixedRadixReader(payload)
    raw_pos = 0
    out: list[Draft] = []
    try:
        for n in range(num_drafts):
            counts = values = None
            if config.drop_zeros:
                k = r.read(config.max_support) + 1
            elif config.scheme == Scheme.CONFORMAL:
                k = r.read(v) + 1
            else:
                k = config.max_support
            if min(k, v - k) > MAX_RANKED_SUPPORT:
                raise PayloadError(f"draft {n}: support of {k} tokens exceeds the limit of {MAX_RANKED_SUPPORT}")
            subset = r.read(ranking.num_subsets(v, k))
            if config.scheme.lattice:
                pos = config.drop_zeros
                comp = r.read(ranking.num_compositions(ell, k, positive=pos))
                counts = np.asarray(ranking.unrank_composition(comp, ell, k, positive=pos), dtype=np.int64)
            support = np.asarray(ranking.unrank_subset(subset, k, v), dtype=np.int64)
            if counts is not None:
                probs = dequantize(counts, ell)
            elif config.scheme == Scheme.INVARIANT:
                probs = np.ones(1)  # the token alone: verified by agreement, not against q
            else:
                width = 2 if config.scheme == Scheme.FP16_TOPK else 4
                chunk = raw[raw_pos : raw_pos + width * k]
                if len(chunk) != width * k:
                    raise PayloadError(f"draft {n}: raw values truncated ({len(chunk)} of {width * k} bytes)")
                raw_pos += width * k
                values = np.frombuffer(chunk, dtype="<f2" if width == 2 else "<f4")
                if not np.all(np.isfinite(values)) or np.any(values < 0) or not values.astype(np.float64).sum() > 0:
                    raise PayloadError(f"draft {n}: float values must be finite, non-negative, with positive sum")
                probs = float_probs(values)
            index = r.read(k)
            if not probs[index] > 0:
                raise PayloadError(f"draft {n}: draft token {int(support[index])} has zero draft probability")
            out.append(Draft(int(support[index]), support, probs, counts=counts, values=values))
        r.finish()
    except PackingError as exc:
        raise PayloadError(str(exc)) from None
    except PayloadError:
        raise
    except ValueError as exc:  # ranking rejects an out-of-range rank
        raise PayloadError(f"corrupt payload: {exc}") from None
    if raw_pos != len(raw):
        raise PayloadError(f"raw values carry {len(raw) - raw_pos} unexpected trailing bytes")
    return out
