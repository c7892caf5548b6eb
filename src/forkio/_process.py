"""``fork()``: the parent's view of a child process and its channel (sync face)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import IO, Any, NamedTuple, TypeVar

from ._channel import Channel
from ._check import signal_arg, timeout_arg
from ._codec import DEFAULT_MAX_FRAME
from ._endpoint import Endpoint
from ._errors import WaitTimeout, describe_exit, signal_name
from ._launch import LaunchSpec, ProcessHandle, build_spec
from ._launch import start as launch

DEFAULT_GRACE = 5.0


class _Process:
    """What sync and asyncio children share: the OS process, its exit, kill and the timeout."""

    def _init_process(self, popen: ProcessHandle, spec: LaunchSpec, kill_signal: int,
                      start_method: str = "exec") -> None:
        self._popen = popen
        self._spec = spec
        self.kill_signal = kill_signal
        self.pid: int = popen.pid
        #: ``"zygote"`` (cloned from a preloaded zygote) or ``"exec"`` (a fresh interpreter, or Node).
        self.start_method = start_method
        self.stdin: IO[bytes] | None = popen.stdin
        self.stdout: IO[bytes] | None = popen.stdout
        self.stderr: IO[bytes] | None = popen.stderr
        self._timer: threading.Timer | None = None
        self._sentinel: int | None = None
        try:
            self._sentinel = os.pidfd_open(self.pid)  # ours until reaped, so no pid-reuse race here
        except (AttributeError, OSError):
            pass
        self._release_sentinel = weakref.finalize(self, _close_fd, self._sentinel)

    @property
    def sentinel(self) -> int:
        """An fd that becomes readable when the child exits (a pidfd), to select() on with others.

        Valid until ``close()``. Without pidfds (old kernels, macOS) it is a pipe closed by a
        thread that waits for the exit.
        """
        if not self._release_sentinel.alive:
            raise ValueError(f"child {self.pid} is closed: its sentinel is gone")
        if self._sentinel is None:
            self._sentinel = _exit_pipe(self._popen)
            self._release_sentinel.detach()
            self._release_sentinel = weakref.finalize(self, _close_fd, self._sentinel)
        return self._sentinel

    @property
    def returncode(self) -> int | None:
        """As ``subprocess`` reports it: the exit code, or minus the signal number; None while running."""
        return self._popen.poll()

    @property
    def exit_code(self) -> int | None:
        """The exit status if the child exited normally; None while it runs or if a signal killed it."""
        code = self._popen.poll()
        return code if code is not None and code >= 0 else None

    @property
    def signal_code(self) -> str | None:
        """The name of the signal that killed the child (``"SIGKILL"``), or None."""
        code = self._popen.poll()
        return signal_name(-code) if code is not None and code < 0 else None

    @property
    def startup_error(self) -> str | None:
        """Why the child ended before running any of its target's code (a syntax error, a module
        not found...), as the child reported it: ``"SyntaxError: ..."``; None otherwise.

        Known once the child has exited (``"exit"`` listeners and ``wait()``'s callers can read it);
        ``recv()`` raises ``ChannelClosed`` with the same text.
        """
        return self._startup_error()

    def _startup_error(self, wait: float = 0.0) -> str | None:
        channel: Channel | None = getattr(self, "_channel", None)  # the endpoint's (both faces have one)
        if channel is None:
            return None
        if channel.peer_failure is None and channel.connected and self._popen.poll() is not None:
            channel.read_pending(wait)  # it is the first and last thing such a child sends
        return channel.peer_failure

    @property
    def killed(self) -> bool:
        return self.signal_code is not None

    def kill(self, sig: int | str = signal.SIGTERM) -> bool:
        """Send ``sig`` (a number, a ``signal.Signals`` or a name such as ``"SIGKILL"``) to the child.

        True if it was sent; False if the child has already exited (nothing is sent, whatever the
        signal). A signal that does not exist is a ``ValueError``, alive or not; 0 sends nothing
        and says whether the child still runs.
        """
        sig = signal_arg(sig)
        if self._popen.poll() is not None:
            return False
        try:
            self._popen.send_signal(sig)
        except ProcessLookupError:
            return False
        return True

    def _stop_steps(self, grace: float) -> tuple[tuple[int | None, float | None], ...]:
        """How ``close()`` stops a child: wait ``grace`` s, then ``kill_signal`` and 1 s, then SIGKILL."""
        return ((None, timeout_arg(grace, "grace")), (self.kill_signal, 1.0), (signal.SIGKILL, None))

    def _release(self) -> None:
        """After the exit: close the stdio pipes and the sentinel."""
        for stream in (self.stdin, self.stdout, self.stderr):
            if stream is not None:
                stream.close()
        self._release_sentinel()

    def _arm_timeout(self, timeout: float | None) -> None:
        if timeout is not None:
            self._timer = threading.Timer(timeout, self.kill, (self.kill_signal,))
            self._timer.daemon = True
            self._timer.start()

    def _cancel_timeout(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _describe(self, kind: str, connected: bool) -> str:
        code = self._popen.poll()
        state = "running" if code is None else describe_exit(code)
        failure = self._startup_error() if code is not None else None
        if failure:
            state += f" (failed to start: {failure.splitlines()[-1]})"
        what = self._spec.label
        chan = "connected" if connected else "disconnected"
        return (f"<forkio.{kind} pid={self.pid} {what!r} {self._spec.serialization} {self.start_method} "
                f"{chan} {state}>")


def _close_fd(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def _exit_pipe(popen: ProcessHandle) -> int:
    """The sentinel where there is no pidfd: the read end of a pipe whose writer closes at exit."""
    r, w = os.pipe()

    def watch() -> None:
        try:
            popen.wait()
        finally:
            os.close(w)

    threading.Thread(target=watch, name=f"forkio-sentinel-{popen.pid}", daemon=True).start()
    return r


class ChildProcess(_Process, Endpoint):
    """A running child with a message channel (sync face). Create with ``forkio.fork()``.

    Events: ``"message"`` (message[, handle]), ``"disconnect"``, ``"exit"`` (exit_code,
    signal_name) and ``"error"`` (exception). ``"exit"`` fires once, after the reader has
    delivered every message the child sent (so a ``"message"`` listener must not wait for it).
    """

    _events = ("message", "disconnect", "exit", "error")

    def __init__(self, popen: ProcessHandle, channel: Channel, spec: LaunchSpec, *,
                 kill_signal: int, timeout: float | None, start_method: str = "exec") -> None:
        Endpoint.__init__(self, channel)
        self._init_process(popen, spec, kill_signal, start_method)
        self._exit_lock = threading.Lock()
        self._exit_emitted = False
        self._watcher: threading.Thread | None = None
        self._arm_timeout(timeout)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the child to exit; return its returncode (negative signal number if killed)."""
        timeout = timeout_arg(timeout)
        try:
            code = self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise WaitTimeout(f"child {self.pid} still running after {timeout} s") from None
        self._cancel_timeout()
        return code

    def _listening(self, event: str) -> None:
        super()._listening(event)
        if event == "exit" and self._watcher is None:
            self._watcher = threading.Thread(target=self._watch_exit, name=f"forkio-exit-{self.pid}", daemon=True)
            self._watcher.start()

    def _watch_exit(self) -> None:
        code = self.wait()
        reader = self._reader
        if reader is not None:
            self._delivered_all(reader)  # "exit" comes after every message the child sent
        self._startup_error(wait=1.0)  # known before the listeners run (a recv() may be reading it)
        with self._exit_lock:
            if self._exit_emitted:
                return
            self._exit_emitted = True
        self.emit("exit", code if code >= 0 else None, signal_name(-code) if code < 0 else None)

    def close(self, grace: float = DEFAULT_GRACE) -> int:
        """Disconnect, give the child ``grace`` seconds to exit, then stop it (TERM, then KILL)."""
        steps = self._stop_steps(grace)  # first: a bad grace changes nothing
        self.disconnect()
        for sig, wait_for in steps:
            if sig is not None:
                self.kill(sig)
            try:
                code = self.wait(wait_for)
            except WaitTimeout:
                continue
            self._release()
            return code
        raise AssertionError("unreachable: the last step waits without a limit")

    def __enter__(self) -> ChildProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return self._describe("ChildProcess", self.connected)


def fork(script: str | os.PathLike[str] | None = None, args: Sequence[str] = (), *,
         module: str | None = None, cwd: str | None = None, env: dict[str, str] | None = None,
         executable: str | None = None, exec_args: Sequence[str] = (), stdio: str = "inherit",
         serialization: str | None = None, timeout: float | None = None,
         kill_signal: int | str = signal.SIGTERM, detached: bool = False,
         max_frame_size: int = DEFAULT_MAX_FRAME, start: str = "auto",
         preload: Sequence[str] | None = None) -> ChildProcess:
    """Start a Python script or module (or a Node script) as a child with a message channel.

    Like Node's ``child_process.fork()``: the child finds the channel through
    ``NODE_CHANNEL_FD`` and talks back with ``forkio.parent``. ``serialization`` is
    ``"pickle"`` by default for Python children and ``"json"`` (Node's wire format) for Node
    children. ``timeout`` stops the child with ``kill_signal`` after that many seconds.
    Unless ``detached``, the child exits when this process dies.

    ``start="auto"`` clones a Python child from a zygote (a clean interpreter with forkio and the
    ``preload`` modules already imported: a few milliseconds) where that is safe, and execs a
    fresh interpreter otherwise; ``"zygote"`` insists, ``"exec"`` never uses one. ``preload``
    defaults to ``forkio.set_preload(...)``'s list. ``child.start_method`` says which it was.

    Everything is checked before anything starts: a bad option is a ``TypeError`` or
    ``ValueError`` (``args`` and ``env`` take str, bytes or os.PathLike; ``timeout`` > 0 seconds,
    ``inf`` for none; ``kill_signal`` a number or a name such as ``"SIGINT"``), a script that is
    missing, a directory without ``__main__.py`` or unreadable the ``OSError`` opening it would
    give. No process to be had (``RLIMIT_NPROC``...) raises that ``OSError``; nothing is disabled.
    """
    plan = _ForkPlan.checked(**locals())  # first line: locals() is fork()'s own arguments, nothing else
    return plan.child(ChildProcess, *launch(plan.spec))


_Child = TypeVar("_Child", bound=_Process)


class _ForkPlan(NamedTuple):
    """``fork()``'s and ``afork()``'s options, checked: what the launcher starts, and how the child
    object is made once it has (the two faces differ only in how they wait for the launcher)."""

    spec: LaunchSpec
    timeout: float | None
    kill_signal: int
    max_frame_size: int

    @classmethod
    def checked(cls, script: str | os.PathLike[str] | None, args: Sequence[str], *, timeout: float | None,
                kill_signal: int | str, max_frame_size: int, **spec_options: Any) -> _ForkPlan:
        """Everything checked before anything starts (see ``fork``); ``spec_options`` go to ``build_spec``."""
        timeout, signum = timeout_arg(timeout, zero=False), signal_arg(kill_signal, "kill_signal")
        return cls(build_spec(script, args, **spec_options), timeout, signum, max_frame_size)

    def child(self, face: Callable[..., _Child], popen: ProcessHandle, sock: socket.socket, method: str) -> _Child:
        """The ``face`` (``ChildProcess``, ``AsyncChildProcess``) of a child the launcher has started."""
        spec = self.spec
        channel = Channel(sock, serialization=spec.serialization, max_frame_size=self.max_frame_size,
                          node_peer=spec.is_node)
        return face(popen, channel, spec, kill_signal=self.kill_signal, timeout=self.timeout, start_method=method)
