"""Weight types made with llama.cpp's own quantizer (sqs_models.quantize) and llama.cpp pass tables,
on the tiny pair's GGUF (bench/tiny_gguf.py): no Qwen model needed.

Skips without llama-cpp-python or gguf.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("gguf")
pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[llama]')")

from bench.tiny_gguf import write_tiny_gguf  # noqa: E402
from sqs_models.llama_lm import LlamaModel  # noqa: E402
from sqs_models.quantize import (  # noqa: E402
    QualityRefused, Tolerance, check_quality, quantize_gguf, quantized_path, read_verdict, source_type)
from sqs_models.registry import load_model  # noqa: E402

IDS = [ord(c) for c in "def f(x):\n    return x * 2\n\nThe quick brown fox jumps over the lazy dog."]
WANT = 24


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "model.gguf")


def torch_logits() -> np.ndarray:
    m = load_model("tiny", role="target")
    with torch.inference_mode():
        return m.model(input_ids=torch.tensor([IDS])).logits[0, -WANT:].float().numpy()


def llama_logits(path) -> np.ndarray:
    m = LlamaModel(path, threads=1, vocab_size=128, extra_bufts=False)
    try:
        return m.new_lm().logits(IDS, want=WANT)
    finally:
        m.close()


def test_the_tiny_gguf_is_f32_and_matches_torch(tiny_gguf):
    assert source_type(tiny_gguf) == "F32"
    ref, got = torch_logits(), llama_logits(tiny_gguf)
    assert np.abs(ref - got).max() < 1e-3


def test_q8_0_is_made_beside_the_source_checked_once_and_refused_outside_a_tolerance(tiny_gguf):
    out = quantized_path(tiny_gguf, "Q8_0")
    assert out.name == "model.Q8_0.gguf" and out.parent == tiny_gguf.parent
    quantize_gguf(tiny_gguf, out, "Q8_0", threads=1)
    assert out.is_file() and source_type(out) == "Q8_0" and not out.with_name(out.name + ".part").exists()
    ref = torch_logits()
    calls = []

    def candidate(p):
        calls.append(p)
        return llama_logits(p)

    v = check_quality(out, lambda: ref, candidate)
    assert v["accepted"] and v["kl"] < 0.05 and v["top1"] >= 0.9, v
    assert read_verdict(out)["kl"] == v["kl"]
    assert check_quality(out, lambda: ref, candidate) == v and len(calls) == 1  # kept beside the file
    strict = Tolerance(max_kl=0.0, min_top1=1.01)  # another tolerance is measured anew, and refuses
    assert not check_quality(out, lambda: ref, candidate, strict)["accepted"] and len(calls) == 2


def test_a_refused_type_is_not_offered_and_local_gguf_says_why(tiny_gguf, monkeypatch, tmp_path):
    from sqs_models import engines

    d = tmp_path / "m"
    d.mkdir()
    src = d / "model.gguf"
    src.write_bytes(tiny_gguf.read_bytes())
    monkeypatch.setattr(engines, "model_gguf", lambda name, cache_dir=None: src)
    monkeypatch.setattr(engines, "_llama_quality_logits", lambda p, *a, **k: llama_logits(p))
    ref = torch_logits()
    assert engines.local_gguf("m", "F32", reference=lambda: ref) == src  # the source itself
    path = engines.local_gguf("m", "Q8_0", threads=1, reference=lambda: ref)
    assert path == d / "model.Q8_0.gguf"
    assert set(engines.weight_types("m")) == {"F32", "Q8_0"}
    # Q4_0 of random tiny weights against an impossible bar: made, measured, refused, never offered
    with pytest.raises(QualityRefused, match="tolerance"):
        engines.local_gguf("m", "Q4_0", threads=1, reference=lambda: ref, tolerance=Tolerance(0.0, 1.01))
    assert "Q4_0" not in engines.weight_types("m")
    assert "Q4_0" in engines.weight_types("m", accepted_only=False)


def test_llama_pass_table_on_the_tiny_gguf_is_measured_once(tiny_gguf, tmp_path):
    from sqs_models.engines import _llama_key, time_passes
    from sqs_models.pass_table import cached_table

    cache = tmp_path / "tables.json"
    m = LlamaModel(tiny_gguf, threads=1, vocab_size=128, extra_bufts=False)
    key = _llama_key("tiny-gguf", "F32", tiny_gguf, 1, False)
    assert "|llama|F32|model.gguf:" in key and "extra_bufts=0" in key
    measured = []

    def measure(rows):
        measured.append(list(rows))
        return time_passes(m.new_lm(), 128, rows, repeats=1)

    t, cached = cached_table(key, (1, 2, 5, 9), measure, cache)
    assert not cached and set(t) == {1, 2, 5, 9} and all(ms > 0 for ms in t.values())
    t2, cached = cached_table(key, (1, 9), measure, cache)
    assert cached and t2 == {1: t[1], 9: t[9]} and len(measured) == 1
    m.close()
