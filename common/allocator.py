"""Keep freed heap memory in the process (glibc's malloc), so that per-token vocabulary-sized arrays
reuse warm pages instead of faulting in fresh ones.

Every target or draft step builds a few float64 [V] arrays (V = 151,936: 1.2 MB each): the
probabilities, the Gumbel noise, masks. With glibc's defaults a freed block of that size goes back
to the kernel (munmap, or a heap trim once its dynamic threshold is passed), and the next step's
array faults in ~300 fresh zeroed pages. Measured on this project's T = 1 sampling of one row
(target_probs then gumbel_token, numpy 2.4, one core of an Intel Xeon with AMX): 2.36 ms with the
defaults, 1.34 ms with the settings below. In the cloud that is per session and step, on the core
the forward passes need.

The cost is memory the process keeps after a peak (at most what it used), which the sizes below
bound from above only through the workload itself. Not glibc (musl, macOS): nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks below this come from the heap and are reused: the dynamic threshold's own ceiling on 64-bit
# glibc, fixed so that it does not start low and climb only after the first frees.
MMAP_THRESHOLD = 32 << 20
# Free memory at a heap's top is given back only beyond this.
TRIM_THRESHOLD = 256 << 20

_done = False


def keep_freed_memory() -> bool:
    """Apply the settings once per process; True when glibc took them."""
    global _done
    if _done:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
        gnu = getattr(libc, "gnu_get_libc_version", None)
    except OSError:
        return False
    if mallopt is None or gnu is None:  # not glibc: its mallopt (if any) means something else
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not ok:
        log.warning("mallopt refused the heap settings; per-token arrays fault in fresh pages")
    _done = ok
    return ok
