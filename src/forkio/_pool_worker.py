"""The worker side of ``forkio.Pool``: run the tasks the pool sends, report results in batches.

Protocol (pickle frames over the worker's forkio channel):

    pool -> worker   ("init", sys_path, main_path, report_rss, (initializer, initargs) pickled, mp authkey)
                     first, with the fd of an 8-byte shared counter of tasks started, then the
                     fds of multiprocessing objects in initargs (see ``dumps_for_workers``)
                     ("tasks", [(task_id, payload[, buffers]), ...]) payload = pickled (fn, args[, kwargs]);
                                                                     big buffers apart (shared memory)
                     ("cancel", task_id)                             skip it if it has not started
    worker -> pool   ("ready", pid) | ("init-failed", error)
                     ("results", [(task_id, status, payload, seconds, big buffers or None), ...],
                      rss_or_None)                                   status OK, RAISED or SKIPPED
                     ("message", task_id, message pickled)           from progress() / report()
                     ("unreadable", tasks received before, error)    a tasks frame it cannot take in
                                                                     (then it exits)

Tasks run one at a time, in the order received, so the pool always knows which task a dead
worker was running (it also counts the tasks it starts in shared memory). Results are sent
when the local queue runs dry, every few milliseconds while it does not, and, by a helper
thread, a few milliseconds into a task that runs longer: a finished result never waits for the
next task to end. A result with big buffers (shared memory) goes at once, in a frame of its own,
so that a frame the pool cannot take in (no fd left for its segment) fails that one task only.
A task cancelled before it started is skipped and reported as such. A tasks frame the worker
cannot take in (no memory to read it or to map its shared segment, no fd) is reported with the number of tasks
received before it, which names its first task, and the worker exits: what it held and had not
started goes to another worker.
"""

from __future__ import annotations

import errno
import mmap
import os
import pickle
import signal
import stat
import struct
import sys
import threading
import time
import traceback
from collections import deque
from typing import Any, ClassVar

from ._codec import DEFAULT_MAX_FRAME
from ._errors import ChannelClosed, SerializationError
from ._parent import parent

OK, RAISED, SKIPPED = 0, 1, 2
FLUSH_EVERY = 0.005  # seconds: how long results may wait while more tasks are queued
CHECK_CANCELS_EVERY = 0.0002
# Room in a frame for what wraps a task or a result (ids, tuple, header): a payload bigger than
# the frame limit less this cannot travel, and fails with SerializationError at the sender.
FRAME_SLACK = 4096
MAX_PAYLOAD = DEFAULT_MAX_FRAME - FRAME_SLACK

_current_task: int | None = None


BIG_BUFFER = 1 << 20  # task arguments' buffers this big travel apart (shared memory), not pickled in


def dumps(obj: Any, big_buffers: list[pickle.PickleBuffer] | None = None) -> bytes:
    """Pickle ``obj``; fall back to cloudpickle (if installed) for lambdas, closures and the like.

    With ``big_buffers``, protocol-5 buffers of ``BIG_BUFFER`` bytes or more (numpy arrays...)
    are left out of the pickle and appended there, for the channel to pass through shared memory.
    """
    callback = None
    if big_buffers is not None:
        def callback(buffer: pickle.PickleBuffer) -> bool:
            try:
                if buffer.raw().nbytes >= BIG_BUFFER:
                    big_buffers.append(buffer)
                    return False  # out of band
            except BufferError:  # not contiguous: pickled in with the rest
                pass
            return True
    try:
        return pickle.dumps(obj, 5, buffer_callback=callback)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        try:
            import cloudpickle  # type: ignore[import-untyped]
        except ImportError:
            raise exc from None
        if big_buffers:
            big_buffers.clear()
        return bytes(cloudpickle.dumps(obj, 5, buffer_callback=callback))


class _Handover:
    """Stands in for multiprocessing's spawning ``Popen`` while the initializer's arguments are
    pickled for the workers: a ``multiprocessing`` queue, pipe or connection in them then pickles
    (as it does for ``ProcessPoolExecutor``), its fds to travel with each worker's init message."""

    def __init__(self) -> None:
        self.fds: list[int] = []
        self.semaphores: dict[int, tuple[int, int]] = {}  # sem_t address -> (index in fds, offset in its file)

    def duplicate_for_child(self, fd: int) -> int:
        # Our own copy: the caller may close the queue while a worker is still to be started.
        self.fds.append(os.dup(fd))
        return len(self.fds) - 1

    class DupFd:
        """In the worker: the fd that came with the init message at this position."""

        def __init__(self, index: int) -> None:
            self.index = index

        def detach(self) -> int:
            return os.dup(_inherited_fds[self.index])

    def reduce_semlock(self, value: Any) -> Any:
        """A pickler's ``reducer_override``: a lock, semaphore... made in the "fork" context (the
        default on Linux before Python 3.14) travels as the file behind its semaphore.

        Such a semaphore has no name (multiprocessing unlinks it at once, for forked children
        only), and a worker starts fresh, not forked from here. But it is a process-shared glibc
        semaphore in a shared mapping of a deleted ``/dev/shm`` file, which this process can
        still open through ``/proc/self/map_files``; a worker maps that file and uses the
        semaphore there (futexes in shared mappings are keyed on the file, not the address).
        Where that cannot be done, a clear ``SerializationError`` says what to use instead."""
        synchronize = sys.modules.get("multiprocessing.synchronize")
        if synchronize is None or not isinstance(value, synchronize.SemLock) or value._semlock.name is not None:
            return NotImplemented  # (a named semaphore pickles as multiprocessing pickles it)
        semlock = value._semlock
        shared = self.semaphores.get(semlock.handle)
        if shared is None:
            try:
                fd, offset = _open_semaphore(semlock.handle)
            except OSError as exc:
                raise SerializationError(
                    f"a multiprocessing {type(value).__name__} (or a Queue, Event... built on one) made in the "
                    "'fork' context cannot reach the pool's workers: they start fresh, not forked from this "
                    f"process, and its semaphore could not be opened for them ({exc}; that takes Linux and "
                    "CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN, as root has). Make it with "
                    "multiprocessing.get_context('spawn') (e.g. get_context('spawn').Queue()), or use a "
                    "multiprocessing.Manager().Queue() proxy") from exc
            self.fds.append(fd)
            shared = self.semaphores[semlock.handle] = (len(self.fds) - 1, offset)
        return _map_semlock, (type(value), *shared, semlock.kind, semlock.maxvalue)


SEM_T_SIZE = struct.calcsize("P") * 4  # glibc's sem_t: 32 bytes on 64-bit platforms, 16 on 32-bit


def _open_semaphore(handle: int) -> tuple[int, int]:
    """The file behind this process's (unnamed) semaphore at address ``handle``, opened, and the
    semaphore's offset in it. Raises OSError where it cannot be had."""
    with open("/proc/self/maps", "rb") as maps:  # (no /proc: FileNotFoundError, an OSError)
        for line in maps:
            fields = line.split()
            start, end = (int(address, 16) for address in fields[0].split(b"-"))
            if start <= handle < end:
                break
        else:
            raise OSError(errno.ENOENT, "no mapping of this process holds it")
    if b"s" not in fields[1] or fields[4] == b"0":
        raise OSError(errno.EINVAL, "it does not live in a shared mapping of a file")
    # Needs CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN (the kernel's rule for opening map_files): EPERM otherwise.
    fd = os.open(f"/proc/self/map_files/{start:x}-{end:x}", os.O_RDWR | os.O_CLOEXEC)
    offset = handle - start + int(fields[2], 16)
    status = os.fstat(fd)
    if not stat.S_ISREG(status.st_mode) or status.st_size < offset + SEM_T_SIZE:
        os.close(fd)
        raise OSError(errno.EINVAL, "the file mapped there does not hold a semaphore")
    return fd, offset


_semaphore_files: dict[int, Any] = {}  # index in _inherited_fds -> its mapping, pinned for the worker's life


def _map_semlock(cls: Any, index: int, offset: int, kind: int, maxvalue: int) -> Any:
    """In the worker: a fork-context lock, semaphore... of the caller, on the file it came as
    (see ``_Handover.reduce_semlock``)."""
    import ctypes

    pinned = _semaphore_files.get(index)
    if pinned is None:
        fd = _inherited_fds[index]
        # Mapped until the worker exits: a SemLock hands out its bound methods, which may outlive
        # it, and they use the semaphore's address. ctypes' view pins the mapping (mmap cannot be
        # closed while it is exported) and gives its address.
        pinned = _semaphore_files[index] = ctypes.c_char.from_buffer(mmap.mmap(fd, os.fstat(fd).st_size))
    lock = cls.__new__(cls)
    lock.__setstate__((ctypes.addressof(pinned) + offset, kind, maxvalue, None))
    # Still a fork-context semaphore: handed on to a process that starts fresh, it would be a
    # dangling address there. multiprocessing then refuses it, as it does in the caller.
    lock._is_fork_ctx = True
    return lock


_inherited_fds: list[int] = []


def dumps_for_workers(obj: Any) -> tuple[bytes, list[int]]:
    """Pickle what every worker gets at start (the initializer and its arguments): ``dumps``, with
    ``multiprocessing`` objects allowed. Returns the pickle and the fds to send with it (ours to close)."""
    context = sys.modules.get("multiprocessing.context")
    if context is None:  # no multiprocessing object can be in it
        return dumps(obj), []
    handover = _Handover()
    context.set_spawning_popen(handover)
    try:
        return _forking_dumps(obj, handover), handover.fds
    except BaseException:
        for fd in handover.fds:
            os.close(fd)
        raise
    finally:
        context.set_spawning_popen(None)


def _forking_dumps(obj: Any, handover: _Handover) -> bytes:
    """``dumps`` with multiprocessing's reducers (its connections pickle by fd only through them)
    and ``handover``'s for fork-context locks."""
    import io
    from collections import ChainMap
    from multiprocessing.reduction import ForkingPickler

    class Forking(ForkingPickler):
        reducer_override = staticmethod(handover.reduce_semlock)

    buffer = io.BytesIO()
    try:
        Forking(buffer, 5).dump(obj)
        return buffer.getvalue()
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        try:
            import cloudpickle
        except ImportError:
            raise exc from None

    class Pickler(cloudpickle.Pickler):  # type: ignore[misc]
        dispatch_table: ClassVar[ChainMap[Any, Any]] = ChainMap(ForkingPickler._extra_reducers,  # type: ignore[attr-defined]
                                                                cloudpickle.Pickler.dispatch_table)

        def reducer_override(self, obj: Any) -> Any:
            reduced = handover.reduce_semlock(obj)
            return super().reducer_override(obj) if reduced is NotImplemented else reduced

    buffer = io.BytesIO()
    Pickler(buffer, 5).dump(obj)
    return buffer.getvalue()


_main_path: str | None = None
_main_loaded = False
_authkey: bytes | None = None  # the caller's multiprocessing authkey, until it is adopted


def _adopt_authkey() -> None:
    """Take the caller's multiprocessing authkey, as multiprocessing's children do, so that Manager
    proxies in tasks can connect. Done when a payload names multiprocessing: importing it in every
    worker would slow every start."""
    global _authkey
    import multiprocessing.process

    if _authkey is not None:
        multiprocessing.process.current_process().authkey = _authkey
        _authkey = None


def loads(payload: bytes, buffers: list[Any] | None = None) -> Any:
    """Unpickle a task. Functions from the caller's ``__main__`` are found by loading its main
    script here under the name ``__mp_main__`` (as multiprocessing does), on first need."""
    global _main_loaded
    if _authkey is not None and b"multiprocessing" in payload:
        _adopt_authkey()
    try:
        return pickle.loads(payload, buffers=buffers)
    except AttributeError:
        # (Not "is __mp_main__ in sys.modules": importing multiprocessing puts our own __main__ there.)
        if _main_path is None or _main_loaded:
            raise
    import runpy
    import types

    _main_loaded = True
    module = types.ModuleType("__mp_main__")
    sys.modules["__mp_main__"] = module
    module.__dict__.update(runpy.run_path(_main_path, run_name="__mp_main__"))
    sys.modules["__main__"] = module
    return pickle.loads(payload, buffers=buffers)


def encode_error(exc: BaseException) -> bytes:
    """An exception, pickled apart from its description and traceback text, so the caller can
    still report it (as ``RemoteError``) if it cannot be pickled here or unpickled there."""
    tb_text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    try:
        exc_bytes: bytes | None = pickle.dumps(exc, 5)
    except Exception:
        exc_bytes = None
    return pickle.dumps((exc_bytes, name, str(exc), tb_text), 5)


def progress(done: float, total: float | None = None) -> None:
    """Inside a pool task: tell the caller how far the task has got (``on_progress`` receives it)."""
    report(("__forkio_progress__", done, total))


def report(message: Any) -> None:
    """Inside a pool task: send ``message`` to the caller now (``on_message`` receives it).

    Outside a pool task this does nothing, so task code can call it unconditionally.
    """
    if _current_task is None or not parent.connected:
        return
    try:  # pickled apart, as results are: the pool unpickles it where the callback runs
        payload = dumps(message)
    except Exception as exc:
        raise SerializationError(f"cannot send this message to the caller: {exc!r}") from exc
    with _worker.lock:  # after the results that finished before it, never between two frames
        _worker._flush()
        parent.send(("message", _current_task, payload))


def rss_of(pid: int | str = "self") -> int | None:
    """Resident memory of a process in bytes (Linux ``/proc``); None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def result_error(exc: BaseException | None, size: int | None = None) -> bytes:
    """A task's result that cannot travel back, as an encoded ``SerializationError``."""
    if size is not None:
        why = (f"the task's result pickles to {size} bytes, over the channel's frame limit of "
               f"{MAX_PAYLOAD} bytes (large arrays and protocol-5 buffers travel apart, through shared memory)")
    else:
        why = f"cannot send the task's result back to the caller: {type(exc).__name__}: {exc}"
    return encode_error(SerializationError(why))


class _Worker:
    def __init__(self) -> None:
        # Appended here without a lock (deque appends are atomic); taken off only under ``lock``,
        # by this thread between tasks or by the flusher during a long one: frames keep the
        # results' order, and no result is lost between the two.
        self.results: deque[tuple[int, int, bytes, float, list[pickle.PickleBuffer] | None]] = deque()
        self.report_rss = False
        self.cancelled: set[int] = set()
        self.started = memoryview(bytearray(8)).cast("Q")  # replaced by the pool's shared counter
        self.received = 0  # tasks taken in from "tasks" frames
        self.last_flush = time.perf_counter()
        self.lock = threading.Lock()
        self.busy = threading.Event()  # set while a task runs with results waiting to go

    def flush(self) -> None:
        with self.lock:
            self._flush()

    def _flush(self) -> None:
        results = self.results
        if results:
            rss = rss_of() if self.report_rss else None
            while results:
                # A result with big buffers (a shared segment) travels alone; the others go
                # together, in frames well under the frame limit.
                batch = [results.popleft()]
                if batch[0][4] is None:
                    size = len(batch[0][2])
                    while results and results[0][4] is None and size + len(results[0][2]) <= MAX_PAYLOAD // 2:
                        entry = results.popleft()
                        batch.append(entry)
                        size += len(entry[2])
                parent.send(("results", batch, rss))
        self.last_flush = time.perf_counter()

    def flusher(self) -> None:
        """Send the results that wait while a task runs long: they are ready, the caller waits."""
        busy = self.busy
        while True:
            busy.wait()
            time.sleep(FLUSH_EVERY)
            if self.results and time.perf_counter() - self.last_flush >= FLUSH_EVERY:
                try:
                    self.flush()
                except (ChannelClosed, OSError):
                    return  # the pool let us go: the main thread finds out on its own
            if not self.results:
                busy.clear()
                if self.results:  # appended meanwhile: the main thread may have seen "busy" still set
                    busy.set()

    def handle(self, message: tuple[Any, ...], queue: deque[tuple[Any, ...]]) -> bool:
        kind = message[0]
        if kind == "tasks":
            queue.extend(message[1])
            self.received += len(message[1])
        elif kind == "cancel":
            self.cancelled.add(message[1])
        elif kind == "exit":
            return False
        return True

    def unreadable(self, exc: Exception) -> None:
        """A frame from the pool could not be taken in: say which (by the tasks received before it,
        after the results so far) and stop taking tasks; the tasks it held go to another worker.
        (A frame that fails to decode leaves the channel usable; one that fails to be read in,
        a ``MemoryError``, may not: either way this worker stops.)"""
        self.flush()
        why = str(exc) if isinstance(exc, SerializationError) else f"{type(exc).__name__}: {exc}".rstrip(": ")
        error = SerializationError(f"the worker cannot take in the task's arguments: {why}")
        error.__cause__ = exc
        try:
            parent.send(("unreadable", self.received, encode_error(error)))
        except ChannelClosed:
            pass

    def run(self) -> None:
        global _current_task
        channel = parent.channel
        queue: deque[tuple[Any, ...]] = deque()  # (task_id, payload[, big buffers])
        last_check = time.perf_counter()
        perf = time.perf_counter
        busy = self.busy
        while True:
            if not queue:
                self.flush()
                try:
                    message = parent.recv()
                except ChannelClosed:
                    return  # the pool let us go: nothing left to do
                except Exception as exc:  # a frame too big for our memory, a segment we cannot map...
                    return self.unreadable(exc)
                if not self.handle(message, queue):
                    return
                continue
            now = perf()
            if now - last_check > CHECK_CANCELS_EVERY:
                # Between tasks, take in what the pool sent meanwhile (cancels, more tasks).
                last_check = now
                try:
                    channel.read_available()
                    while channel._inbox:
                        if not self.handle(channel.pop(False), queue):
                            return
                except ChannelClosed:
                    raise
                except Exception as exc:
                    return self.unreadable(exc)
            task_id, payload, *big = queue.popleft()
            self.started[0] += 1  # seen by the pool even if we die in this task (see _pool_sched)
            if task_id in self.cancelled:
                self.cancelled.discard(task_id)
                self.results.append((task_id, SKIPPED, b"", 0.0, None))
                continue
            if self.results and not busy.is_set():
                busy.set()  # this task may run long: the flusher sends what waits meanwhile
            _current_task = task_id
            started = perf()
            result_buffers: list[pickle.PickleBuffer] = []
            try:
                call = loads(payload, big[0] if big else None)  # (fn, args) or (fn, args, kwargs)
                value = call[0](*call[1], **call[2]) if len(call) == 3 else call[0](*call[1])
                del call  # let go of shared-memory arguments now, so the caller can reuse the segment
            except BaseException as exc:
                result, status = encode_error(exc), RAISED
            else:
                status = OK
                try:
                    result = dumps(value, result_buffers)
                except BaseException as exc:  # the task ran; its result cannot travel: say so
                    result, status = result_error(exc), RAISED
                    result_buffers.clear()
                del value
                if len(result) > MAX_PAYLOAD:
                    result, status = result_error(None, len(result)), RAISED
                    result_buffers.clear()
            finished = perf()
            _current_task = None
            self.results.append((task_id, status, result, finished - started, result_buffers or None))
            if result_buffers or finished - self.last_flush > FLUSH_EVERY:
                self.flush()


_worker = _Worker()


def _hide_channel_from_tasks() -> None:
    """In a worker the channel carries the pool's protocol: a task that used ``forkio.parent``
    would corrupt it. Tasks see a ``parent`` that says so; this module keeps the real one."""
    import forkio

    from . import _parent

    blocked = _parent.Parent(None, "inside a pool task the channel belongs to the pool: "
                                   "use forkio.report() or forkio.progress() to reach the caller")
    _parent.parent = blocked
    forkio.parent = blocked


def main() -> None:
    # Ctrl-C reaches the whole process group: the pool in the parent decides what stops, not us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    global _main_path
    try:
        (_init, sys_path, _main_path, report_rss, initializer_payload, authkey), fds = parent.channel.recv_fds()
    except ChannelClosed:
        return  # the pool closed before we started: nothing to do
    counter_fd, _inherited_fds[:] = fds[0], fds[1:]
    sys.path[:] = sys_path  # find what the caller finds, as multiprocessing's spawn does
    _worker.report_rss = report_rss
    _worker.started = memoryview(mmap.mmap(counter_fd, 8)).cast("Q")
    os.close(counter_fd)
    global _authkey
    _authkey = authkey
    _hide_channel_from_tasks()
    try:
        initializer, initargs = loads(initializer_payload)
        for fd in _inherited_fds:  # what needed them holds its own copies now
            os.close(fd)
        del _inherited_fds[:]
        if initializer is not None:
            initializer(*initargs)
    except BaseException as exc:
        try:
            parent.send(("init-failed", encode_error(exc)))
        except ChannelClosed:
            pass  # the pool broke on another worker's report and let us go: nobody left to tell
        sys.exit(3)
    threading.Thread(target=_worker.flusher, name="forkio-results", daemon=True).start()
    try:
        parent.send(("ready", os.getpid()))
        _worker.run()
    except ChannelClosed:
        pass  # the pool let us go
    # Leave at once, as multiprocessing's workers do: a full interpreter teardown (atexit,
    # module cleanup) costs the pool's shutdown milliseconds per worker and runs nothing of ours.
    util = sys.modules.get("multiprocessing.util")
    if util is not None:
        # A task used multiprocessing: a queue's feeder thread may still hold what a task put.
        # Run its exit hooks, as multiprocessing's own workers do before their os._exit().
        util._exit_function()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

