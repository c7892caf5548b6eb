"""What runs inside the forkio child on a Dask worker (imports nothing of Dask)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._pool_worker import OK, RAISED, encode_error


def call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, Any]:
    """Run the task; its own exception comes back as bytes, encoded here, where its type surely exists.

    The Dask worker in between never unpickles it, so a type that exists only where the task ran
    (or cannot be unpickled at all) reaches the caller as it would from a local pool.
    """
    try:
        return OK, fn(*args, **kwargs)
    except BaseException as exc:
        return RAISED, encode_error(exc)
