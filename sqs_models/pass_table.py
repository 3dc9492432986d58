"""Pass tables: what a forward pass scoring r new rows costs on one engine, measured once per machine,
and the committed tokens per second each table predicts.

    table = cached_table(key, rows, measure, cache)   # {rows: ms}; measured only for rows not cached
    best, preds = choose({"torch bfloat16": t1, "llama Q4_K_M": t2}, acceptance=0.7)

A table is keyed by everything that changes it: model (and its file), engine, weight type,
threads, a hash of the CPU flags and the library versions (:func:`machine_key`), so a restart on
the same machine reads it instead of measuring again, and any change measures anew. The cache is
one JSON file, ``pass-tables.json`` in :func:`state_dir`.

Prediction (:func:`predict`), per engine, from its table alone (ms by rows, :func:`pass_ms`), an
acceptance ``a`` per drafted position and the edge's draft step ``d`` ms:

* plain decoding: 1000 / t(1) tokens per second;
* speculation with L drafts: E[tokens | L] = 1 + a + ... + a^L committed per round of L draft steps
  and a pass of L + 1 rows, so 1000 * E / (L * d + t(L + 1)); the best L in 1..max_drafts is kept.

:func:`choose` keeps the engine whose WORST prediction over an acceptance range
(``ACCEPTANCE_RANGE``: 0.5, a T = 1 or prose session, to 0.9, greedy code) is best: the promise is
never to be slower than plain decoding on the best engine, and a session's acceptance is not known
at start. The cloud does not know its edges' draft step either; ``DRAFT_STEP_PRIOR`` prices it as a
fraction of the fastest one-token step among the candidates (measured here: the 0.5B draft on
llama.cpp steps in 68 ms against the 1.5B target's 149 ms, 0.46). Without the draft's cost,
an engine whose 2-row pass is barely dearer than its step (llama Q4_0 here: 179 / 186 ms) was kept
over one with a cheaper step (Q4_K_M, 149 ms) and lost at T = 1, where speculation does not pay.
The network is left out: it is the same for every target engine.

Sessions. A cloud that serves S edges at once (``sessions``, the operator's --expect-sessions)
scores their rounds in shared passes, so an engine is judged by its aggregate rate there: plain,
S tokens per pass of S rows; speculative, S * E[tokens | L] per round of L draft steps (each edge
drafts on its own device) and one pass of S * (L + 1) rows. Where a wide pass costs about what a
narrow one does (torch bf16 on AMX here: 366 ms for 17 rows against 342 for one) that engine wins
at S = 8 while llama.cpp's cheaper step wins at S = 1, so one process cannot keep both promises:
the operator says which load to plan for (default 1, the single-client promise).

Near ties. A table is timed once, on whatever else the host runs then; on the AMX VM of RESULTS 0h
a start during an install measured Q4_K_M's step at 181 ms (161 quiet) and Q4_0's at 154 (195
quiet), kept Q4_0, and cached the choice, whose wide passes cost 2-3x Q4_K_M's; the host's speed
drifted by up to 40% within that session. So when the two best predictions lie within ``TIE_MARGIN``
(25%, which that case needed: 154 against 181) of each other and either table was just measured, both
are timed ``TIE_RETIMES`` more times, alternating (A B A B: a slow or fast spell of the host falls
on both), each row keeps the median of its timings (a VM's core runs faster as well as slower while
the other core idles or works, so the fastest figure is no safer), and the choice is made again on
those tables, which are what the cache keeps.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

__all__ = ["GRID", "ACCEPTANCE_PRIOR", "ACCEPTANCE_RANGE", "DRAFT_STEP_PRIOR", "state_dir", "cpu_fingerprint", "package_version", "llama_build", "machine_key", "pass_grid", "cached_table",
           "store_table", "near_tie", "TIE_MARGIN", "TIE_RETIMES",
           "Prediction", "expected_tokens", "pass_ms", "predict", "choose", "describe_choice"]

# Rows of the measured passes: L + 1 for L = 0, 1, 2, 4, 8, 16, 32, and the multiples of 4 just
# below (llama.cpp's repacked kernels take rows four at a time and each one left over alone, so a
# table that skipped them drew 8 rows as dear as the line from 5 to 9: common/pass_shape.py).
GRID = (1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 64)
ACCEPTANCE_PRIOR = 0.7  # per drafted position; docs/DESIGN.md section 9 measured 1.94 of 4 greedy (code+prose)
ACCEPTANCE_RANGE = (0.5, 0.9)  # the auto choice's worst case runs over these (module doc)
DRAFT_STEP_PRIOR = 0.4  # the edge's draft step, as a fraction of the fastest target step (module doc)
MAX_DRAFTS = 16
TIE_MARGIN = 0.25  # predictions this close are timed again, interleaved, before one is kept
TIE_RETIMES = 2  # further timings of each of the two leaders, alternating
TABLE_FORMAT = "fastest-of-3"  # how a cached figure was taken: a change here measures anew
_lock = threading.Lock()


def state_dir() -> Path:
    """Where measurements that outlive a process are kept: ``$SQS_STATE_DIR``, else ``~/.cache/sqs-sd``."""
    return Path(os.environ.get("SQS_STATE_DIR") or "~/.cache/sqs-sd").expanduser()


def cpu_fingerprint() -> str:
    """A short hash of the CPU model and all its flags (/proc/cpuinfo): what kernels a library may pick."""
    try:
        text = open("/proc/cpuinfo").read()
        model = text.split("model name", 1)[1].split("\n", 1)[0] if "model name" in text else ""
        flags = text.split("\nflags", 1)[1].split("\n", 1)[0] if "\nflags" in text else ""
    except (OSError, IndexError):
        model, flags = platform.processor(), ""
    return hashlib.sha256(f"{platform.machine()}|{model}|{flags}".encode()).hexdigest()[:12]


def package_version(package: str) -> str:
    """The installed version of ``package``, or "-" (without importing it)."""
    import importlib.metadata as md

    try:
        return md.version(package)
    except md.PackageNotFoundError:
        return "-"


def llama_build() -> str:
    """llama-cpp-python's version and a hash of its compiled CPU kernels (libggml-cpu), or "-": the
    same version built with other flags (scripts/llama_build_flags.sh: AMX on or off) runs other
    kernels, so measurements and crash probes are keyed by the build, not the version alone."""
    import importlib.util

    version = package_version("llama-cpp-python")
    spec = importlib.util.find_spec("llama_cpp") if version != "-" else None
    if spec is None or not spec.submodule_search_locations:
        return version
    libs = sorted(Path(next(iter(spec.submodule_search_locations)), "lib").glob("libggml-cpu.so*"))
    try:
        digest = hashlib.sha256(libs[0].read_bytes()).hexdigest()[:12]
    except (IndexError, OSError):
        return version
    return f"{version}+{digest}"


def machine_key() -> str:
    """CPU fingerprint and the versions (llama.cpp: the build) of the libraries that compute a pass."""
    libs = ",".join(f"{p}={package_version(p)}" for p in ("torch", "transformers"))
    return f"cpu:{cpu_fingerprint()}|{libs},llama-cpp-python={llama_build()}|{TABLE_FORMAT}"


def pass_grid(max_rows: int, grid: Iterable[int] = GRID) -> tuple[int, ...]:
    """The grid's row counts up to ``max_rows``, with ``max_rows`` itself when the grid passes it."""
    rows = [r for r in grid if r <= max_rows]
    if max_rows >= 1 and max_rows not in rows and any(r > max_rows for r in grid):
        rows.append(max_rows)
    return tuple(sorted(set(rows)))


def _read(cache: Path) -> dict:
    try:
        return json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}


def cached_table(key: str, rows: Sequence[int], measure: Callable[[Sequence[int]], Mapping[int, float]],
                 cache: Path | None = None) -> tuple[dict[int, float], bool]:
    """({rows: ms} for ``rows``, True when nothing had to be measured). Rows missing from the cache
    under ``key`` are measured with ``measure(missing)`` and stored; ``cache=None`` uses
    ``state_dir()/pass-tables.json``."""
    cache = cache or state_dir() / "pass-tables.json"
    with _lock:
        known = {int(r): float(ms) for r, ms in _read(cache).get(key, {}).items()}
    missing = [r for r in rows if r not in known]
    if missing:
        known.update({int(r): float(ms) for r, ms in measure(missing).items()})
        store_table(key, known, cache)
    return {r: known[r] for r in rows}, not missing


def store_table(key: str, table: Mapping[int, float], cache: Path | None = None) -> None:
    """Write ``table`` ({rows: ms}) under ``key``: its rows replace those cached, other cached rows
    stay (atomic rename)."""
    cache = cache or state_dir() / "pass-tables.json"
    with _lock:  # re-read: another engine of this process may have written meanwhile
        known = _read(cache)
        merged = {int(r): float(ms) for r, ms in known.get(key, {}).items()}
        merged.update({int(r): float(ms) for r, ms in table.items()})
        known[key] = {str(r): ms for r, ms in sorted(merged.items())}
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        tmp.replace(cache)


def near_tie(a: Prediction, b: Prediction, margin: float = TIE_MARGIN) -> bool:
    """True when ``b`` predicts within ``margin`` (relative) of ``a``: closer than one measurement
    of a loaded host can tell apart (module doc, "Near ties")."""
    return b.best_tok_s >= (1.0 - margin) * a.best_tok_s


@dataclass(frozen=True)
class Prediction:
    """Predicted committed tokens per second of one engine at one acceptance (see the module doc)."""

    name: str
    plain_tok_s: float
    spec_tok_s: float
    drafts: int  # the L of spec_tok_s
    acceptance: float = ACCEPTANCE_PRIOR
    sessions: int = 1  # the rates are the aggregate of this many concurrent sessions

    @property
    def best_tok_s(self) -> float:
        return max(self.plain_tok_s, self.spec_tok_s)

    @property
    def mode(self) -> str:
        return f"speculative L={self.drafts}" if self.spec_tok_s > self.plain_tok_s else "plain"

    def __str__(self) -> str:
        at = f"at acceptance {self.acceptance:g}" + (f", {self.sessions} sessions" if self.sessions > 1 else "")
        return (f"{self.name}: {self.best_tok_s:.1f} tok/s {at} ({self.mode}; "
                f"plain {self.plain_tok_s:.1f}, speculative {self.spec_tok_s:.1f} at L={self.drafts})")


def expected_tokens(drafts: int, acceptance: float) -> float:
    """E[committed tokens] of a round of ``drafts`` drafts, each accepted with ``acceptance`` given
    the previous ones: 1 + a + a^2 + ... + a^L (the resampled or bonus token included)."""
    return sum(acceptance ** i for i in range(drafts + 1))


def pass_ms(table: Mapping[int, float], rows: int) -> float:
    """ms of a pass of ``rows`` rows from a measured table, as measured: linear between measured row
    counts, along the last segment beyond them (never below the last figure). Deliberately not forced
    to never fall with rows: on an AMX core torch's 17-row bf16 pass measured cheaper than its
    1-row step (a GEMV against AMX tile GEMMs), and that is what speculation can use."""
    xs = sorted(table)
    ys = [float(table[x]) for x in xs]
    if rows <= xs[-1]:
        return float(np.interp(rows, xs, ys))
    if len(xs) == 1:
        return ys[0] * rows / xs[0]  # one point: proportional is the cautious guess
    slope = max(0.0, (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]))
    return ys[-1] + slope * (rows - xs[-1])


def predict(name: str, table: Mapping[int, float], acceptance: float = ACCEPTANCE_PRIOR,
            max_drafts: int = MAX_DRAFTS, draft_ms: float = 0.0, sessions: int = 1) -> Prediction:
    """Plain and best speculative tok/s of one table at ``acceptance``, drafts at ``draft_ms`` each,
    summed over ``sessions`` concurrent sessions whose rounds share each pass (module doc)."""
    if not table:
        raise ValueError(f"{name}: empty pass table")
    if not 0.0 <= acceptance < 1.0:
        raise ValueError(f"acceptance must lie in [0, 1), got {acceptance}")
    if not draft_ms >= 0.0:
        raise ValueError(f"draft_ms must be >= 0, got {draft_ms}")
    if sessions < 1:
        raise ValueError(f"sessions must be >= 1, got {sessions}")
    s = sessions
    plain = 1e3 * s / pass_ms(table, s)
    best_l, best = 0, 0.0
    for n in range(1, max_drafts + 1):
        rate = 1e3 * s * expected_tokens(n, acceptance) / (n * draft_ms + pass_ms(table, s * (n + 1)))
        if rate > best:
            best_l, best = n, rate
    return Prediction(name, plain, best, best_l, acceptance, s)


def draft_step_ms(tables: Mapping[str, Mapping[int, float]], draft_ratio: float = DRAFT_STEP_PRIOR) -> float:
    """The edge's draft step the choice assumes: ``draft_ratio`` of the fastest one-token step."""
    return draft_ratio * min(pass_ms(t, 1) for t in tables.values())


def choose(tables: Mapping[str, Mapping[int, float]], acceptance: float | Sequence[float] = ACCEPTANCE_RANGE,
           max_drafts: int = MAX_DRAFTS, draft_ratio: float = DRAFT_STEP_PRIOR,
           sessions: int = 1) -> tuple[str, list[Prediction]]:
    """(the name whose worst prediction over ``acceptance`` (one value or several) is best, each
    name's worst prediction, best first), for ``sessions`` concurrent sessions. Drafts cost
    :func:`draft_step_ms` each."""
    if not tables:
        raise ValueError("no candidate engine")
    accs = (float(acceptance),) if isinstance(acceptance, (int, float)) else tuple(acceptance)
    d = draft_step_ms(tables, draft_ratio)
    worst = [min((predict(n, t, a, max_drafts, d, sessions) for a in accs), key=lambda p: p.best_tok_s)
             for n, t in tables.items()]
    preds = sorted(worst, key=lambda p: -p.best_tok_s)
    return preds[0].name, preds


def describe_choice(preds: Sequence[Prediction], acceptance: float | Sequence[float] = ACCEPTANCE_RANGE,
                    draft_ms: float | None = None) -> str:
    """One line: "auto by the worst predicted tok/s over acceptance 0.5..0.9 ...: kept A: ...; B: ..."."""
    accs = (acceptance,) if isinstance(acceptance, (int, float)) else tuple(acceptance)
    over = f"acceptance {accs[0]:g}" if len(accs) == 1 else f"acceptance {min(accs):g}..{max(accs):g}"
    drafts = f", drafts at {draft_ms:.0f} ms" if draft_ms is not None else ""
    return (f"auto by the worst predicted tok/s over {over} per position{drafts}: kept {preds[0]}"
            + "".join(f"; {p}" for p in preds[1:]))
