"""Small helpers shared by the process tests."""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from forkio._channel import Channel


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


def open_fds() -> int:
    """How many fds this process has open."""
    return len(os.listdir("/proc/self/fd"))


@contextlib.contextmanager
def channel_pair() -> Iterator[tuple[Channel, Channel]]:
    """Two connected pickle channels in this process, closed on exit; no fd of theirs may outlive them."""
    gc.collect()
    fds_before = open_fds()
    a, b = socket.socketpair()
    left, right = Channel(a), Channel(b)
    yield left, right
    left.close()
    right.close()
    gc.collect()
    assert open_fds() == fds_before, "an fd leaked"


def wait_until(predicate: Any, timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until it is true (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def feed_in_chunks(decoder: Any, stream: bytes, cuts: list[int]) -> list[Any]:
    """Feed ``stream`` to a codec's decoder cut at ``cuts`` (taken modulo its length); the messages out."""
    points = sorted({c % (len(stream) + 1) for c in cuts})
    out, start = [], 0
    for point in [*points, len(stream)]:
        out += [item[0] for item in decoder.feed(stream[start:point])]
        start = point
    return out


REPO = Path(__file__).resolve().parent.parent
# What a copy of the repository leaves out: version control, environments, caches, build and run outputs
# (examples' out/ folders can hold a named pipe, which a copy would block on).
NOT_COPIED = (".git", ".venv", "out", "__pycache__", "*.egg-info", "build", "dist", ".mypy_cache",
              ".pytest_cache", ".ruff_cache", ".hypothesis", "node_modules")


def copy_of_repository(dest: Path) -> Path:
    """A copy of this checkout's files at ``dest`` (without ``NOT_COPIED``), for tests that build or
    run from a repository they may change."""
    shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(*NOT_COPIED), symlinks=True)
    return dest
