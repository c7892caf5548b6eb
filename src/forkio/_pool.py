"""``forkio.Pool``: a ``concurrent.futures.Executor`` over forked workers that never breaks.

One I/O thread (the *manager*) waits on every worker's channel, every worker's exit (a pidfd),
a wake-up pipe and the nearest task deadline, all in one ``select``; it feeds what happened to
the pure ``Scheduler`` (``_pool_sched``) and carries out the actions it returns. Callers only
pickle their task, queue it and poke the wake-up pipe.

The manager never blocks on one worker: what it writes to a worker waits in that worker's
outbox until the socket takes it. It holds the pool only weakly while it waits, so a pool
dropped without ``shutdown()`` is noticed and its workers stopped; at interpreter exit every
live pool is shut down, waiting for its tasks (``concurrent.futures`` semantics).

This module is the caller's side of ``Pool``; the manager thread's side is ``_pool_manager``
(``_PoolManager``, which ``Pool`` inherits), its handles on workers ``_pool_proc``, and the
future and errors the caller gets back ``_pool_future`` (re-exported here).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import pickle
import selectors
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from typing import Any

from ._check import check_count, check_pool_options
from ._errors import SerializationError
from ._pool_future import BrokenPool as BrokenPool
from ._pool_future import PoolClosed as PoolClosed
from ._pool_future import RemoteError as RemoteError
from ._pool_future import RemoteTraceback as RemoteTraceback
from ._pool_future import TaskFuture as TaskFuture
from ._pool_future import _decode_error as _decode_error
from ._pool_manager import KILL_GRACE as KILL_GRACE
from ._pool_manager import MAX_WAIT as MAX_WAIT
from ._pool_manager import _live_pools, _manage, _PoolManager
from ._pool_proc import _Proc, _Wake
from ._pool_sched import Scheduler, Task
from ._pool_worker import MAX_PAYLOAD, dumps, dumps_for_workers, rss_of

_UNSET: Any = object()


class Pool(_PoolManager, Executor):
    """A pool of worker processes: crash isolation, timeouts that stop the task, retries, recycling.

    ``spare_workers`` keeps that many extra workers started and idle, to take over at once
    when a worker dies or is stopped (recovery without waiting for a new process).

    ``cluster`` (a Dask scheduler address or a ``distributed.Client``) runs the tasks on a Dask
    cluster instead, with the same API and promises (the ``dask`` extra; see docs/dask.md).

    ``submit``/``map``/``shutdown`` are ``concurrent.futures.Executor``'s, so
    ``loop.run_in_executor(pool, fn, x)`` works. ``pool.options(timeout=..., retries=...,
    on_message=..., on_progress=...)`` sets them for some tasks; ``await pool.run(fn, ...)``
    and ``pool.stream(...)``/``pool.astream(...)`` are the asyncio and streaming faces.
    """

    def __new__(cls, *args: Any, cluster: Any = None, **kwargs: Any) -> Pool:
        # Pool(cluster=...) is the Dask-backed pool; importing it (and Dask) only then.
        if cluster is not None and cls is Pool:
            from ._dask import pool_class

            return super().__new__(pool_class())
        return super().__new__(cls)

    def __init__(self, workers: int | None = None, *, cluster: Any = None, preload: Iterable[str] = (),
                 initializer: Callable[..., Any] | None = None, initargs: Iterable[Any] = (),
                 task_timeout: float | None = None, retries: int = 0,
                 max_tasks_per_worker: int | None = None, max_memory_per_worker: int | None = None,
                 spare_workers: int = 0, max_workers: int | None = None, max_tasks_per_child: int | None = None,
                 mp_context: Any = None) -> None:
        # ProcessPoolExecutor's names, so that code written for it switches by the class name.
        # (Errors name the option as the caller spelled it.)
        workers, workers_name = _alias("workers", workers, "max_workers", max_workers)
        max_tasks_per_worker, max_tasks_name = _alias("max_tasks_per_worker", max_tasks_per_worker,
                                                      "max_tasks_per_child", max_tasks_per_child)
        _check_mp_context(mp_context)
        # Every option is checked here: a bad one found later, in the manager thread, breaks the pool.
        if workers is None:
            workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        workers = check_count(workers_name, workers, 1)
        options = check_pool_options(
            task_timeout=task_timeout, retries=retries, spare_workers=spare_workers,
            max_tasks_per_worker=max_tasks_per_worker, max_memory_per_worker=max_memory_per_worker,
            initializer=initializer, initargs=initargs, preload=preload, max_tasks_name=max_tasks_name)
        self.workers = workers
        self.task_timeout = options.task_timeout
        self.retries = options.retries
        self._preload = options.preload
        # The initializer is pickled apart: the worker can unpickle it only once it has our sys.path.
        # multiprocessing objects in it (queues, locks) bring fds, which go with each init message.
        try:
            init_payload, self._init_fds = dumps_for_workers((options.initializer, options.initargs))
        except SerializationError:
            raise
        except Exception as exc:
            raise SerializationError(f"cannot send the initializer and its initargs to the workers: "
                                     f"{exc}{_cloudpickle_hint(exc)}") from exc
        self._init_message = ("init", list(sys.path), _main_path(), options.max_memory_per_worker is not None,
                              init_payload, _mp_authkey())
        self._sched = Scheduler(workers, max_tasks_per_worker=options.max_tasks_per_worker,
                                max_memory_per_worker=options.max_memory_per_worker)
        self._procs: dict[int, _Proc] = {}
        self._tasks: dict[int, Task] = {}
        self._wake = _Wake()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake.r, selectors.EVENT_READ, None)
        self._task_ids = itertools.count(1)  # next() on a count is atomic under the GIL: no lock
        self._next_worker_id = 0
        self._closed = False
        self._broken: BaseException | None = None
        self._broken_reason = ""
        self._starting = 0
        self.restarts = 0
        self.spare_workers = options.spare_workers
        # Streams over an input without a length, not iterated yet, whose reading threads still
        # dispatch their first window (see _pool_stream._Stream): held here until they have,
        # dropped or not, and waited for by shutdown().
        self._streams: set[Any] = set()
        # The manager holds the pool weakly: the callback wakes it when the pool is dropped.
        self._manager = threading.Thread(
            target=_manage, args=(weakref.ref(self, self._wake.poke_dropped), self._selector, self._procs, self._wake),
            name="forkio-pool", daemon=True)
        self._manager.start()
        _live_pools.add(self)
        self._post(("spawn", workers + spare_workers))

    # ---- the caller's side ------------------------------------------------------------------
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Run ``fn(*args, **kwargs)`` in a worker; returns a ``Future``."""
        return self._submit(fn, args, kwargs, self.task_timeout, self.retries, None)

    def _submit(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                timeout: float | None, retries: int, on_message: Callable[[Any], None] | None) -> TaskFuture:
        # The hot path of every submission: one Task, one Future, one pickle, one locked append.
        if self._closed:
            raise self._refusal()
        task = Task(next(self._task_ids), b"", timeout, retries, on_message)
        future = TaskFuture(self, task)
        task.future = future
        try:
            big: list[pickle.PickleBuffer] = []
            task.payload = dumps((fn, args, kwargs) if kwargs else (fn, args), big)
            task.buffers = big or None
        except KeyboardInterrupt:
            raise  # Ctrl-C while pickling a big argument: the caller's to handle, not the task's
        except BaseException as exc:  # SystemExit from a __reduce__ too: it fails this task only
            error = SerializationError(f"cannot send task {getattr(fn, '__name__', fn)!r} to a worker: "
                                       f"{exc!r}{_cloudpickle_hint(exc)}")
            error.__cause__ = exc
            future.set_exception(error)
            return future
        if len(task.payload) > MAX_PAYLOAD:
            future.set_exception(SerializationError(
                f"cannot send task {getattr(fn, '__name__', fn)!r} to a worker: its arguments pickle to "
                f"{len(task.payload)} bytes, over the channel's frame limit of {MAX_PAYLOAD} bytes (pass large "
                "data as numpy arrays or other protocol-5 buffers, which travel through shared memory)"))
            return future
        wake = self._wake
        with wake.lock:
            # Checked again under the lock shutdown() takes: a task either precedes the close
            # in the manager's inbox, and runs, or is refused here. None is left behind.
            # (Open, so the wake-up pipe is too: what follows is post_locked(), inlined.)
            if self._closed:
                raise self._refusal()
            wake.inbox.append(("submit", task))
            if not wake.pending:
                wake.pending = True
                os.write(wake.w, b"x")
        return future

    def _refusal(self) -> PoolClosed:
        if self._broken is not None:
            error: PoolClosed = BrokenPool(f"cannot submit to a broken pool: {self._broken_reason}")
            error.__cause__ = self._broken
            return error
        return PoolClosed("cannot submit to a pool that is shut down")

    def options(self, *, timeout: float | None = _UNSET, retries: int = _UNSET,
                on_message: Callable[[Any], None] | None = None,
                on_progress: Callable[[float, float | None], None] | None = None) -> TaskOptions:
        """A view of this pool whose tasks get these options instead of the pool's defaults."""
        return TaskOptions(self, self.task_timeout if timeout is _UNSET else timeout,
                           self.retries if retries is _UNSET else retries, _message_handler(on_message, on_progress))

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int | None = None, progress: bool = False) -> Iterator[Any]:
        """Like ``Executor.map`` (the work starts now), batched for you; an input without a length is read ahead."""
        return self.options().map(fn, *iterables, timeout=timeout, chunksize=chunksize, progress=progress)

    def imap_unordered(self, fn: Callable[..., Any], iterable: Iterable[Any], *,
                       chunksize: int | None = None, progress: bool = False) -> Iterator[Any]:
        """Results as they complete (not in input order); raises at the first failed item."""
        return self.options().imap_unordered(fn, iterable, chunksize=chunksize, progress=progress)

    def stream(self, fn: Callable[..., Any], iterable: Iterable[Any], *, ordered: bool = False,
               chunksize: int | None = None, progress: bool = False) -> Iterator[TaskResult]:
        """A ``TaskResult`` per input (value or error, never raised), lazily, ordered or as completed."""
        return self.options().stream(fn, iterable, ordered=ordered, chunksize=chunksize, progress=progress)

    async def run(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """asyncio: await ``fn(*args, **kwargs)`` in a worker. Cancelling the await stops the task."""
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    def astream(self, fn: Callable[..., Any], iterable: Iterable[Any], *, ordered: bool = False,
                chunksize: int | None = None) -> Any:
        """asyncio: ``async for result in pool.astream(fn, items)``, one ``TaskResult`` per input."""
        return self.options().astream(fn, iterable, ordered=ordered, chunksize=chunksize)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking tasks; finish (or, with ``cancel_futures``, cancel) queued ones; stop the workers."""
        if wait and not cancel_futures:
            self._wait_for_streams()
        with self._wake.lock:
            if not self._closed:
                self._closed = True
                self._wake.post_locked(("close", cancel_futures))
            elif cancel_futures:
                self._wake.post_locked(("close", cancel_futures))
        if wait and threading.current_thread() is not self._manager:
            self._manager.join()

    def _wait_for_streams(self) -> None:
        """Streams not iterated yet finish dispatching their first window, to be waited for too."""
        for stream in list(self._streams):
            stream.settled.wait()

    def terminate(self) -> None:
        """Stop now: cancel every task, kill every worker, wait for them to go."""
        with self._wake.lock:
            self._closed = True
            self._wake.post_locked(("terminate",))  # nothing, once the manager has finished
        if threading.current_thread() is not self._manager:
            self._manager.join()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self.terminate()  # Ctrl-C: stop at once, quietly, leaving nothing behind
        else:
            self.shutdown(wait=True)

    def stats(self) -> list[dict[str, Any]]:
        """Per worker slot: pid, tasks done, failures, restarts and RSS in bytes (live workers)."""
        rows = []
        for proc in list(self._procs.values()):
            state = proc.state
            rows.append({"pid": state.pid, "tasks_done": state.tasks_done, "failures": state.failures,
                         "rss": rss_of(state.pid) if state.pid else None, "ready": state.ready})
        return rows

    def __repr__(self) -> str:
        state = "broken" if self._broken else "shut down" if self._closed else "running"
        return (f"<forkio.Pool workers={self.workers} {state} alive={len(self._procs)} "
                f"queued={len(self._sched.queue)} restarts={self.restarts}>")

    # ---- talking to the manager ---------------------------------------------------------------
    def _post(self, command: tuple[Any, ...]) -> None:
        with self._wake.lock:
            self._wake.post_locked(command)


def _main_path() -> str | None:
    """The caller's main script, so workers can find functions defined in it (see ``_pool_worker.loads``)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path is None or getattr(main, "__spec__", None) is not None:
        return None  # an interactive session, ``-c``, or ``-m`` (its module is importable by name)
    # Objects a worker sends back from its copy of the main script name "__mp_main__".
    sys.modules.setdefault("__mp_main__", main)  # type: ignore[arg-type]
    return os.path.abspath(path) if os.path.isfile(path) else None


def _has_cloudpickle() -> bool:
    try:
        import cloudpickle  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        return False
    return True


def _cloudpickle_hint(exc: BaseException) -> str:
    """A pointer to cloudpickle, where the failure is one it removes: a lambda, a closure, a local
    class, a function not reachable by its name. (Locks, sockets... no pickler can send.)"""
    text = str(exc)
    if _has_cloudpickle() or not any(sign in text for sign in ("<lambda>", "<locals>", "local object",
                                                               "attribute lookup")):
        return ""
    return " (lambdas and closures need cloudpickle: pip install 'forkio[cloudpickle]')"


def _alias(name: str, value: Any, alias: str, alias_value: Any) -> tuple[Any, str]:
    """``value``, or ``alias_value`` when given under ``ProcessPoolExecutor``'s name instead;
    with the name it came by."""
    if alias_value is None:
        return value, name
    if value is not None:
        raise TypeError(f"give {name}= or its alias {alias}=, not both")
    return alias_value, alias


def _check_mp_context(context: Any) -> None:
    """``mp_context`` is accepted for ``ProcessPoolExecutor`` code: workers always start fresh
    (as with "spawn" or "forkserver"), so a "fork" context, whose promise they cannot keep, is refused."""
    if context is None:
        return
    start_method = getattr(context, "get_start_method", None)
    if not callable(start_method):
        raise TypeError(f"mp_context must be a multiprocessing context or None, not {type(context).__name__}")
    if start_method() == "fork":
        raise ValueError("mp_context: forkio's workers start fresh, never forked from this process, so they "
                         "cannot inherit what a 'fork' context promises; leave mp_context out (or use 'spawn')")


def _mp_authkey() -> bytes:
    """This process's ``multiprocessing`` authkey, which workers take as their own (as multiprocessing's
    children do), so that a ``Manager`` proxy passed to a task can connect, whenever it was made.
    (Importing it here costs ~3 ms once per process; workers import it only when a task needs it.)"""
    import multiprocessing.process

    return bytes(multiprocessing.process.current_process().authkey)


def _message_handler(on_message: Callable[[Any], None] | None,
                     on_progress: Callable[[float, float | None], None] | None) -> Callable[[Any], None] | None:
    if on_progress is None:
        return on_message

    def handle(message: Any) -> None:
        if isinstance(message, tuple) and len(message) == 3 and message[0] == "__forkio_progress__":
            on_progress(message[1], message[2])
        elif on_message is not None:
            on_message(message)

    return handle


from ._pool_stream import TaskOptions, TaskResult  # noqa: E402  (they build on Pool)
