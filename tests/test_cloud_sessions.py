"""cloud/sessions.py alone (no rounds, no torch), and the seams around it: the verifier imports no
model loader, the server hands it the pass times it measured where it loaded the engine."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from cloud.config import TargetInfo, VerifierConfig
from cloud.sessions import Refusal, SessionError, SessionTable
from common import codec
from common.schemes import SchemeConfig

ROOT = Path(__file__).resolve().parents[1]
V = 6


class NullLM:
    def __init__(self) -> None:
        self.fed: list[int] = []  # context lengths fed

    def logits(self, context, want):
        assert want == 1, "the table only prefills"
        self.fed.append(len(context))
        return np.zeros((1, V), np.float32)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def table(clock=None, **config) -> SessionTable:
    return SessionTable(TargetInfo("null", V, "fp", ()), NullLM, VerifierConfig(**config), clock or Clock())


def open_req(context=(0,), seed=0, fingerprint="fp", client_session_id="") -> codec.OpenRequest:
    return codec.OpenRequest(list(context), codec.Sampling(1.0, 0, 1.0, seed), SchemeConfig("topk", V, k=3, ell=20),
                             fingerprint, 4, client_session_id)


def test_open_get_close_and_the_refusals():
    t = table(max_sessions=2)
    a = t.open(open_req())
    assert t.get(a.id) is a and t.active == 1
    with pytest.raises(SessionError) as e:
        t.open(open_req(fingerprint="other"))
    assert e.value.code == Refusal.VOCAB_MISMATCH
    b, c = t.open(open_req(seed=1)), t.open(open_req(seed=2))  # the least recently used (a) is evicted
    with pytest.raises(SessionError) as e:
        t.get(a.id)
    assert e.value.code == Refusal.UNKNOWN_SESSION and t.active == 2
    back = t.open(open_req(client_session_id=a.id))  # a re-open brings the id back
    assert back.id == a.id and t.open(open_req(client_session_id=a.id)) is back
    with pytest.raises(SessionError) as e:
        t.open(open_req(seed=9, client_session_id=a.id))
    assert e.value.code == Refusal.SESSION_LIVE
    assert t.close(back.id) and not t.close(back.id)
    assert t.get(c.id) is c and b.id != c.id


def test_streams_orphans_and_reaping_on_a_fake_clock():
    clock = Clock()
    t = table(clock, session_ttl_s=100, orphan_ttl_s=10)
    streamed, idle = t.open(open_req()), t.open(open_req(seed=1))
    t.attach(streamed.id)
    assert t.attached() == 1
    t.release(streamed.id)  # its only stream ended without a close
    assert streamed.orphan and t.attached() == 0
    clock.t = 11
    assert t.reap() == 1 and t.active == 1  # the orphan went, the idle session stays
    assert t.get(idle.id) is idle  # (and is used now, at t = 11)
    clock.t = 112
    assert t.reap() == 1 and t.active == 0  # idle passed the TTL


def test_prefill_runs_in_chunks_through_the_last_token_and_keeps_its_row_for_the_first_round():
    t = table(prefill_chunk=4)
    s = t.open(open_req(context=list(range(V)) * 2))  # 12 tokens, all prefilled
    steps = 1
    while not t.prefill_step(s):
        steps += 1
    assert s.lm.fed == [4, 8, 12] and steps == 3 and s.prefilled == 12
    row = s.take_next_row()
    assert row is not None and row.shape == (V,)
    assert s.take_next_row() is None  # once
    s.next_row = (12, row)
    s.context.append(3)
    assert s.take_next_row() is None  # not for a context that moved on


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    return names | {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}


def test_verifier_and_sessions_import_no_model_loader():
    for name in ("verifier.py", "sessions.py", "config.py", "pass_batcher.py"):
        mods = imported_modules(ROOT / "cloud" / name)
        assert not any(m.split(".")[0] in ("sqs_models", "torch", "transformers", "llama_cpp") for m in mods), (name, mods)


def test_the_server_hands_the_verifier_the_pass_times_it_measured():
    pytest.importorskip("torch")
    from cloud.inprocess import LocalCloud

    with LocalCloud("tiny", verifier=VerifierConfig(calibrate_rows=(1, 3), batch_window_ms=0)) as c:
        table_ms = c.running.verifier.pass_table()
    assert set(table_ms) == {1, 3} and all(ms > 0 for ms in table_ms.values())
