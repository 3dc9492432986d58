"""A causal LM with a KV cache that follows a token context (shared by edge and cloud).

The cache always holds the key/values of a prefix of the last context it saw. A call with a new
context keeps the longest common prefix, crops the rest (the rollback after a rejection), and feeds
only the tokens after it: feeding [last accepted or new token] + drafts gives the L+1 verification
rows in one pass, and a fully accepted batch's last draft is fed automatically next round.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from transformers import DynamicCache


class CachedLM:
    def __init__(self, model: torch.nn.Module, vocab_size: int) -> None:
        self.model = model
        self.vocab_size = vocab_size
        self._cache = DynamicCache()
        self._tokens: list[int] = []  # tokens whose key/values are in the cache, in order

    def logits(self, context: Sequence[int], want: int) -> np.ndarray:
        """Next-token logits after each of the last `want` positions of context: float32 [want, V].

        Row i predicts the token after context[len(context) - want + i].
        """
        n = len(context)
        if not 1 <= want <= n:
            raise ValueError(f"want={want} must lie in [1, len(context)={n}]")
        keep = 0
        limit = min(len(self._tokens), n - want)  # the last `want` tokens must be fed to get their rows
        while keep < limit and self._tokens[keep] == context[keep]:
            keep += 1
        drop = len(self._tokens) - keep
        if drop > 0:
            self._cache.crop(-drop)
            del self._tokens[keep:]
        new = list(context[keep:])
        ids = torch.tensor([new], dtype=torch.long)
        positions = torch.arange(keep, n, dtype=torch.long).unsqueeze(0)
        with torch.inference_mode():
            out = self.model(
                input_ids=ids, past_key_values=self._cache, use_cache=True, position_ids=positions
            )
        self._cache = out.past_key_values
        self._tokens.extend(new)
        rows = out.logits[0, -want:, : self.vocab_size]  # [want, V]
        return rows.float().numpy()
