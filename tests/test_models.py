"""Tests of sqs_models: the tiny pair, the ASCII tokenizer, fingerprints, the install plumbing.

Fast and CPU-only. The real Qwen models are never needed: the tests that use them skip unless
`sqs-models install ...` has put them in the cache.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from sqs_models import install as inst  # noqa: E402
from sqs_models.registry import (  # noqa: E402
    KNOWN_MODELS,
    LoadedModel,
    ModelNotInstalled,
    load_model,
)
from sqs_models.tiny import build_tiny_pair  # noqa: E402
from sqs_models.tokenizer import AsciiTokenizer, vocab_fingerprint  # noqa: E402

REAL = list(inst.REAL_MODELS)


def _contexts(n: int, length: int, seed: int = 1234) -> "torch.Tensor":
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (n, length), generator=g)  # [n, length]


@pytest.fixture(scope="module")
def tiny_pair() -> tuple[LoadedModel, LoadedModel]:
    return load_model("tiny", "target"), load_model("tiny", "draft")


# ---------------------------------------------------------------------------------------------
# tiny


def test_tiny_fields(tiny_pair):
    for lm, role in zip(tiny_pair, ("target", "draft")):
        assert lm.name == "tiny"
        assert lm.vocab_size == 128
        assert lm.eos_token_ids == ()
        assert lm.dtype == torch.float32
        assert not lm.model.training
        assert not any(p.requires_grad for p in lm.model.parameters())
        assert isinstance(lm.tokenizer, AsciiTokenizer)
        logits = lm.model(_contexts(2, 5)).logits
        assert logits.shape == (2, 5, 128)


def test_tiny_deterministic():
    a_t, a_d = build_tiny_pair(0)
    b_t, b_d = build_tiny_pair(0)
    for a, b in ((a_t, b_t), (a_d, b_d)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # through the registry as well, and a different seed really differs
    x = load_model("tiny", "draft").model.state_dict()
    assert all(torch.equal(x[k], a_d.state_dict()[k]) for k in x)
    c_t, _ = build_tiny_pair(1)
    assert not torch.equal(c_t.lm_head.weight, a_t.lm_head.weight)


def test_tiny_does_not_touch_global_rng():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    build_tiny_pair(0)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_builds_fast():
    build_tiny_pair(0)  # warm: the first call pays for importing transformers' Qwen2 code
    t = time.perf_counter()
    build_tiny_pair(3)
    assert time.perf_counter() - t < 1.0


@torch.no_grad()
def test_tiny_draft_differs_but_is_close(tiny_pair):
    target, draft = tiny_pair
    assert not torch.equal(target.model.lm_head.weight, draft.model.lm_head.weight)
    x = _contexts(16, 32)
    p = target.model(x).logits.double().softmax(-1)  # [16, 32, 128]
    q = draft.model(x).logits.double().softmax(-1)
    acceptance = torch.minimum(p, q).sum(-1).mean().item()  # E[sum_x min(p, q)], T = 1
    assert 0.5 <= acceptance <= 0.8, acceptance
    # target distributions moderately peaked: neither flat (1/128) nor one-hot
    max_p = p.max(-1).values.mean().item()
    assert 0.1 <= max_p <= 0.6, max_p
    # and context matters, not only the last token
    x2 = x.clone()
    x2[:, :-1] = _contexts(16, 31, seed=99)
    p2 = target.model(x2).logits[:, -1].double().softmax(-1)
    tv = 0.5 * (p[:, -1] - p2).abs().sum(-1).mean().item()
    assert tv > 0.02, tv


def test_tiny_pair_fingerprint_equal(tiny_pair):
    target, draft = tiny_pair
    assert target.fingerprint == draft.fingerprint
    assert len(target.fingerprint) == 64 and int(target.fingerprint, 16) >= 0


def test_tiny_dtype_option():
    lm = load_model("tiny", "target", dtype="bf16")
    assert lm.dtype == torch.bfloat16
    assert next(lm.model.parameters()).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# tokenizer and fingerprint


def test_ascii_roundtrip():
    tok = AsciiTokenizer()
    every = "".join(chr(i) for i in range(128))
    assert tok.encode(every) == list(range(128))
    assert tok.decode(tok.encode(every)) == every
    s = "def fibonacci(n):\n\treturn n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\r\n"
    assert tok.decode(tok.encode(s)) == s
    assert tok.decode(torch.tensor(tok.encode(s))) == s  # tensors decode too


def test_ascii_non_ascii_maps_to_question_mark():
    tok = AsciiTokenizer()
    assert tok.encode("é€😀a") == [63, 63, 63, 97]
    assert tok.decode(tok.encode("naïve")) == "na?ve"


def test_ascii_decode_rejects_out_of_range():
    with pytest.raises(ValueError):
        AsciiTokenizer().decode([128])
    with pytest.raises(ValueError):
        AsciiTokenizer().decode([-1])


def test_fingerprint_properties():
    vocab = {"a": 0, "b": 1, "c": 2}
    fp = vocab_fingerprint(vocab, 3)
    assert fp == vocab_fingerprint(dict(reversed(list(vocab.items()))), 3)  # order-free
    assert fp != vocab_fingerprint(vocab, 4)  # logits width matters
    assert fp != vocab_fingerprint({"a": 0, "b": 2, "c": 1}, 3)  # mapping matters
    assert vocab_fingerprint(AsciiTokenizer(), 128) == vocab_fingerprint(AsciiTokenizer().get_vocab(), 128)


# ---------------------------------------------------------------------------------------------
# names, errors, local directories


@pytest.mark.parametrize("name", REAL)
def test_missing_real_model_raises_with_command(name, tmp_path, monkeypatch):
    monkeypatch.setenv("SQS_MODEL_CACHE", str(tmp_path))
    with pytest.raises(ModelNotInstalled) as err:
        load_model(name, "target")
    msg = str(err.value)
    assert "\n" not in msg
    assert f"sqs-models install {name}" in msg
    assert msg == f"model {name} is not installed; run: sqs-models install {name}"
    assert err.value.command == f"sqs-models install {name}"


def test_missing_with_explicit_cache_dir_names_it(tmp_path):
    with pytest.raises(ModelNotInstalled) as err:
        load_model("qwen2.5-coder-1.5b", cache_dir=tmp_path)
    assert f"sqs-models install qwen2.5-coder-1.5b --cache-dir {tmp_path}" in str(err.value)


def test_partial_install_is_not_installed(tmp_path):
    # a directory without the manifest (a killed install) must not count as installed
    (tmp_path / "qwen2.5-coder-0.5b").mkdir()
    (tmp_path / "qwen2.5-coder-0.5b" / "config.json").write_text("{}")
    with pytest.raises(ModelNotInstalled):
        load_model("qwen2.5-coder-0.5b", cache_dir=tmp_path)


def test_unknown_name_and_role():
    with pytest.raises(ValueError, match="unknown model"):
        load_model("gpt-neo-does-not-exist")
    with pytest.raises(ValueError, match="role"):
        load_model("tiny", "verifier")
    with pytest.raises(ValueError, match="dtype"):
        load_model("tiny", dtype="int3")


def test_known_models():
    assert set(KNOWN_MODELS) == {"tiny", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "smollm2-135m"}


def _ascii_hf_tokenizer(out: Path) -> None:
    """Save a Hugging Face tokenizer with exactly the ASCII tokenizer's vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({chr(i): i for i in range(128)}, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(str(out))


@torch.no_grad()
def test_local_directory_roundtrip(tmp_path):
    target, _ = build_tiny_pair(0)
    target.save_pretrained(str(tmp_path))
    _ascii_hf_tokenizer(tmp_path)
    lm = load_model(str(tmp_path))
    assert lm.vocab_size == 128 and lm.dtype == torch.float32
    x = _contexts(2, 8)
    assert torch.equal(lm.model(x).logits, target(x).logits)
    # same vocabulary through a different tokenizer class -> same fingerprint
    assert lm.fingerprint == load_model("tiny").fingerprint
    assert lm.tokenizer.decode(lm.tokenizer.encode("abc")) == "abc"


def test_local_directory_without_config(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_model(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# install plumbing (no network, no real models)


def test_cache_root_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SQS_MODEL_CACHE", str(tmp_path))
    assert inst.model_dir("qwen2.5-coder-0.5b") == tmp_path / "qwen2.5-coder-0.5b"
    monkeypatch.delenv("SQS_MODEL_CACHE")
    assert inst.default_cache_root() == Path.home() / ".cache" / "sqs-sd" / "models"


def test_join_and_verify(tmp_path):
    parts = []
    for i, blob in enumerate([b"GGUF", b"\x00" * 1000, b"tail"]):
        p = tmp_path / f"part{i + 1:02d}.bin"
        p.write_bytes(blob)
        parts.append(p)
    want = hashlib.sha256(b"GGUF" + b"\x00" * 1000 + b"tail").hexdigest()
    out = tmp_path / "joined.gguf"
    inst.join_and_verify(parts, out, want, chunk=7)
    assert out.read_bytes() == b"GGUF" + b"\x00" * 1000 + b"tail"
    assert inst.sha256_file(out, chunk=5) == want
    with pytest.raises(inst.InstallError, match="sha256"):
        inst.join_and_verify(list(reversed(parts)), out, want)
    assert not out.exists()  # a bad join leaves nothing behind


def test_specs_are_consistent():
    for name, spec in inst.REAL_MODELS.items():
        assert spec.name == name
        assert len(spec.gguf_sha256) == 64
        assert all("==" in req for req in spec.packages)
    assert len(inst.REAL_MODELS["qwen2.5-coder-0.5b"].packages) == 6
    assert len(inst.REAL_MODELS["qwen2.5-coder-1.5b"].packages) == 22


def test_cli_list_and_bad_install(tmp_path, capsys):
    from sqs_models.cli import main

    assert main(["list", "--json", "--cache-dir", str(tmp_path)]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["tiny"]["status"] == "built-in"
    assert rows["qwen2.5-coder-1.5b"]["status"] != "installed"
    assert main(["install", "tiny", "--cache-dir", str(tmp_path)]) == 2


# ---------------------------------------------------------------------------------------------
# real models: only when installed


def _installed(name: str) -> bool:
    return inst.is_installed(name)


needs_qwen_pair = pytest.mark.skipif(
    not (_installed("qwen2.5-coder-0.5b") and _installed("qwen2.5-coder-1.5b")),
    reason="Qwen pair not installed (sqs-models install qwen2.5-coder-0.5b qwen2.5-coder-1.5b)",
)


@needs_qwen_pair
@pytest.mark.slow
def test_qwen_pair_shares_vocabulary():
    # tokenizers only (fast, no weights): the pair must agree on ids and logits width
    from transformers import AutoTokenizer

    fps = []
    for name in ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"):
        d = inst.model_dir(name)
        tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        rows = json.loads((d / inst.MANIFEST_NAME).read_text())["lm_head_rows"]
        assert rows == 151936
        fps.append(vocab_fingerprint(tok, rows))
    assert fps[0] == fps[1]


@needs_qwen_pair
@pytest.mark.slow
@torch.no_grad()
def test_qwen_draft_loads():
    lm = load_model("qwen2.5-coder-0.5b", "draft")
    assert lm.vocab_size == 151936 and lm.dtype == torch.bfloat16
    assert {151643, 151645} <= set(lm.eos_token_ids)
    ids = lm.tokenizer.encode("def fibonacci(n):")
    logits = lm.model(torch.tensor([ids])).logits  # [1, len, 151936]
    assert logits.shape == (1, len(ids), 151936) and torch.isfinite(logits).all()
