"""Process-wide allocator setting for the `tidyface` command (CPU inference)."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_kept_block_bytes: int | None = None  # keep_freed_memory's mmap_threshold, once it took effect


def keep_freed_memory(mmap_threshold: int = 256 << 20, trim_threshold: int = 512 << 20) -> bool:
    """Let glibc keep freed blocks of up to mmap_threshold bytes for reuse, and up to
    trim_threshold bytes of free heap, instead of handing them back to the OS.

    By default glibc serves every block above 32 MiB (and many smaller ones) with a fresh
    mmap and unmaps it on free, so each frame, activation and crop batch of a CPU run is
    page-faulted in anew. Measured on 2 cores: MTCNN's R-Net on 512 crops 37 -> 21 ms, O-Net on
    128 crops 41 -> 28 ms; `video2faces` on Video_2.mp4 3.1 -> 2.9 s, its page faults 250k ->
    50k. The price: the process keeps up to trim_threshold of freed memory. Returns False
    where this is not glibc, with TIDYFACE_KEEP_FREED_MEMORY=0, or when the MALLOC_*_
    environment variables already tune glibc.
    """
    if not sys.platform.startswith("linux") or os.environ.get("TIDYFACE_KEEP_FREED_MEMORY") == "0":
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False  # the user tuned glibc already
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    if not (mallopt(_M_MMAP_THRESHOLD, mmap_threshold) and mallopt(_M_TRIM_THRESHOLD, trim_threshold)):
        return False
    global _kept_block_bytes
    _kept_block_bytes = mmap_threshold
    return True


def kept_block_bytes() -> int | None:
    """The size up to which freed blocks are kept for reuse (keep_freed_memory's mmap_threshold),
    or None where glibc's own policy stands (a block of more than 32 MiB is then mapped anew)."""
    return _kept_block_bytes
