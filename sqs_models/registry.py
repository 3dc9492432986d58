"""Models by name: ``load_model(name, role) -> LoadedModel``.

Names (see :data:`KNOWN_MODELS`):

* ``tiny``: the deterministic random-weight pair of :mod:`sqs_models.tiny`; ``role`` picks the
  draft or the target. fp32, vocab 128, ASCII tokenizer, no EOS. Built in ~20 ms.
* ``qwen2.5-coder-0.5b`` / ``qwen2.5-coder-1.5b``: the real draft/target pair (shared tokenizer,
  vocab 151,936), loaded from the bf16 cache that ``sqs-models install`` writes; raises
  :class:`ModelNotInstalled` if it is absent. ``role`` is accepted and ignored: the name decides.
* ``smollm2-135m``: SmolLM2-135M-Instruct (vocab 49,152), same mechanism.
* any other string naming an existing directory: a local Hugging Face model directory.

Importing this module imports neither torch nor transformers; :func:`load_model` does, and sets
``HF_HUB_OFFLINE=1`` first so nothing ever reaches for a model hub.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .install import MANIFEST_NAME, REAL_MODELS, default_cache_root, install_command, is_installed, model_dir
from .tokenizer import AsciiTokenizer, vocab_fingerprint

if TYPE_CHECKING:
    import torch

__all__ = [
    "LoadedModel",
    "ModelNotInstalled",
    "KNOWN_MODELS",
    "ROLES",
    "load_model",
    "parse_dtype",
    "eos_ids_for",
    "installed_manifest",
    "default_cache_root",
]

ROLES = ("draft", "target")

KNOWN_MODELS: dict[str, str] = {
    "tiny": "random-weight Qwen2 pair built locally from a seed (role picks draft/target); fp32, vocab 128, ASCII",
    **{name: spec.description for name, spec in REAL_MODELS.items()},
}

# Tokens that end a text in chat-style vocabularies. The Qwen2.5 configs list only <|im_end|>,
# but base-style continuations end with <|endoftext|>, so stopping at either is what callers want.
_END_TOKENS = ("<|endoftext|>", "<|im_end|>")


class ModelNotInstalled(RuntimeError):
    """A real model's converted cache is missing. The message is one line and contains the
    exact shell command that installs it, e.g.
    ``model qwen2.5-coder-1.5b is not installed; run: sqs-models install qwen2.5-coder-1.5b``.
    """

    def __init__(self, name: str, command: str) -> None:
        super().__init__(f"model {name} is not installed; run: {command}")
        self.name = name
        self.command = command


@dataclass
class LoadedModel:
    """A causal LM ready for inference plus what the protocol needs to know about it.

    model: Hugging Face causal LM in eval mode with ``requires_grad`` off; ``model(input_ids)``
        with ``input_ids`` ``[batch, seq]`` int64 returns ``.logits`` ``[batch, seq, vocab_size]``.
    tokenizer: ``encode(text) -> list[int]``, ``decode(ids) -> str`` (a Hugging Face tokenizer
        for real models, :class:`AsciiTokenizer` for ``tiny``).
    vocab_size: rows of the lm_head = logits width (151,936 for Qwen2.5; may exceed
        ``len(tokenizer)`` because of padding rows, which real models give ~0 probability).
    eos_token_ids: ids that end generation; ``()`` means none (``tiny``).
    fingerprint: :func:`sqs_models.tokenizer.vocab_fingerprint` (sha256 hex of token->id mapping
        and vocab_size); equal for two models that can share token ids and probability rows.
    dtype: parameter dtype (``torch.float32`` for tiny, ``torch.bfloat16`` for cached real models).
    """

    name: str
    model: "torch.nn.Module"
    tokenizer: object
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    fingerprint: str
    dtype: "torch.dtype"


def parse_dtype(dtype: str | None, default: str) -> "torch.dtype | str":
    """``"float32"|"fp32"|"bfloat16"|"bf16"|"float16"|"fp16"|"auto"`` -> torch dtype (or "auto").

    ``None`` means ``default``. "auto" keeps what a local directory's config declares.
    """
    import torch

    key = (dtype or default).lower().removeprefix("torch.")
    table = {
        "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
        "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
        "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    }
    if key == "auto":
        return "auto"
    if key not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16, auto")
    return table[key]


def eos_ids_for(model: "torch.nn.Module", tokenizer: object, required: dict[str, int] | None = None) -> tuple[int, ...]:
    """End-of-sequence ids: the config's and generation config's ``eos_token_id`` (int or list),
    the tokenizer's ``eos_token_id``, plus ``<|endoftext|>`` / ``<|im_end|>`` when the vocabulary
    has them. ``required`` maps token -> id that must hold (pinned tokenizers); a mismatch raises.
    Sorted ascending, no duplicates.
    """
    ids: set[int] = set()
    for src in (getattr(model, "config", None), getattr(model, "generation_config", None), tokenizer):
        val = getattr(src, "eos_token_id", None)
        if isinstance(val, int):
            ids.add(val)
        elif isinstance(val, (list, tuple)):
            ids.update(int(v) for v in val)
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    for tok in _END_TOKENS:
        if tok in vocab:
            ids.add(int(vocab[tok]))
    for tok, want in (required or {}).items():
        if vocab.get(tok) != want:
            raise RuntimeError(f"tokenizer maps {tok!r} to {vocab.get(tok)}, expected {want}: not the pinned tokenizer")
    return tuple(sorted(ids))


def _finish(name: str, model: "torch.nn.Module", tokenizer: object, eos: tuple[int, ...]) -> LoadedModel:
    model.eval()
    model.requires_grad_(False)
    vocab_size = int(model.get_output_embeddings().weight.shape[0])
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        eos_token_ids=eos,
        fingerprint=vocab_fingerprint(tokenizer, vocab_size),
        dtype=next(model.parameters()).dtype,
    )


def _load_hf_dir(name: str, path: Path, dtype: "torch.dtype | str", required_eos: dict[str, int] | None) -> LoadedModel:
    os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers/huggingface_hub read it
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    if (path / "tokenizer.json").is_file():
        # Read the serialized pipeline verbatim. transformers 5's AutoTokenizer picks a class from
        # the config's model_type and may rebuild the pipeline from vocab + merges with that
        # class's defaults (seen: a char-level vocab under a qwen2 config lost its spaces). For
        # the cached Qwen2.5 models both ways give identical vocabularies and encodings.
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    return _finish(name, model, tokenizer, eos_ids_for(model, tokenizer, required_eos))


def load_model(
    name: str,
    role: str = "target",
    *,
    dtype: str | None = None,
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Load a model by name (see the module docstring) for ``role`` ``"draft"`` or ``"target"``.

    dtype: ``None`` = the model's default (float32 for tiny, bfloat16 for cached real models,
        "auto" = as saved for a local directory); otherwise a name accepted by :func:`parse_dtype`.
    cache_dir: the cache *root* holding ``<root>/<name>`` directories; default
        ``$SQS_MODEL_CACHE`` or ``~/.cache/sqs-sd/models``.

    Raises ModelNotInstalled for a real model without a converted cache, ValueError for an
    unknown name, role or dtype. Timing: tiny ~20 ms; Qwen 0.5B / 1.5B from the bf16 cache a few
    seconds each (first call also imports transformers' model code, ~3 s).
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")

    if name == "tiny":
        import torch

        from .tiny import build_tiny

        model = build_tiny(role)
        dt = parse_dtype(dtype, "float32")
        if dt not in ("auto", torch.float32):
            model = model.to(dt)
        return _finish("tiny", model, AsciiTokenizer(), ())

    if name in REAL_MODELS:
        if not is_installed(name, cache_dir):
            raise ModelNotInstalled(name, install_command(name, cache_dir))
        path = model_dir(name, cache_dir)
        return _load_hf_dir(name, path, parse_dtype(dtype, "bfloat16"), REAL_MODELS[name].eos_tokens)

    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is not a Hugging Face model directory (no config.json)")
        return _load_hf_dir(str(path.resolve()), path, parse_dtype(dtype, "auto"), None)

    raise ValueError(
        f"unknown model {name!r}: use one of {', '.join(KNOWN_MODELS)} or a local Hugging Face directory"
    )


def installed_manifest(name: str, cache_dir: Path | None = None) -> dict | None:
    """The ``sqs-model.json`` written by the install, or None when not installed."""
    if not is_installed(name, cache_dir):
        return None
    return json.loads((model_dir(name, cache_dir) / MANIFEST_NAME).read_text())

