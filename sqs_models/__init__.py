"""Models for SQS-SD: the ``tiny`` test pair, the Qwen2.5-Coder pair and SmolLM2 from PyPI.

    from sqs_models import load_model
    target = load_model("qwen2.5-coder-1.5b", "target")   # LoadedModel
    draft = load_model("tiny", "draft")

Importing this package loads nothing heavy: the names below resolve lazily, and torch /
transformers are imported only when a model is built or loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["KNOWN_MODELS", "LoadedModel", "ModelNotInstalled", "load_model", "AsciiTokenizer", "vocab_fingerprint"]

if TYPE_CHECKING:
    from .registry import KNOWN_MODELS, LoadedModel, ModelNotInstalled, load_model
    from .tokenizer import AsciiTokenizer, vocab_fingerprint


def __getattr__(name: str) -> Any:
    if name in ("AsciiTokenizer", "vocab_fingerprint"):
        from . import tokenizer

        return getattr(tokenizer, name)
    if name in __all__:
        from . import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'sqs_models' has no attribute {name!r}")
