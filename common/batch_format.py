"""A batch of drafts <-> packed bytes (one mixed-radix integer plus raw float values).

Per draft, in this order (radices in brackets; a field with radix 1 costs nothing):
  support size K'-1      [max_support]   only where K varies (conformal, or drop_zeros)
  support subset rank    [C(V, K')]      combinatorial number system
  lattice counts rank    [C(ell+K'-1, K'-1)], or [C(ell-1, K'-1)] with drop_zeros (positive parts)
  draft token index      [K']            position of the draft token in the support
Float baselines (fp16-topk, fp32) put their values, little-endian, in `raw`.
The token index costs log2 K' bits more than the paper's formula, which leaves the token out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from common import bits, ranking
from common.lattice import dequantize
from common.packing import MixedRadixReader, MixedRadixWriter, PackingError, log2_int
from common.schemes import MAX_RANKED_SUPPORT, Draft, Scheme, SchemeConfig, float_probs


class PayloadError(ValueError):
    """A batch payload that is malformed or inconsistent with the session; str() is the reason."""


@dataclass(frozen=True)
class PackedBatch:
    payload: bytes  # the mixed-radix integer, little-endian, ceil(packed_bits / 8) bytes
    raw: bytes  # float values of the float baselines (empty for lattice schemes)
    packed_bits: int  # ceil(sum log2 radices) + 8 * len(raw)
    honest_bits: float  # sum of log2 radices + raw bits: what the description really costs
    formula_bits: float  # the paper's formula, summed over the drafts

    @property
    def payload_bytes(self) -> int:
        return len(self.payload) + len(self.raw)


def _varies(config: SchemeConfig) -> bool:
    return config.scheme == Scheme.CONFORMAL or config.drop_zeros


def draft_radices(config: SchemeConfig, k: int) -> list[int]:
    """Radices of one draft's mixed-radix fields when its support has k tokens."""
    v, ell = config.vocab_size, config.ell
    out = []
    if _varies(config):
        out.append(config.max_support)
    out.append(ranking.num_subsets(v, k))
    if config.scheme.lattice:
        out.append(ranking.num_compositions(ell, k, positive=config.drop_zeros))
    out.append(k)
    return out


def draft_bits(config: SchemeConfig, k: int) -> tuple[float, float]:
    """(honest bits, formula bits) of one draft with support size k."""
    honest = sum(log2_int(r) for r in draft_radices(config, k))
    if config.scheme == Scheme.FP16_TOPK:
        honest += 16 * k
    elif config.scheme == Scheme.FP32:
        honest += 32 * k
    return honest, bits.formula_bits(config, k)


def pack(drafts: Sequence[Draft], config: SchemeConfig) -> PackedBatch:
    """Pack the drafts of one batch (the order is the draft order)."""
    w = MixedRadixWriter()
    raw = bytearray()
    honest_raw = 0
    formula = 0.0
    for d in drafts:
        k = int(d.support.size)
        if not _varies(config) and k != config.max_support:
            raise ValueError(f"scheme {config.scheme.value} sends {config.max_support} support entries, draft has {k}")
        radices = draft_radices(config, k)
        fields = []
        if _varies(config):
            fields.append(k - 1)
        fields.append(ranking.rank_subset(d.support.tolist(), config.vocab_size))
        if config.scheme.lattice:
            fields.append(ranking.rank_composition(d.counts.tolist(), positive=config.drop_zeros))
        index = int(np.searchsorted(d.support, d.token))
        fields.append(index)
        for value, radix in zip(fields, radices):
            w.write(value, radix)
        if d.values is not None:
            dtype = "<f2" if config.scheme == Scheme.FP16_TOPK else "<f4"
            chunk = np.asarray(d.values).astype(dtype).tobytes()
            raw += chunk
            honest_raw += 8 * len(chunk)
        formula += bits.formula_bits(config, k)
    return PackedBatch(
        payload=w.to_bytes(),
        raw=bytes(raw),
        packed_bits=w.bits + honest_raw,
        honest_bits=w.log2_capacity + honest_raw if drafts else 0.0,
        formula_bits=formula,
    )


def unpack(num_drafts: int, payload: bytes, raw: bytes, config: SchemeConfig) -> list[Draft]:
    """Inverse of pack; every inconsistency raises PayloadError with the reason."""
    v, ell = config.vocab_size, config.ell
    r = MixedRadixReader(payload)
    raw_view = memoryview(raw)
    raw_pos = 0
    out: list[Draft] = []
    try:
        for n in range(num_drafts):
            k = r.read(config.max_support) + 1 if _varies(config) else config.max_support
            if min(k, v - k) > MAX_RANKED_SUPPORT:
                raise PayloadError(f"draft {n}: support of {k} tokens exceeds the limit of {MAX_RANKED_SUPPORT}")
            support = np.asarray(ranking.unrank_subset(r.read(ranking.num_subsets(v, k)), k, v), dtype=np.int64)
            counts = values = None
            if config.scheme.lattice:
                crank = r.read(ranking.num_compositions(ell, k, positive=config.drop_zeros))
                counts = np.asarray(
                    ranking.unrank_composition(crank, ell, k, positive=config.drop_zeros), dtype=np.int64
                )
                probs = dequantize(counts, ell)
            else:
                width = 2 if config.scheme == Scheme.FP16_TOPK else 4
                chunk = raw_view[raw_pos : raw_pos + width * k]
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
    except ValueError as exc:  # ranking rejects an out-of-range rank
        raise PayloadError(f"corrupt payload: {exc}") from None
    if raw_pos != len(raw):
        raise PayloadError(f"raw values carry {len(raw) - raw_pos} unexpected trailing bytes")
    return out
