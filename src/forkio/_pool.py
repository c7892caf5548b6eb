"""``forkio.Pool``: a ``concurrent.futures.Executor`` over forked workers that never breaks.

One I/O thread (the *manager*) waits on every worker's channel, every worker's exit (a pidfd),
a wake-up pipe and the nearest task deadline, all in one ``select``; it feeds what happened to
the pure ``Scheduler`` (``_pool_sched``) and carries out the actions it returns. Callers only
pickle their task, queue it and poke the wake-up pipe.

The manager never blocks on one worker: what it writes to a worker waits in that worker's
outbox until the socket takes it. It holds the pool only weakly while it waits, so a pool
dropped without ``shutdown()`` is noticed and its workers stopped; at interpreter exit every
live pool is shut down, waiting for its tasks (``concurrent.futures`` semantics).
"""

from __future__ import annotations

import errno
import itertools
import mmap
import operator
import os
import pickle
import selectors
import signal
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import BrokenExecutor, Executor, Future, InvalidStateError
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, LOGGER, PENDING
from typing import Any

from ._errors import ChannelClosed, ForkioError, SerializationError, TaskTimeout, WorkerCrashed, signal_name
from ._pool_sched import (
    Action,
    Break,
    Dispatch,
    Failure,
    Kill,
    Resolve,
    Retire,
    Scheduler,
    SkipTask,
    Spawn,
    Task,
    Worker,
)
from ._pool_worker import MAX_PAYLOAD, OK, SKIPPED, dumps, dumps_for_workers, rss_of
from ._process import ChildProcess, fork
from ._zygote import ZygoteError

KILL_GRACE = 0.2  # seconds between SIGTERM and SIGKILL when a task must be stopped
_UNSET: Any = object()
# Failures to start a worker that a moment's wait can cure: retried with back-off, not fatal.
_TRANSIENT_ERRNOS = frozenset({errno.EAGAIN, errno.ENOMEM, errno.EMFILE, errno.ENFILE, errno.ENOSPC, errno.EINTR})
MAX_WAIT = 86400.0  # seconds: the longest single wait of the manager's select()


class PoolClosed(ForkioError, RuntimeError):
    """The pool is shut down and takes no more tasks."""


class BrokenPool(PoolClosed, BrokenExecutor):
    """The pool cannot start workers any more (a failing initializer, workers that die while
    starting): pending and later tasks fail with this error, which says why; its ``__cause__``
    is the original error. A ``concurrent.futures.BrokenExecutor``, as ``BrokenProcessPool`` is."""


class RemoteError(ForkioError):
    """A task raised an exception that could not be sent back as itself; carries its traceback text."""

    def __init__(self, type_name: str, message: str, traceback_text: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.traceback = traceback_text


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker, attached as ``__cause__``."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text}"""'


class _FutureCondition(threading.Condition):
    """``threading.Condition()`` (over an RLock, as every ``Future``'s), built for a future a task.

    The standard one binds five of its lock's methods to itself as it is made: that doubles the
    cost of a ``Future`` and makes five more objects for the cyclic GC to walk while the task is
    pending. Here the class reaches the lock instead; what the condition does is unchanged.
    """

    def __init__(self) -> None:  # deliberately not Condition.__init__ (see the class)
        self._lock = threading.RLock()
        self._waiters: deque[Any] = deque()

    def __enter__(self) -> bool:
        return self._lock.__enter__()

    def __exit__(self, *args: Any) -> None:
        self._lock.__exit__(*args)

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def _release_save(self) -> Any:
        return self._lock._release_save()  # type: ignore[attr-defined]

    def _acquire_restore(self, state: Any) -> None:
        self._lock._acquire_restore(state)  # type: ignore[attr-defined]

    def _is_owned(self) -> bool:
        return bool(self._lock._is_owned())  # type: ignore[attr-defined]


# What Future.__init__ sets (the same from 3.10 to 3.13). TaskFuture sets its state itself where
# this Python's Future agrees; elsewhere it leaves that to Future.__init__.
_FUTURE_FIELDS = {"_condition", "_state", "_result", "_exception", "_waiters", "_done_callbacks"}
_FAST_FUTURE = set(vars(Future())) == _FUTURE_FIELDS and hasattr(threading.RLock(), "_release_save")
_DONE = frozenset({CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED})
_CONDITIONS_MADE = threading.Lock()  # a future's condition is made once, and set_result sees it


class TaskFuture(Future[Any]):
    """A ``Future`` whose ``cancel()`` also stops a task that is already running.

    ``running()`` is True while a worker runs the task (from the moment it starts it until its
    result is in); the future stays cancellable then, which stops that worker.
    """

    # A pending task's future is, for the cyclic GC, one object: its condition (with its deque)
    # and its two lists are made when first used, by whoever waits or adds a callback, and most
    # tiny tasks finish before anyone does. A result set before that needs no condition to
    # notify: _CONDITIONS_MADE orders the two, so a waiter either finds the result or is notified.
    _cond: threading.Condition | None = None
    _waiters_list: list[Any] | None = None
    _callbacks_list: list[Callable[[Future[Any]], object]] | None = None

    def __init__(self, pool: Pool, task: Task) -> None:
        if _FAST_FUTURE:
            # Future.__init__, less its cost: one per submit(), on the caller's hot path.
            self._state = PENDING
            self._result = None
            self._exception = None
        else:
            super().__init__()
        self._pool: Pool | None = pool
        self._task: Task | None = task

    @property
    def _condition(self) -> threading.Condition:
        cond = self._cond
        if cond is None:
            with _CONDITIONS_MADE:
                cond = self._cond
                if cond is None:
                    cond = self._cond = _FutureCondition()
        return cond

    @_condition.setter
    def _condition(self, cond: threading.Condition) -> None:
        self._cond = cond

    @property
    def _waiters(self) -> list[Any]:
        # Used under the condition only (by wait(), as_completed() and set_result()).
        waiters = self._waiters_list
        if waiters is None:
            waiters = self._waiters_list = []
        return waiters

    @_waiters.setter
    def _waiters(self, waiters: list[Any]) -> None:
        self._waiters_list = waiters

    @property
    def _done_callbacks(self) -> list[Callable[[Future[Any]], object]]:
        callbacks = self._callbacks_list
        if callbacks is None:
            callbacks = self._callbacks_list = []
        return callbacks

    @_done_callbacks.setter
    def _done_callbacks(self, callbacks: list[Callable[[Future[Any]], object]]) -> None:
        self._callbacks_list = callbacks

    def _settle_unwatched(self, result: Any, exception: BaseException | None) -> bool:
        """Finish a future nobody has waited on yet, without making its condition; False if
        someone has (then the standard way notifies them)."""
        if self._cond is not None:
            return False
        with _CONDITIONS_MADE:
            if self._cond is not None:
                return False
            if self._state != PENDING:  # finished already (cancelling would have made the condition)
                finished = True
            else:
                finished = False
                self._result = result
                self._exception = exception
                self._state = FINISHED
        if finished:
            raise InvalidStateError(f"{self._state}: {self!r}")
        return True

    def set_result(self, result: Any) -> None:
        if not self._settle_unwatched(result, None):
            super().set_result(result)

    def set_exception(self, exception: BaseException | None) -> None:
        if not self._settle_unwatched(None, exception):
            super().set_exception(exception)

    def done(self) -> bool:
        return self._state in _DONE  # one attribute read: the lock Future takes adds nothing to it

    def result(self, timeout: float | None = None) -> Any:
        if self._state == FINISHED:  # final, so read without the condition (which it may not have)
            if self._exception is not None:
                try:
                    raise self._exception
                finally:
                    self = None  # type: ignore[assignment]  # as Future does: no cycle through the frame
            return self._result
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state == FINISHED:
            return self._exception
        return super().exception(timeout)

    def running(self) -> bool:
        task, pool = self._task, self._pool
        if task is None or pool is None or self.done():
            return False
        return pool._started(task)

    def _invoke_callbacks(self) -> None:
        # Callbacks run in the pool's thread: one that raises anything, SystemExit included,
        # is logged (as concurrent.futures logs an Exception) and must not stop the pool.
        for callback in self._callbacks_list or ():
            try:
                callback(self)
            except BaseException:
                LOGGER.exception("exception calling callback for %r", self)

    def cancel(self) -> bool:
        # Futures stay PENDING while their task runs, so the standard cancel() succeeds;
        # then the pool stops the worker running it, if any.
        task = self._task
        if not super().cancel():
            return False
        pool = self._pool
        if task is not None and pool is not None:
            task.cancelled = True  # seen by the manager without taking the future's lock
            pool._post(("cancel", task))
        return True


def _decode_error(payload: bytes) -> BaseException:
    """A task's exception as its own type, or as ``RemoteError`` if it will not unpickle here."""
    exc_bytes, name, message, tb_text = pickle.loads(payload)
    try:
        exc = pickle.loads(exc_bytes) if exc_bytes is not None else None
    except BaseException:  # e.g. urllib's HTTPError pickles, but does not unpickle
        exc = None
    if not isinstance(exc, BaseException):
        return RemoteError(name, message, tb_text)
    exc.__cause__ = RemoteTraceback(tb_text)
    return exc


class _Proc:
    """The manager's handle on one worker process."""

    def started(self) -> int:
        """How many tasks the worker has begun, by its own count."""
        return int.from_bytes(self.counter[:8], sys.byteorder)

    def close(self) -> None:
        self.counter.close()
        os.close(self.counter_fd)

    def __init__(self, state: Worker, child: ChildProcess) -> None:
        self.state = state
        self.child = child
        self.pidfd = child.sentinel  # readable at exit; the child owns it and closes it in close()
        # A counter the worker bumps (in shared memory, no system call) as it starts each task.
        self.counter_fd = _anonymous_file()
        try:
            os.ftruncate(self.counter_fd, 8)
            self.counter = mmap.mmap(self.counter_fd, 8)
        except BaseException:
            os.close(self.counter_fd)
            raise
        # Bytes waiting for the worker's socket to take them. A frame that carries fds (a task's
        # shared segment) must start a write of its own, its fds with it: ``marks`` holds the
        # offsets of such frames in ``outbox``, in order, with their fds.
        self.outbox = bytearray()
        self.marks: deque[tuple[int, list[int]]] = deque()
        self.stop_at: float | None = None  # when SIGTERM was sent, to escalate to SIGKILL
        self.retired = False


class Pool(Executor):
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
        retries = check_count("retries", retries, 0)
        spare_workers = check_count("spare_workers", spare_workers, 0)
        task_timeout = check_timeout("task_timeout", task_timeout)
        if max_tasks_per_worker is not None:
            max_tasks_per_worker = check_count(max_tasks_name, max_tasks_per_worker, 1)
        if max_memory_per_worker is not None:
            max_memory_per_worker = check_count("max_memory_per_worker", max_memory_per_worker, 1)
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be callable or None, not {type(initializer).__name__}")
        if isinstance(initargs, str | bytes) or not isinstance(initargs, Iterable):
            raise TypeError(f"initargs must be a tuple of arguments, not {type(initargs).__name__}")
        initargs = tuple(initargs)
        from ._zygote import _normalise

        preload = _normalise(preload)
        self.workers = workers
        self.task_timeout = task_timeout
        self.retries = retries
        self._preload = preload
        # The initializer is pickled apart: the worker can unpickle it only once it has our sys.path.
        # multiprocessing objects in it (queues, locks) bring fds, which go with each init message.
        try:
            init_payload, self._init_fds = dumps_for_workers((initializer, initargs))
        except SerializationError:
            raise
        except Exception as exc:
            raise SerializationError(f"cannot send the initializer and its initargs to the workers: "
                                     f"{exc}{_cloudpickle_hint(exc)}") from exc
        self._init_message = ("init", list(sys.path), _main_path(), max_memory_per_worker is not None,
                              init_payload, _mp_authkey())
        self._sched = Scheduler(workers, max_tasks_per_worker=max_tasks_per_worker,
                                max_memory_per_worker=max_memory_per_worker)
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
        self.spare_workers = spare_workers
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
        return await self.options().run(fn, *args, **kwargs)

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

    # ---- the manager thread ------------------------------------------------------------------
    def _step(self, events: list[tuple[selectors.SelectorKey, int]]) -> bool:
        """One round of the manager: take in what happened, act on it. False once it is finished."""
        try:
            for key, mask in events:
                proc = key.data
                if proc is None:
                    self._drain_commands()
                elif key.fd == proc.pidfd:
                    self._on_exit(proc)
                elif mask & selectors.EVENT_WRITE and (proc.outbox or proc.marks):
                    self._flush(proc)
                else:
                    self._on_readable(proc)
            now = time.monotonic()
            self._apply(self._sched.tick(now))
            self._apply(self._sched.dispatch(now))
            self._escalate(now)
            if self._closed and not self._procs and self._starting == 0 and not self._sched.busy:
                self._wind_up()
                return False
            return True
        except BaseException as exc:  # a bug here must not leave futures pending forever
            self._break(exc, f"its manager thread failed: {exc!r}")
            for proc in list(self._procs.values()):
                proc.child.kill(signal.SIGKILL)
            self._wind_up()
            raise

    def _wind_up(self) -> None:
        """The manager ends: nothing more can be posted; what was, and every task, is resolved."""
        with self._wake.lock:
            self._closed = True
            leftovers = self._wake.close()
        _live_pools.discard(self)
        unsent = [command[1] for command in leftovers if command[0] == "submit"]
        for command in leftovers:
            if command[0] == "spawned" and isinstance(command[2], ChildProcess):
                _discard_child(command[2])
        for task in [*self._tasks.values(), *unsent]:
            if self._broken is not None:
                self._resolve(task, False, self._broken_error())
            else:
                self._resolve(task, False, PoolClosed("the pool stopped before this task finished"))
        for proc in list(self._procs.values()):
            self._reap(proc)
        self._selector.close()
        init_fds, self._init_fds = self._init_fds, []
        for fd in init_fds:
            os.close(fd)

    def _select_timeout(self) -> float | None:
        deadlines = [d for d in (self._sched.next_deadline(),
                                 *(p.stop_at for p in self._procs.values() if p.stop_at)) if d is not None]
        if not deadlines:
            return None
        # A day at most: select() overflows past ~24.8 days, and a far deadline is simply waited for again.
        return min(max(0.0, min(deadlines) - time.monotonic()), MAX_WAIT)

    def _drain_commands(self) -> None:
        inbox = self._wake.drain()
        while inbox:
            command = inbox.popleft()
            kind = command[0]
            if kind == "submit":
                task = command[1]
                if task.cancelled:
                    continue
                if self._broken is not None:
                    self._resolve(task, False, self._broken_error())
                    continue
                self._tasks[task.id] = task
                self._sched.submit(task)
            elif kind == "cancel":
                task = command[1]
                self._tasks.pop(task.id, None)
                self._apply(self._sched.cancel(task, self._started_of))
            elif kind == "spawned":
                self._on_spawned(command[1], command[2])
            elif kind == "spawn":
                self._spawn(command[1])
            elif kind == "close":
                if command[1]:  # cancel_futures: every task not started yet, sent ahead or not
                    begun = {id(t) for p in self._procs.values() for t in self._begun(p)}
                    for task in list(self._tasks.values()):
                        if id(task) not in begun and Future.cancel(task.future):
                            task.cancelled = True
                            self._tasks.pop(task.id, None)
                            self._apply(self._sched.cancel(task, self._started_of))
                self._apply(self._sched.close())
            elif kind == "terminate":
                for task in list(self._tasks.values()):
                    task.cancelled = True
                    Future.cancel(task.future)
                self._tasks.clear()
                self._sched.queue.clear()
                self._sched.closing = True
                self._sched.owed = 0
                self._sched.spawn_at = None
                for proc in list(self._procs.values()):
                    proc.state.assigned.clear()
                    proc.child.kill(signal.SIGKILL)

    def _started(self, task: Task) -> bool:
        """Whether a worker has begun ``task`` (for ``TaskFuture.running``, from any thread:
        a snapshot, read without stopping the manager)."""
        for proc in list(self._procs.values()):
            state = proc.state
            try:
                at = state.assigned.index(task)
                return at <= proc.started() - state.consumed - 1
            except ValueError:  # not this worker's (or its counter is gone with it)
                continue
            except RuntimeError:  # the manager changed its queue meanwhile: it is not running yet
                return False
        return False

    def _started_of(self, worker: Worker) -> int | None:
        proc = self._procs.get(worker.id)
        return proc.started() if proc is not None else None

    @staticmethod
    def _begun(proc: _Proc) -> list[Task]:
        """The tasks a worker holds that it has started: the one running, and any that finished
        with their results still on the way."""
        state = proc.state
        return list(state.assigned)[:max(0, proc.started() - state.consumed)]

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Dispatch):
                self._dispatch(self._procs[action.worker.id], action.tasks)
            elif isinstance(action, Resolve):
                value = action.value
                if isinstance(value, Failure):
                    value = self._failure_error(value)
                self._resolve(action.task, action.ok, value)
            elif isinstance(action, Kill):
                proc = self._procs[action.worker.id]
                proc.child.kill(signal.SIGTERM)
                proc.stop_at = time.monotonic() + KILL_GRACE
            elif isinstance(action, Retire):
                self._retire(self._procs[action.worker.id])
            elif isinstance(action, Spawn):
                self._spawn(action.count)
            elif isinstance(action, SkipTask):
                self._send(self._procs[action.worker.id], ("cancel", action.task.id))
            elif isinstance(action, Break):
                reason = action.reason
                if isinstance(reason, Failure):
                    crash = self._failure_error(reason)
                    self._break(crash, f"{self._sched.start_failures} workers in a row died while starting "
                                       f"(the last: {crash})")
                else:
                    self._break(reason, f"a worker cannot be started: {type(reason).__name__}: {reason}")

    def _dispatch(self, proc: _Proc, tasks: list[Task]) -> None:
        """Write tasks to a worker, in order. A task with big buffers gets a frame of its own, so
        that when its shared segment cannot be made (no fd, no room in /dev/shm) it fails alone."""
        if not any(map(_buffers_of, tasks)):
            self._send(proc, ("tasks", [(task.id, task.payload) for task in tasks]))
            return
        plain: list[tuple[int, bytes]] = []
        for task in tasks:
            if not task.buffers:
                plain.append((task.id, task.payload))
                continue
            if plain:
                self._send(proc, ("tasks", plain))
                plain = []
            try:
                self._send(proc, ("tasks", [(task.id, task.payload, task.buffers)]))
            except (SerializationError, OSError) as exc:
                error = exc if isinstance(exc, SerializationError) else SerializationError(
                    f"cannot send the task's arguments to the worker: {exc}")
                if error is not exc:
                    error.__cause__ = exc
                self._apply(self._sched.unsent(proc.state, task, error))
        if plain:
            self._send(proc, ("tasks", plain))

    def _failure_error(self, failure: Failure) -> BaseException:
        pid = failure.worker.pid or 0 if failure.worker is not None else 0
        if failure.kind == "timeout":
            return TaskTimeout(f"task ran longer than its timeout of {failure.detail} s; worker {pid} was stopped")
        if failure.kind == "broken":
            cause = self._failure_error(failure.detail) if isinstance(failure.detail, Failure) else None
            return self._broken_error(cause)
        code = failure.detail
        detail = "before it was ready" if failure.kind == "start" else ""
        if code is not None and code < 0:
            return WorkerCrashed(pid, None, signal_name(-code), detail)
        return WorkerCrashed(pid, code, None, detail)

    def _broken_error(self, cause: BaseException | None = None) -> BrokenPool:
        error = BrokenPool(f"the pool is broken and runs no more tasks: {self._broken_reason}")
        error.__cause__ = cause if cause is not None else self._broken
        return error

    def _resolve(self, task: Task, ok: bool, value: Any, *, cause: BaseException | None = None) -> None:
        self._tasks.pop(task.id, None)
        future = task.future
        future._task = None  # break the Task <-> Future cycle: both are freed by refcount, not the GC
        future._pool = None  # a kept future does not keep a finished pool (and its workers) alive
        try:
            if ok:
                future.set_result(value)
            else:
                if cause is not None and value.__cause__ is None:
                    value.__cause__ = cause
                future.set_exception(value)
        except Exception:  # InvalidStateError: the caller cancelled it meanwhile
            pass

    # ---- workers ------------------------------------------------------------------------------
    def _spawn(self, count: int) -> None:
        if self._broken is not None:
            return
        for _ in range(count):
            self._next_worker_id += 1
            worker = Worker(self._next_worker_id)
            self._starting += 1
            threading.Thread(target=_start_worker, args=(self._wake, worker, self._preload), daemon=True,
                             name=f"forkio-pool-spawn-{worker.id}").start()

    def _on_spawned(self, worker: Worker, child: ChildProcess | BaseException) -> None:
        self._starting -= 1
        if not isinstance(child, BaseException):
            try:
                proc = _Proc(worker, child)
            except OSError as exc:  # no fd for its counter (EMFILE): a failed start like any other
                _discard_child(child)
                child = exc
        if isinstance(child, BaseException):
            if self._broken is None:
                self._apply(self._sched.spawn_failed(child, time.monotonic(), transient=_transient(child)))
            return
        self._sched.spawned()
        worker.pid = child.pid
        self._procs[worker.id] = proc
        self._sched.add_worker(worker)
        # The manager must never wait on one worker: no backpressure on shared segments here.
        child.channel.shm_in_flight_limit = None
        self._watch(child.channel.fileno(), proc)
        self._watch(proc.pidfd, proc)
        try:
            data, fds = child.channel.encode_fds(self._init_message, [proc.counter_fd, *self._init_fds])
            child.channel.send_bytes(data, fds)  # the first bytes on an empty socket: never blocks
        except ChannelClosed:
            pass  # it died already: its pidfd says so
        if self._broken is not None or (self._closed and not self._sched.busy):
            self._apply(self._sched.close())

    def _send(self, proc: _Proc, message: tuple[Any, ...]) -> None:
        """Queue a message for a worker and write what its socket takes now; never blocks.
        Raises ``SerializationError`` (nothing queued) when the message cannot be encoded."""
        if proc.retired:
            return
        data, fds = proc.child.channel.encode(message)
        if fds:
            proc.marks.append((len(proc.outbox), fds))
        proc.outbox += data
        self._flush(proc)

    def _flush(self, proc: _Proc) -> None:
        channel = proc.child.channel
        outbox, marks = proc.outbox, proc.marks
        try:
            while outbox:
                fds: list[int] = []
                if marks and marks[0][0] == 0:
                    fds = marks[0][1]
                    end = marks[1][0] if len(marks) > 1 else len(outbox)
                else:
                    end = marks[0][0] if marks else len(outbox)
                view = memoryview(outbox)
                try:
                    sent = channel.try_send(view[:end], fds)
                finally:
                    view.release()
                if sent == 0:
                    break
                if fds:
                    marks.popleft()  # in flight with the first byte: the channel closed its copies
                del outbox[:sent]
                if marks:
                    proc.marks = marks = deque((offset - sent, mark_fds) for offset, mark_fds in marks)
                if sent < end:
                    break
        except ChannelClosed:
            # It is dying: its pidfd reports that, and its tasks go back to the queue then.
            # A fresh buffer, because the failed call's traceback may still hold a view of the old one.
            for _, mark_fds in marks:
                channel._disown(mark_fds)
            proc.outbox = bytearray()
            proc.marks = deque()
            proc.state.ready = False
            return
        mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if proc.outbox else 0)
        try:
            if self._selector.get_key(channel.fileno()).data is proc:
                self._selector.modify(channel.fileno(), mask, proc)
        except (KeyError, ValueError):
            pass

    def _on_readable(self, proc: _Proc) -> None:
        channel = proc.child.channel
        channel.read_available()
        self._take_messages(proc)
        if not channel.connected:
            self._unwatch(channel.fileno(), proc)
            proc.state.ready = False  # no more tasks for it: its exit (pidfd) comes next

    def _take_messages(self, proc: _Proc) -> None:
        channel = proc.child.channel
        while channel._inbox:
            try:
                message = channel.pop(False)
            except SerializationError as exc:
                # One frame that could not be taken in, boundaries intact. Everything a worker
                # sends is pickled apart (results, messages) except a result's big buffers, so
                # it is a result whose shared segment's fd did not arrive (this process is out
                # of fds) or cannot be mapped. Such results come one per frame, in order: it
                # was the next task's.
                self._result_lost(proc, exc)
                continue
            except Exception:  # a worker that breaks the protocol is stopped; its exit fails its task
                proc.child.kill(signal.SIGKILL)
                return
            kind = message[0]
            if kind == "results":
                _, results, rss = message
                self._sched.memory_report(proc.state, rss)
                for task_id, status, payload, seconds, buffers in results:
                    if status == SKIPPED:
                        self._apply(self._sched.task_skipped(proc.state, task_id))
                        continue
                    ok, value = self._decode_result(status, payload, buffers)
                    self._apply(self._sched.task_finished(proc.state, task_id, ok, value, seconds))
            elif kind == "message":
                task = self._tasks.get(message[1])
                if task is not None and task.on_message is not None:
                    try:
                        # Pickled apart in the worker: one that will not unpickle here is this
                        # callback's problem, not a broken frame.
                        task.on_message(pickle.loads(message[2]))
                    except BaseException:  # a callback's bug (even a SystemExit) must not kill the pool
                        import traceback

                        traceback.print_exc()
            elif kind == "ready":
                self._sched.worker_ready(proc.state)
            elif kind == "init-failed":
                error = _decode_error(message[1])
                self._break(error, f"its initializer raised {type(error).__name__}: {error}")

    def _result_lost(self, proc: _Proc, exc: SerializationError) -> None:
        state = proc.state
        if not state.assigned:
            return
        hint = ""
        if _out_of_fds():
            hint = (" -- this process is out of file descriptors (EMFILE): each big result kept alive "
                    "holds its shared segment's")
        error = SerializationError(f"cannot receive the task's result: {exc}{hint}")
        error.__cause__ = exc
        self._apply(self._sched.task_finished(state, state.assigned[0].id, False, error, 0.0))

    def _decode_result(self, status: int, payload: bytes, buffers: list[Any] | None) -> tuple[bool, Any]:
        try:
            if status == OK:
                return True, pickle.loads(payload, buffers=buffers)
            return False, _decode_error(payload)
        except BaseException as exc:  # SystemExit from a __setstate__ too: it fails this task only
            error = SerializationError(f"cannot unpickle the task's result in the caller: {exc!r}")
            error.__cause__ = exc
            return False, error

    def _on_exit(self, proc: _Proc) -> None:
        channel = proc.child.channel
        while channel.connected and channel.read_available():  # read to EOF: results sent before dying count
            self._take_messages(proc)
        self._take_messages(proc)
        code = proc.child.wait()
        started = proc.started()
        self._reap(proc)
        if proc.retired:
            return
        self.restarts += 1
        state = proc.state
        kind = "crashed" if state.started else "start"
        self._apply(self._sched.worker_died(state, Failure(kind, state, code), started, time.monotonic()))

    def _reap(self, proc: _Proc) -> None:
        self._procs.pop(proc.state.id, None)
        self._unwatch(proc.child.channel.fileno(), proc)
        self._unwatch(proc.pidfd, proc)
        proc.close()
        if proc.child.returncode is None:
            proc.child.kill(signal.SIGKILL)
        proc.child.close(grace=0)  # disconnect, reap, release the sentinel
        proc.outbox = bytearray()
        proc.marks = deque()  # their fds were the channel's, closed with it

    # fd numbers come back: a closed channel's number may already belong to another worker's
    # socket or pidfd, so registrations are checked against their owner, never assumed.
    def _watch(self, fd: int, proc: _Proc) -> None:
        self._unwatch(fd, None)
        self._selector.register(fd, selectors.EVENT_READ, proc)

    def _unwatch(self, fd: int, owner: _Proc | None) -> None:
        """Stop watching ``fd`` if ``owner`` (any owner, with None) is who it is registered for."""
        try:
            key = self._selector.get_key(fd)
        except (KeyError, ValueError):
            return
        if owner is None or key.data is owner:
            self._selector.unregister(fd)

    def _retire(self, proc: _Proc) -> None:
        """Let a worker go: closing its channel ends its loop; its exit is reaped via the pidfd."""
        proc.retired = True
        self._unwatch(proc.child.channel.fileno(), proc)
        proc.child.disconnect()

    def _escalate(self, now: float) -> None:
        for proc in self._procs.values():
            if proc.stop_at is not None and now >= proc.stop_at:
                proc.child.kill(signal.SIGKILL)
                proc.stop_at = None

    def _break(self, error: BaseException, reason: str) -> None:
        """No worker can start (bad initializer, workers that crash while starting): fail what
        waits, take no more tasks. Busy workers finish what they hold."""
        if self._broken is not None:
            return
        self._broken = error
        self._broken_reason = reason
        self._closed = True
        self._apply(self._sched.break_pool())


class _Wake:
    """The manager's inbox and wake-up pipe. Posting and closing take one lock, so nothing is
    ever written to the pipe's fd numbers once they are closed (they may be a user's file by then)."""

    def __init__(self) -> None:
        self.inbox: deque[tuple[Any, ...]] = deque()
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        self.lock = threading.Lock()
        self.pending = False
        self.closed = False

    def post_locked(self, command: tuple[Any, ...]) -> None:
        """Queue ``command`` and wake the manager (the caller holds ``lock``)."""
        if self.closed:
            if command[0] == "spawned" and isinstance(command[2], ChildProcess):
                _discard_child(command[2])  # a worker that started too late: nobody will use it
            return
        self.inbox.append(command)
        if not self.pending:
            self.pending = True
            os.write(self.w, b"x")

    def post(self, command: tuple[Any, ...]) -> None:
        with self.lock:
            self.post_locked(command)

    def poke_dropped(self, _ref: Any) -> None:
        """The pool was dropped (weakref callback): wake the manager to stop its workers."""
        # Not waiting for the lock: a GC pass may run this in a thread that holds it (posting);
        # whoever holds it is writing a wake-up byte, or closing the pipe, either way enough.
        if not self.lock.acquire(blocking=False):
            return
        try:
            if not self.closed and not self.pending:
                self.pending = True
                os.write(self.w, b"x")
        finally:
            self.lock.release()

    def drain(self) -> deque[tuple[Any, ...]]:
        # Drain first, then clear the flag, then read the inbox: a command posted at any point
        # either is seen by the caller or writes a fresh wake-up byte.
        try:
            while os.read(self.r, 4096):
                pass
        except BlockingIOError:
            pass
        self.pending = False
        return self.inbox

    def close(self) -> list[tuple[Any, ...]]:
        """Close the pipe (the caller holds ``lock``); returns the commands nobody will read."""
        if self.closed:
            return []
        self.closed = True
        os.close(self.r)
        os.close(self.w)
        leftovers = list(self.inbox)
        self.inbox.clear()
        return leftovers


_buffers_of = operator.attrgetter("buffers")
_live_pools: weakref.WeakSet[Pool] = weakref.WeakSet()


def _manage(ref: weakref.ref[Pool], selector: selectors.BaseSelector, procs: dict[int, _Proc], wake: _Wake) -> None:
    """The manager thread. While the pool has work (tasks queued or running, workers starting)
    the thread holds it, so that work completes even if the caller drops the pool, as with
    ``shutdown(wait=False)``. Idle, it holds the pool only weakly: a pool nobody references
    any more is collected, and the thread then lets its workers go."""
    events: list[tuple[selectors.SelectorKey, int]] = []
    keep: Pool | None = None
    while True:
        pool = keep or ref()
        if pool is None:
            _orphaned(selector, procs, wake)
            return
        if not pool._step(events):
            return
        timeout = pool._select_timeout()
        keep = pool if pool._sched.busy or pool._starting else None
        del pool
        events = selector.select(timeout)


def _orphaned(selector: selectors.BaseSelector, procs: dict[int, _Proc], wake: _Wake) -> None:
    """The pool was dropped, idle, without shutdown: its workers go as at shutdown."""
    with wake.lock:
        wake.close()
    for proc in procs.values():
        proc.child.disconnect()  # its loop ends at EOF: each exits at once, all together
    deadline = time.monotonic() + KILL_GRACE
    for proc in list(procs.values()):
        proc.child.close(grace=max(0.0, deadline - time.monotonic()))
        proc.close()
    procs.clear()
    selector.close()


def _start_worker(wake: _Wake, worker: Worker, preload: tuple[str, ...]) -> None:
    """In a short-lived thread, so a slow start never stalls the manager."""
    try:
        child: ChildProcess | BaseException = fork(module="forkio._pool_main", preload=preload or None)
    except BaseException as exc:
        child = exc
    wake.post(("spawned", worker, child))


def _discard_child(child: ChildProcess) -> None:
    child.kill(signal.SIGKILL)
    child.close(grace=0)


def _transient(error: BaseException) -> bool:
    """A failure to start a worker that may pass (no process, fd or memory to spare just now)."""
    seen: set[int] = set()
    exc: BaseException | None = error
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
            return True
        if isinstance(exc, ZygoteError):  # the zygote could not clone just now (it falls back, or recovers)
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _out_of_fds() -> bool:
    """Whether this process is at its fd limit now (to say so in an error)."""
    try:
        os.close(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
    except OSError as exc:
        return exc.errno == errno.EMFILE
    return False


def _at_exit() -> None:
    """Interpreter exit: every live pool finishes its tasks, as ``concurrent.futures`` pools do."""
    for pool in list(_live_pools):
        try:
            pool.shutdown(wait=True)
        except BaseException:  # Ctrl-C while waiting: stop now
            pool.terminate()
            raise


try:
    threading._register_atexit(_at_exit)  # type: ignore[attr-defined]  # runs before threads are joined
except RuntimeError:  # imported while the interpreter shuts down: no pool will outlive it anyway
    pass


def _anonymous_file() -> int:
    """An fd of a nameless file to share by mmap: a memfd on Linux, an unlinked temp file elsewhere."""
    if hasattr(os, "memfd_create"):
        return os.memfd_create("forkio-worker-progress", os.MFD_CLOEXEC)
    import tempfile

    with tempfile.TemporaryFile() as f:
        return os.dup(f.fileno())


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


from ._pool_stream import TaskOptions, TaskResult, check_count, check_timeout  # noqa: E402  (they build on Pool)
