"""Process launch: the command line, the environment and the channel handed to a child.

Every exec'd child, and every zygote, is started from one long-lived launcher thread. On Linux
a child asks for ``PR_SET_PDEATHSIG``, which fires when the *thread* that forked it ends, not
the process; forking from a short-lived worker thread would kill its children with it.
Children cloned by a zygote share the zygote's parent, that same thread (see ``_zygote``).

``start="auto"`` (the default) takes a Python child from a zygote where that is safe (Linux,
the default interpreter without ``exec_args``) and execs it otherwise; Node children are
always exec'd.
"""

from __future__ import annotations

import errno
import os
import queue
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

from ._check import env_arg, str_arg

NODE_SUFFIXES = (".js", ".mjs", ".cjs")
STDIO_MODES = ("inherit", "pipe", "ignore")
START_METHODS = ("auto", "zygote", "exec")

_FORKIO_PATH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Run in the child by ``python -c``: find forkio wherever the parent found it, then step aside.
BOOTSTRAP = (
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
    start: str = "exec"  # how to start it: "zygote" or "exec"
    strict: bool = False  # the caller asked for the zygote: no falling back to exec
    preload: tuple[str, ...] = ()
    target: tuple[str, str, tuple[str, ...]] | None = None  # (script|module, target, args) of a Python child


class ProcessHandle(Protocol):
    """What a child process is to ``ChildProcess``: a ``subprocess.Popen`` or a ``ZygoteProcess``."""

    pid: int
    returncode: int | None
    stdin: IO[bytes] | None
    stdout: IO[bytes] | None
    stderr: IO[bytes] | None

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def send_signal(self, sig: int) -> None: ...


def is_node_target(script: str | None, executable: str | None) -> bool:
    """A ``.js``/``.mjs``/``.cjs`` script, or an executable named node, means a Node child."""
    if executable is not None and os.path.basename(executable).split(".")[0] in ("node", "nodejs"):
        return True
    return script is not None and script.endswith(NODE_SUFFIXES)


def build_spec(script: str | os.PathLike[str] | None, args: Sequence[str], *, module: str | None,
               cwd: str | os.PathLike[str] | None, env: dict[str, str] | None, executable: str | None,
               exec_args: Sequence[str],
               stdio: str, serialization: str | None, detached: bool, start: str = "exec",
               preload: Sequence[str] | None = None) -> LaunchSpec:
    """Validate ``fork()``'s options and turn them into a ``LaunchSpec``."""
    if start not in START_METHODS:
        raise ValueError(f"start must be one of {START_METHODS}, not {start!r}")
    if (script is None) == (module is None):
        raise TypeError("fork() needs exactly one of script or module=")
    if module is not None and not isinstance(module, str):
        raise TypeError(f"module must be a module name (str), not {type(module).__name__}")
    script = None if script is None else str_arg(script, "script")
    cwd = None if cwd is None else str_arg(cwd, "cwd")
    executable = None if executable is None else str_arg(executable, "executable")
    if isinstance(exec_args, (str, bytes)):
        raise TypeError("exec_args must be a sequence of strings, not a string")
    exec_args = [str_arg(a, f"exec_args[{i}]") for i, a in enumerate(exec_args)]
    if stdio not in STDIO_MODES:
        raise ValueError(f"stdio must be one of {STDIO_MODES}, not {stdio!r}")
    if isinstance(args, (str, bytes)):
        raise TypeError("args must be a sequence of strings, not a string")
    args = [str_arg(a, f"args[{i}]") for i, a in enumerate(args)]
    node = is_node_target(script, executable)
    if node:
        if module is not None:
            raise TypeError("module= names a Python module; a Node child needs a script")
        if serialization not in (None, "json"):
            raise ValueError("a Node child speaks serialization='json' only")
        serialization = "json"
        assert script is not None
        argv = [executable or "node", *exec_args, script, *args]
    else:
        serialization = serialization or "pickle"
        if script is not None:
            target = ["script", os.path.abspath(os.path.join(cwd or "", script))]
        else:
            target = ["module", str(module)]
        argv = [executable or sys.executable, *exec_args, "-c", BOOTSTRAP, *target, *args]
    method, why_not = "exec", _why_not_zygote(node, executable, exec_args)
    if start != "exec":
        if why_not is None:
            method = "zygote"
        elif start == "zygote":
            raise ValueError(f"start='zygote' is not possible: {why_not}")
    if serialization not in ("pickle", "json"):
        raise ValueError(f"serialization must be 'pickle' or 'json', not {serialization!r}")
    if script is not None:  # after the options: a bad one is named before a missing file
        _check_script(os.path.join(cwd or "", script), python=not node)
    child_env = _environ() if env is None else env_arg(env)
    child_env["NODE_CHANNEL_SERIALIZATION_MODE"] = serialization
    if not node and not detached and sys.platform.startswith("linux"):
        child_env["FORKIO_PARENT_PID"] = str(os.getpid())
    else:
        child_env.pop("FORKIO_PARENT_PID", None)
    label = str(script or module)
    if method == "exec":
        return LaunchSpec(argv, child_env, cwd, stdio, detached, serialization, node, label)
    from ._zygote import _normalise

    return LaunchSpec(argv, child_env, cwd, stdio, detached, serialization, node, label, start="zygote",
                      strict=start == "zygote", preload=_normalise(preload),
                      target=(target[0], target[1], tuple(args)))


def _check_script(path: str, *, python: bool) -> None:
    """Raise here what running ``path`` would fail on first in the child: a missing file
    (``FileNotFoundError``), a directory (``IsADirectoryError``; Python runs one only for its
    ``__main__.py``), a file we may not read (``PermissionError``)."""
    st = os.stat(path)
    if stat.S_ISDIR(st.st_mode):
        if python and not any(os.path.exists(os.path.join(path, name)) for name in ("__main__.py", "__main__.pyc")):
            raise IsADirectoryError(errno.EISDIR, "is a directory (with no __main__.py to run)", path)
    elif stat.S_ISREG(st.st_mode):
        # Opening it, as the child will: access() would judge by the real ids and no capabilities.
        os.close(os.open(path, os.O_RDONLY | os.O_CLOEXEC))


_environ_cache: tuple[dict[bytes, bytes], dict[str, str]] | None = None


def _environ() -> dict[str, str]:
    """A copy of ``os.environ``: decoding it costs ~30 us, so keep the last one while it is unchanged."""
    global _environ_cache
    data = getattr(os.environ, "_data", None)
    cache = _environ_cache
    if cache is not None and data is not None and data == cache[0]:
        return dict(cache[1])
    snapshot = dict(os.environ)
    if isinstance(data, dict):
        _environ_cache = (dict(data), snapshot)
    return dict(snapshot)


def _why_not_zygote(node: bool, executable: str | None, exec_args: Sequence[str]) -> str | None:
    if node:
        return "Node children are always exec'd"
    if not sys.platform.startswith("linux"):
        return f"no zygote on {sys.platform} yet"
    if executable is not None and os.path.realpath(executable) != os.path.realpath(sys.executable):
        return "a zygote runs this interpreter, not executable="
    if exec_args:
        return "a zygote runs the interpreter without exec_args"
    return None


def _stdio_args(stdio: str) -> dict[str, Any]:
    if stdio == "pipe":
        return {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    if stdio == "ignore":
        return {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    return {}


def start(spec: LaunchSpec) -> tuple[ProcessHandle, socket.socket, str]:
    """Start the child; return it, the parent's end of its channel and how it was started."""
    if spec.start == "zygote":
        from . import _zygote

        launched = _zygote.start(spec)
        if launched is not None:
            return launched[0], launched[1], "zygote"
    popen, sock = start_exec(spec)
    return popen, sock, "exec"


def start_exec(spec: LaunchSpec) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """Start the child as a fresh interpreter (or Node); return it and the parent's end of its channel."""
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
            if future.set_running_or_notify_cancel():
                _settle(future, job)


def _settle(future: Future[Any], job: Callable[[], Any]) -> None:
    """Run ``job`` and put its result, or its exception, into ``future``."""
    try:
        future.set_result(job())
    except BaseException as exc:
        future.set_exception(exc)


_launcher = _Launcher()


def _run_in_launcher(job: Callable[[], Any]) -> Any:
    if threading.current_thread() is _launcher._thread:
        return job()
    return _launcher.submit(job).result()


def submit_start(spec: LaunchSpec) -> Future[tuple[ProcessHandle, socket.socket, str]]:
    """``start`` without waiting: for the asyncio face."""
    if spec.start != "zygote":
        return _launcher.submit(lambda: start(spec))
    # Not on the launcher: asking a zygote may mean waiting for one to start, which the
    # launcher itself does (another thread could be waiting for it to, holding the registry).
    future: Future[tuple[ProcessHandle, socket.socket, str]] = Future()
    threading.Thread(target=_settle, args=(future, lambda: start(spec)), name="forkio-zygote-request",
                     daemon=True).start()
    return future
