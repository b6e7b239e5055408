"""CPU memory: keep freed blocks in the process, so large tensors are not page-faulted in afresh at every step.

glibc's malloc serves every block above its mmap threshold (128 KiB, adapting up to 32 MiB) with a fresh ``mmap``
and hands it back to the operating system when it is freed. An inner loop allocates the same large tensors at every
step (a batch of tasks' activations and their gradients: tens of MB each), so each step the kernel maps them again and
zero-fills them page by page: in a profile of the plain adaptation baseline, one ``fill_`` of a freshly mapped
gradient buffer took as long as the convolution's backward pass. :func:`retain_freed_memory` asks malloc to serve every
block from its heap (``M_MMAP_MAX = 0``) and to keep up to 2 GiB of freed memory for reuse (``M_TRIM_THRESHOLD``).

It changes no arithmetic (torch aligns every CPU tensor to 64 bytes wherever its memory comes from): the evaluation of
held-out mnist gave every method the same per-task accuracies with and without it, 1.33x faster with it
(``benchmarks/bench_allocator.py`` measures it on your machine). A process holds on to its peak memory until it exits.
Anywhere but glibc (macOS, musl, Windows) it does nothing; ``HMLIB_SYSTEM_MALLOC=1`` turns it off.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # bytes of free memory at the heap's top kept for reuse (mallopt takes an int)
OFF = "HMLIB_SYSTEM_MALLOC"

_done: bool | None = None


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (once per process); True where it applies."""
    global _done
    if _done is None:
        _done = False
        if sys.platform.startswith("linux") and os.environ.get(OFF, "") in ("", "0"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                mallopt = libc.mallopt  # glibc only: musl has none
            except (OSError, AttributeError):
                return False
            _done = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done
