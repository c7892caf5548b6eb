"""The zygote, from the parent's side: started lazily, asked for children, never trusted with them.

A zygote is a clean Python process started once (by the launcher thread, so that it is this
process's child) with forkio and the ``preload`` modules imported. ``fork()`` sends it one
request per child: the target, argv, environment, cwd, signal dispositions, and the fds
(channel end, stdio) over SCM_RIGHTS. It clones itself with ``CLONE_PARENT`` (see
``_zygote_main``), so the child it makes is **our** child:

- we reap it with ``waitpid`` and can open a pidfd for it (``ZygoteProcess``, shaped like the
  ``subprocess.Popen`` that exec'd children get), and ``getppid()`` in it is us;
- its ``PR_SET_PDEATHSIG`` fires when *our* launcher thread ends (that thread started the zygote,
  and a ``CLONE_PARENT`` child shares its parent), as for an exec'd child; the zygote dying
  changes nothing for it.

A zygote is keyed by everything that an exec'd child would take from its start rather than from
the request: the preload list, the startup environment (``PYTHON*``, locale, ``HOME``) and the
process attributes inherited at fork (uid/gids, umask, resource limits). When one of
those changes, the next fork gets a zygote that matches. A dead zygote is replaced on the next
fork; a zygote that cannot clone safely says why once, and ``start="auto"`` execs from then on.
A clone that fails for want of a process (``EAGAIN``, ``ENOMEM``) fails that one fork with the
``OSError``; the next fork clones again.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]
import atexit
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import IO, Any

from ._channel import Channel
from ._errors import ChannelClosed, ForkioError, WaitTimeout
from ._handles import close_fds

MAX_ZYGOTES = 4
START_TIMEOUT = 300.0  # a zygote importing heavy modules on a slow disk may take a while
REPLY_TIMEOUT = 60.0
_STARTUP_VARS = ("LANG", "LC_ALL", "LC_CTYPE", "HOME")

_default_preload: tuple[str, ...] = ()


class PreloadError(ForkioError, ImportError):
    """A module named in ``preload`` failed to import in the zygote (raised by every fork that asks for it)."""

    def __init__(self, module: str, error: str, detail: str = "") -> None:
        super().__init__(f"forkio zygote: preloading {module!r} failed: {error}", name=module)
        self.module = module
        self.detail = detail


class ZygoteError(ForkioError):
    """The zygote cannot start this child (``start="zygote"`` only: ``"auto"`` execs instead)."""


class _Refused(Exception):
    """The zygote cannot clone here (threads, a kernel that refuses CLONE_PARENT...)."""


def set_preload(modules: Iterable[str]) -> tuple[str, ...]:
    """Set the modules every zygote preloads when ``fork()`` names none; returns the previous ones."""
    global _default_preload
    new = _normalise(modules)
    previous, _default_preload = _default_preload, new
    return previous


def get_preload() -> tuple[str, ...]:
    """The modules zygotes preload by default (see ``set_preload``)."""
    return _default_preload


def _normalise(modules: Iterable[str] | None) -> tuple[str, ...]:
    if modules is None:
        return _default_preload
    if isinstance(modules, str):
        raise TypeError("preload must be a sequence of module names, not a string")
    names = []
    for name in modules:
        if not isinstance(name, str) or not name or any(not part.isidentifier() for part in name.split(".")):
            raise ValueError(f"preload: {name!r} is not a module name")
        if name not in names:
            names.append(name)
    return tuple(names)


# ------------------------------------------------------------------------ the child's handle
class ZygoteProcess:
    """A child cloned by the zygote, as ``subprocess.Popen`` would show it: ``pid``, ``poll``,
    ``wait``, ``send_signal``, ``returncode`` and the stdio pipes. It is our child: we reap it."""

    def __init__(self, pid: int, stdin: IO[bytes] | None, stdout: IO[bytes] | None,
                 stderr: IO[bytes] | None) -> None:
        self.pid = pid
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.returncode: int | None = None
        self._lock = threading.Lock()

    def _reap(self, flags: int) -> None:
        try:
            pid, status = os.waitpid(self.pid, flags)
        except ChildProcessError:  # someone else reaped it (SIGCHLD ignored?): as Popen says
            self.returncode = 0
            return
        if pid == self.pid:
            self.returncode = os.waitstatus_to_exitcode(status)

    def poll(self) -> int | None:
        if self.returncode is None and self._lock.acquire(False):
            try:
                if self.returncode is None:
                    self._reap(os.WNOHANG)
            finally:
                self._lock.release()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is not None:
            return self.returncode
        if timeout is None:
            with self._lock:
                while self.returncode is None:
                    self._reap(0)
            return self.returncode
        deadline = time.monotonic() + timeout
        pidfd = _pidfd(self.pid)
        try:
            while self.poll() is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise subprocess.TimeoutExpired(str(self.pid), timeout)
                if pidfd is not None:
                    select.select([pidfd], [], [], remaining)
                else:
                    time.sleep(min(remaining, 0.005))
        finally:
            if pidfd is not None:
                os.close(pidfd)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        self.poll()
        if self.returncode is not None:
            return
        try:
            os.kill(self.pid, sig)  # not reaped yet, so the pid is still this child's
        except ProcessLookupError:
            pass

    def __del__(self) -> None:
        if self.returncode is None:
            _unreaped.append(self)  # reaped at a later fork, as subprocess does for Popen


_unreaped: list[ZygoteProcess] = []


def _reap_abandoned() -> None:
    for proc in list(_unreaped):
        if proc.poll() is not None:
            _unreaped.remove(proc)


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


# --------------------------------------------------------------------------- the zygote
class _Zygote:
    """One zygote process and its control channel. ``fork`` is safe from any thread."""

    def __init__(self, preload: tuple[str, ...], startup_env: tuple[tuple[str, str], ...]) -> None:
        from ._launch import BOOTSTRAP, _run_in_launcher

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = {k: v for k, v in os.environ.items() if not _is_startup_var(k)}
        env.update(startup_env)
        argv = [sys.executable, "-c", BOOTSTRAP, "zygote", str(theirs.fileno()), str(os.getpid()), ",".join(preload)]
        try:
            self.popen: subprocess.Popen[bytes] = _run_in_launcher(lambda: subprocess.Popen(
                argv, env=env, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.preload = preload
        self.channel = Channel(ours)
        self.channel.zero_copy_threshold = None
        self._lock = threading.Lock()
        self._serial = 0  # numbers the requests
        try:
            hello = self.channel.recv(timeout=START_TIMEOUT)
        except BaseException as exc:
            self.close()
            raise ZygoteError(f"the zygote did not start: {exc}") from exc
        if not hello.get("ok"):
            self.close()
            raise PreloadError(hello["module"], hello["error"], hello.get("traceback", ""))
        self.pid: int = hello["pid"]
        self.problem: str | None = hello["problem"]

    @property
    def alive(self) -> bool:
        return self.channel.connected and self.popen.poll() is None

    def fork(self, request: dict[str, Any], fds: list[int]) -> int:
        """Ask for one child; its pid. ``ChannelClosed`` if the zygote died without making one,
        ``_Refused`` if it cannot clone here, the ``OSError`` exec would raise (a missing cwd,
        no process to be had) otherwise."""
        with self._lock:
            self._serial += 1
            request["id"] = self._serial
            self.channel.send_fds(request, fds)
            try:
                reply = self._answer(request["id"], REPLY_TIMEOUT)
            except WaitTimeout:  # a zygote that hangs is no zygote: the next fork starts another
                self.popen.kill()
                try:  # a child it made before hanging says so itself once the zygote is gone
                    reply = self._answer(request["id"], 2.0)
                except (WaitTimeout, ChannelClosed):
                    raise ZygoteError(f"the zygote did not answer within {REPLY_TIMEOUT} s") from None
                finally:
                    self.channel.close()
        if "refused" in reply:
            raise _Refused(reply["refused"])
        if "error" in reply:
            raise reply["error"]  # what exec would have raised (a missing cwd: FileNotFoundError...)
        return int(reply["pid"])

    def _answer(self, serial: int, timeout: float) -> dict[str, Any]:
        """The answer to request ``serial``. Answers to earlier ones are dropped: a child whose
        zygote died after answering for it may answer again (see ``_zygote_main._State.become``)."""
        deadline = time.monotonic() + timeout
        while True:
            reply: dict[str, Any] = self.channel.recv(timeout=max(0.0, deadline - time.monotonic()))
            if reply.get("id") == serial:
                return reply

    def close(self) -> None:
        self.channel.close()  # the zygote exits at EOF
        try:
            self.popen.wait(2)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


_zygotes: OrderedDict[tuple[Any, ...], _Zygote] = OrderedDict()
_failures: dict[tuple[Any, ...], PreloadError] = {}
_registry_lock = threading.Lock()


def long_lived_pids() -> set[int]:
    """The zygotes' pids: processes forkio keeps running on purpose."""
    with _registry_lock:
        return {z.popen.pid for z in _zygotes.values()}


def _is_startup_var(name: str) -> bool:
    return name.startswith("PYTHON") or name in _STARTUP_VARS


def _inherited_state() -> tuple[Any, ...]:
    """What a child inherits from this process at fork time and a zygote froze at its own start.

    (CPU affinity, nice value and the signal mask are per thread on Linux: both kinds of child
    take them from the launcher thread, which started the zygote too.)
    """
    import resource

    state: list[Any] = [os.getresuid(), os.getresgid(), tuple(os.getgroups())]
    state.extend(resource.getrlimit(r) for r in _RLIMITS)
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"Umask:"):
                    state.append(line.split()[1])
                    break
    except OSError:
        pass
    return tuple(state)


def _rlimits() -> list[int]:
    import resource

    return [getattr(resource, name) for name in dir(resource) if name.startswith("RLIMIT_")]


_RLIMITS = _rlimits()


def _get(preload: tuple[str, ...], startup_env: tuple[tuple[str, str], ...]) -> _Zygote:
    key = (preload, startup_env, _inherited_state())
    with _registry_lock:
        failure = _failures.get(key)
        if failure is not None:
            raise failure
        zygote = _zygotes.get(key)
        if zygote is not None and zygote.alive:
            _zygotes.move_to_end(key)
            return zygote
        if zygote is not None:
            del _zygotes[key]
            zygote.close()
        _reap_abandoned()
        try:
            zygote = _Zygote(preload, startup_env)
        except PreloadError as exc:
            _failures[key] = exc
            raise
        _zygotes[key] = zygote
        while len(_zygotes) > MAX_ZYGOTES:
            _, old = _zygotes.popitem(last=False)
            old.close()  # its children are ours, not its: they live on
        return zygote


def retire(preload: Iterable[str] | None = None) -> int:
    """Close the zygotes that preload ``preload`` (default: ``get_preload()``); how many there were.

    The next fork that needs one starts a new zygote, which imports those modules afresh: how
    a reload serves edited code. Children cloned by the old ones are ours and live on.
    """
    wanted = _normalise(preload)
    with _registry_lock:
        old = [key for key in _zygotes if key[0] == wanted]
        zygotes = [_zygotes.pop(key) for key in old]
        for key in [key for key in _failures if key[0] == wanted]:
            del _failures[key]  # a preload that failed may import now
    for zygote in zygotes:
        zygote.close()
    return len(zygotes)


def _ignored_signals() -> list[int]:
    """Signals this process ignores: an exec'd child inherits that (SIGPIPE/SIGXFSZ excepted)."""
    getsignal, ignore = _signal.getsignal, _signal.SIG_IGN  # the C functions: no enum conversions
    return [sig for sig in _SIGNALS if getsignal(sig) == ignore]


_SIGNALS = [int(sig) for sig in signal.valid_signals()
            if sig not in (signal.SIGKILL, signal.SIGSTOP, signal.SIGPIPE, getattr(signal, "SIGXFSZ", signal.SIGPIPE))]


def start(spec: Any) -> tuple[ZygoteProcess, socket.socket] | None:
    """Start ``spec`` (a ``LaunchSpec``) from a zygote; None when the zygote cannot and exec should."""
    startup_env = tuple(sorted((k, v) for k, v in spec.env.items() if _is_startup_var(k)))
    for attempt in range(2):
        try:
            zygote = _get(spec.preload, startup_env)
        except ZygoteError:
            if spec.strict:
                raise
            return None  # a zygote that cannot start (not a bad preload: that is the user's) means exec
        if zygote.problem is not None:
            if spec.strict:
                raise ZygoteError(f"the zygote cannot start children here: {zygote.problem}")
            return None
        try:
            return _start_from(zygote, spec)
        except ChannelClosed:
            if attempt:
                if spec.strict:
                    raise ZygoteError("the zygote died twice while starting a child") from None
                return None
        except _Refused as exc:
            zygote.problem = str(exc)
            if spec.strict:
                raise ZygoteError(f"the zygote cannot start children here: {exc}") from None
            return None
    raise AssertionError("unreachable")


def _start_from(zygote: _Zygote, spec: Any) -> tuple[ZygoteProcess, socket.socket]:
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    send = [child_end.fileno()]
    ours: list[int] = []  # our ends of stdio pipes
    theirs: list[int] = []  # fds opened here for the child only
    try:
        stdio: list[int | None]
        if spec.stdio == "pipe":
            r0, w0 = os.pipe()
            r1, w1 = os.pipe()
            r2, w2 = os.pipe()
            ours += [w0, r1, r2]
            theirs += [r0, w1, w2]
            send += [r0, w1, w2]
            stdio = [1, 2, 3]
        elif spec.stdio == "ignore":
            null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            theirs.append(null)
            send.append(null)
            stdio = [1, 1, 1]
        else:
            stdio = []
            for fd in (0, 1, 2):
                if _valid(fd):
                    send.append(fd)
                    stdio.append(len(send) - 1)
                else:
                    stdio.append(None)
        extra = []
        for fd in spec.extra_fds:
            send.append(fd)
            extra.append((len(send) - 1, fd))
        kind, target, args = spec.target
        parent_pid = spec.env.get("FORKIO_PARENT_PID")
        try:
            cwd = spec.cwd if spec.cwd is not None else os.getcwd()
        except OSError:
            cwd = None
        request = {
            "kind": kind, "target": target, "args": args, "argv": spec.argv, "env": spec.env, "cwd": cwd,
            "detached": spec.detached, "parent_pid": int(parent_pid) if parent_pid else None,
            "ignored": _ignored_signals(), "channel": 0, "channel_fd": child_end.fileno(), "stdio": stdio,
            "extra": extra,
        }
        pid = zygote.fork(request, send)
    except BaseException:
        parent_end.close()
        close_fds(ours)
        raise
    finally:
        child_end.close()
        close_fds(theirs)
    files: list[IO[bytes] | None] = [None, None, None]
    if ours:
        files = [open(ours[0], "wb"), open(ours[1], "rb"), open(ours[2], "rb")]
    return ZygoteProcess(pid, files[0], files[1], files[2]), parent_end


def _valid(fd: int) -> bool:
    """Would an exec'd child have this fd? Open and inheritable (close-on-exec ones vanish)."""
    try:
        return os.get_inheritable(fd)
    except OSError:
        return False


def _close_all() -> None:
    with _registry_lock:
        zygotes = list(_zygotes.values())
        _zygotes.clear()
    for zygote in zygotes:
        try:
            zygote.close()
        except Exception:
            pass


def _forget_after_fork() -> None:
    """In a child made by os.fork() of this process: those zygotes are the parent's, not ours.
    Drop them without a word to them (closing would shut the parent's connection down)."""
    global _registry_lock
    _registry_lock = threading.Lock()
    for zygote in _zygotes.values():
        zygote.channel._closed = True
        try:
            os.close(zygote.channel.sock.detach())
        except OSError:
            pass
    _zygotes.clear()


atexit.register(_close_all)
os.register_at_fork(after_in_child=_forget_after_fork)
