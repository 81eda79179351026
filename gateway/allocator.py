"""The C allocator's policy for a serving process: large buffers are reused instead of mapped afresh.

An analytics answer handles buffers of megabytes: the packed latency sketches of a 30-day HOUR reliability
report are 5 MB, read into numpy arrays of 3-4 MB each, and the JSON of a large answer is as big. glibc's malloc
serves every allocation above its mmap threshold (128 KiB at first, raised dynamically up to 32 MiB) with a fresh
``mmap`` and returns it with ``munmap`` on free; heap memory above the trim threshold is returned to the kernel too.
Either way the next request touches new pages, and the kernel zeroes each one on its first fault: for the 30-day
reliability report's sketch batch, 11.5 ms of page faults against 0.75 ms of work (measured in one process on this
machine; ``docs/benchmarks.md``, "Reliability query").

``tune_allocator`` fixes the mmap threshold (so buffers up to it come from the heap and are reused) and the trim
threshold at twice that (so up to that much freed heap stays with the process). The cost is resident memory: a
process keeps its high-water mark of such buffers, at most a few tens of MiB. ``ANALYTICS_MALLOC_MMAP_THRESHOLD_MB``
sets it; 0 leaves glibc's defaults. Where the C library is not glibc (musl, macOS), nothing changes.
"""

from __future__ import annotations

import ctypes
import functools

import structlog

log = structlog.get_logger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
MAX_MMAP_THRESHOLD_MB = 32  # glibc's largest on 64-bit systems (HEAP_MAX_SIZE / 2)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library the process runs on (its own symbols: no search on disk), if it is glibc."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p  # only glibc has it: its mallopt takes our parameters
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        libc.mallopt.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def tune_allocator(mmap_threshold_mb: int) -> bool:
    """Set glibc's mmap threshold to ``mmap_threshold_mb`` MiB and its trim threshold to twice that; whether it
    did (False for 0, or where ``mallopt`` is not glibc's)."""
    if mmap_threshold_mb <= 0:
        return False
    if not 0 < mmap_threshold_mb <= MAX_MMAP_THRESHOLD_MB:
        raise ValueError(f"mmap threshold {mmap_threshold_mb} MiB: must be 1 to {MAX_MMAP_THRESHOLD_MB}")
    libc = _glibc()
    if libc is None:
        return False
    gnu_get_libc_version, mallopt = libc.gnu_get_libc_version, libc.mallopt
    threshold = mmap_threshold_mb * 1024 * 1024
    done = bool(mallopt(M_MMAP_THRESHOLD, threshold) == 1 and mallopt(M_TRIM_THRESHOLD, 2 * threshold) == 1)
    log.debug("allocator.tuned", glibc=gnu_get_libc_version().decode(), mmap_threshold_mb=mmap_threshold_mb, ok=done)
    return done
