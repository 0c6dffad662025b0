"""Process-level tuning the agent applies to itself (and, through the environment, its workers).

**malloc.** glibc serves allocations of 128 KiB and more with ``mmap`` and gives them back
with ``munmap`` at ``free`` (and trims the heap's top): every MiB-sized payload then lands
in fresh pages, paying a page fault per 4 KiB, in the agent (received frames, item
copies, result buffers) and in its worker processes. It stays because it is measured to
help on a quiet and on a busy machine alike: W7 of ``tests/benchmarks/bench_remote.py``
(200 x 4 MiB through an agent), with and without it, quiet and with one extra busy
process, is in the project's CHANGELOG for the release that checked it. The cost: up to
``TRIM_THRESHOLD`` of freed memory stays with the process for reuse. Values the operator
set in ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "tune_malloc"]

#: Allocations below this come from the (reused) heap, not fresh mmaps. Above the
#: largest frame the agent typically handles; far below its message limit.
MMAP_THRESHOLD = 64 * 1024 * 1024

#: Free memory at the heap's top kept for reuse before it is returned to the system.
TRIM_THRESHOLD = 256 * 1024 * 1024

_M_TRIM_THRESHOLD = -1  # glibc malloc.h
_M_MMAP_THRESHOLD = -3


def tune_malloc() -> bool:
    """Apply the thresholds to this process and its future children; False where not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False  # the operator decided
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    if not mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) or not mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD):
        return False
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)  # worker processes start with the same
    os.environ["MALLOC_TRIM_THRESHOLD_"] = str(TRIM_THRESHOLD)
    return True
