"""The pool manager's handles: ``_Proc`` on a worker process, ``_Wake`` on its own inbox, and
starting (in a thread of its own) or discarding a worker process."""

from __future__ import annotations

import errno
import mmap
import os
import signal
import sys
import threading
from collections import deque
from typing import Any

from ._pool_sched import Worker
from ._process import ChildProcess, fork
from ._zygote import ZygoteError

# Failures to start a worker that a moment's wait can cure: retried with back-off, not fatal.
_TRANSIENT_ERRNOS = frozenset({errno.EAGAIN, errno.ENOMEM, errno.EMFILE, errno.ENFILE, errno.ENOSPC, errno.EINTR})


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


def _anonymous_file() -> int:
    """An fd of a nameless file to share by mmap: a memfd on Linux, an unlinked temp file elsewhere."""
    if hasattr(os, "memfd_create"):
        return os.memfd_create("forkio-worker-progress", os.MFD_CLOEXEC)
    import tempfile

    with tempfile.TemporaryFile() as f:
        return os.dup(f.fileno())
