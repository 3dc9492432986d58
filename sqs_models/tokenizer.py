"""Tokenizers and the vocabulary fingerprint.

Pure Python (no torch, no transformers), so anything that only needs to compare vocabularies or
tokenize for the ``tiny`` model stays cheap to import.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

__all__ = ["AsciiTokenizer", "SupportsGetVocab", "vocab_fingerprint"]


class SupportsGetVocab(Protocol):
    """Anything with a Hugging Face style ``get_vocab() -> {token: id}``."""

    def get_vocab(self) -> dict[str, int]: ...


class AsciiTokenizer:
    """One token per ASCII character: token id = code point, 0..127.

    Used by the ``tiny`` model pair. Characters outside ASCII encode to ``'?'`` (63), so
    ``decode(encode(s)) == s`` exactly for ASCII strings (control characters included) and is
    lossy otherwise. There are no special tokens: no BOS, no EOS, no padding.

    The method signatures accept and ignore the keyword arguments callers habitually pass to
    Hugging Face tokenizers (``add_special_tokens``, ``skip_special_tokens``), so code written
    for the real models works unchanged.
    """

    vocab_size: int = 128
    unknown_id: int = ord("?")
    eos_token_id: int | None = None
    bos_token_id: int | None = None
    pad_token_id: int | None = None

    def encode(self, text: str, **_hf_kwargs: Any) -> list[int]:
        """Return one id in [0, 128) per character of ``text``."""
        return [c if c < 128 else self.unknown_id for c in map(ord, text)]

    def decode(self, ids: Iterable[int], **_hf_kwargs: Any) -> str:
        """Inverse of :meth:`encode` on ASCII; ``ids`` may be a list, tuple or 1-D tensor/array.

        Raises ValueError on an id outside [0, 128): that is a bug upstream (the logits are
        only 128 wide), not something to paper over with a replacement character.
        """
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} outside the ASCII vocabulary [0, {self.vocab_size})")
            out.append(chr(i))
        return "".join(out)

    def get_vocab(self) -> dict[str, int]:
        """Token string -> id, 128 entries."""
        return {chr(i): i for i in range(self.vocab_size)}

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | list[str]:
        if isinstance(ids, int):
            return self.decode([ids])
        return [self.decode([i]) for i in ids]

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return "AsciiTokenizer(vocab_size=128)"


def vocab_fingerprint(tokenizer: SupportsGetVocab | Mapping[str, int], vocab_size: int) -> str:
    """SHA-256 hex digest of a vocabulary: the token -> id mapping plus the logits width.

    Two models can exchange token ids and probability rows only if this matches, so the edge and
    the cloud compare it at session start. ``vocab_size`` is the number of lm_head rows (which
    may exceed the tokenizer's length because of padding: Qwen2.5 pads 151,665 tokens to
    151,936 rows); it is part of the hash because a probability row's length must agree too.

    Canonical form: UTF-8 JSON of ``{"vocab_size": V, "vocab": [[token, id], ...]}`` with the
    pairs sorted by (id, token), compact separators. Independent of dict order and of which
    tokenizer class produced the mapping.
    """
    vocab = tokenizer if isinstance(tokenizer, Mapping) else tokenizer.get_vocab()
    pairs = sorted(((int(i), str(t)) for t, i in vocab.items()))
    doc = {"vocab_size": int(vocab_size), "vocab": [[t, i] for i, t in pairs]}
    blob = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()
