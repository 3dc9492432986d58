"""What the protocol needs of a language model, and the engines that provide it, named once.

Both sides compute distributions through `LM.logits`; whichever engine runs it (transformers on
torch, or llama.cpp) only decides how p (cloud) or q (edge) is computed, never the protocol.
This module stays free of torch so that command-line help and the protocol code can name the
engines without loading one.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

ENGINES = ("auto", "torch", "llama")  # --engine choices of sqs-cloud, sqs-edge, sqs-loadtest and sqs-bench


class LM(Protocol):
    def logits(self, context: Sequence[int], want: int) -> np.ndarray:
        """float32 [want, V]: next-token logits after each of the last `want` positions of `context`.

        One instance per session: it keeps a KV cache that follows the context (a context that
        shares only a prefix with the last call crops the cache to that prefix first)."""
        ...
