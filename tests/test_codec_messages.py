"""The codec both ways: every plain dataclass the Verifier and the edge's round loop exchange
survives protobuf (to_pb -> SerializeToString -> FromString -> from_pb) unchanged, and a batch's
digest tells batches apart by every field. The bits of a batch come from one function."""

from __future__ import annotations

from dataclasses import fields, replace

import numpy as np
import pytest

from common import codec
from common.batch_format import batch_bits, draft_bits, pack
from common.pb.v1 import sqs_pb2 as pb
from common.schemes import SchemeConfig, describe, draw

V = 50


def drafts(cfg: SchemeConfig, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [draw(describe(rng.dirichlet(np.full(V, 0.3)), cfg, beta=0.01), cfg.ell, rng) for _ in range(n)]


def wire(message):
    return type(message).FromString(message.SerializeToString())


@pytest.mark.parametrize("plain", [(), (3, 4, 5)])
def test_verdict_round_trip(plain):
    v = codec.Verdict(accepted=2, token=7, position=12, plain_tokens=plain, received_unix_us=1_700_000_000_000_001,
                      sent_unix_us=1_700_000_000_002_000, forward_us=1234)
    assert codec.verdict_from_pb(wire(codec.verdict_to_pb(v))) == v


def test_opened_round_trip():
    o = codec.Opened("ab" * 16, "tiny", 512, eos_token_ids=(0, 2), pass_rows=(1, 2, 9), pass_ms=(1.5, 2.25, 8.0))
    assert codec.opened_from_pb(wire(codec.opened_to_pb(o))) == o  # values exact in float32


@pytest.mark.parametrize("scheme", ["topk", "conformal", "fp16-topk"])
def test_batch_round_trip_and_unpack(scheme):
    cfg = SchemeConfig(scheme, V, k=4, ell=30)
    ds = drafts(cfg, 3)
    batch = codec.pack_batch(17, ds, cfg, plain_steps=2)
    msg = codec.batch_to_pb(batch, session_id="s")
    assert msg.session_id == "s" and msg.plain_steps == 2
    back = codec.batch_from_pb(wire(msg))
    assert back == batch and back.digest() == batch.digest()
    assert back.payload_bytes == pack(ds, cfg).payload_bytes
    assert [d.token for d in codec.unpack_batch(back, cfg, max_drafts=3)] == [d.token for d in ds]


def test_batch_digest_sees_every_field():
    cfg = SchemeConfig("topk", V, k=4, ell=30)
    batch = codec.pack_batch(5, drafts(cfg, 2), cfg)
    changed = {"position": 6, "num_drafts": 3, "packed": batch.packed + b"\0", "raw": b"\1", "k": 5, "ell": 31,
               "plain_steps": 1, "stream": True, "lookahead": True}
    assert set(changed) == {f.name for f in fields(codec.Batch)}
    for name, value in changed.items():
        assert replace(batch, **{name: value}).digest() != batch.digest(), name
    assert replace(batch).digest() == batch.digest()


def test_batch_bits_is_the_sum_of_draft_bits_and_what_pack_reports():
    """One function for a batch's bits: the drafter's record, the cloud's metrics and
    PackedBatch.bits all come from batch_bits (bit-identical sums, in draft order)."""
    cfg = SchemeConfig("conformal", V, ell=30)
    ds = drafts(cfg, 5)
    ks = [int(d.support.size) for d in ds]
    honest = formula = 0.0
    for k in ks:
        h, f = draft_bits(cfg, k)
        honest, formula = honest + h, formula + f
    assert batch_bits(cfg, ks) == batch_bits(cfg, (d.support.size for d in ds))
    assert (batch_bits(cfg, ks).honest, batch_bits(cfg, ks).formula) == (honest, formula)
    assert pack(ds, cfg).bits == batch_bits(cfg, ks)
    assert batch_bits(cfg, []).honest == batch_bits(cfg, []).formula == 0.0


def test_pb_knows_no_field_the_plain_batch_and_verdict_leave_out():
    """Every DraftBatch field but the session routing, and every Verdict field, has a plain twin."""
    assert {f.name for f in pb.DraftBatch.DESCRIPTOR.fields} - {f.name for f in fields(codec.Batch)} == {"session_id"}
    assert {f.name for f in pb.Verdict.DESCRIPTOR.fields} == {f.name for f in fields(codec.Verdict)}
    assert {f.name for f in pb.OpenSessionResponse.DESCRIPTOR.fields} == {f.name for f in fields(codec.Opened)}
