"""common/allocator.py: freed vocabulary-sized arrays are reused, not faulted in again each step."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Minor page faults of 50 steps that each build and drop float64 [V] arrays (V = 151,936), counted
# after one warm-up step; printed by a fresh interpreter, with or without keep_freed_memory().
_PROBE = """
import resource, sys
import numpy as np
if sys.argv[1] == "keep":
    from common.allocator import keep_freed_memory
    assert keep_freed_memory()
x = np.random.default_rng(0).standard_normal(151_936)
def step():
    p = np.exp(x - x.max())
    p /= p.sum()
    return int(np.flatnonzero(p > p.mean()).size)
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=120, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_memory_serves_each_steps_arrays_without_fresh_pages():
    default, kept = _faults("default"), _faults("keep")
    # One fresh 1.2 MB array is ~300 faults; the default run faults at least one per step.
    assert default > 50 * 250, default
    assert kept < 500, kept
