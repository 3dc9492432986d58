"""Engine selection (sqs_models.engines) on the tiny pair: which engine `auto` picks and why, what
`llama` refuses, the torch dtype measurement, and the cloud / edge flags that reach it.

No llama.cpp and no real model needed: the llama-vs-torch agreement on the real Qwen 0.5B model
is tests/test_engines_llama.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sqs_models import engines  # noqa: E402
from sqs_models.engines import EngineUnavailable, load_engine, measure_torch_dtype, resolve_engine  # noqa: E402
from sqs_models.registry import load_model  # noqa: E402


def test_auto_is_torch_for_the_tiny_pair_whatever_is_installed(monkeypatch):
    monkeypatch.setattr(engines, "llama_available", lambda: True)
    assert engines.model_gguf("tiny") is None
    assert resolve_engine("auto", "tiny") == "torch"
    assert resolve_engine("torch", "tiny") == "torch"


def test_llama_on_tiny_is_refused_with_a_reason(monkeypatch):
    monkeypatch.setattr(engines, "llama_available", lambda: True)
    with pytest.raises(EngineUnavailable, match="no GGUF"):
        resolve_engine("llama", "tiny")
    monkeypatch.setattr(engines, "llama_available", lambda: False)
    with pytest.raises(EngineUnavailable, match=r"llama-cpp-python.*\.\[llama\]"):
        resolve_engine("llama", "tiny")


def test_unknown_engine_and_llama_with_a_dtype_are_value_errors():
    with pytest.raises(ValueError, match="unknown engine"):
        resolve_engine("onnx", "tiny")
    with pytest.raises(ValueError, match="--dtype applies to the torch engine"):
        resolve_engine("llama", "tiny", dtype="bfloat16")


def test_auto_picks_llama_only_with_the_package_a_gguf_and_no_dtype(monkeypatch, tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(engines, "model_gguf", lambda name, cache_dir=None: gguf)
    monkeypatch.setattr(engines, "llama_available", lambda: True)
    assert resolve_engine("auto", "qwen2.5-coder-0.5b") == "llama"
    assert resolve_engine("llama", "qwen2.5-coder-0.5b") == "llama"
    assert resolve_engine("auto", "qwen2.5-coder-0.5b", dtype="float32") == "torch"  # a dtype asks for torch
    monkeypatch.setattr(engines, "llama_available", lambda: False)
    assert resolve_engine("auto", "qwen2.5-coder-0.5b") == "torch"
    monkeypatch.setattr(engines, "llama_available", lambda: True)
    monkeypatch.setattr(engines, "model_gguf", lambda name, cache_dir=None: None)
    assert resolve_engine("auto", "qwen2.5-coder-0.5b") == "torch"


def test_a_local_directory_with_model_gguf_has_a_gguf(tmp_path):
    assert engines.model_gguf(str(tmp_path)) is None
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    assert engines.model_gguf(str(tmp_path)) == tmp_path / "model.gguf"


def test_real_model_gguf_is_the_kept_file_in_the_cache(tmp_path):
    assert engines.model_gguf("qwen2.5-coder-0.5b", tmp_path) is None
    d = tmp_path / "qwen2.5-coder-0.5b"
    d.mkdir()
    (d / "model.gguf").write_bytes(b"GGUF")
    assert engines.model_gguf("qwen2.5-coder-0.5b", tmp_path) == d / "model.gguf"


def test_tiny_torch_engine_matches_load_model_and_keeps_fp32():
    eng = load_engine("tiny", "target", engine="auto")
    ref = load_model("tiny", role="target")
    assert (eng.kind, eng.dtype, eng.probe) == ("torch", "float32", {})
    assert (eng.vocab_size, eng.fingerprint, eng.eos_token_ids) == (ref.vocab_size, ref.fingerprint, ())
    a, b = eng.new_lm(), eng.new_lm()  # independent caches
    ctx = [1, 2, 3, 4, 5]
    ra = a.logits(ctx, want=2)
    b.logits([9, 9, 9], want=1)
    assert ra.dtype == np.float32 and ra.shape == (2, eng.vocab_size)
    np.testing.assert_allclose(a.logits(ctx, want=2), ra, atol=1e-5)
    with torch.inference_mode():
        full = ref.model(input_ids=torch.tensor([ctx])).logits[0, -2:].float().numpy()
    np.testing.assert_allclose(ra, full, atol=1e-4)


def test_an_asked_dtype_is_not_measured():
    eng = load_engine("tiny", "draft", engine="torch", dtype="bfloat16")
    assert (eng.dtype, eng.probe) == ("bfloat16", {})
    assert "asked" in eng.detail


@pytest.mark.parametrize("role,key", [("target", "pass_ms"), ("draft", "step_ms")])
def test_dtype_measurement_picks_the_cheaper_for_the_role_and_leaves_the_model_in_it(role, key):
    m = load_model("tiny", role=role, dtype="bfloat16")
    w0 = next(m.model.parameters()).detach().clone()
    best, probe = measure_torch_dtype(m.model, m.vocab_size, role, repeats=2)
    assert set(probe) == {"bfloat16", "float32"}
    assert all(v["step_ms"] > 0 and v["pass_ms"] > 0 for v in probe.values())
    want = min(probe, key=lambda d: probe[d][key])
    assert str(best).removeprefix("torch.") == want
    w1 = next(m.model.parameters())
    assert w1.dtype == best
    assert torch.equal(w1.to(torch.bfloat16), w0)  # bf16 -> fp32 -> bf16 round trips exactly


def test_measurement_runs_for_real_models_only(monkeypatch):
    calls = []
    monkeypatch.setattr(engines, "measure_torch_dtype", lambda *a, **k: calls.append(a) or (torch.float32, {}))
    load_engine("tiny", "target", engine="torch")
    assert calls == []


def test_cloud_load_target_uses_the_engine_layer():
    from cloud.server import CloudConfig, load_target

    info, new_lm = load_target("tiny", engine="auto")
    assert info.name == "tiny" and info.vocab_size == 128
    assert new_lm().logits([1, 2, 3], want=3).shape == (3, 128)
    assert CloudConfig().engine == "auto"


def test_cloud_cli_engine_flag(monkeypatch):
    from cloud.cli import parse_args

    monkeypatch.delenv("SQS_ENGINE", raising=False)
    monkeypatch.delenv("SQS_DTYPE", raising=False)
    local = ["--host", "127.0.0.1"]  # plaintext beyond loopback needs --insecure (issue 23)
    assert parse_args(local).engine == "auto"
    cfg = parse_args(local + ["--engine", "llama", "--torch-threads", "1"])
    assert (cfg.engine, cfg.threads) == ("llama", 1)
    with pytest.raises(SystemExit):
        parse_args(local + ["--engine", "llama", "--dtype", "float32"])
    with pytest.raises(SystemExit):
        parse_args(local + ["--engine", "onnx"])
    monkeypatch.delenv("SQS_EXPECT_SESSIONS", raising=False)
    assert parse_args(local).expect_sessions == 1
    assert parse_args(local + ["--expect-sessions", "8"]).expect_sessions == 8
    monkeypatch.setenv("SQS_EXPECT_SESSIONS", "4")
    assert parse_args(local).expect_sessions == 4
    with pytest.raises(SystemExit):
        parse_args(local + ["--expect-sessions", "0"])


def test_edge_and_loadtest_parsers_take_the_engine_flag():
    import argparse

    from edge.options import add_generation_args
    from loadtest.cli import build_parser, config_from_args

    ap = argparse.ArgumentParser()
    add_generation_args(ap)
    assert ap.parse_args(["--engine", "torch"]).engine == "torch"
    a = build_parser().parse_args(["--engine", "torch"])
    assert config_from_args(a).engine == "torch"


def test_edge_generate_reports_its_engine(cloud):
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "edge", "generate", "--cloud", cloud.address, "--prompt", "hi", "--max-new-tokens",
         "4", "--engine", "auto", "--json"],
        capture_output=True, text=True, timeout=180, cwd=Path(__file__).resolve().parents[1],
    )
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["draft_engine"].startswith("torch float32") and len(d["token_ids"]) == 4
    bad = subprocess.run(
        [sys.executable, "-m", "edge", "generate", "--cloud", cloud.address, "--prompt", "hi", "--engine", "llama"],
        capture_output=True, text=True, timeout=180,
    )
    assert bad.returncode != 0 and bad.stderr.strip().startswith("sqs-edge: error:"), bad.stderr


def test_bench_compare_against_a_naive_kl():
    from bench.engines import compare

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 50)), rng.normal(size=(5, 50))
    p = np.exp(a) / np.exp(a).sum(-1, keepdims=True)
    q = np.exp(b) / np.exp(b).sum(-1, keepdims=True)
    kl, top1 = compare(a, b)
    assert kl == pytest.approx(float(np.mean(np.sum(p * np.log(p / q), -1))), rel=1e-9)
    assert top1 == float(np.mean(a.argmax(-1) == b.argmax(-1)))
    assert compare(a, a) == (pytest.approx(0.0, abs=1e-12), 1.0)


@pytest.mark.slow
def test_sqs_bench_engines_on_the_tiny_pair(tmp_path, capsys):
    from bench.cli import main

    with pytest.raises(SystemExit) as ex:
        main(["engines", "--models", "tiny", "--engines", "torch-bf16", "torch-fp32", "llama", "--repeats", "1",
              "--positions", "4", "--out", str(tmp_path)])
    assert ex.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("CPU flags:")
    import csv

    rows = list(csv.DictReader(open(tmp_path / "engines.csv")))
    by = {r["engine"]: r for r in rows}
    assert [r["engine"] for r in rows] == ["torch-fp32", "torch-bf16", "llama"]  # the reference first
    assert float(by["torch-fp32"]["kl_vs_fp32"]) == 0.0 and float(by["torch-bf16"]["top1_vs_fp32"]) > 0.5
    assert all(float(by["torch-fp32"][f"ms_{n}"]) > 0 for n in (1, 2, 3, 5, 9, 17))
    assert by["llama"]["error"]  # tiny has no GGUF: skipped with the reason
