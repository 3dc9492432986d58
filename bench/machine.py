"""What every benchmark records about where it ran, and how it writes its rows."""

from __future__ import annotations

import csv
import os
import platform
import subprocess
from pathlib import Path
from typing import Iterable

ROOT = Path(__file__).resolve().parents[1]


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


def code_commit(root: Path = ROOT) -> str | None:
    """`git rev-parse --short HEAD`, with "-dirty" when `git status --porcelain` lists anything
    (uncommitted or untracked files: the run may not be that commit's code); None outside a git tree."""
    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout if proc.returncode == 0 else None

    head = git("rev-parse", "--short", "HEAD")
    if not head or not head.strip():
        return None
    status = git("status", "--porcelain")
    return head.strip() + ("-dirty" if status is None or status.strip() else "")


def loadavg() -> list[float] | None:
    """os.getloadavg() (1, 5, 15 min): other work on the machine shows here; None where unsupported."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def loadavg_1m() -> float | None:
    """The 1-minute load average now (other work on the machine, and a run's own earlier rows)."""
    la = loadavg()
    return la[0] if la else None
