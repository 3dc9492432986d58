"""What every benchmark records about where it ran, and how it writes its rows."""

from __future__ import annotations

import csv
import platform
from pathlib import Path
from typing import Iterable


def cpu_flags() -> str:
    """The CPU flags that decide what a multi-row forward pass costs (the machine's, from
    /proc/cpuinfo): avx2, avx512f, avx512_bf16, amx_bf16, amx_tile."""
    try:
        flags = open("/proc/cpuinfo").read().split("flags", 1)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return platform.machine()
    keep = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return " ".join(keep) or platform.machine()


def write_csv(rows: Iterable[dict], path: Path, columns: list[str]) -> None:
    """rows as CSV with exactly `columns` (other keys of a row are left out)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
