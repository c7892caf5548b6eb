"""Inside the zygote: preload, then clone a child per request and make it what exec would have made.

The zygote is a clean ``python -c <bootstrap> zygote ...`` started by the parent's launcher
thread. It imports forkio and the preload modules, then waits for requests on its control
channel. For each one it clones itself with ``CLONE_PARENT``: the new process is a child of
the *parent* (the zygote's own parent), not of the zygote, so the parent reaps it with
``waitpid``, gets a pidfd for it, and its ``PR_SET_PDEATHSIG`` follows the parent's launcher
thread, exactly like an exec'd child. ``os.fork`` cannot pass that flag, so the clone is a raw
``syscall`` through ctypes, bracketed by what ``os.fork`` does around ``fork()``:
``PyOS_BeforeFork`` / ``PyOS_AfterFork_Child`` (import lock, threads, the GIL, ``os.register_at_fork``
hooks such as ``random``'s reseed), and ``CLONE_CHILD_SETTID`` so that the C library's cached
thread id is the child's.

What a raw clone skips is the C library's ``pthread_atfork`` handlers and its lock resets. Both
matter only with other threads around: the zygote refuses to clone unless it is the only
thread at that moment (preloaded modules that start thread pools, like OpenBLAS, are quieted by
one real ``os.fork`` first, which runs their handlers; if threads remain, it reports that and
the parent execs instead).

The child then resets signal dispositions as exec + Python startup would, installs its fds
(channel, stdio) and cwd, environment, ``sys.path``, ``sys.argv``, fresh stdio objects and
random state, arms the parent-death signal for the real parent, and returns to
``_bootstrap.main``, which runs the target exactly as an exec'd child does.
"""

from __future__ import annotations

import errno
import fcntl
import gc
import importlib
import importlib.util
import io
import os
import signal
import socket
import sys
import time
import warnings
from typing import Any

from ._bootstrap import arm_parent_death_signal, parent_death_signal
from ._channel import RECV_SIZE, Channel
from ._errors import ChannelClosed
from ._handles import close_fds

CLONE_PARENT = 0x00008000
CLONE_CHILD_SETTID = 0x01000000
_SYS_CLONE = {"x86_64": 56, "amd64": 56, "aarch64": 220, "arm64": 220}
# clone() errors that say "not now" (RLIMIT_NPROC, pid or memory shortage), not "never here".
_SHORTAGE = (errno.EAGAIN, errno.ENOMEM)


def native_threads() -> int:
    """Threads in this process, as the kernel counts them."""
    with open("/proc/self/stat", "rb") as stat:
        fields = stat.read().rsplit(b")", 1)[1].split()
    return int(fields[17])  # field 20 of the line; the split starts at field 3


class Cloner:
    """``clone(CLONE_PARENT)`` from Python, when it can be done safely here; ``problem`` says why not."""

    def __init__(self) -> None:
        self.problem: str | None = None
        self._tid_address = 0
        machine = os.uname().machine
        nr = _SYS_CLONE.get(machine.lower())
        if not sys.platform.startswith("linux") or nr is None:
            self.problem = f"no CLONE_PARENT clone on {sys.platform} {machine}"
            return
        self._nr = nr
        import ctypes

        self._api = ctypes.pythonapi
        libc = ctypes.PyDLL(None, use_errno=True)  # PyDLL: the GIL stays held across the call
        self._syscall = libc.syscall
        self._syscall.restype = ctypes.c_long
        self._syscall.argtypes = [ctypes.c_long, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_void_p,
                                  ctypes.c_void_p, ctypes.c_void_p]
        self._get_errno = ctypes.get_errno
        # The C library caches the thread id in its thread descriptor; find that slot so the
        # kernel writes the child's id there (as fork() does), not leave it the zygote's.
        pthread_self = libc.pthread_self
        pthread_self.restype = ctypes.c_void_p
        descriptor = pthread_self()
        words = (ctypes.c_int * 256).from_address(descriptor)
        hits = [i for i, value in enumerate(words) if value == threading_native_id()]
        if len(hits) != 1:
            self.problem = "cannot find the thread id in the C library's thread descriptor"
            return
        self._tid_address = descriptor + hits[0] * ctypes.sizeof(ctypes.c_int)

    def fork(self) -> int:
        """Clone: 0 in the child, its pid in the zygote. Raises OSError when refused."""
        if self.problem is not None:
            raise OSError(self.problem)
        threads = native_threads()
        if threads != 1:
            raise OSError(f"the zygote is running {threads} threads: cloning it would not be safe")
        sys.audit("os.fork")
        api = self._api
        api.PyOS_BeforeFork()
        # Argument order differs between x86_64 (..., child_tid, tls) and arm64 (..., tls,
        # child_tid); without CLONE_SETTLS the tls slot is ignored, so pass the address in both.
        pid = self._syscall(self._nr, CLONE_PARENT | CLONE_CHILD_SETTID, None, None,
                            self._tid_address, self._tid_address)
        if pid == 0:
            api.PyOS_AfterFork_Child()
            return 0
        err = self._get_errno()
        api.PyOS_AfterFork_Parent()
        if pid < 0:
            raise OSError(err, f"clone(CLONE_PARENT) failed: {os.strerror(err)}")
        return int(pid)


def threading_native_id() -> int:
    import threading

    return threading.get_native_id()


def _quiet_threads() -> None:
    """Preloaded native thread pools (OpenBLAS...) stop in their pthread_atfork handlers: one real
    fork runs those handlers, and the pools restart lazily in whoever uses them next."""
    if native_threads() == 1:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 3.12+ warns about forking with threads: that is the point
        pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    deadline = time.monotonic() + 1.0
    while native_threads() > 1 and time.monotonic() < deadline:
        time.sleep(0.005)


def serve(argv: list[str]) -> tuple[str, str, list[str], Any]:
    """The zygote's life: returns only in a cloned child, with the target to run."""
    ctrl_fd, parent_pid, preload = int(argv[0]), int(argv[1]), [m for m in argv[2].split(",") if m]
    arm_parent_death_signal(parent_pid, signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent and the children
    control = Channel(socket.socket(fileno=_high(ctrl_fd)))
    control.zero_copy_threshold = None
    state = _State()
    for name in preload:
        try:
            importlib.import_module(name)
        except BaseException as exc:
            import traceback

            control.send({"ok": False, "module": name, "error": f"{type(exc).__name__}: {exc}",
                          "traceback": traceback.format_exc()})
            os._exit(1)
    _warm_up()
    _quiet_threads()
    cloner = Cloner()
    if cloner.problem is None and native_threads() != 1:
        cloner.problem = _threads_problem()
    gc.collect()
    gc.freeze()  # preloaded objects stay put: children do not copy their pages when they collect
    control.send({"ok": True, "pid": os.getpid(), "problem": cloner.problem})
    while True:
        try:
            request, fds = control.recv_fds()
        except ChannelClosed:
            os._exit(0)
        rid = request["id"]  # echoed in the answer: the parent ignores answers to earlier requests
        try:
            state.prepare(request, fds)
            go = list(os.pipe())  # see _State.become: the child starts once the parent knows its pid
        except BaseException as exc:  # the request cannot be honoured (a bad cwd...): say what exec would
            state.after_fork(failed=True)
            control.send({"id": rid, "error": exc if isinstance(exc, Exception) else RuntimeError(repr(exc))})
            continue
        try:
            pid = cloner.fork()
        except OSError as exc:
            close_fds(go)
            state.after_fork()
            if exc.errno in _SHORTAGE:  # no process to be had right now: this fork fails, the next may not
                control.send({"id": rid, "error": exc})
            else:  # cloning is not possible here: the parent should exec instead
                control.send({"id": rid, "refused": str(exc)})
            continue
        if pid == 0:
            return state.become(control, request, go)
        control.send({"id": rid, "pid": pid})  # first: the parent is waiting, the clean-up is not urgent
        os.write(go[1], b"\0")
        close_fds(go)
        state.after_fork()


def _warm_up() -> None:
    """Import what running a target imports lazily, so that no child pays for it."""
    import importlib.machinery
    import importlib.util
    import pkgutil  # (runpy.run_path reads .pyc headers with it)

    from . import _pool_worker  # every Pool worker runs it: a pool's start should not pay for its import

    del importlib, pkgutil, _pool_worker


def _threads_problem() -> str:
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as comm:
                names.append(comm.read().strip())
        except OSError:
            pass
    return f"preloaded modules keep {len(names) - 1} native threads running ({', '.join(names[1:])})"


class _State:
    """What the zygote sets up *before* each clone, so the child starts with it done.

    A clone shares its pages copy-on-write: every page the child writes costs it a fault and a
    copy, which on a virtual machine is most of a child's start time. So the zygote itself puts
    the child's stdio on fds 0-2 (with fresh ``sys.std*`` objects for them), its cwd, environment
    (only what differs from the last child's), ``sys.path``/``sys.orig_argv``, signal
    dispositions and ``forkio.parent``'s channel in place, and clones; the child is left with
    the parent-death signal, its session and the few things only it can do.
    """

    def __init__(self) -> None:
        self.clean_path = list(sys.path)
        self.env = dict(os.environ)
        self.ignored: set[int] = {int(sig) for sig in signal.valid_signals()
                                  if sig not in _SPECIAL and signal.getsignal(sig) is signal.SIG_IGN}
        self.devnull = _high(os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC))
        self.keep: list[int] = []  # fds the child needs beyond 0-2 (channel, extra)
        self.channel: Channel | None = None
        self.stdio_key: tuple[Any, ...] | None = None
        self.prepared: tuple[Any, Any] | None = None
        self.recv_buffer = bytearray(RECV_SIZE)
        self._prctl = _prctl()
        self._getppid = os.getppid
        for fd in (0, 1, 2):  # the zygote's own stdio: nothing (the control channel reports errors)
            os.dup2(self.devnull, fd)

    def prepare(self, request: dict[str, Any], fds: list[int]) -> None:
        """Settle the fds first (taking ownership of ``fds``), then everything that may fail."""
        stdio = request["stdio"]
        self.keep = [fds[request["channel"]], *(fds[index] for index, _ in request["extra"])]
        try:
            for fd, index in enumerate(stdio):
                # A slot the parent has closed is closed in the child, not here: until the clone
                # it holds /dev/null, so that nothing opened meanwhile lands on it.
                os.dup2(self.devnull if index is None else fds[index], fd, inheritable=True)
        finally:
            close_fds([fd for fd in fds if fd not in self.keep])
        wanted = request["channel_fd"]  # the number an exec'd child would have it under (pass_fds)
        # Only onto a free number: under a low fd limit the zygote's own fds (control socket,
        # /dev/null, a preloaded module's files) may sit where the parent's numbers go.
        if self.keep[0] != wanted and wanted >= 3 and _is_free(wanted):
            os.dup2(self.keep[0], wanted, inheritable=False)
            os.close(self.keep[0])
            self.keep[0] = wanted
        if request["cwd"] is not None:
            os.chdir(request["cwd"])
        self._set_env(request["env"])
        sys.path[:] = self.clean_path
        sys.orig_argv[:] = request["argv"]
        self.prepared = _precompile(request["kind"], request["target"])
        self._set_signals(set(request["ignored"]))
        self._set_stdio(stdio)
        from . import _parent

        os.set_inheritable(self.keep[0], False)  # as forkio.parent leaves it in an exec'd child
        sock = socket.socket(fileno=self.keep[0])
        try:
            # Every child's channel gets the same receive buffer, allocated once here: a fresh one
            # would be zeroed (its pages faulted in) for each child, on the way to the clone.
            self.channel = Channel(sock, serialization=request["env"]["NODE_CHANNEL_SERIALIZATION_MODE"],
                                   recv_buffer=self.recv_buffer)
        except ValueError:
            sock.detach()
            raise
        _parent._channel, _parent._reason = self.channel, ""
        _parent.parent._channel, _parent.parent._reason = self.channel, ""
        aprocess = sys.modules.get("forkio._aprocess")
        if aprocess is not None:
            aprocess.aparent._channel, aprocess.aparent._reason = self.channel, ""

    def after_fork(self, *, failed: bool = False) -> None:
        """In the zygote: let go of the child's fds, so that its pipes and channel see EOF without it."""
        from . import _parent

        if failed:  # whatever prepare() changed halfway: know it as it is
            self.env = dict(os.environ)
            self.stdio_key = None

        _parent.parent._channel = _parent._channel = None
        aprocess = sys.modules.get("forkio._aprocess")
        if aprocess is not None:
            aprocess.aparent._channel = None
        if self.channel is not None:
            self.channel._closed = True
            self.channel.sock.detach()
            self.channel = None
        close_fds(self.keep)
        self.keep = []
        for fd in (0, 1, 2):
            os.dup2(self.devnull, fd)

    def become(self, control: Channel, request: dict[str, Any], go: list[int]
               ) -> tuple[str, str, list[str], Any]:
        """In the child, right after the clone: what only the child can do.

        Nothing runs before the parent knows this child's pid: the zygote writes a byte to ``go``
        once it has sent the pid. A zygote killed in between (OOM killer...) closes ``go``
        unwritten; then the child sends its pid itself, on the control channel it still shares,
        so that the parent takes it as the answer instead of asking another zygote for a second
        child. If even that fails nobody knows this child: it ends before running anything.
        """
        parent_pid = request["parent_pid"]
        if parent_pid is not None:
            self._prctl(_PR_SET_PDEATHSIG, parent_death_signal(signal.SIGTERM in self.ignored), 0, 0, 0)
            if self._getppid() != parent_pid:  # the parent died before prctl took effect
                os._exit(128 + signal.SIGTERM)
        os.close(go[1])
        answered = os.read(go[0], 1)
        os.close(go[0])
        if not answered:
            try:
                control.send({"id": request["id"], "pid": os.getpid()})
            except BaseException:
                os._exit(128 + signal.SIGTERM)
        control._closed = True
        os.close(control.sock.detach())  # only the descriptor: the zygote keeps using the socket
        os.close(self.devnull)
        for fd, index in enumerate(request["stdio"]):
            if index is None:
                os.close(fd)  # as in the parent: nothing there
        if request["detached"]:
            os.setsid()
        if signal.SIGINT not in self.ignored:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        for (_, target), fd in zip(request["extra"], self.keep[1:], strict=True):
            os.dup2(fd, target, inheritable=True)  # pass_fds keeps an fd's number: so do we
            if fd != target:
                os.close(fd)
        nprandom = sys.modules.get("numpy.random")  # random reseeds itself at fork; numpy does not
        if nprandom is not None:
            try:
                nprandom.seed()
            except Exception:
                pass
        return request["kind"], request["target"], list(request["args"]), self.prepared

    def _set_env(self, env: dict[str, str]) -> None:
        """Make os.environ ``env`` (minus the channel's variables, which forkio.parent takes away)."""
        env = {k: v for k, v in env.items() if k not in _TAKEN_VARS}
        old = self.env
        if env == old:
            return
        for key in [k for k in old if k not in env]:
            os.environ.pop(key, None)
        for key, value in env.items():
            if old.get(key) != value:
                os.environ[key] = value
        if env.get("TZ") != old.get("TZ") and hasattr(time, "tzset"):
            time.tzset()
        self.env = env

    def _set_signals(self, ignored: set[int]) -> None:
        """Ignored as in the parent (exec keeps SIG_IGN), default otherwise; SIGINT is set in the child."""
        for sig in ignored ^ self.ignored:
            if sig in _SPECIAL:
                continue
            try:
                signal.signal(sig, signal.SIG_IGN if sig in ignored else signal.SIG_DFL)
            except (OSError, ValueError):
                pass
        self.ignored = ignored

    def _set_stdio(self, stdio: list[int | None]) -> None:
        """Fresh sys.std* objects over fds 0-2, made as Python's startup makes them for those fds."""
        key = tuple(None if stdio[fd] is None else _describe(fd) for fd in (0, 1, 2))
        if key == self.stdio_key:
            return  # same kinds of files as last time: the objects made then fit as they are
        for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
            old = getattr(sys, f"__{name}__")
            stream: Any = None
            if stdio[fd] is not None:
                stream = _make_stdio(fd, name, old)
            setattr(sys, name, stream)
            setattr(sys, f"__{name}__", stream)
        self.stdio_key = key


_compiled: dict[str, tuple[int, int, int, Any]] = {}


def _precompile(kind: str, target: str) -> tuple[Any, Any] | None:
    """Find and compile the target here, as runpy would in the child (None: let the child do it).

    Compiling in a fresh clone costs it a page fault for every page the compiler writes; here it
    costs nothing. Only what has no side effect is done: a plain script file, or a module whose
    package is already imported; anything else (a directory, a zip, a package to import, a
    syntax error to report) is left to runpy in the child.
    """
    from ._bootstrap import prepare

    try:
        if kind == "script":
            sys.path[0] = os.path.dirname(target)
            st = os.stat(target)
            cached = _compiled.get(target)
            if cached is not None and cached[:3] == (st.st_ino, st.st_mtime_ns, st.st_size):
                return cached[3], None  # the same file as last time (stricter than .pyc's check)
            found = prepare("script", target)
            if found is None:
                return None
            code = found[0]
            if len(_compiled) > 64:
                _compiled.clear()
            _compiled[target] = (st.st_ino, st.st_mtime_ns, st.st_size, code)
            return code, None
        package = target.rpartition(".")[0]
        if target.startswith(".") or (package and package not in sys.modules) or target in sys.modules:
            return None
        sys.path[0] = os.getcwd()
        spec = importlib.util.find_spec(target)
        if spec is None or spec.loader is None or spec.submodule_search_locations is not None:
            return None
        code = spec.loader.get_code(target)  # type: ignore[attr-defined]
        return (code, spec) if code is not None else None
    except Exception:
        return None


_SPECIAL = {signal.SIGKILL, signal.SIGSTOP, signal.SIGINT, signal.SIGPIPE, getattr(signal, "SIGXFSZ", signal.SIGPIPE)}
_TAKEN_VARS = ("NODE_CHANNEL_FD", "NODE_CHANNEL_SERIALIZATION_MODE", "FORKIO_PARENT_PID")
_PR_SET_PDEATHSIG = 1


_HIGH = 900  # the zygote's own fds live up here, out of the way of the numbers children get


def _high(fd: int) -> int:
    """Move ``fd`` to a number at or above _HIGH, or as near the fd limit as it allows."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    floor = _HIGH if soft == resource.RLIM_INFINITY else min(_HIGH, max(3, soft - 64))
    try:
        moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor)
    except OSError:
        return fd
    os.close(fd)
    return moved


def _is_free(fd: int) -> bool:
    """No open file under number ``fd`` here."""
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        return True
    return False


def _prctl() -> Any:
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl


def _describe(fd: int) -> tuple[Any, ...] | None:
    """What Python's stdio setup looks at: is there a file, is it a tty, can it seek, its block size."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    try:
        os.lseek(fd, 0, os.SEEK_CUR)
        seekable = True
    except OSError:
        seekable = False
    return (st.st_mode & 0o170000, os.isatty(fd), seekable, getattr(st, "st_blksize", 0))


def _make_stdio(fd: int, name: str, old: Any) -> io.TextIOWrapper:
    write = fd != 0
    buffered = not (old is not None and getattr(old, "write_through", False))
    raw = io.FileIO(fd, "wb" if write else "rb", closefd=False)
    raw.name = f"<{name}>"
    buf: Any = raw
    if not write:
        buf = io.BufferedReader(raw)
    elif buffered:
        buf = io.BufferedWriter(raw)
    stream = io.TextIOWrapper(
        buf, encoding=getattr(old, "encoding", None), errors=getattr(old, "errors", None), newline="\n",
        line_buffering=buffered and (raw.isatty() or fd == 2), write_through=not buffered)
    stream.mode = "w" if write else "r"  # type: ignore[misc]
    return stream
