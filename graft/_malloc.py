"""Stop glibc from returning big buffers to the OS after every tensor.

Eager PyTorch on CPU allocates and frees many tensors over glibc's mmap threshold; each one
is a fresh mmap, page faults and munmap. Keeping them on the heap (M_MMAP_MAX=0) and never
trimming it makes eager training/inference 2-3x faster on a small machine (see
BENCHMARKS.md). It must run before torch allocates, so ``graft/__init__`` calls it first.
Set GRAFT_NO_MALLOC_TUNING=1 to leave malloc alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_applied = False


def tune_malloc() -> bool:
    """Apply the settings once; returns whether they are in effect (glibc only)."""
    global _applied
    if _applied:
        return True
    if os.environ.get("GRAFT_NO_MALLOC_TUNING") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    _applied = bool(ok)
    return _applied
