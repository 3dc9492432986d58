"""Which optional rows a shared forward pass keeps: pure arithmetic on a pass-cost table.

    keep = shape_rows(wants=[1, 3, 1], optional=[0, 2, 0], cost=table.predict, acceptance=0.9)

Why. With llama.cpp's weight repacking (the CPU kernels of an x86 build without AMX, docs/DESIGN.md
section 10) a matrix product takes the rows of a pass four at a time and every row left over
(rows mod 4) alone, as a one-row product that reads the whole matrix again: on the Xeon of
docs/RESULTS.md section 0i a 1.5B Q4_0 pass of 8 rows cost 460 ms and one of 9 531
(docs/results/amx_2026-12-05o/fine_table.txt). A pass of
eight sessions' plain steps plus one draft that rides a step (a lookahead draft, cloud/verifier.py)
thus pays a full step for that draft. Such drafts are optional: the step verifies a prefix of
them, which is exactly a round whose edge sent fewer (the choice depends on row counts and past
acceptance, never on this step's draws, so the sampled law is unchanged). So before the pass, the
optional rows go deepest first, across items, while dropping them raises the pass's expected
tokens per ms.

Value of a kept row: a mandatory row (a step's own row, a round's rows) commits one token; the
optional row at depth j (its j-th draft) commits one only if it and the j - 1 before it are
accepted, ``acceptance ** j``.
"""

from __future__ import annotations

from typing import Callable, Sequence

__all__ = ["shape_rows"]


def shape_rows(wants: Sequence[int], optional: Sequence[int], cost: Callable[[int], float],
               acceptance: float) -> list[int]:
    """Rows each item keeps (same order as ``wants``).

    wants[i]: rows item i asks for; optional[i]: how many of its last rows may go (0..wants[i] - 1);
    cost(R): ms of a pass of R rows (> 0 where known; a table that answers 0 keeps everything);
    acceptance: in [0, 1], per drafted position. Drops go deepest first (ties: the later item
    first), and the kept total is the one with the most expected tokens per ms, ties to more rows.
    """
    if len(wants) != len(optional):
        raise ValueError(f"{len(wants)} wants but {len(optional)} optional counts")
    if not 0.0 <= acceptance <= 1.0:
        raise ValueError(f"acceptance must lie in [0, 1], got {acceptance}")
    for w, o in zip(wants, optional):
        if w < 1 or not 0 <= o < w:
            raise ValueError(f"an item wants {w} rows with {o} optional: needs want >= 1, 0 <= optional < want")
    keep = list(wants)
    total = sum(wants)
    if not any(optional) or cost(total) <= 0.0:
        return keep
    # Optional rows as (depth, item), the deepest (and, among equals, the latest item) dropped first.
    order = sorted(((d, i) for i, o in enumerate(optional) for d in range(1, o + 1)), reverse=True)
    value = sum(w - o for w, o in zip(wants, optional)) + sum(acceptance ** d for d, _ in order)
    best_rate, best_drops = value / cost(total), 0
    for n, (d, _) in enumerate(order, start=1):
        value -= acceptance ** d
        ms = cost(total - n)
        if ms <= 0.0:
            break
        if value / ms > best_rate * (1.0 + 1e-9):
            best_rate, best_drops = value / ms, n
    for d, i in order[:best_drops]:
        keep[i] -= 1
    return keep
