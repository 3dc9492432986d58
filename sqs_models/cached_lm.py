"""A causal LM with a KV cache that follows a token context (shared by edge and cloud).

The cache always holds the key/values of a prefix of the last context it saw. A call with a new
context keeps the longest common prefix, crops the rest (the rollback after a rejection), and feeds
only the tokens after it: feeding [last accepted or new token] + drafts gives the L+1 verification
rows in one pass, and a fully accepted batch's last draft is fed automatically next round.

`CachedLM.logits_batch(lms, contexts, wants)` does the same for several CachedLMs over one model
in ONE forward pass (the cloud's cross-session batched verification). Layout of the padded batch,
per session i with c_i cached tokens and n_i tokens to feed, C = max c_i, N = max n_i:

    keys   [ pad (C - c_i) | cache_i (c_i) | new_i (n_i) | pad (N - n_i) ]     # [B, heads, C + N, d]
    mask   [     0         |      1        |     1       |      0        ]     # [B, C + N]
    queries                                [ new_i       | pad           ]     # [B, N]
    positions                              [ c_i ... c_i + n_i - 1 | (repeat last) ]

The cached keys already carry their rotary embedding (applied at their true positions), so the
left padding shifts nothing; the new tokens get their true positions through position_ids, and the
causal mask (by index in the padded row) plus the padding mask leave each query exactly the keys of
its own session's prefix. Afterwards each session's cache gets its own n_i new key/values appended
(the padded tensors are dropped), so it holds exactly its own tokens, as after an unbatched call.
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

    def _sync(self, context: Sequence[int], want: int) -> list[int]:
        """Crop the cache to the longest prefix it shares with context (leaving at least `want`
        tokens to feed); returns the tokens to feed."""
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
        return list(context[keep:])

    def logits(self, context: Sequence[int], want: int) -> np.ndarray:
        """Next-token logits after each of the last `want` positions of context: float32 [want, V].

        Row i predicts the token after context[len(context) - want + i].
        """
        new = self._sync(context, want)
        keep = len(self._tokens)
        ids = torch.tensor([new], dtype=torch.long)
        positions = torch.arange(keep, keep + len(new), dtype=torch.long).unsqueeze(0)
        with torch.inference_mode():
            out = self.model(
                input_ids=ids, past_key_values=self._cache, use_cache=True, position_ids=positions
            )
        self._cache = out.past_key_values
        self._tokens.extend(new)
        rows = out.logits[0, -want:, : self.vocab_size]  # [want, V]
        return rows.float().numpy()

    def _layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(keys, values) per layer, each [1, heads, cached, head_dim]; [] while the cache is empty."""
        if not self._tokens:
            return []
        return [(layer.keys, layer.values) for layer in self._cache.layers]

    @staticmethod
    def logits_batch(lms: Sequence[CachedLM], contexts: Sequence[Sequence[int]],
                     wants: Sequence[int]) -> list[np.ndarray]:
        """`[lm.logits(context, want) for ...]` in ONE forward pass of their shared model.

        Every lm must wrap the same model and appear once. Same result per session as an unbatched
        call (up to float rounding of the different GEMM shapes), same cache state afterwards.
        A failure leaves every cache consistent (cropped at most; nothing appended).
        """
        if not lms:
            return []
        if not (len(lms) == len(contexts) == len(wants)):
            raise ValueError("lms, contexts and wants must have the same length")
        model = lms[0].model
        if any(lm.model is not model for lm in lms) or len({id(lm) for lm in lms}) != len(lms):
            raise ValueError("a batch needs distinct CachedLMs over one model")
        if len(lms) == 1:
            return [lms[0].logits(contexts[0], wants[0])]
        news = [lm._sync(ctx, want) for lm, ctx, want in zip(lms, contexts, wants)]
        cached = [len(lm._tokens) for lm in lms]
        B, C, N = len(lms), max(cached), max(len(new) for new in news)
        ids = torch.zeros(B, N, dtype=torch.long)
        positions = torch.zeros(B, N, dtype=torch.long)
        mask = torch.zeros(B, C + N, dtype=torch.long)
        for i, (new, c) in enumerate(zip(news, cached)):
            n = len(new)
            ids[i, :n] = torch.tensor(new, dtype=torch.long)
            positions[i, :n] = torch.arange(c, c + n)
            positions[i, n:] = c + n - 1  # padding queries: any valid position, their rows are dropped
            mask[i, C - c : C + n] = 1
        cache = DynamicCache()
        if C:
            per_lm = [lm._layers() for lm in lms]
            template = next(layers for layers in per_lm if layers)
            data = []
            for li, (k0, v0) in enumerate(template):
                keys = k0.new_zeros(B, k0.shape[1], C, k0.shape[3])  # [B, heads, C, head_dim]
                values = v0.new_zeros(B, v0.shape[1], C, v0.shape[3])
                for i, layers in enumerate(per_lm):
                    if layers:
                        keys[i, :, C - cached[i] :] = layers[li][0][0]
                        values[i, :, C - cached[i] :] = layers[li][1][0]
                data.append((keys, values))
            cache = DynamicCache(ddp_cache_data=data)
        with torch.inference_mode():
            out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True,
                        position_ids=positions)
        layers_out = [(layer.keys, layer.values) for layer in out.past_key_values.layers]  # [B, heads, C + N, d]
        results = []
        for i, (lm, new, want) in enumerate(zip(lms, news, wants)):
            n = len(new)
            for li, (keys, values) in enumerate(layers_out):
                lm._cache.update(keys[i : i + 1, :, C : C + n].contiguous(),
                                 values[i : i + 1, :, C : C + n].contiguous(), li)
            lm._tokens.extend(new)
            results.append(out.logits[i, n - want : n, : lm.vocab_size].float().numpy())  # [want, V]
        return results
