"""Argument checks shared by the public faces: bad input raises ``TypeError``/``ValueError`` at
the call, never later inside a thread or a child."""

from __future__ import annotations

import math
import operator
import os
import signal
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple


def timeout_arg(value: Any, name: str = "timeout", *, zero: bool = True) -> float | None:
    """Seconds to wait: a real number >= 0 (> 0 unless ``zero``), ``None`` or ``inf`` for no limit.

    For the process faces (fork, wait, recv, kill). The pool's options use ``check_timeout``,
    which also takes any number ``float()`` accepts (Decimal, numpy) and negative deadlines.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds or None, not {type(value).__name__}")
    if math.isnan(value) or value < 0 or (value == 0 and not zero):
        bound = ">= 0" if zero else "> 0"
        raise ValueError(f"{name} must be {bound} seconds (or None for no limit), not {value!r}")
    return None if math.isinf(value) else float(value)


_SIGNALS = frozenset(int(sig) for sig in signal.valid_signals())


def signal_arg(value: Any, name: str = "signal") -> int:
    """A signal number from a number, a ``signal.Signals`` or a name such as ``"SIGTERM"``.

    0 is accepted (it sends nothing: ``kill(0)`` asks whether the child still runs, as ``kill -0``).
    """
    if isinstance(value, str):
        try:
            return int(signal.Signals[value])
        except KeyError:
            raise ValueError(f"{name}: unknown signal name {value!r} (names look like 'SIGTERM')") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a signal number or name, not {type(value).__name__}")
    if value != 0 and value not in _SIGNALS:
        raise ValueError(f"{name}: {value} is not a valid signal number")
    return int(value)


def str_arg(value: Any, name: str) -> str:
    """A string for the command line or the environment: ``str``, ``bytes`` (decoded as the file
    system decodes names) or ``os.PathLike``. Anything else is a ``TypeError``: no ``str(None)``."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, bytes):
        return os.fsdecode(value)
    if isinstance(value, str):
        return value
    raise TypeError(f"{name} must be str, bytes or os.PathLike, not {type(value).__name__}: {value!r}")


def env_arg(env: Any) -> dict[str, str]:
    """A child's environment as ``dict[str, str]``; refuses what exec would refuse, here and now."""
    if not isinstance(env, Mapping):
        raise TypeError(f"env must be a mapping of names to values, not {type(env).__name__}")
    checked = {}
    for key, value in env.items():
        key = str_arg(key, "env key")
        value = str_arg(value, f"env[{key!r}]")
        if not key or "=" in key or "\0" in key:
            raise ValueError(f"env: illegal environment variable name {key!r}")
        if "\0" in value:
            raise ValueError(f"env[{key!r}]: embedded null byte")
        checked[key] = value
    return checked


def check_count(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int of at least ``minimum``; a clear TypeError/ValueError otherwise."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not bool")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, not {type(value).__name__}") from None
    if number < minimum:  # (worded as ProcessPoolExecutor words it for max_workers)
        raise ValueError(f"{name} must be greater than {minimum - 1}" if minimum > 0
                         else f"{name} must not be negative")
    return number


def check_timeout(name: str, value: Any, *, positive: bool = True) -> float | None:
    """A number of seconds, positive unless told otherwise, or None for no limit (``inf`` too)."""
    if value is None:
        return None
    if isinstance(value, bool | str | bytes):  # float() would take "2", and True is 1
        raise TypeError(f"{name} must be a number of seconds or None, not {type(value).__name__}")
    try:
        seconds = float(value)  # ints, Decimal, numpy floats...
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number of seconds or None, not {type(value).__name__}") from None
    if math.isnan(seconds) or (positive and seconds <= 0):
        raise ValueError(f"{name} must be a positive number of seconds (or None for no limit), not {value!r}")
    return None if math.isinf(seconds) and seconds > 0 else seconds


class PoolOptions(NamedTuple):
    """The options every pool takes (local or on Dask), checked."""

    task_timeout: float | None
    retries: int
    spare_workers: int
    max_tasks_per_worker: int | None
    max_memory_per_worker: int | None
    initializer: Callable[..., Any] | None
    initargs: tuple[Any, ...]
    preload: tuple[str, ...]


def check_pool_options(*, task_timeout: Any, retries: Any, spare_workers: Any, max_tasks_per_worker: Any,
                       max_memory_per_worker: Any, initializer: Any, initargs: Any, preload: Any,
                       max_tasks_name: str = "max_tasks_per_worker") -> PoolOptions:
    """A pool's options checked at the call (a bad one found later, in a pool's thread or on a
    remote worker, would break the pool). ``max_tasks_name`` is how the caller spelled that option."""
    from ._zygote import _normalise  # (not at import: the process faces use this module too)

    if initializer is not None and not callable(initializer):
        raise TypeError(f"initializer must be callable or None, not {type(initializer).__name__}")
    if isinstance(initargs, str | bytes) or not isinstance(initargs, Iterable):
        raise TypeError(f"initargs must be a tuple of arguments, not {type(initargs).__name__}")
    return PoolOptions(
        task_timeout=check_timeout("task_timeout", task_timeout),
        retries=check_count("retries", retries, 0),
        spare_workers=check_count("spare_workers", spare_workers, 0),
        max_tasks_per_worker=None if max_tasks_per_worker is None else check_count(
            max_tasks_name, max_tasks_per_worker, 1),
        max_memory_per_worker=None if max_memory_per_worker is None else check_count(
            "max_memory_per_worker", max_memory_per_worker, 1),
        initializer=initializer,
        initargs=tuple(initargs),
        preload=_normalise(preload),
    )
