"""Task functions for ``bench/pool.py``: importable by name in every library's workers.

Kept to the standard library and free of side effects at import: spawn-style workers (loky,
forkserver) import this module before running a task.
"""

from __future__ import annotations

import os
import time


def inc(x: int) -> int:
    """The tiny task: ``x + 1``."""
    return x + 1


def spin(n: int) -> int:
    """A pure-Python CPU-bound loop of ``n`` iterations (no I/O, no GIL release)."""
    total = 0
    for i in range(n):
        total += i ^ (i >> 3)
    return total


def pid_sleep(seconds: float = 0.0) -> int:
    """Sleep (0 means a bare ``time.sleep(0)``) and return the worker's pid."""
    time.sleep(seconds)
    return os.getpid()


def spin_timed(n: int) -> float:
    """``spin(n)``; returns how long it took, in seconds, timed inside the worker."""
    t0 = time.perf_counter()
    spin(n)
    return time.perf_counter() - t0
