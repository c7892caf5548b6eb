"""``forkio.Pool``: a ``concurrent.futures.Executor`` over forked workers that never breaks.

One I/O thread (the *manager*) waits on every worker's channel, every worker's exit (a pidfd),
a wake-up pipe and the nearest task deadline, all in one ``select``; it feeds what happened to
the pure ``Scheduler`` (``_pool_sched``) and carries out the actions it returns. Callers only
pickle their task, queue it and poke the wake-up pipe.
"""

from __future__ import annotations

import itertools
import mmap
import os
import pickle
import selectors
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from typing import Any

from ._errors import ChannelClosed, ForkioError, SerializationError, TaskTimeout, WorkerCrashed, signal_name
from ._pool_sched import (
    Action,
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
from ._pool_worker import OK, dumps, rss_of
from ._process import ChildProcess, fork

KILL_GRACE = 0.2  # seconds between SIGTERM and SIGKILL when a task must be stopped
_UNSET: Any = object()


class PoolClosed(ForkioError, RuntimeError):
    """The pool is shut down (or broken) and takes no more tasks."""


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


class TaskFuture(Future[Any]):
    """A ``Future`` whose ``cancel()`` also stops a task that is already running."""

    def __init__(self, pool: Pool, task: Task) -> None:
        super().__init__()
        self._pool = pool
        self._task: Task | None = task

    def cancel(self) -> bool:
        # Futures stay PENDING while their task runs, so the standard cancel() succeeds;
        # then the pool stops the worker running it, if any.
        task = self._task
        if not super().cancel():
            return False
        if task is not None:
            task.cancelled = True  # seen by the manager without taking the future's lock
            self._pool._post(("cancel", task))
        return True


def _decode_error(payload: bytes) -> BaseException:
    """A task's exception as its own type, or as ``RemoteError`` if it will not unpickle here."""
    exc_bytes, name, message, tb_text = pickle.loads(payload)
    try:
        exc = pickle.loads(exc_bytes) if exc_bytes is not None else None
    except Exception:  # e.g. urllib's HTTPError pickles, but does not unpickle
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
        os.ftruncate(self.counter_fd, 8)
        self.counter = mmap.mmap(self.counter_fd, 8)
        self.outbox = bytearray()
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

    def __init__(self, workers: int | None = None, *, cluster: Any = None, preload: tuple[str, ...] = (),
                 initializer: Callable[..., Any] | None = None, initargs: tuple[Any, ...] = (),
                 task_timeout: float | None = None, retries: int = 0,
                 max_tasks_per_worker: int | None = None, max_memory_per_worker: int | None = None,
                 spare_workers: int = 0) -> None:
        if workers is None:
            workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if workers < 1:
            raise ValueError("workers must be at least 1")
        if retries < 0:
            raise ValueError("retries must be >= 0")
        if spare_workers < 0:
            raise ValueError("spare_workers must be >= 0")
        if task_timeout is not None and task_timeout <= 0:
            raise ValueError("task_timeout must be positive")
        for name, limit in (("max_tasks_per_worker", max_tasks_per_worker),
                            ("max_memory_per_worker", max_memory_per_worker)):
            if limit is not None and limit < 1:
                raise ValueError(f"{name} must be at least 1")
        self.workers = workers
        self.task_timeout = task_timeout
        self.retries = retries
        self._preload = tuple(preload)
        # The initializer is pickled apart: the worker can unpickle it only once it has our sys.path.
        self._init_message = ("init", list(sys.path), _main_path(), max_memory_per_worker is not None,
                              dumps((initializer, initargs)))
        self._sched = Scheduler(workers, max_tasks_per_worker=max_tasks_per_worker,
                                max_memory_per_worker=max_memory_per_worker)
        self._procs: dict[int, _Proc] = {}
        self._tasks: dict[int, Task] = {}
        self._inbox: deque[tuple[Any, ...]] = deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._wake_pending = False
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._task_ids = itertools.count(1)  # next() on a count is atomic under the GIL: no lock
        self._next_worker_id = 0
        self._closed = False
        self._broken: BaseException | None = None
        self._starting = 0
        self.restarts = 0
        self._manager = threading.Thread(target=self._run, name="forkio-pool", daemon=True)
        self._manager.start()
        self.spare_workers = spare_workers
        self._post(("spawn", workers + spare_workers))

    # ---- the caller's side ------------------------------------------------------------------
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Run ``fn(*args, **kwargs)`` in a worker; returns a ``Future``."""
        return self._submit(fn, args, kwargs, self.task_timeout, self.retries, None)

    def _submit(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                timeout: float | None, retries: int, on_message: Callable[[Any], None] | None) -> TaskFuture:
        # The hot path of every submission: one Task, one Future, one pickle, one deque append.
        if self._closed:
            raise PoolClosed("cannot submit to a pool that is shut down") from self._broken
        task = Task(next(self._task_ids), b"", timeout, retries, on_message)
        future = TaskFuture(self, task)
        task.future = future
        try:
            big: list[pickle.PickleBuffer] = []
            task.payload = dumps((fn, args, kwargs) if kwargs else (fn, args), big)
            task.buffers = big or None
        except Exception as exc:
            hint = ("" if _has_cloudpickle() else
                    " (lambdas and closures need cloudpickle: pip install 'forkio[cloudpickle]')")
            error = SerializationError(f"cannot send task {getattr(fn, '__name__', fn)!r} to a worker: {exc}{hint}")
            error.__cause__ = exc
            future.set_exception(error)
            return future
        self._post(("submit", task))
        return future

    def options(self, *, timeout: float | None = _UNSET, retries: int = _UNSET,
                on_message: Callable[[Any], None] | None = None,
                on_progress: Callable[[float, float | None], None] | None = None) -> TaskOptions:
        """A view of this pool whose tasks get these options instead of the pool's defaults."""
        return TaskOptions(self, self.task_timeout if timeout is _UNSET else timeout,
                           self.retries if retries is _UNSET else retries, _message_handler(on_message, on_progress))

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int | None = None, progress: bool = False) -> Iterator[Any]:
        """Like ``Executor.map``, but input is consumed lazily and batching is chosen for you."""
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
        if not self._closed:
            self._closed = True
            self._post(("close", cancel_futures))
        if wait and threading.current_thread() is not self._manager:
            self._manager.join()

    def terminate(self) -> None:
        """Stop now: cancel every task, kill every worker, wait for them to go."""
        self._closed = True
        self._post(("terminate",))
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
        self._inbox.append(command)
        if not self._wake_pending:
            self._wake_pending = True
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass  # the manager has finished: nothing left to wake

    # ---- the manager thread ------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # a bug here must not leave futures pending forever
            self._break(exc)
            for proc in list(self._procs.values()):
                proc.child.kill(signal.SIGKILL)
            raise
        finally:
            self._closed = True
            unsent = [command[1] for command in self._inbox if command[0] == "submit"]
            for task in [*self._tasks.values(), *unsent]:
                self._resolve(task, False, PoolClosed("the pool stopped before this task finished"),
                              cause=self._broken)
            for proc in list(self._procs.values()):
                self._reap(proc)
            self._selector.close()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _loop(self) -> None:
        select = self._selector.select
        while True:
            timeout = self._select_timeout()
            for key, events in select(timeout):
                proc = key.data
                if proc is None:
                    self._drain_commands()
                elif key.fd == proc.pidfd:
                    self._on_exit(proc)
                elif events & selectors.EVENT_WRITE and proc.outbox:
                    self._flush(proc)
                else:
                    self._on_readable(proc)
            now = time.monotonic()
            self._apply(self._sched.tick(now))
            self._apply(self._sched.dispatch(now))
            self._escalate(now)
            if self._closed and not self._procs and self._starting == 0 and not self._sched.busy:
                break

    def _select_timeout(self) -> float | None:
        deadlines = [d for d in (self._sched.next_deadline(),
                                 *(p.stop_at for p in self._procs.values() if p.stop_at)) if d is not None]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _drain_commands(self) -> None:
        # Drain first, then clear the flag, then read the inbox: a command posted at any point
        # either is seen below or writes a fresh wake-up byte (see _post).
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        self._wake_pending = False
        inbox = self._inbox
        while inbox:
            command = inbox.popleft()
            kind = command[0]
            if kind == "submit":
                task = command[1]
                if task.cancelled:
                    continue
                if self._broken is not None:
                    self._resolve(task, False, PoolClosed("the pool is broken"), cause=self._broken)
                    continue
                self._tasks[task.id] = task
                self._sched.submit(task)
            elif kind == "cancel":
                task = command[1]
                self._tasks.pop(task.id, None)
                self._apply(self._sched.cancel(task))
            elif kind == "spawned":
                self._on_spawned(command[1], command[2])
            elif kind == "spawn":
                self._spawn(command[1])
            elif kind == "close":
                if command[1]:  # cancel_futures: every task not running yet, sent ahead or not
                    running = {id(w.assigned[0]) for w in self._sched.workers.values() if w.assigned}
                    for task in list(self._tasks.values()):
                        if id(task) not in running and Future.cancel(task.future):
                            task.cancelled = True
                            self._tasks.pop(task.id, None)
                            self._apply(self._sched.cancel(task))
                self._apply(self._sched.close())
            elif kind == "terminate":
                for task in list(self._tasks.values()):
                    task.cancelled = True
                    Future.cancel(task.future)
                self._tasks.clear()
                self._sched.queue.clear()
                self._sched.closing = True
                for proc in list(self._procs.values()):
                    proc.state.assigned.clear()
                    proc.child.kill(signal.SIGKILL)

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Dispatch):
                self._send(self._procs[action.worker.id],
                           ("tasks", [(t.id, t.payload, t.buffers) if t.buffers else (t.id, t.payload)
                                      for t in action.tasks]))
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

    def _failure_error(self, failure: Failure) -> BaseException:
        pid = failure.worker.pid or 0
        if failure.kind == "timeout":
            return TaskTimeout(f"task ran longer than its timeout of {failure.detail} s; worker {pid} was stopped")
        code = failure.detail
        if code is not None and code < 0:
            return WorkerCrashed(pid, None, signal_name(-code))
        return WorkerCrashed(pid, code, None)

    def _resolve(self, task: Task, ok: bool, value: Any, *, cause: BaseException | None = None) -> None:
        self._tasks.pop(task.id, None)
        future = task.future
        future._task = None  # break the Task <-> Future cycle: both are freed by refcount, not the GC
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
            threading.Thread(target=self._start_worker, args=(worker,), daemon=True,
                             name=f"forkio-pool-spawn-{worker.id}").start()

    def _start_worker(self, worker: Worker) -> None:
        """In a short-lived thread, so a slow start never stalls the manager."""
        try:
            child: ChildProcess | BaseException = fork(module="forkio._pool_main", preload=self._preload or None)
        except BaseException as exc:
            child = exc
        self._post(("spawned", worker, child))

    def _on_spawned(self, worker: Worker, child: ChildProcess | BaseException) -> None:
        self._starting -= 1
        if isinstance(child, BaseException):
            self._break(child)
            return
        worker.pid = child.pid
        proc = _Proc(worker, child)
        self._procs[worker.id] = proc
        self._sched.add_worker(worker)
        self._watch(child.channel.fileno(), proc)
        self._watch(proc.pidfd, proc)
        data, fds = child.channel.encode(self._init_message, proc.counter_fd)
        try:
            child.channel.send_bytes(data, fds)  # the first bytes on an empty socket: never blocks
        except ChannelClosed:
            pass  # it died already: its pidfd says so
        if self._closed and not self._sched.busy:
            self._apply(self._sched.close())

    def _send(self, proc: _Proc, message: tuple[Any, ...]) -> None:
        if proc.retired:
            return
        channel = proc.child.channel
        data, fds = channel.encode(message)
        if not fds:
            proc.outbox += data
            self._flush(proc)
            return
        # Big task arguments went into a shared segment, whose fd rides with the frame. Such
        # frames are small and rare: write them (and whatever is queued before them) blocking.
        try:
            if proc.outbox:
                channel.send_bytes(bytes(proc.outbox))
                proc.outbox = bytearray()
            channel.send_bytes(data, fds)
        except ChannelClosed:
            proc.outbox = bytearray()
            proc.state.ready = False  # it is dying: its pidfd reports that
        finally:
            channel._disown(fds)

    def _flush(self, proc: _Proc) -> None:
        channel = proc.child.channel
        view = memoryview(proc.outbox)
        try:
            sent = channel.try_send(view)
        except ChannelClosed:
            # It is dying: its pidfd reports that, and its tasks go back to the queue then.
            # A fresh buffer, because the failed call's traceback may still hold a view of the old one.
            proc.outbox = bytearray()
            proc.state.ready = False
            return
        finally:
            view.release()
        del proc.outbox[:sent]
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
            except Exception:  # a worker that breaks the protocol is stopped; its exit fails its task
                proc.child.kill(signal.SIGKILL)
                return
            kind = message[0]
            if kind == "results":
                _, results, rss = message
                self._sched.memory_report(proc.state, rss)
                for task_id, status, payload, seconds, buffers in results:
                    ok, value = self._decode_result(status, payload, buffers)
                    self._apply(self._sched.task_finished(proc.state, task_id, ok, value, seconds))
            elif kind == "message":
                task = self._tasks.get(message[1])
                if task is not None and task.on_message is not None:
                    try:
                        task.on_message(message[2])
                    except Exception:  # a callback's bug must not kill the pool
                        import traceback

                        traceback.print_exc()
            elif kind == "ready":
                self._sched.worker_ready(proc.state)
            elif kind == "init-failed":
                self._break(_decode_error(message[1]))

    def _decode_result(self, status: int, payload: bytes, buffers: list[Any] | None) -> tuple[bool, Any]:
        try:
            if status == OK:
                return True, pickle.loads(payload, buffers=buffers)
            return False, _decode_error(payload)
        except Exception as exc:
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
        self._apply(self._sched.worker_died(state, Failure("crashed", state, code), started))

    def _reap(self, proc: _Proc) -> None:
        self._procs.pop(proc.state.id, None)
        self._unwatch(proc.child.channel.fileno(), proc)
        self._unwatch(proc.pidfd, proc)
        proc.close()
        if proc.child.returncode is None:
            proc.child.kill(signal.SIGKILL)
        proc.child.close(grace=0)  # disconnect, reap, release the sentinel

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

    def _break(self, error: BaseException) -> None:
        """A worker cannot even start (bad initializer, no interpreter): fail everything, stop."""
        if self._broken is not None:
            return
        self._broken = error
        self._closed = True
        for action in self._sched.fail_all_queued(error):
            if isinstance(action, Resolve):
                self._resolve(action.task, False, action.value)
        self._sched.closing = True
        for proc in list(self._procs.values()):
            if not proc.state.assigned:
                self._retire(proc)


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
