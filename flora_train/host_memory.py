"""Host allocator settings for a training process on CPU.

A training step allocates and frees the same activation-sized blocks (tens of MiB) every step.
glibc's malloc returns such blocks to the kernel when they are freed (``mmap`` above its
threshold, heap trimming below it), so the next step's first write to each fresh block costs a
page fault per 4 KiB: measured on the 2-core bench machine, that made FLoRA's elementwise passes
about a third slower (``flora-train bench train``: 1.16x -> 1.12x over the frozen base). Keeping
freed blocks for reuse is what tcmalloc/jemalloc do for PyTorch on CPU; these are glibc's own knobs
for it. The cost is that the process keeps its peak heap until it exits.
"""

from __future__ import annotations

import ctypes
import os
import sys

# glibc's mallopt parameter numbers (malloc.h) and the largest mmap threshold it accepts on 64-bit.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD_MAX = 32 << 20
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_blocks() -> bool:
    """Makes glibc reuse freed blocks below 32 MiB instead of returning them to the kernel.

    Returns whether the settings were applied: not on other C libraries, and not when the user
    chose their own (``MALLOC_*_`` variables, or ``FLORA_TRAIN_MALLOC=system``).
    """
    if sys.platform != "linux" or os.environ.get("FLORA_TRAIN_MALLOC") == "system":
        return False
    if any(name in os.environ for name in USER_SETTINGS):
        return False
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version"):
        return False  # musl and others: mallopt is absent or ignores these parameters
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1
    ok &= libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1
    ok &= libc.mallopt(M_TOP_PAD, 64 << 20) == 1
    return bool(ok)
