"""Process launch: the command line, the environment and the channel handed to a child.

Every child is started from one long-lived launcher thread. On Linux a child asks for
``PR_SET_PDEATHSIG``, which fires when the *thread* that forked it ends, not the process;
forking from a short-lived worker thread would kill its children with it.
"""

from __future__ import annotations

import os
import queue
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

NODE_SUFFIXES = (".js", ".mjs", ".cjs")
STDIO_MODES = ("inherit", "pipe", "ignore")

_FORKIO_PATH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Run in the child by ``python -c``: find forkio wherever the parent found it, then step aside.
_BOOTSTRAP = (
    f"import sys; sys.path.insert(0, {_FORKIO_PATH!r}); import forkio._bootstrap as b; "
    "del sys.path[0]; b.main()"
)


@dataclass(frozen=True)
class LaunchSpec:
    """Everything needed to start one child, already validated."""

    argv: list[str]
    env: dict[str, str]
    cwd: str | None
    stdio: str
    detached: bool
    serialization: str
    is_node: bool
    label: str = ""
    extra_fds: tuple[int, ...] = field(default=())


def is_node_target(script: str | None, executable: str | None) -> bool:
    """A ``.js``/``.mjs``/``.cjs`` script, or an executable named node, means a Node child."""
    if executable is not None and os.path.basename(executable).split(".")[0] in ("node", "nodejs"):
        return True
    return script is not None and script.endswith(NODE_SUFFIXES)


def build_spec(script: str | None, args: Sequence[str], *, module: str | None, cwd: str | None,
               env: dict[str, str] | None, executable: str | None, exec_args: Sequence[str],
               stdio: str, serialization: str | None, detached: bool) -> LaunchSpec:
    """Validate ``fork()``'s options and turn them into a ``LaunchSpec``."""
    if (script is None) == (module is None):
        raise TypeError("fork() needs exactly one of script or module=")
    if stdio not in STDIO_MODES:
        raise ValueError(f"stdio must be one of {STDIO_MODES}, not {stdio!r}")
    if isinstance(args, str):
        raise TypeError("args must be a sequence of strings, not a string")
    args = [os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in args]
    node = is_node_target(script, executable)
    if node:
        if module is not None:
            raise TypeError("module= names a Python module; a Node child needs a script")
        if serialization not in (None, "json"):
            raise ValueError("a Node child speaks serialization='json' only")
        serialization = "json"
        argv = [executable or "node", *exec_args, os.fspath(script), *args]  # type: ignore[arg-type]
    else:
        serialization = serialization or "pickle"
        if script is not None:
            target = ["script", os.path.abspath(os.path.join(cwd or "", os.fspath(script)))]
        else:
            target = ["module", str(module)]
        argv = [executable or sys.executable, *exec_args, "-c", _BOOTSTRAP, *target, *args]
    if serialization not in ("pickle", "json"):
        raise ValueError(f"serialization must be 'pickle' or 'json', not {serialization!r}")
    child_env = dict(os.environ if env is None else env)
    child_env["NODE_CHANNEL_SERIALIZATION_MODE"] = serialization
    if not node and not detached and sys.platform.startswith("linux"):
        child_env["FORKIO_PARENT_PID"] = str(os.getpid())
    else:
        child_env.pop("FORKIO_PARENT_PID", None)
    return LaunchSpec(argv, child_env, cwd, stdio, detached, serialization, node, str(script or module))


def _stdio_args(stdio: str) -> dict[str, Any]:
    if stdio == "pipe":
        return {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    if stdio == "ignore":
        return {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    return {}


def start(spec: LaunchSpec) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """Start the child; return it and the parent's end of its channel."""
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        env = dict(spec.env)
        env["NODE_CHANNEL_FD"] = str(child_end.fileno())
        popen = _run_in_launcher(lambda: subprocess.Popen(
            spec.argv, cwd=spec.cwd, env=env, pass_fds=(child_end.fileno(), *spec.extra_fds),
            start_new_session=spec.detached, **_stdio_args(spec.stdio)))
    except BaseException:
        parent_end.close()
        raise
    finally:
        child_end.close()
    return popen, parent_end


class _Launcher:
    """The one thread that starts children (see the module docstring for why)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="forkio-launcher", daemon=True)
                self._thread.start()
        self._jobs.put((job, future))
        return future

    def _run(self) -> None:
        while True:
            job, future = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(job())
            except BaseException as exc:
                future.set_exception(exc)


_launcher = _Launcher()


def _run_in_launcher(job: Callable[[], Any]) -> Any:
    if threading.current_thread() is _launcher._thread:
        return job()
    return _launcher.submit(job).result()


def submit_start(spec: LaunchSpec) -> Future[tuple[subprocess.Popen[bytes], socket.socket]]:
    """``start`` without waiting: for the asyncio face."""
    future: Future[tuple[subprocess.Popen[bytes], socket.socket]] = Future()

    def job() -> None:
        try:
            future.set_result(start(spec))
        except BaseException as exc:
            future.set_exception(exc)

    _launcher.submit(job)
    return future
