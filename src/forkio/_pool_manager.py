"""The pool's manager thread: ``_PoolManager``, the half of ``Pool`` that only that thread runs.

One I/O thread (the *manager*) waits on every worker's channel, every worker's exit (a pidfd),
a wake-up pipe and the nearest task deadline, all in one ``select``; it feeds what happened to
the pure ``Scheduler`` (``_pool_sched``) and carries out the actions it returns. ``Pool``
(``_pool``) inherits it and keeps the caller's side; the state both sides share is set up in
``Pool.__init__`` and declared here.
"""

from __future__ import annotations

import operator
import os
import pickle
import selectors
import signal
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from ._errors import ChannelClosed, SerializationError, TaskTimeout, WorkerCrashed, signal_name
from ._pool_future import BrokenPool, PoolClosed, _decode_error
from ._pool_proc import _discard_child, _out_of_fds, _Proc, _start_worker, _transient, _Wake
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
from ._pool_worker import OK, SKIPPED
from ._process import ChildProcess

KILL_GRACE = 0.2  # seconds between SIGTERM and SIGKILL when a task must be stopped
MAX_WAIT = 86400.0  # seconds: the longest single wait of the manager's select()


class _PoolManager:
    """What the manager thread does with a pool's state: ``Pool`` inherits it."""

    # Set up in Pool.__init__.
    workers: int
    restarts: int
    _sched: Scheduler
    _procs: dict[int, _Proc]
    _tasks: dict[int, Task]
    _wake: _Wake
    _selector: selectors.BaseSelector
    _preload: tuple[str, ...]
    _init_message: tuple[Any, ...]
    _init_fds: list[int]
    _next_worker_id: int
    _closed: bool
    _broken: BaseException | None
    _broken_reason: str
    _starting: int

    if TYPE_CHECKING:  # the caller's side, in Pool (for _at_exit)
        def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None: ...
        def terminate(self) -> None: ...

    # ---- one round -------------------------------------------------------------------------
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
                self._sched.terminate()
                for proc in list(self._procs.values()):
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
        if failure.task is not None:
            task = failure.task
            runs = f" (run {task.attempts} of {task.retries + 1})" if task.retries else ""
            detail = f"while running the task{runs}"
        else:
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
            elif kind == "unreadable":
                self._apply(self._sched.unreadable(proc.state, message[1], _decode_error(message[2])))
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


_buffers_of = operator.attrgetter("buffers")
_live_pools: weakref.WeakSet[_PoolManager] = weakref.WeakSet()


def _manage(ref: weakref.ref[_PoolManager], selector: selectors.BaseSelector, procs: dict[int, _Proc],
            wake: _Wake) -> None:
    """The manager thread. While the pool has work (tasks queued or running, workers starting)
    the thread holds it, so that work completes even if the caller drops the pool, as with
    ``shutdown(wait=False)``. Idle, it holds the pool only weakly: a pool nobody references
    any more is collected, and the thread then lets its workers go."""
    events: list[tuple[selectors.SelectorKey, int]] = []
    keep: _PoolManager | None = None
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
