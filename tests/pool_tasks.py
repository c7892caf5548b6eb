"""Task functions for the pool tests (workers import them by name)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import forkio


def inc(x: int) -> int:
    return x + 1


def add(a: int, b: int) -> int:
    return a + b


def pid_of(_: object = None) -> int:
    return os.getpid()


def fail(message: str) -> None:
    raise KeyError(message)


class Unpicklable(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def fail_unpicklably(message: str) -> None:
    raise Unpicklable(message)


def fail_with_http_error() -> None:
    """urllib's HTTPError pickles in the worker but cannot be unpickled in the caller."""
    import io
    import urllib.error

    raise urllib.error.HTTPError("http://127.0.0.1/x", 500, "Internal Server Error", {}, io.BytesIO(b""))  # type: ignore[arg-type]


def return_unpicklable() -> Any:
    return threading.Lock()


def die(how: str) -> None:
    if how == "exit":
        os._exit(13)
    if how == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    os.kill(os.getpid(), signal.SIGKILL)


def die_if(x: int, bad: int) -> int:
    if x == bad:
        os.kill(os.getpid(), signal.SIGKILL)
    return x * 2


def sleep_then(seconds: float, value: Any = None) -> Any:
    time.sleep(seconds)
    return value


def hang_if(x: int, bad: int) -> int:
    if x == bad:
        time.sleep(600)
    return x


def mark_then_sleep(path: str, seconds: float, value: Any) -> Any:
    Path(path).write_text(str(os.getpid()))
    time.sleep(seconds)
    return value


def mark_then_wait(path: str, gate: str, value: Any) -> Any:
    """Leave a mark, then return ``value`` once ``gate`` exists (the test decides when)."""
    Path(path).write_text(str(os.getpid()))
    wait_for_file(gate)
    return value


def mark_then_hang(path: str) -> None:
    Path(path).write_text(str(os.getpid()))
    time.sleep(600)


def flaky(counter_file: str, failures: int) -> str:
    """Die the first `failures` times (counted in a file), then succeed."""
    path = Path(counter_file)
    count = int(path.read_text()) if path.exists() else 0
    path.write_text(str(count + 1))
    if count < failures:
        os.kill(os.getpid(), signal.SIGKILL)
    return f"ok after {count} failures"


def use_parent_directly() -> None:
    forkio.parent.send("this would corrupt the pool's channel")


def with_progress(steps: int) -> str:
    for i in range(1, steps + 1):
        forkio.progress(i, steps)
    forkio.report({"note": "almost done"})
    return "done"


def grow_memory(megabytes: int) -> int:
    global _hoard
    _hoard = bytearray(megabytes * 1024 * 1024)
    for i in range(0, len(_hoard), 4096):
        _hoard[i] = 1
    return os.getpid()


_hoard = bytearray()
_initialized: Any = None


def init_worker(value: Any) -> None:
    global _initialized
    _initialized = value


def initialized(_: object = None) -> Any:
    return _initialized


def bad_init() -> None:
    raise RuntimeError("initializer failed on purpose")


def cpu(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


def array_sum(arr: Any) -> tuple[float, bool]:
    """The sum, and whether the array's memory is a shared mapping rather than a pickled copy."""
    return float(arr.sum()), not in_band(arr)


def make_array(n: int) -> Any:
    import numpy as np

    return np.arange(n, dtype=np.float64)


def in_band(arr: Any) -> bool:
    """Whether an unpickled array's memory is a copy inside the pickle (bytes), not a mapping."""
    base = arr
    while not isinstance(base, memoryview) and getattr(base, "base", None) is not None:
        base = base.base
    return isinstance(base, memoryview) and isinstance(base.obj, bytes | bytearray)


# ---- for the hardening tests ---------------------------------------------------------------
def fail_on_init_number(counter_file: str, bad: int) -> None:
    """An initializer that fails only in the ``bad``-th worker started (a passing failure)."""
    import fcntl

    with open(counter_file, "a+") as f:  # workers start together: count under a lock
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        count = len(f.read()) + 1
        f.write("x")
    if count == bad:
        raise RuntimeError(f"transient initializer failure (worker #{count})")


def set_worker_payload_limit(limit: int) -> None:
    from forkio import _pool_worker

    _pool_worker.MAX_PAYLOAD = limit


def big_bytes(n: int) -> bytes:
    return b"y" * n


def wait_for_file(path: str) -> bool:
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return True


def log_then_sleep(log: str, name: str, seconds: float) -> str:
    with open(log, "a") as f:
        f.write(f"{name} {os.getpid()}\n")
    time.sleep(seconds)
    return name


def started_pids(log: str, name: str) -> list[int]:
    if not os.path.exists(log):
        return []
    with open(log) as f:
        return [int(pid) for key, pid in (line.split() for line in f if line.strip()) if key == name]


def started_runs(log: str, name: str) -> int:
    return len(started_pids(log, name))


class Blob:
    """Bytes that travel out of band (through shared memory, at 1 MiB or more), like an array's."""

    def __init__(self, data: Any) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> Any:
        import pickle

        return (Blob, (pickle.PickleBuffer(self.data),))


def big_buffer(nbytes: int) -> Blob:
    return Blob(bytearray(nbytes))


class _ExitOnUnpickle:
    def __reduce__(self) -> Any:
        return (sys.exit, (1,))


def limit_address_space(extra: int) -> None:
    """Initializer: this worker may map only ``extra`` more bytes than it has now (RLIMIT_AS)."""
    import resource

    with open("/proc/self/status") as status:
        size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (size + extra, resource.RLIM_INFINITY))


class DieOnUnpickle:
    """An argument whose unpickling ends the worker process at once (exit code 7)."""

    def __reduce__(self) -> Any:
        return (os._exit, (7,))


def exit_when_unpickled() -> Any:
    return _ExitOnUnpickle()


def sleep_then_print(seconds: float, text: str) -> None:
    time.sleep(seconds)
    print(text, flush=True)


def sleep_then_write(seconds: float, path: str) -> None:
    time.sleep(seconds)
    Path(path).write_text("done")


def report_unloadable() -> str:
    """Report a message that cannot be unpickled in the caller (it calls sys.exit there)."""
    forkio.report(_ExitOnUnpickle())
    return "done"


def hold_first(x: int, gate: str, done_dir: str) -> int:
    """Item 1 waits for ``gate`` to exist; every other item leaves a file in ``done_dir``."""
    if x == 1:
        wait_for_file(gate)
    else:
        Path(done_dir, str(x)).touch()
    return x
