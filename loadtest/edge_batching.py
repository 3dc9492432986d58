"""The simulated edges' draft passes, batched: N edges of one load test share ONE draft model and
each step of theirs that is ready within a few ms goes into one forward pass.

Why: in a deployment every edge drafts on its own device (the 0.5B draft steps in ~68 ms on one
core). A load test runs N edges in one process on one core, where N drafters stepping one by one
make each edge N times slower than a real one (8 edges: ~0.55 s a step), so the edges plan short
drafts or plain decoding and the cloud sees rounds a real fleet would not send. Batched, 8 edges'
steps cost one pass of ~8 rows (~0.2 s on llama.cpp here): still slower than a real edge, much
closer to it. Opt-in (``sqs-loadtest --edge-batch-window-ms``); the records say when it was on.

    passes = SharedDraftPasses(runtime.engine, clients=8, window_ms=5.0)
    lm = passes.new_lm()          # one per simulated edge, the LM protocol (common/lm.py)
    rows = lm.logits(context, 1)  # waits for the pass it shares with the other edges' steps

The queue and the window are the cloud's (cloud/pass_batcher.py); a pass that fails runs its items
one by one, so one edge's bad call fails that edge only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from cloud.pass_batcher import PassBatcher
from common.lm import LM


@dataclass
class _Step:
    lm: LM
    context: list[int]
    want: int


class SharedDraftPasses:
    """Draft LMs of one engine whose calls are batched across the simulated edges."""

    def __init__(self, engine, clients: int, window_ms: float, max_rows: int = 64) -> None:
        if clients < 1 or not window_ms > 0:
            raise ValueError("clients must be >= 1 and window_ms > 0")
        self._factory = engine.lm_factory(clients)
        self.batched = hasattr(type(self._factory()), "logits_batch")
        # Wait for every edge's step (at most the window): edges waiting on the cloud send none,
        # and the window bounds what that costs the others.
        self._batcher = PassBatcher(self._run, window_ms / 1e3, max_rows, expected=lambda: clients)

    def new_lm(self) -> LM:
        lm = self._factory()
        return _SharedLM(self._batcher, lm) if self.batched else lm

    @property
    def stats(self):
        """Passes, items and rows so far (cloud/pass_batcher.PassStats)."""
        return self._batcher.stats()

    @staticmethod
    def _run(items: list[_Step]) -> Sequence[np.ndarray | BaseException]:
        lms = [i.lm for i in items]
        try:
            return type(lms[0]).logits_batch(lms, [i.context for i in items], [i.want for i in items])
        except Exception:
            if len(items) == 1:
                raise
        out: list[np.ndarray | BaseException] = []
        for i in items:  # one edge's bad call must not fail the others
            try:
                out.append(i.lm.logits(i.context, i.want))
            except Exception as exc:
                out.append(exc)
        return out


class _SharedLM:
    """One simulated edge's draft LM: its own cache, its calls joined to the shared passes."""

    def __init__(self, batcher: PassBatcher, lm: LM) -> None:
        self._batcher, self._lm = batcher, lm

    def logits(self, context: Sequence[int], want: int) -> np.ndarray:
        return self._batcher.submit(_Step(self._lm, list(context), want), want)

    def __getattr__(self, name: str):  # vocab size, close(), ... of the wrapped LM
        return getattr(self._lm, name)
