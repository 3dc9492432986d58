"""The ``tiny`` draft/target pair: random-weight Qwen2 models built locally from a seed.

For tests and quick end-to-end runs: no download, fp32, about 0.14 M parameters each, a build
takes ~10-20 ms on CPU (after ``import transformers``), and the same seed gives bit-identical
weights on every call.

Construction
------------
* Architecture: ``transformers.Qwen2ForCausalLM`` (the real Qwen2.5 pair's architecture, so the
  same cache/forward code paths run), vocab 128 (the :class:`~sqs_models.tokenizer.AsciiTokenizer`),
  hidden 64, 2 layers, 4 heads (4 KV heads), MLP 128, 512 positions, untied lm_head.
* Target: every weight drawn from an explicit ``torch.Generator`` seeded with ``seed`` (the
  global torch RNG is neither used nor disturbed). Token embeddings ~ N(0, 1); attention and MLP
  matrices ~ N(0, 0.08^2), large enough that the next-token distribution depends on more than
  the last token; biases ~ N(0, 0.02^2); norms = 1; lm_head ~ N(0, 0.3^2), which sets how peaked
  the next-token distributions are.
* Draft: a copy of the target plus Gaussian noise, per tensor
  ``w + 0.25 * std(w) * N(0, 1)`` (norm weights untouched), drawn from a second generator
  seeded with ``seed + DRAFT_SEED_OFFSET``.

Measured (seed 0, temperature 1, 64 uniformly random contexts x 32 positions = 2,048 rows):
* target next-token max probability: mean 0.33, 10th-90th percentile 0.15-0.62 (mean entropy
  2.7 nats, against ln 128 = 4.85 for uniform): moderately peaked, neither flat nor one-hot;
* acceptance alpha = sum_x min(p(x), q(x)): mean 0.674 (10th-90th percentile 0.56-0.79).
  Over seeds 0..9 the mean stays within 0.67-0.71.
These numbers are re-measured by ``tests/test_models.py`` (required range 0.5-0.8).

EOS: the tiny pair has none (``eos_token_ids == ()``); generation runs to ``max_new_tokens``.
Tests of EOS handling can pick any id, e.g. ``dataclasses.replace(m, eos_token_ids=(0,))``
(token 0 is NUL, which the target emits with ordinary, non-negligible probability).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

__all__ = ["TinySpec", "TINY_SPEC", "DRAFT_SEED_OFFSET", "build_tiny_pair", "build_tiny"]

# A large prime offset keeps the draft's noise stream apart from any nearby target seed.
DRAFT_SEED_OFFSET = 1_000_003


@dataclass(frozen=True)
class TinySpec:
    """Shape and initialisation scales of the tiny pair (see the module docstring)."""

    vocab_size: int = 128
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    max_positions: int = 512
    embed_std: float = 1.0
    matrix_std: float = 0.08
    bias_std: float = 0.02
    lm_head_std: float = 0.3
    draft_noise: float = 0.25  # relative to each tensor's std


TINY_SPEC = TinySpec()


def _config(spec: TinySpec):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=False,
        use_sliding_window=False,
        # No special tokens: the ASCII tokenizer has none, and a configured EOS would make
        # generate() stop at random places.
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


@torch.no_grad()
def _init_target(model: torch.nn.Module, spec: TinySpec, gen: torch.Generator) -> None:
    # named_parameters() order is fixed by the module definition, so the draws are reproducible.
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.normal_(0.0, spec.bias_std, generator=gen)
        elif "embed_tokens" in name:
            p.normal_(0.0, spec.embed_std, generator=gen)
        elif name.startswith("lm_head"):
            p.normal_(0.0, spec.lm_head_std, generator=gen)
        else:
            p.normal_(0.0, spec.matrix_std, generator=gen)


@torch.no_grad()
def _perturb(model: torch.nn.Module, rel_std: float, gen: torch.Generator) -> None:
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            continue  # all ones: std 0, and noise there only rescales the stream
        p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * (rel_std * p.std()))


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def build_tiny_pair(seed: int = 0, spec: TinySpec = TINY_SPEC) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Return ``(target, draft)``: fp32 ``Qwen2ForCausalLM`` models in eval mode, no grads.

    Deterministic: the same ``seed`` and ``spec`` give bit-identical weights on every call.
    The logits of both are ``[batch, seq, 128]``.
    """
    from transformers import Qwen2ForCausalLM

    # The constructor runs transformers' own init on the global RNG; fork it so that building a
    # model never shifts the caller's random stream (the weights come from `gen` below anyway).
    with torch.random.fork_rng(devices=[]):
        target = Qwen2ForCausalLM(_config(spec)).to(torch.float32)
    _init_target(target, spec, torch.Generator().manual_seed(seed))
    draft = copy.deepcopy(target)
    _perturb(draft, spec.draft_noise, torch.Generator().manual_seed(seed + DRAFT_SEED_OFFSET))
    return _freeze(target), _freeze(draft)


def build_tiny(role: str = "target", seed: int = 0, spec: TinySpec = TINY_SPEC) -> torch.nn.Module:
    """One model of :func:`build_tiny_pair`; ``role`` is ``"target"`` or ``"draft"``.

    The draft is derived from the target, so building the draft builds both (still ~20 ms).
    """
    if role not in ("target", "draft"):
        raise ValueError(f"role must be 'target' or 'draft', got {role!r}")
    target, draft = build_tiny_pair(seed, spec)
    return target if role == "target" else draft
