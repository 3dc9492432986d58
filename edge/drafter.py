"""The edge's half of a round: draft, sparsify, quantize, sample, price against the bit budget.

Per position: q = SLM next-token distribution (session temperature/top-k/top-p; T = 0 is one-hot),
described by the scheme (support + lattice counts or float values), priced in bits, and only if it
fits the budget B is the draft token sampled from exactly the q_hat that will be sent. Stops at B,
the max draft length, the token limit, or an EOS draft. After the verdict, settle() rolls the
conformal threshold back to the surviving positions; the KV cache follows the context by itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from common.batch_format import draft_bits
from common.conformal import ConformalController
from common.rejection import target_probs
from common.schemes import Draft, Scheme, SchemeConfig, describe, draw


class LM(Protocol):
    def logits(self, context: Sequence[int], want: int) -> np.ndarray:  # float32 [want, V]
        ...


@dataclass(frozen=True)
class DraftConfig:
    scheme: SchemeConfig
    max_draft_len: int = 8
    budget_bits: float = 5000.0  # uplink budget B per batch
    budget_accounting: str = "honest"  # "honest": what is packed; "formula": the paper's eq. 1 bits
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    @classmethod
    def from_options(cls, o, vocab_size: int) -> "DraftConfig":
        """From any object with the `sqs-edge generate` option names (argparse namespace, HTTP
        request, load-test config): sparsifier, k, ell, drop_zeros, beta0, eta, alpha, draft_len,
        budget_bits, budget_accounting, temperature, top_k, top_p, seed. draft_len 0 = plain
        target decoding. Raises ValueError with the reason for inconsistent options."""
        scheme = Scheme.NONE if o.draft_len == 0 else Scheme(o.sparsifier)
        return cls(
            scheme=SchemeConfig(
                scheme, vocab_size=vocab_size, k=o.k, ell=o.ell, drop_zeros=o.drop_zeros and scheme.lattice,
                beta0=o.beta0, eta=o.eta, alpha=o.alpha,
            ),
            max_draft_len=o.draft_len, budget_bits=o.budget_bits, budget_accounting=o.budget_accounting,
            temperature=o.temperature, top_k=o.top_k, top_p=o.top_p, seed=o.seed,
        )

    def __post_init__(self) -> None:
        if self.budget_accounting not in ("honest", "formula"):
            raise ValueError("budget_accounting must be 'honest' or 'formula'")
        if self.max_draft_len < 0:
            raise ValueError("max_draft_len must be >= 0")


@dataclass
class DraftedBatch:
    drafts: list[Draft]
    honest_bits: float
    formula_bits: float
    draft_ms: float


class Drafter:
    def __init__(self, lm: LM, config: DraftConfig, eos_token_ids: Sequence[int] = ()) -> None:
        self.lm = lm
        self.config = config
        self.eos = frozenset(int(t) for t in eos_token_ids)
        s = config.scheme
        self.controller = (
            ConformalController(s.beta0, eta=s.eta, alpha=s.alpha) if s.scheme == Scheme.CONFORMAL else None
        )

    def draft(self, context: Sequence[int], max_drafts: int) -> DraftedBatch:
        """Draft up to min(max_drafts, max_draft_len) tokens continuing `context`."""
        t0 = time.perf_counter()
        cfg, scheme = self.config, self.config.scheme
        limit = min(max_drafts, cfg.max_draft_len) if scheme.scheme != Scheme.NONE else 0
        ctx = list(context)
        rng = np.random.default_rng([cfg.seed, len(ctx), 0xED6E])  # keyed by position: restart-safe
        drafts: list[Draft] = []
        honest_total = formula_total = spent = 0.0
        while len(drafts) < limit:
            logits = self.lm.logits(ctx, want=1)[0]  # [V]
            q = target_probs(logits.astype(np.float64), cfg.temperature, cfg.top_k, cfg.top_p)  # [V]
            beta = self.controller.beta if self.controller else None
            d = describe(q, scheme, beta=beta)
            honest, formula = draft_bits(scheme, int(d.support.size))
            cost = honest if cfg.budget_accounting == "honest" else formula
            if spent + cost > cfg.budget_bits:  # stop before the draft that would exceed B
                break
            spent += cost
            d = draw(d, scheme.ell, rng)
            if self.controller:
                self.controller.observe(d.dropped_mass)
            drafts.append(d)
            honest_total += honest
            formula_total += formula
            ctx.append(d.token)
            if d.token in self.eos:
                break
        return DraftedBatch(drafts, honest_total, formula_total, (time.perf_counter() - t0) * 1e3)

    def settle(self, accepted: int, drafted: int) -> None:
        if self.controller:
            self.controller.settle(accepted, drafted)

    @property
    def beta(self) -> float | None:
        return self.controller.beta if self.controller else None
