"""Keep freed CPU memory in the process instead of handing it back to the kernel after every op.

Why: a differentiable unroll allocates and frees activation-sized tensors thousands of times
per outer iteration (at CIFAR shape, 100 images: 50 MB each). glibc serves any block above its
mmap threshold (at most 32 MB) with a fresh ``mmap`` and returns it with ``munmap`` when freed,
so every such tensor is zero-filled again by the kernel one 4 KiB page fault at a time. On this
machine's 2 cores that was about 8.6 million page faults and roughly 40 % of one iteration's
wall time (``benchmarks/speed.py``: 36.9 s -> 19.4 s at the anchor "cifar10 100 img 20 steps";
2.1 million faults instead of 25.7 million over three iterations).

The fix is four ``mallopt`` settings, applied at run time in every process that trains:
no ``mmap`` for large blocks (they come from the heap and are reused), no trimming of the
heap's top, growth in 64 MiB steps, and one arena so that Ray Train's worker thread shares the
main heap. The cost is that a process keeps its peak heap until it exits, which a training
worker reaches every iteration anyway. Values are unchanged: only where the bytes live.

Only glibc has ``mallopt``; elsewhere (macOS, musl) this does nothing. Set
``PDD_RAY_MALLOC=default`` to leave the allocator alone (e.g. to compare).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

#: ``PDD_RAY_MALLOC=default`` keeps glibc's own settings.
OPT_OUT_ENV = "PDD_RAY_MALLOC"

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_TOP_PAD_BYTES = 64 << 20  # grow the heap in 64 MiB steps: fewer brk calls
_NEVER_TRIM = (1 << 31) - 1  # mallopt takes an int

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the settings once per process; returns True when they are in effect.

    Safe to call from every worker entry point: later calls return the first call's answer.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get(OPT_OUT_ENV, "").strip().lower() == "default":
        return False
    libc = _glibc()
    if libc is None:
        return False
    settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM), (_M_TOP_PAD, _TOP_PAD_BYTES), (_M_ARENA_MAX, 1))
    _applied = all(libc.mallopt(param, value) == 1 for param, value in settings)
    return _applied


def _glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc (the only one with these mallopt parameters), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc
