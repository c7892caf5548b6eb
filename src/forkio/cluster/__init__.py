"""``forkio.cluster``: run any Python server on every core, Node's ``cluster`` style.

One script runs as the primary and as each worker::

    from forkio import cluster

    def serve():                                     # runs in each worker
        sock = cluster.listen(("127.0.0.1", 8000))   # the primary binds once and hands the socket over
        ...                                          # asyncio.start_server(sock=sock), http.server...

    if __name__ == "__main__":
        cluster.run(serve, workers=4)                # primary: fork, supervise, restart, reload

The primary owns the listening sockets for its whole life, replaces a worker that dies,
kills one whose event loop stops answering (SIGABRT first: its traceback is logged), reloads
with fresh code without dropping a request (SIGHUP or ``reload()``), and stops gracefully on
SIGTERM, quickly on SIGINT/SIGQUIT. SIGTTIN/SIGTTOU add or remove a worker. When the primary
dies, even by SIGKILL, its workers exit at once. See docs/cluster.md.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from .._events import Listener
from ._primary import EVENTS, Supervisor, Worker
from ._settings import (
    ENV_ID,
    ENV_SETTINGS,
    MIN_UPTIME,
    REUSE_PORT_DEFAULT,
    AddressLike,
    ClusterError,
    Settings,
    parse_address,
)
from ._worker import WorkerSide

__all__ = [
    "ClusterError",
    "Worker",
    "broadcast",
    "fork",
    "heartbeat",
    "is_primary",
    "is_worker",
    "listen",
    "on",
    "ready",
    "recycle",
    "reload",
    "run",
    "scale",
    "setup_primary",
    "worker",
    "workers",
]

_id_text = os.environ.pop(ENV_ID, None)
_settings_text = os.environ.pop(ENV_SETTINGS, None)

#: True in a worker started by a cluster's primary.
is_worker: bool = _id_text is not None
#: True in the primary (any process that is not a cluster worker).
is_primary: bool = not is_worker
#: In a worker: its id (1, 2, ...); None in the primary.
worker: int | None = int(_id_text) if _id_text is not None else None
#: In the primary: the live workers by id (updated as they come and go); empty in a worker.
workers: dict[int, Worker] = {}

_side: WorkerSide | None = WorkerSide(int(_id_text), Settings.from_env(_settings_text)) if _id_text else None
_supervisor: Supervisor | None = None
_supervisor_lock = threading.Lock()
_early_listeners: list[tuple[str, Listener]] = []
_defaults: dict[str, Any] = {}  # what `forkio cluster --workers ...` says, over the script's run() arguments


def _primary(settings: Settings | None = None, target: tuple[str, str, list[str]] | None = None,
             preload: Sequence[str] = (), env: dict[str, str] | None = None, log: bool = True,
             libraries: Sequence[str] = ()) -> Supervisor:
    """The supervisor, started on first use; settings given before the first worker is forked apply."""
    global _supervisor
    if _side is not None:
        raise ClusterError("this is a cluster worker: only the primary forks and supervises workers")
    with _supervisor_lock:
        if _supervisor is None or _supervisor.done.is_set():
            _supervisor = Supervisor(target or _this_program(), settings or Settings(), preload=preload, env=env,
                                     log=log, libraries=libraries)
            _supervisor.workers = workers
            workers.clear()
            for event, callback in _early_listeners:
                _supervisor.events.on(event, callback)
        elif settings is not None and not _supervisor.workers:  # e.g. listen() in the primary, then run()
            _supervisor.settings = settings
        return _supervisor


def _this_program() -> tuple[str, str, list[str]]:
    """How to start this program again: the script or module ``__main__`` came from, and its arguments."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name and spec.name != "__main__":
        name = spec.name[: -len(".__main__")] if spec.name.endswith(".__main__") else spec.name
        return ("module", name, list(sys.argv[1:]))
    if not sys.argv or not sys.argv[0] or sys.argv[0] == "-c":
        raise ClusterError("cluster workers run this program again, but it has no script or module to run "
                           "(started with python -c or interactively)")
    return ("script", os.path.abspath(sys.argv[0]), list(sys.argv[1:]))


def run(serve: Callable[[], Any], *, workers: int | None = None, timeout: float | None = 30.0,
        graceful_timeout: float = 30.0, reuse_port: bool | None = None, wait_ready: bool = False,
        min_uptime: float = MIN_UPTIME, preload: Sequence[str] = (), env: dict[str, str] | None = None,
        log: bool = True) -> None:
    """In the primary: fork ``workers`` workers (default: one per CPU) and supervise them until stopped.

    In a worker: call ``serve()`` (an ``async def`` is run with ``asyncio.run``) and return when
    it does. The primary restarts workers that die, kills one whose event loop is silent for
    ``timeout`` s (None: never), gives a worker asked to stop ``graceful_timeout`` s, hands
    each worker slot its own ``SO_REUSEPORT`` socket (``reuse_port``, the default on Linux: it
    spreads connections more evenly) or all workers one shared socket, waits for
    ``cluster.ready()`` instead of the first ``listen`` with ``wait_ready``, and starts workers
    from a zygote with the ``preload`` modules imported (a reload starts a new one).
    Signals: SIGTERM stops gracefully, SIGINT/SIGQUIT at once, SIGHUP reloads, SIGTTIN/SIGTTOU
    add or remove a worker. A worker that dies unasked before it is ready or within
    ``min_uptime`` s after, whatever its exit code, is an unstable start: the next start waits
    longer each time, and 5 of them in 10 s stop the cluster (exit status 1) or, during a
    reload, abandon it for the previous workers.
    """
    if _side is not None:
        _side.run(serve)
        return
    given = {key: value for key, value in _defaults.items() if value is not None}
    workers = given.get("workers", workers)
    timeout = given.get("timeout", timeout)
    graceful_timeout = given.get("graceful_timeout", graceful_timeout)
    min_uptime = given.get("min_uptime", min_uptime)
    reuse_port = given.get("reuse_port", reuse_port)
    if reuse_port is None:
        reuse_port = REUSE_PORT_DEFAULT
    log = given.get("log", log)
    settings = Settings(timeout=timeout, graceful_timeout=graceful_timeout, reuse_port=reuse_port,
                        wait_ready=wait_ready, min_uptime=min_uptime)
    _supervise(settings, workers=workers, preload=preload, env=env, log=log)


def _supervise(settings: Settings, *, workers: int | None, target: tuple[str, str, list[str]] | None = None,
              preload: Sequence[str] = (), env: dict[str, str] | None = None, log: bool = True,
              binds: Sequence[Any] = (), libraries: Sequence[str] = ()) -> None:
    """The primary's part of ``run`` (and of ``forkio serve``): until the cluster stops."""
    count = (os.cpu_count() or 1) if workers is None else workers
    if count < 1:
        raise ValueError(f"workers must be >= 1, not {count}")
    supervisor = _primary(settings, target, preload, env, log, libraries)
    for address in binds:
        supervisor.call(functools.partial(supervisor.listen, address))
    restore = _handle_signals(supervisor) if threading.current_thread() is threading.main_thread() else {}
    try:
        supervisor.call(lambda: supervisor.set_count(count))
        while not supervisor.done.wait(1.0):
            pass
    finally:
        for signum, handler in restore.items():
            signal.signal(signum, handler)
    if supervisor.exit_code:
        raise SystemExit(supervisor.exit_code)


def _handle_signals(supervisor: Supervisor) -> dict[int, Any]:
    """Signal handlers that only queue what to do for the supervisor thread; the old ones, to restore."""
    def on_signal(signum: int, _frame: Any) -> None:
        supervisor._calls.append((functools.partial(_act, supervisor, signum), _NoFuture()))  # type: ignore[arg-type]
        supervisor.wake()

    restore = {}
    for name in ("SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP", "SIGTTIN", "SIGTTOU"):
        signum = getattr(signal, name, None)
        if signum is not None:
            restore[signum] = signal.signal(signum, on_signal)
    return restore


def _act(supervisor: Supervisor, signum: int) -> None:
    if signum == signal.SIGTERM:
        supervisor.stop(quick=False)
    elif signum in (signal.SIGINT, signal.SIGQUIT):
        supervisor.stop(quick=True)
    elif signum == signal.SIGHUP:
        supervisor.reload()
    elif signum == signal.SIGTTIN:
        supervisor.set_count((supervisor.count or len(supervisor.workers)) + 1)
        supervisor.log(f"SIGTTIN: {supervisor.count} worker(s)")
    elif signum == signal.SIGTTOU:
        supervisor.set_count(max(1, (supervisor.count or len(supervisor.workers)) - 1))
        supervisor.log(f"SIGTTOU: {supervisor.count} worker(s)")


class _NoFuture:
    """A stand-in future for signal-queued jobs: nobody waits for them."""

    def set_running_or_notify_cancel(self) -> bool:
        return True

    def set_result(self, result: Any) -> None:
        pass

    def set_exception(self, exc: BaseException) -> None:
        import traceback

        traceback.print_exception(exc)


# ---------------------------------------------------------------------- the lower level, Node style
def fork(env: dict[str, str] | None = None) -> Worker:
    """In the primary: start one more worker (running this program again) and return it.

    Once ``run()`` or ``scale()`` set a number of workers, a forked worker adds one to it
    (and is replaced when it dies); before, nothing is replaced, as in Node.
    """
    supervisor = _primary()

    def start() -> Worker:
        new = supervisor.fork(env)
        if supervisor.count is not None:
            supervisor.count += 1
        return new

    return supervisor.call(start)


def on(event: str, callback: Listener | None = None) -> Any:
    """In the primary: call ``callback`` on a cluster event (Node's names and arguments).

    ``fork(worker)``, ``online(worker)``, ``listening(worker, address)``, ``message(worker,
    message[, handle])``, ``disconnect(worker)``, ``exit(worker, exit_code, signal_name)`` (see
    ``worker.exited_after_disconnect``), ``error(exception)``. Callbacks run in the primary's
    supervisor thread, one at a time. Returns ``callback``; without one, a decorator. In a worker
    (the same script runs there) nothing is registered: it hears from the primary on ``forkio.parent``.
    """
    if callback is None:
        return lambda function: on(event, function)
    if event not in EVENTS:
        raise ValueError(f"unknown cluster event {event!r}; expected one of {', '.join(EVENTS)}")
    if _side is not None:  # as in Node, a worker may register them: they never fire there
        return callback
    if _supervisor is None:
        _early_listeners.append((event, callback))
    else:
        _supervisor.events.on(event, callback)
    return callback


def setup_primary(*, timeout: float | None = 30.0, graceful_timeout: float = 30.0, reuse_port: bool | None = None,
                  wait_ready: bool = False, min_uptime: float = MIN_UPTIME, preload: Sequence[str] = (),
                  env: dict[str, str] | None = None, log: bool = True) -> None:
    """In the primary, before the first ``fork()``: the settings ``run()`` takes (Node's ``setupPrimary``)."""
    if _side is not None:
        raise ClusterError("cluster.setup_primary() is for the primary")
    if _supervisor is not None and not _supervisor.done.is_set():
        raise ClusterError("cluster.setup_primary() must come before the first fork()")
    settings = Settings(timeout=timeout, graceful_timeout=graceful_timeout, wait_ready=wait_ready,
                        min_uptime=min_uptime, reuse_port=REUSE_PORT_DEFAULT if reuse_port is None else reuse_port)
    _primary(settings, None, preload, env, log)


def broadcast(message: Any) -> None:
    """In the primary: send ``message`` to every live worker."""
    supervisor = _primary()
    supervisor.call(lambda: supervisor.broadcast(message))


def reload() -> None:
    """In the primary: replace every worker with one running freshly imported code, dropping nothing."""
    supervisor = _primary()
    supervisor.call(supervisor.reload)


def scale(n: int) -> None:
    """In the primary: keep ``n`` workers (forking or gracefully stopping the difference)."""
    supervisor = _primary()
    supervisor.call(lambda: supervisor.set_count(n))


def listen(address: AddressLike) -> socket.socket:
    """A listening socket for ``address`` (``("host", port)``, ``"host:port"``, a port, ``"unix:PATH"``).

    In a worker the primary binds it and hands it over: one socket per worker slot with
    ``reuse_port`` (the default on Linux), one for all workers otherwise. The primary keeps
    it open for as long as it is used, so restarts and reloads never close it. In the primary:
    the primary's own socket (bound without listening, with ``reuse_port``).
    """
    parsed = parse_address(address)
    if _side is not None:
        return _side.listen(parsed)
    supervisor = _primary()
    return supervisor.call(lambda: supervisor.listen(parsed))


def ready() -> None:
    """In a worker: say it can take traffic (needed with ``wait_ready=True``; harmless otherwise)."""
    if _side is not None:
        _side.ready()


def heartbeat() -> None:
    """In a worker: say its loop is alive. Call it from a synchronous server's loop (cheap: it rate-limits).

    asyncio loops made in the worker's main thread send heartbeats by themselves. The primary
    watches a worker only once it has had one heartbeat from it.
    """
    if _side is not None:
        _side.heartbeat()


def recycle() -> None:
    """In a worker: ask to be replaced (a replacement starts, then this one is stopped gracefully)."""
    if _side is None:
        raise ClusterError("cluster.recycle() is for a worker")
    _side.recycle()
