"""The primary: forks workers, owns the listening sockets, supervises, replaces, reloads.

One supervisor thread waits on everything at once: each worker's channel, its pidfd, its
stdout and stderr pipes, a wake-up pipe (signals and calls from other threads) and the
nearest deadline (a silent heartbeat, a stop that ran out of grace, a restart held back, a
worker's ``min_uptime``). What a worker's exit means is decided in one place (``_on_exit``);
how many workers should run, in another (``_reconcile``): a worker that dies, hangs, is
recycled or belongs to the code before a reload stops counting, a replacement is forked,
and the one it replaces is asked to stop only once the replacement is ready (in a reload, up
for ``min_uptime`` too: new code that exits soon after ready must not cost the old workers).
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from .._errors import ChannelClosed, WaitTimeout, signal_name
from .._events import EventEmitter
from .._handles import Handle
from .._process import ChildProcess
from ._settings import (
    ENV_ID,
    ENV_SETTINGS,
    Address,
    ClusterError,
    Settings,
    bind,
    bound_address,
)
from ._starts import BOOT_FAILURES, BOOT_WINDOW, StartLimit

T = TypeVar("T")
EVENTS = ("fork", "online", "listening", "message", "disconnect", "exit", "error")
QUICK_GRACE = 1.0  # a worker told to stop quickly, or sent SIGABRT, is SIGKILLed after this long
# So a replacement starts in milliseconds. Not forkio.cluster itself: whether it is a worker is
# decided when it is imported, and a zygote that imported it would clone primaries.
# The rest is what importing forkio.cluster costs a worker (tens of ms otherwise).
DEFAULT_PRELOAD = ("asyncio", "concurrent.futures", "selectors", "faulthandler", "forkio._process")


class Worker(EventEmitter):
    """A worker as the primary sees it (Node's ``cluster.Worker``). Made by ``cluster.fork()``.

    ``id`` (1, 2, ... never reused), ``pid``, ``process`` (its ``forkio.ChildProcess``),
    ``state`` (``"starting"``, ``"online"``, ``"listening"``, ``"ready"``, ``"stopping"``,
    ``"dead"``), and after its exit ``exit_code`` / ``signal_code`` and
    ``exited_after_disconnect`` (True when the primary asked it to stop or kill it).
    """

    _events = ("online", "listening", "message", "disconnect", "exit", "error")

    def __init__(self, worker_id: int, process: ChildProcess, supervisor: Supervisor, generation: int) -> None:
        super().__init__()
        self.id = worker_id
        self.process = process
        self.pid = process.pid
        self.state = "starting"
        self.generation = generation
        self.exited_after_disconnect = False
        self.exit_code: int | None = None
        self.signal_code: str | None = None
        self._supervisor = supervisor
        self._ready = False
        self._ready_at = 0.0
        self._stable = False  # ready and still alive ``min_uptime`` later: its start worked
        self._asked = False  # the primary asked it to stop (or killed it on purpose)
        self._counted = True  # counts towards the number of workers to keep
        self._retiring = False  # to be stopped once enough replacements are ready
        self._kill_at: float | None = None
        self._last_beat: float | None = None
        self._partial: dict[int, bytes] = {}
        self._disconnected = False
        #: With ``reuse_port``: which of the primary's per-worker sockets this worker accepts on
        #: (a replacement, or its successor after a reload, gets the same one).
        self.slot = 0

    def send(self, message: Any, handle: Handle | None = None) -> None:
        """Send ``message`` (and optionally a socket or fd) to the worker; it reads ``forkio.parent``."""
        self.process.send(message, handle)

    def disconnect(self) -> None:
        """Ask the worker to stop gracefully: stop accepting, finish in-flight work, exit.

        While the cluster keeps a number of workers (``run()``, ``scale()``) it is replaced:
        lower the number with ``cluster.scale()`` to have one fewer.
        """
        self._supervisor.call(lambda: self._supervisor.stop_worker(self, quick=False))

    def kill(self, sig: int | str = signal.SIGTERM) -> None:
        """Send ``sig`` to the worker (SIGTERM: a graceful stop); ``exited_after_disconnect`` will be True.

        Replaced like a ``disconnect()``-ed worker while the cluster keeps a number of workers.
        """
        number = getattr(signal, sig) if isinstance(sig, str) else int(sig)
        self._supervisor.call(lambda: self._supervisor.kill_worker(self, number))

    def is_dead(self) -> bool:
        """True once the worker process has exited."""
        return self.state == "dead"

    def is_connected(self) -> bool:
        """True while the channel to the worker is open."""
        return self.process.connected

    def __repr__(self) -> str:
        return f"<forkio.cluster.Worker id={self.id} pid={self.pid} {self.state}>"


class Supervisor:
    """The primary's loop and state; one per process, running in its own thread."""

    def __init__(self, target: tuple[str, str, list[str]], settings: Settings, *, preload: Sequence[str] = (),
                 env: dict[str, str] | None = None, log: bool = True, libraries: Sequence[str] = ()) -> None:
        self.target_spec = target  # ("script" | "module", name, args): what each worker runs
        self.settings = settings
        # The zygote imports libraries (kept across reloads) and the user's preload (re-imported by a reload).
        self.preload = tuple(dict.fromkeys((*DEFAULT_PRELOAD, *libraries, *preload)))
        self.user_preload = tuple(preload)
        self.env = env
        self.log_enabled = log
        self.events = EventEmitter()
        self.events._events = EVENTS
        self.workers: dict[int, Worker] = {}
        self.sockets: dict[Address, socket.socket] = {}
        self._slot_sockets: dict[tuple[Address, int], socket.socket] = {}  # reuse_port: one per worker slot
        self.count: int | None = None  # workers to keep; None: only those forked by hand, no replacing
        self.exit_code = 0
        self.done = threading.Event()
        self._stopping: str | None = None  # "graceful" or "quick"
        self._next_id = 1
        self._generation = 0
        self._reloading = False
        self._reload_pending = False
        self._starts = StartLimit()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._calls: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._thread = threading.Thread(target=self._loop, name="forkio-cluster-primary", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ calls from any thread
    def call(self, job: Callable[[], T]) -> T:
        """Run ``job`` in the supervisor thread (at once when already there) and return its result."""
        if threading.current_thread() is self._thread:
            return job()
        if self.done.is_set():
            raise ClusterError("the cluster has stopped")
        future: Future[T] = Future()
        self._calls.append((job, future))
        self.wake()
        return future.result()

    def wake(self) -> None:
        """Make the loop look at its queues (safe from signal handlers)."""
        try:
            os.write(self._wake_w, b"!")
        except (BlockingIOError, OSError):
            pass  # already awake, or closed at the end

    def log(self, text: str) -> None:
        if self.log_enabled:
            sys.stderr.write(f"forkio cluster: {text}\n")
            sys.stderr.flush()

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        try:
            while not (self._stopping and not self.workers):
                now = time.monotonic()
                deadline = self._next_deadline()
                timeout = None if deadline is None else max(0.0, deadline - now)
                for key, _ in self._selector.select(timeout):
                    if key.data is None:
                        self._drain_wake()
                    else:
                        key.data()
                self._check_deadlines()
        except BaseException as exc:  # a bug here must not leave workers unsupervised
            import traceback

            traceback.print_exc()
            self.exit_code = self.exit_code or 1
            for worker in list(self.workers.values()):
                worker.process.kill(signal.SIGKILL)
            raise SystemExit(1) from exc
        finally:
            self._finish()

    def _finish(self) -> None:
        for worker in list(self.workers.values()):
            if worker.process.returncode is None:
                worker.process.kill(signal.SIGKILL)
            worker.process.close(0)
        for sock in self._slot_sockets.values():
            sock.close()
        for address, sock in self.sockets.items():
            sock.close()
            if address[0] == "unix":
                try:
                    os.unlink(address[1])
                except OSError:
                    pass
        self._selector.close()
        os.close(self._wake_r)
        while self._calls:
            _job, future = self._calls.popleft()
            future.set_exception(ClusterError("the cluster has stopped"))
        self.done.set()

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while self._calls:
            job, future = self._calls.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(job())
                except BaseException as exc:
                    future.set_exception(exc)

    def _next_deadline(self) -> float | None:
        times = [] if self._starts.hold_until is None else [self._starts.hold_until]
        timeout = self.settings.timeout
        for worker in self.workers.values():
            if worker._ready and not worker._stable:
                times.append(worker._ready_at + self.settings.min_uptime)
            if worker._kill_at is not None:
                times.append(worker._kill_at)
            elif timeout is not None and worker._last_beat is not None:
                times.append(worker._last_beat + timeout)
        return min(times) if times else None

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        timeout = self.settings.timeout
        if self._starts.hold_until is not None and not self._starts.held(now):
            self._reconcile()
        for worker in list(self.workers.values()):
            if worker._ready and not worker._stable and now >= worker._ready_at + self.settings.min_uptime:
                self._on_stable(worker)
            if worker._kill_at is not None:
                if now >= worker._kill_at:
                    worker._kill_at = None
                    worker._last_beat = None  # dead in a moment: not a hang to report again
                    worker.process.kill(signal.SIGKILL)
            elif timeout is not None and worker._last_beat is not None and now - worker._last_beat >= timeout:
                self.log(f"worker {worker.id} (pid {worker.pid}) event loop silent for {timeout:g} s: "
                         "SIGABRT (traceback below), replacing it")
                worker._counted = False
                worker.state = "stopping"
                worker._kill_at = now + QUICK_GRACE
                worker.process.kill(signal.SIGABRT)
                self._reconcile()

    # ------------------------------------------------------------------ workers
    def fork(self, env: dict[str, str] | None = None) -> Worker:
        """Start one worker (in the supervisor thread)."""
        import forkio

        if self._stopping:
            raise ClusterError("the cluster is stopping")
        worker_id = self._next_id
        self._next_id += 1
        child_env = dict(os.environ)
        child_env.update(self.env or {})
        child_env.update(env or {})
        child_env[ENV_ID] = str(worker_id)
        child_env[ENV_SETTINGS] = self.settings.to_env()
        kind, name, args = self.target_spec
        if kind == "module":
            process = forkio.fork(module=name, args=args, env=child_env, stdio="pipe", preload=self.preload)
        else:
            process = forkio.fork(name, args, env=child_env, stdio="pipe", preload=self.preload)
        if process.stdin is not None:
            process.stdin.close()
        worker = Worker(worker_id, process, self, self._generation)
        taken = {w.slot for w in self.workers.values() if w._counted}
        worker.slot = min(set(range(len(taken) + 1)) - taken)
        process.channel.on_control = lambda message, fds: self._on_control(worker, message, fds)
        self.workers[worker_id] = worker
        self._selector.register(process.channel.fd, selectors.EVENT_READ, lambda: self._on_channel(worker))
        self._selector.register(process.sentinel, selectors.EVENT_READ, lambda: self._on_exit(worker))
        for stream, out in ((process.stdout, sys.stdout), (process.stderr, sys.stderr)):
            if stream is not None:
                fd = stream.fileno()
                os.set_blocking(fd, False)
                self._selector.register(fd, selectors.EVENT_READ,
                                        lambda fd=fd, out=out: self._on_output(worker, fd, out))
        self.log(f"worker {worker_id} (pid {worker.pid}) started")
        self.events.emit("fork", worker)
        return worker

    def stop_worker(self, worker: Worker, *, quick: bool) -> None:
        """Ask ``worker`` to stop (it is not replaced); SIGKILL if it is still there after the grace."""
        if worker.state == "dead":
            return
        grace = QUICK_GRACE if quick else self.settings.graceful_timeout
        sooner = worker._kill_at is not None and worker._kill_at <= time.monotonic() + grace
        if worker._asked and (not quick or sooner):  # asked already, with no less grace
            return
        worker._asked = True
        worker._counted = False
        worker.state = "stopping"
        worker._kill_at = time.monotonic() + grace
        try:
            worker.process.channel.send_control({"op": "stop", "quick": quick})
        except ChannelClosed:
            worker.process.kill(signal.SIGTERM)

    def kill_worker(self, worker: Worker, sig: int) -> None:
        if worker.state == "dead":
            return
        worker._asked = True
        worker._counted = False
        worker.state = "stopping"
        if sig == signal.SIGTERM:
            worker._kill_at = time.monotonic() + self.settings.graceful_timeout
        worker.process.kill(sig)

    def _on_control(self, worker: Worker, message: dict[str, Any], fds: list[int]) -> None:
        for fd in fds:  # workers send no fds with control messages
            os.close(fd)
        op = message.get("op")
        if op == "beat":
            worker._last_beat = None if message.get("off") else time.monotonic()
        elif op == "online":
            if worker.state == "starting":
                worker.state = "online"
            self.events.emit("online", worker)
            worker.emit("online")
        elif op == "listen":
            self._listen_for(worker, tuple(message["address"]))
        elif op == "listening":
            address = tuple(message["address"])
            if worker.state in ("starting", "online"):
                worker.state = "listening"
            self.events.emit("listening", worker, address)
            worker.emit("listening", address)
            if not self.settings.wait_ready:
                self._on_ready(worker)
        elif op == "ready":
            self._on_ready(worker)
        elif op == "recycle" and worker._counted:
            self.log(f"worker {worker.id} (pid {worker.pid}) asked to be recycled")
            worker._counted = False
            worker._retiring = True
            self._reconcile()

    def _listen_for(self, worker: Worker, address: Address) -> None:
        try:
            sock = self.listen(address)  # port 0: later requests find it under its real port too
            if self.settings.reuse_port and address[0] == "tcp":
                sock = self._slot_socket(bound_address(sock), worker.slot)
        except OSError as exc:
            reply: dict[str, Any] = {"op": "listen", "ok": False, "error": str(exc), "errno": exc.errno}
            fds: list[int] = []
        else:
            reply, fds = {"op": "listen", "ok": True}, [sock.fileno()]
        try:
            worker.process.channel.send_control(reply, fds)
        except ChannelClosed:
            pass

    def _on_ready(self, worker: Worker) -> None:
        if worker._ready:
            return
        worker._ready = True
        worker._ready_at = time.monotonic()
        if worker.state in ("starting", "online", "listening"):
            worker.state = "ready"
        if self.settings.min_uptime <= 0:
            self._on_stable(worker)
        else:
            self._retire_replaced()

    def _on_stable(self, worker: Worker) -> None:
        """``worker`` stayed up ``min_uptime`` after ready: its start worked."""
        worker._stable = True
        self._starts.stable()
        self._retire_replaced()

    def _on_channel(self, worker: Worker) -> None:
        channel = worker.process.channel
        if channel.connected:
            channel.read_available()
        while True:
            try:
                message, handle = channel.recv(0, with_handle=True)
            except (WaitTimeout, ChannelClosed):
                break
            except Exception as exc:  # a message that failed to decode: the channel goes on
                self.events.emit("error", exc)
                continue
            self.events.emit("message", worker, message, *(() if handle is None else (handle,)))
            worker.emit("message", message, *(() if handle is None else (handle,)))
        if not channel.connected and not worker._disconnected:
            worker._disconnected = True
            self._selector.unregister(channel.fd)
            self.events.emit("disconnect", worker)
            worker.emit("disconnect")

    def _on_output(self, worker: Worker, fd: int, out: Any) -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        prefix = f"[worker {worker.id} pid {worker.pid}] ".encode()
        text = worker._partial.pop(fd, b"") + data
        lines = text.split(b"\n")
        rest = lines.pop()
        if not data:  # EOF: the last line even without its newline
            self._selector.unregister(fd)
            if rest:
                lines.append(rest)
        elif rest:
            worker._partial[fd] = rest
        if lines:
            try:
                out.flush()
                out.buffer.write(b"".join(prefix + line + b"\n" for line in lines))
                out.buffer.flush()
            except (AttributeError, OSError, ValueError):
                pass  # no stdout/stderr to relay to (closed, or None): the lines are dropped

    def _on_exit(self, worker: Worker) -> None:
        process = worker.process
        code = process.wait()
        self._selector.unregister(process.sentinel)
        for stream, out in ((process.stdout, sys.stdout), (process.stderr, sys.stderr)):
            if stream is not None and stream.fileno() in self._selector.get_map():
                self._on_output(worker, stream.fileno(), out)  # what it wrote last
                if stream.fileno() in self._selector.get_map():
                    self._selector.unregister(stream.fileno())
        while worker.process.channel.connected and worker.process.channel.read_available():
            pass  # every message it sent before exiting, before its exit
        self._on_channel(worker)
        if not worker._disconnected:
            worker._disconnected = True
            self._selector.unregister(process.channel.fd)
        process.close(0)
        del self.workers[worker.id]
        worker.state = "dead"
        worker.exited_after_disconnect = worker._asked
        worker.exit_code = code if code >= 0 else None
        worker.signal_code = signal_name(-code) if code < 0 else None
        how = f"exit code {code}" if code >= 0 else f"killed by {worker.signal_code}"
        # Whatever its exit code: a worker that exits soon after ready (or before) did not start well.
        unstable = not worker._asked and not worker._stable
        if worker._asked:
            why = "asked"
        elif not worker._ready:
            why = "at boot"
        elif unstable:
            how += f", {time.monotonic() - worker._ready_at:.2f} s after ready"
            why = "unstable start"
        else:
            why = "unexpected"
        crash_loop, delay = False, 0.0
        if unstable:
            restarting = self.count is not None and not self._stopping
            crash_loop, delay = self._starts.unstable(time.monotonic(), restarting=restarting)
        self.log(f"worker {worker.id} (pid {worker.pid}) exited: {how} ({why})" + (
            f"; next start in {delay:g} s ({self._starts.in_a_row} unstable starts in a row)" if delay else ""))
        self.events.emit("exit", worker, worker.exit_code, worker.signal_code)
        worker.emit("exit", worker.exit_code, worker.signal_code)
        if crash_loop:
            self._crash_loop(how)
            return
        self._reconcile()
        self._retire_replaced()
        self._close_unused_slots()

    def _crash_loop(self, how: str) -> None:
        """Workers cannot start (or stay up): back to the old workers during a reload, else stop."""
        old = [w for w in self.workers.values() if w._retiring and not w._asked]
        if old:  # a reload whose new code cannot start (or stay up): keep the old workers serving
            self.log(f"reload failed: new workers died at boot or soon after {BOOT_FAILURES} times in "
                     f"{BOOT_WINDOW:g} s (last: {how}); the previous workers keep serving")
            for w in list(self.workers.values()):
                if w._counted and not w._asked:  # the new code's workers, ready or not
                    self.kill_worker(w, signal.SIGKILL)
            for w in old:
                w._retiring = False
                w._counted = True
            self._reloading = False
            return
        print(f"forkio cluster: workers died at boot or soon after {BOOT_FAILURES} times in {BOOT_WINDOW:g} s "
              f"(last: {how}); stopping", file=sys.stderr, flush=True)
        self.exit_code = 1
        self.stop(quick=True)

    def _reconcile(self) -> None:
        """Fork or stop workers until the counted ones are ``count``."""
        if self.count is None or self._stopping:
            return
        counted = [w for w in self.workers.values() if w._counted]
        held = self._starts.held(time.monotonic())
        for _ in range(0 if held else self.count - len(counted)):  # held back: _check_deadlines comes back
            try:
                self.fork()
            except Exception as exc:  # a preload that fails, no processes left...: say it in one line
                print(f"forkio cluster: cannot start a worker: {type(exc).__name__}: {exc}; stopping",
                      file=sys.stderr, flush=True)
                self.exit_code = 1
                self.stop(quick=True)
                return
        if len(counted) > self.count:
            # Fewer workers: the ones not ready yet go first, then the newest.
            extra = sorted(counted, key=lambda w: (w._ready, -w.id))[: len(counted) - self.count]
            for worker in extra:
                self.stop_worker(worker, quick=False)

    def _retire_replaced(self) -> None:
        """Once enough replacements are ready, ask the workers they replace to stop.

        During a reload, ready means up for ``min_uptime`` too: new code that exits soon after
        ready must find the old workers still there to go back to. A recycle replaces a worker
        with the same code, at once (waiting would pile up workers that recycle quickly)."""
        retiring = [w for w in self.workers.values() if w._retiring and not w._asked]
        ready = [w for w in self.workers.values() if w._counted and (w._stable if self._reloading else w._ready)]
        if retiring and (self.count is None or len(ready) >= self.count):
            for worker in retiring:
                self.stop_worker(worker, quick=False)
            retiring = []
        if self._reloading and not retiring:
            self._reloading = False
            self.log("reload done: " + ", ".join(f"worker {w.id} (pid {w.pid})" for w in ready) + " serving")
            if self._reload_pending:
                self._reload_pending = False
                self.reload()

    # ------------------------------------------------------------------ cluster operations
    def set_count(self, count: int) -> None:
        if count < 0:
            raise ValueError(f"the number of workers must be >= 0, not {count}")
        self.count = count
        self._reconcile()

    def reload(self) -> None:
        """Fork a new generation with fresh code; stop the old one once the new one is ready."""
        if self._stopping:
            return
        if self._reloading:
            self._reload_pending = True
            return
        if self.user_preload:
            from .. import _zygote

            _zygote.retire(self.preload)  # the next zygote imports the preloaded modules afresh
        self._generation += 1
        old = [w for w in self.workers.values() if w._counted]
        self.log(f"reload: replacing {len(old)} worker(s)")
        self._reloading = True
        if self.count is None:
            self.count = len(old)
        for worker in old:
            worker._counted = False
            worker._retiring = True
        self._reconcile()
        self._retire_replaced()

    def stop(self, *, quick: bool) -> None:
        """Stop every worker (gracefully, or at once) and end the loop once they are gone."""
        if self._stopping == "quick" or (self._stopping and not quick):
            return
        self._stopping = "quick" if quick else "graceful"
        self.log(f"stopping {len(self.workers)} worker(s) {'now' if quick else 'gracefully'}")
        for worker in list(self.workers.values()):
            self.stop_worker(worker, quick=quick)

    def broadcast(self, message: Any) -> None:
        for worker in list(self.workers.values()):
            if worker.state != "dead":
                try:
                    worker.send(message)
                except ChannelClosed:
                    pass

    def listen(self, address: Address) -> socket.socket:
        """The primary's own socket for ``address`` (bound now if it is not yet).

        With ``reuse_port`` it is bound but not listening: it holds the port (and says early
        that it is taken) while each worker listens on its own socket.
        """
        sock = self.sockets.get(address)
        if sock is None:
            own = self.settings.reuse_port and address[0] == "tcp"
            sock = bind(address, reuse_port=own, listen=not own)
            self.sockets[address] = sock
            self.sockets.setdefault(bound_address(sock), sock)
        return sock

    def _slot_socket(self, address: Address, slot: int) -> socket.socket:
        """``reuse_port``: the listening socket of worker slot ``slot``, made on first use.

        The kernel spreads new connections over the slots' sockets. The primary keeps each one
        for as long as the slot exists, so a restart or a reload hands the same socket (and
        the connections queued on it) to the next worker of the slot: nothing is reset.
        """
        sock = self._slot_sockets.get((address, slot))
        if sock is None:
            sock = bind(address, reuse_port=True)
            self._slot_sockets[(address, slot)] = sock
        return sock

    def _close_unused_slots(self) -> None:
        """After a scale-down: close the sockets of slots no worker uses any more."""
        used = {w.slot for w in self.workers.values()}
        for key in [k for k in self._slot_sockets if k[1] not in used and k[1] >= (self.count or 0)]:
            self._slot_sockets.pop(key).close()
