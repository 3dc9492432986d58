"""Math objects <-> protobuf messages: the only module that knows both.

Both directions of every exchange have a plain dataclass here: OpenRequest / Opened for a session
open, Batch for a round's drafts (still packed: the cloud checks a batch against its session before
it unpacks it), Verdict for the cloud's answer. The Verifier (cloud/verifier.py) and the edge's
round loop (edge/generate.py) work on these; only the servicer and the client turn them into and
out of protobuf (*_to_pb / *_from_pb copy fields; decode_open and unpack_batch validate).

Every decode validates what it reads and raises PayloadError with the reason (never an assert,
never an IndexError), so the server can answer INVALID_ARGUMENT and keep serving.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass, replace
from typing import Sequence

from common.batch_format import PackedBatch, PayloadError, pack, unpack
from common.pb.v1 import sqs_pb2 as pb
from common.schemes import Draft, Scheme, SchemeConfig

__all__ = [
    "PayloadError", "Sampling", "OpenRequest", "Opened", "Batch", "Verdict",
    "encode_open", "decode_open", "opened_to_pb", "opened_from_pb",
    "pack_batch", "unpack_batch", "batch_to_pb", "batch_from_pb", "batch_scheme", "encode_batch", "decode_batch",
    "verdict_to_pb", "verdict_from_pb",
]

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
    Scheme.INVARIANT: pb.SCHEME_INVARIANT,
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


@dataclass(frozen=True)
class Opened:
    """The cloud's answer to an open (OpenSessionResponse)."""

    session_id: str
    target_model: str
    vocab_size: int
    eos_token_ids: tuple[int, ...] = ()
    # The cloud's measured forward time (ms) by rows scored; the edge seeds its cost model with them.
    pass_rows: tuple[int, ...] = ()
    pass_ms: tuple[float, ...] = ()


def opened_to_pb(o: Opened) -> pb.OpenSessionResponse:
    return pb.OpenSessionResponse(
        session_id=o.session_id, target_model=o.target_model, vocab_size=o.vocab_size,
        eos_token_ids=list(o.eos_token_ids), pass_rows=list(o.pass_rows), pass_ms=list(o.pass_ms),
    )


def opened_from_pb(msg: pb.OpenSessionResponse) -> Opened:
    return Opened(msg.session_id, msg.target_model, int(msg.vocab_size), tuple(msg.eos_token_ids),
                  tuple(msg.pass_rows), tuple(msg.pass_ms))


@dataclass(frozen=True)
class Batch:
    """One round's drafts as the wire carries them (a DraftBatch without its session routing):
    packed, so that the cloud can check a batch against its session before unpacking it."""

    position: int  # accepted context length the drafts continue
    num_drafts: int
    packed: bytes = b""  # the mixed-radix integer (common/batch_format.py)
    raw: bytes = b""  # float values of the float baselines
    k: int = 0  # this batch's description; 0 = the session's
    ell: int = 0
    plain_steps: int = 0  # plain target steps after the round's token (cloud-only rounds)
    stream: bool = False  # the cloud streams the round's tokens as it samples them (Verify only)
    lookahead: bool = False  # drafts for a streamed round's next steps, not a round (Verify only)

    @property
    def payload_bytes(self) -> int:
        return len(self.packed) + len(self.raw)

    def digest(self) -> bytes:
        """sha256 of every field: equal digests, equal batches (the cloud's idempotent rounds)."""
        head = struct.pack("<8Q", self.position, self.num_drafts, self.k, self.ell, self.plain_steps, self.stream,
                           self.lookahead, len(self.packed))
        return hashlib.sha256(head + self.packed + self.raw).digest()


def pack_batch(position: int, drafts: Sequence[Draft], config: SchemeConfig, plain_steps: int = 0,
               stream: bool = False, lookahead: bool = False) -> Batch:
    """`config` is this batch's description (its k and ell travel with the batch)."""
    packed = pack(drafts, config)
    return Batch(position, len(drafts), packed.payload, packed.raw, config.k, config.ell, plain_steps, stream,
                 lookahead)


def batch_to_pb(batch: Batch, session_id: str = "") -> pb.DraftBatch:
    return pb.DraftBatch(
        session_id=session_id, position=batch.position, num_drafts=batch.num_drafts, packed=batch.packed,
        raw=batch.raw, k=batch.k, ell=batch.ell, plain_steps=batch.plain_steps, stream=batch.stream,
        lookahead=batch.lookahead,
    )


def batch_from_pb(msg: pb.DraftBatch) -> Batch:
    """The batch of a message (its session_id is the servicer's business); unpack_batch validates it."""
    return Batch(int(msg.position), int(msg.num_drafts), bytes(msg.packed), bytes(msg.raw), int(msg.k),
                 int(msg.ell), int(msg.plain_steps), bool(msg.stream), bool(msg.lookahead))


def encode_batch(
    session_id: str, position: int, drafts: Sequence[Draft], config: SchemeConfig
) -> tuple[pb.DraftBatch, PackedBatch]:
    """pack_batch and batch_to_pb in one call (tests of the whole wire path)."""
    packed = pack(drafts, config)
    batch = Batch(position, len(drafts), packed.payload, packed.raw, config.k, config.ell)
    return batch_to_pb(batch, session_id), packed


def batch_scheme(batch: Batch, session: SchemeConfig) -> SchemeConfig:
    """The description a batch was packed with: the session's scheme with the batch's k and ell."""
    k, ell = int(batch.k) or session.k, int(batch.ell) or session.ell
    if session.scheme.lattice and not 1 <= ell <= MAX_ELL:
        raise PayloadError(f"ell must lie in [1, {MAX_ELL}], got {ell}")
    if (k, ell) == (session.k, session.ell):
        return session
    try:
        return replace(session, k=k, ell=ell)
    except ValueError as exc:
        raise PayloadError(f"batch scheme: {exc}") from None


def unpack_batch(batch: Batch, session: SchemeConfig, max_drafts: int) -> list[Draft]:
    """The drafts of a batch, validated against the session's scheme and limits."""
    config = batch_scheme(batch, session)
    n = batch.num_drafts
    if n > max_drafts:
        raise PayloadError(f"num_drafts {n} exceeds the session's max_drafts {max_drafts}")
    if config.scheme == Scheme.NONE and (n or batch.packed or batch.raw):
        raise PayloadError("scheme none sends no drafts")
    if config.scheme.lattice and batch.raw:
        raise PayloadError("lattice schemes carry no raw float values")
    limit = n * config.vocab_size * 4
    if len(batch.raw) > limit:
        raise PayloadError(f"raw values of {len(batch.raw)} bytes exceed {limit} for {n} drafts")
    return unpack(n, batch.packed, batch.raw, config)


def decode_batch(msg: pb.DraftBatch, session: SchemeConfig, max_drafts: int) -> list[Draft]:
    """batch_from_pb and unpack_batch in one call."""
    return unpack_batch(batch_from_pb(msg), session, max_drafts)


@dataclass(frozen=True)
class Verdict:
    """The cloud's answer to a batch (see Verdict in proto/.../sqs.proto)."""

    accepted: int  # drafts accepted, T
    token: int  # resampled token (T < num_drafts) or bonus token (T == num_drafts)
    position: int  # accepted context length after this round
    plain_tokens: tuple[int, ...] = ()  # tokens of the plain steps after `token`
    received_unix_us: int = 0  # cloud wall clock when the batch was read ...
    sent_unix_us: int = 0  # ... and when the verdict was written
    forward_us: int = 0  # the target forward passes alone
    more: bool = False  # a streamed round's verdict so far: more of its tokens follow
    row_price_ms: float | None = None  # the cloud's price of one more row in its passes now (None: not quoted)
    lookahead_drafted: int = 0  # lookahead drafts the round's steps verified (the last message has them)
    lookahead_accepted: int = 0

    def then(self, part: "Verdict") -> "Verdict":
        """This verdict so far followed by the next message `part` of the same streamed round (see
        Verdict.more in the proto): its plain tokens appended, its position, clocks and flag taken."""
        return replace(part, accepted=self.accepted, token=self.token,
                       plain_tokens=self.plain_tokens + part.plain_tokens)


def verdict_to_pb(v: Verdict) -> pb.Verdict:
    return pb.Verdict(
        accepted=v.accepted, token=v.token, position=v.position, received_unix_us=v.received_unix_us,
        sent_unix_us=v.sent_unix_us, forward_us=v.forward_us, plain_tokens=list(v.plain_tokens), more=v.more,
        row_price_ms=v.row_price_ms, lookahead_drafted=v.lookahead_drafted, lookahead_accepted=v.lookahead_accepted,
    )


def verdict_from_pb(msg: pb.Verdict) -> Verdict:
    return Verdict(int(msg.accepted), int(msg.token), int(msg.position), tuple(msg.plain_tokens),
                   int(msg.received_unix_us), int(msg.sent_unix_us), int(msg.forward_us), bool(msg.more),
                   float(msg.row_price_ms) if msg.HasField("row_price_ms") else None,
                   int(msg.lookahead_drafted), int(msg.lookahead_accepted))
