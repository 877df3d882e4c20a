"""What this machine lets the process use: one answer for every module that sizes a pool."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from contextlib import contextmanager

# glibc's mallopt parameters and their defaults (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM, DEFAULT_MMAP_MAX = 128 * 1024, 65536


def cores() -> int:
    """The CPU cores this process may run on: its affinity where the OS tells (containers,
    `taskset`, CI runners), else every core (`os.cpu_count` ignores the affinity)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has `mallopt` and `malloc_trim`), else None
    (macOS, musl): the heap settings here and `callbacks.release_memory` need it."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if all(hasattr(libc, f) for f in ("mallopt", "malloc_trim")) else None


@contextmanager
def kept_heap(on: bool = True):
    """Inside it, freed memory stays in the process's heap for the next allocation.

    glibc serves every allocation above 32 MB (a batch's activations: 1,024 images
    x 64 channels x 32 x 32 in bf16 is 134 MB) with a fresh mmap and returns it on
    free, so each training step faults in and zeroes gigabytes of new pages: a fifth
    of a zoo_cnn step's time went to the kernel (batch 1,024, bf16, 2 cores of a
    Xeon). With mmap off and a high trim threshold the pages are reused: steps
    1.25-1.38 s -> 1.09-1.13 s there. On exit the defaults come back and the heap
    is trimmed; `callbacks.ReleaseMemory` still trims it after each epoch. Nothing where
    the C library is not glibc (macOS, musl) or `on` is False.
    """
    libc = glibc() if on else None
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM)
        libc.malloc_trim(0)  # what was kept goes back: a large free top would serve later ones
