"""The Dask worker's side: one long-lived local forkio pool per caller's pool, in each Dask worker process.

A Dask task calls ``run_task``, which hands the forkio task to the local pool and waits for its
outcome, so the Dask thread stays busy exactly as long as a forkio child runs the task. The
Dask worker never runs user code itself: a crash or a timeout ends only a forkio child.

Outcomes, one tuple per task, in a form that pickles whatever happened:
``("ok", value)``, ``("raised", encoded error)`` (the task's own exception, encoded in the
child), ``("error", forkio error)`` (crash, timeout...) or ``("cancelled",)``.
"""

from __future__ import annotations

import contextlib
import pickle
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from distributed import get_worker
from distributed.diagnostics.plugin import WorkerPlugin

from .. import _zygote
from .._errors import ForkioError
from .._pool import Pool, RemoteError, RemoteTraceback
from .._pool_stream import run_chunk
from .._pool_worker import OK, dumps, encode_error
from ._child import call

MESSAGES_TOPIC = "forkio"  # one Dask event topic for every pool's progress() / report() messages


@dataclass
class _Local:
    """A caller's pool as seen by one Dask worker."""

    pool: Pool
    running: dict[int, list[Future[Any]]] = field(default_factory=dict)
    cancelled: set[int] = field(default_factory=set)
    closing: bool = False


_pools: dict[str, _Local] = {}
_lock = threading.Lock()


def _local(key: str, settings: dict[str, Any]) -> _Local:
    with _lock:
        local = _pools.get(key)
        if local is None:
            # As many forkio children as the Dask worker has threads: Dask's accounting of
            # slots stays true, and each busy thread waits on exactly one child.
            local = _pools[key] = _Local(Pool(get_worker().state.nthreads, **settings))
        return local


def run_task(key: str, settings: dict[str, Any], wire: int, fn: Any, args: tuple[Any, ...],
             kwargs: dict[str, Any], timeout: float | None, retries: int) -> tuple[Any, ...]:
    """A Dask task: run one forkio task in this worker's local pool and return its outcome.

    A chunk of ``map``/``stream`` items with a per-item timeout comes as one Dask task too (one
    scheduler round trip for many items): here each item becomes a forkio task of its own, with
    its own timeout and retries, and their outcomes are put back together as the chunk's result.
    """
    worker = get_worker()
    local = _local(key, settings)
    options = local.pool.options(timeout=timeout, retries=retries, on_message=partial(_forward, worker, key, wire))
    split = fn is run_chunk and timeout is not None
    calls = [(run_chunk, (args[0], [item], args[2]), {}) for item in args[1]] if split else [(fn, args, kwargs)]
    with _lock:
        if local.closing or wire in local.cancelled:
            local.cancelled.discard(wire)
            return ("cancelled",)
        futures: list[Future[Any]] = [options._submit_raw(call, c) for c in calls]
        local.running[wire] = futures
    del fn, args, kwargs, calls  # the local pool holds what it needs; big arguments go once sent
    try:
        for future in futures:
            # Not concurrent.futures.wait(): it never wakes for a future cancelled outside an executor.
            with contextlib.suppress(BaseException):
                future.exception()
        if not split:
            return _outcome(futures[0])
        return _chunk_outcome([_outcome(future) for future in futures])
    finally:
        with _lock:
            local.running.pop(wire, None)


def _chunk_outcome(outcomes: list[tuple[Any, ...]]) -> tuple[Any, ...]:
    """The items of a split chunk, back together in ``run_chunk``'s shape: one failure per item."""
    if any(outcome[0] == "cancelled" for outcome in outcomes):
        return ("cancelled",)
    values: list[Any] = []
    errors: dict[int, bytes] = {}
    seconds = 0.0
    for pos, outcome in enumerate(outcomes):
        if outcome[0] == "ok":
            item_values, item_errors, item_seconds = outcome[1]
            values.append(item_values[0])
            if 0 in item_errors:
                errors[pos] = item_errors[0]
            seconds += item_seconds
        else:
            values.append(None)
            errors[pos] = outcome[1] if outcome[0] == "raised" else encode_error(outcome[1])
    return ("ok", (values, errors, seconds))


def _outcome(future: Future[Any]) -> tuple[Any, ...]:
    if future.cancelled():
        return ("cancelled",)
    exc = future.exception()
    if exc is None:
        status, value = future.result()
        return ("ok", value) if status == OK else ("raised", value)
    if isinstance(exc, RemoteError):  # cannot be re-pickled as itself: send what it knows
        message = str(exc).removeprefix(f"{exc.type_name}: ")
        return ("raised", pickle.dumps((None, exc.type_name, message, exc.traceback), 5))
    if isinstance(exc, ForkioError):  # crash, timeout, closed pool: forkio's own, they pickle
        return ("error", exc)
    # Anything else failed in the child outside the task (its result would not pickle, say):
    # keep the child's traceback, which the local pool attached as the cause.
    exc_bytes, name, message, tb_text = pickle.loads(encode_error(exc))
    if isinstance(exc.__cause__, RemoteTraceback):
        tb_text = exc.__cause__.text
    return ("raised", pickle.dumps((exc_bytes, name, message, tb_text), 5))


def _forward(worker: Any, key: str, wire: int, message: Any) -> None:
    """A task's progress() / report(): to the caller now, as a Dask event (thread-safe in Dask)."""
    worker.log_event(MESSAGES_TOPIC, [key, wire, dumps(message)])


def cancel_tasks(key: str, wires: list[int]) -> None:
    """Run by ``client.run`` on every worker: stop these tasks if they run here, skip them if they come."""
    with _lock:
        local = _pools.get(key)
        if local is None:
            return
        for wire in wires:
            futures = local.running.get(wire)
            if futures is None:
                local.cancelled.add(wire)
            else:
                for future in futures:
                    future.cancel()


def refuse_new(key: str) -> list[int]:
    """Run on every worker when the caller's pool closes with ``cancel_futures``: what still runs here."""
    with _lock:
        local = _pools.get(key)
        if local is None:
            return []
        local.closing = True
        return list(local.running)


def close_pool(key: str, terminate: bool) -> None:
    """Run on every worker when the caller's pool is closed: its forkio children go."""
    with _lock:
        local = _pools.pop(key, None)
    if local is None:
        return
    if terminate:
        local.pool.terminate()
    else:
        local.pool.shutdown(wait=True)
    with _lock:
        last = not _pools
    if last:  # no pool of ours left here: nothing of forkio stays on the Dask worker, not even a zygote
        _zygote._close_all()


def stats(key: str) -> list[dict[str, Any]]:
    """Run on every worker for ``stats()``: the local pool's rows."""
    with _lock:
        local = _pools.get(key)
    return [] if local is None else local.pool.stats()


class ForkioPlugin(WorkerPlugin):
    """Registered on every worker by the first pool: a worker that closes takes its forkio children along."""

    idempotent = True
    name = "forkio"

    def teardown(self, worker: Any) -> None:
        with _lock:
            keys = list(_pools)
        for key in keys:
            close_pool(key, True)
