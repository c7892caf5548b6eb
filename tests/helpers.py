"""Small helpers shared by the process tests."""

from __future__ import annotations

import time

import psutil


def gone(pid: int, within: float = 0.0) -> bool:
    """True once ``pid`` has exited (a zombie counts: it runs no more), waiting up to ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
