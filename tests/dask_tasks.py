"""Task functions for the Dask backend's tests (Dask workers and forkio children import them by name)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import forkio


def report_and_wait(path: str) -> str:
    """Report, then wait (bounded) until the caller's handler has made ``path``: proof it arrived mid-task."""
    forkio.progress(1, 2)
    forkio.report({"hello": "from the task"})
    deadline = time.monotonic() + 20
    while not Path(path).exists():
        if time.monotonic() > deadline:
            return "message never arrived"
        time.sleep(0.01)
    return "message arrived while running"


def hang_first_time(path: str) -> str:
    """The first call writes its pid to ``path`` and hangs; later calls return at once."""
    if not Path(path).exists():
        Path(path).write_text(str(os.getpid()))
        time.sleep(600)
    return "second attempt"
