"""Task functions for tests/test_pool_api.py (workers import them by name)."""

from __future__ import annotations

import os
from typing import Any


class Marker:
    """A result the caller can hold a weak reference to."""


def make_marker(_: object = None) -> Marker:
    return Marker()


def misbehave_on(x: int, how: str, bad: int = 13) -> int:
    """Return ``x``, except on ``bad``: raise, exit or raise KeyboardInterrupt there."""
    if x != bad:
        return x
    if how == "raise":
        raise KeyError(x)
    if how == "exit":
        raise SystemExit(4)
    raise KeyboardInterrupt


def square(x: int) -> int:
    return x * x


def pid_of(_: object = None) -> int:
    return os.getpid()


def set_item(mapping: Any, key: str, value: Any) -> list[str]:
    """Through a multiprocessing.Manager proxy."""
    mapping[key] = value
    return sorted(mapping.keys())


_kept: Any = None


def keep(value: Any) -> None:
    """A pool initializer that keeps its argument for later tasks."""
    global _kept
    _kept = value


def put_in_kept(value: Any) -> bool:
    _kept.put(value)
    return True


def use_kept_primitives(value: Any) -> bool:
    """With ``(queue, lock, event, semaphore)`` kept: signal the caller through each, then wait
    for the lock the caller holds (and keep it)."""
    queue, lock, event, semaphore = _kept
    queue.put(value)
    event.set()
    semaphore.release()
    return bool(lock.acquire(timeout=30))


def release_kept_lock() -> bool:
    _kept[1].release()
    return True


def touch(path: str) -> str:
    """A side effect the caller can check: create ``path``."""
    with open(path, "w"):
        pass
    return path
