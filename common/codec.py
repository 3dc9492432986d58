"""Math objects <-> protobuf messages: the only module that knows both.

Every decode validates what it reads and raises PayloadError with the reason (never an assert,
never an IndexError), so the server can answer INVALID_ARGUMENT and keep serving.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

from common.batch_format import PackedBatch, PayloadError, pack, unpack
from common.pb.v1 import sqs_pb2 as pb
from common.schemes import Draft, Scheme, SchemeConfig

__all__ = ["PayloadError", "Sampling", "OpenRequest", "encode_open", "decode_open", "encode_batch", "decode_batch"]

MAX_DRAFTS = 1024  # per batch
MAX_CONTEXT = 1 << 17  # tokens in an opened context
MAX_ELL = 1 << 16
MAX_TEMPERATURE = 100.0

_SCHEME_TO_PB = {
    Scheme.TOPK: pb.SCHEME_TOPK,
    Scheme.CONFORMAL: pb.SCHEME_CONFORMAL,
    Scheme.DENSE: pb.SCHEME_DENSE,
    Scheme.TOKEN: pb.SCHEME_TOKEN,
    Scheme.FP16_TOPK: pb.SCHEME_FP16_TOPK,
    Scheme.FP32: pb.SCHEME_FP32,
    Scheme.NONE: pb.SCHEME_NONE,
}
_PB_TO_SCHEME = {v: k for k, v in _SCHEME_TO_PB.items()}


@dataclass(frozen=True)
class Sampling:
    """Target-side sampling parameters."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0


@dataclass(frozen=True)
class OpenRequest:
    context: list[int]  # token ids: the prompt, or the whole accepted context on re-open
    sampling: Sampling
    scheme: SchemeConfig
    vocab_fingerprint: str
    max_drafts: int
    client_session_id: str = ""


def encode_open(req: OpenRequest) -> pb.OpenSessionRequest:
    s, c = req.sampling, req.scheme
    return pb.OpenSessionRequest(
        context_token_ids=req.context,
        sampling=pb.SamplingParams(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed),
        scheme=pb.SchemeParams(scheme=_SCHEME_TO_PB[c.scheme], k=c.k, ell=c.ell, drop_zeros=c.drop_zeros),
        vocab_fingerprint=req.vocab_fingerprint,
        vocab_size=c.vocab_size,
        max_drafts=req.max_drafts,
        client_session_id=req.client_session_id,
    )


def decode_open(msg: pb.OpenSessionRequest, target_vocab_size: int) -> OpenRequest:
    """Validate an open request against the target model's vocabulary width."""
    v = msg.vocab_size
    if v < 2:
        raise PayloadError("vocab_size must be >= 2")
    if v > target_vocab_size:
        raise PayloadError(f"draft vocab_size {v} exceeds the target's {target_vocab_size}")
    ctx = list(msg.context_token_ids)
    if not ctx:
        raise PayloadError("context_token_ids is empty: a session needs at least one prompt token")
    if len(ctx) > MAX_CONTEXT:
        raise PayloadError(f"context of {len(ctx)} tokens exceeds {MAX_CONTEXT}")
    bad = next((t for t in ctx if t >= v), None)
    if bad is not None:
        raise PayloadError(f"context token {bad} outside the vocabulary of {v}")
    sp = msg.sampling
    if not (math.isfinite(sp.temperature) and 0.0 <= sp.temperature <= MAX_TEMPERATURE):
        raise PayloadError(f"temperature must lie in [0, {MAX_TEMPERATURE}], got {sp.temperature}")
    if not (math.isfinite(sp.top_p) and 0.0 <= sp.top_p <= 1.0):
        raise PayloadError(f"top_p must lie in [0, 1] (0 or 1 = off), got {sp.top_p}")
    if sp.top_k > v:
        raise PayloadError(f"top_k {sp.top_k} exceeds the vocabulary of {v}")
    sampling = Sampling(
        temperature=float(sp.temperature), top_k=int(sp.top_k), top_p=float(sp.top_p) or 1.0, seed=int(sp.seed)
    )
    sc = msg.scheme
    if sc.scheme not in _PB_TO_SCHEME:
        raise PayloadError(f"unknown or unspecified scheme {sc.scheme}")
    if not 0 < sc.ell <= MAX_ELL and _PB_TO_SCHEME[sc.scheme].lattice:
        raise PayloadError(f"ell must lie in [1, {MAX_ELL}], got {sc.ell}")
    try:
        scheme = SchemeConfig(
            _PB_TO_SCHEME[sc.scheme], vocab_size=v, k=int(sc.k) or 1, ell=int(sc.ell) or 1, drop_zeros=sc.drop_zeros
        )
    except ValueError as exc:
        raise PayloadError(f"scheme: {exc}") from None
    if not 0 <= msg.max_drafts <= MAX_DRAFTS:
        raise PayloadError(f"max_drafts must lie in [0, {MAX_DRAFTS}], got {msg.max_drafts}")
    if len(msg.vocab_fingerprint) > 128 or len(msg.client_session_id) > 128:
        raise PayloadError("vocab_fingerprint and client_session_id are limited to 128 characters")
    return OpenRequest(ctx, sampling, scheme, msg.vocab_fingerprint, int(msg.max_drafts), msg.client_session_id)


def encode_batch(
    session_id: str, position: int, drafts: Sequence[Draft], config: SchemeConfig
) -> tuple[pb.DraftBatch, PackedBatch]:
    """`config` is this batch's description (its k and ell travel with the batch)."""
    packed = pack(drafts, config)
    msg = pb.DraftBatch(
        session_id=session_id, position=position, num_drafts=len(drafts), packed=packed.payload, raw=packed.raw,
        k=config.k, ell=config.ell,
    )
    return msg, packed


def batch_scheme(msg: pb.DraftBatch, session: SchemeConfig) -> SchemeConfig:
    """The description a batch was packed with: the session's scheme with the batch's k and ell."""
    k, ell = int(msg.k) or session.k, int(msg.ell) or session.ell
    if session.scheme.lattice and not 1 <= ell <= MAX_ELL:
        raise PayloadError(f"ell must lie in [1, {MAX_ELL}], got {ell}")
    if (k, ell) == (session.k, session.ell):
        return session
    try:
        return replace(session, k=k, ell=ell)
    except ValueError as exc:
        raise PayloadError(f"batch scheme: {exc}") from None


def decode_batch(msg: pb.DraftBatch, session: SchemeConfig, max_drafts: int) -> list[Draft]:
    """The drafts of a batch, validated against the session's scheme and limits."""
    config = batch_scheme(msg, session)
    n = msg.num_drafts
    if n > max_drafts:
        raise PayloadError(f"num_drafts {n} exceeds the session's max_drafts {max_drafts}")
    if config.scheme == Scheme.NONE and (n or msg.packed or msg.raw):
        raise PayloadError("scheme none sends no drafts")
    if config.scheme.lattice and msg.raw:
        raise PayloadError("lattice schemes carry no raw float values")
    limit = n * config.vocab_size * 4
    if len(msg.raw) > limit:
        raise PayloadError(f"raw values of {len(msg.raw)} bytes exceed {limit} for {n} drafts")
    return unpack(n, msg.packed, msg.raw, config)
