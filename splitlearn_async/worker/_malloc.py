"""Pin glibc's malloc thresholds in a process that serves torch work for a long time.

glibc serves an allocation of ``M_MMAP_THRESHOLD`` bytes or more (128 KiB at start) with
its own ``mmap``, and raises that threshold, up to 32 MiB, each time such a block is freed:
after one large training step or prompt, blocks of up to tens of megabytes come from the
heap arenas instead, and the heap's growing and trimming around them stalls the process
from then on. Measured (``benchmarks/train_decode_latency.py``): once a training step had
run as one item over the whole trunk, every later phase's decode p99 with a trainer stayed
at 2.3-2.6x its p99 alone (p90 65-74 ms against 52 ms), for as long as the server ran;
with the threshold fixed at 128 KiB, the same phases gave 1.43x and 1.18x.

``mallopt(M_MMAP_THRESHOLD, n)`` fixes the threshold (and so turns off its dynamic
adjustment, and the trim threshold's). ``splitlearn serve`` calls :func:`pin_malloc_thresholds`
at start; a program that embeds the server may too. It does nothing where the C library is
not glibc, or when the user set ``MALLOC_MMAP_THRESHOLD_`` in the environment (theirs wins).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

__all__ = ["pin_malloc_thresholds"]

logger = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def pin_malloc_thresholds(mmap_threshold: int = 128 * 1024) -> bool:
    """Fix glibc's ``M_MMAP_THRESHOLD`` at ``mmap_threshold`` bytes for this process.

    Returns:
        True if the threshold was set; False where the C library is not glibc, or
        ``MALLOC_MMAP_THRESHOLD_`` is set in the environment.
    """
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl, or no libc.so.6
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold))
    if done:
        logger.debug("glibc M_MMAP_THRESHOLD pinned at %d bytes", mmap_threshold)
    return done
