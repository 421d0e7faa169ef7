"""Keeping freed CPU memory for reuse while a training loop runs (glibc's malloc; elsewhere nothing changes).

glibc serves each block over its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and unmaps it on
``free``, and returns the heap's top to the kernel once more than the trim threshold is free. A CPU
training step allocates and frees the same large tensors every step (a shapes batch's convolution maps
are 67 MiB each, a BERT-base word-embedding gradient 94 MiB), so every step the kernel maps them again,
zero-fills them and takes a page fault per 4 KiB on first touch: a quarter of a shapes step on a 2-core
machine (benchmarks/RESULTS.md, issue 15). jemalloc and tcmalloc, which PyTorch's CPU performance guide
recommends preloading, keep such blocks; :func:`reuse_freed_memory` makes glibc's own malloc keep them.
"""

from __future__ import annotations

import ctypes
import platform
from collections.abc import Iterator
from contextlib import contextmanager

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's <malloc.h>
M_MMAP_MAX = -4
GLIBC_DEFAULTS = {M_TRIM_THRESHOLD: 128 * 1024, M_MMAP_MAX: 65536}  # glibc's documented defaults
KEEP = {M_TRIM_THRESHOLD: 2**31 - 1, M_MMAP_MAX: 0}  # never trim the heap's top (it is an int); no mmap'd blocks


def _glibc() -> ctypes.CDLL | None:
    """The running process's C library when it is glibc with ``mallopt`` and ``malloc_trim``, else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


@contextmanager
def reuse_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """Inside, freed blocks of any size stay in the process and serve the next allocation (no ``mmap``
    per large block, no trimming); yields whether that took effect (glibc only, and ``enabled``).

    On exit glibc's default settings are set again and ``malloc_trim`` hands back what was kept. The
    settings are process-wide: the reuse also applies to other threads while inside, and a process
    that had set its own ``mallopt`` values gets glibc's defaults back, not its own."""
    libc = _glibc() if enabled else None
    if libc is None:
        yield False
        return
    applied = all(libc.mallopt(param, value) == 1 for param, value in KEEP.items())
    try:
        yield applied
    finally:
        for param, value in GLIBC_DEFAULTS.items():
            libc.mallopt(param, value)
        libc.malloc_trim(0)
