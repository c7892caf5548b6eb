"""A cluster worker's side: its link to the primary, ``listen``, heartbeats, ``ready`` and stopping.

The primary's control messages (socket replies, stop requests) arrive on the same channel as
the user's messages, as control frames: a watcher thread reads the channel so that they are
handled even while nobody calls ``forkio.parent.recv()``; the user's messages wait in the
channel's inbox for ``forkio.parent`` as in any forked child. The same thread sees the
channel end when the primary dies, and then exits the worker at once.

Heartbeats come from the worker's event loop (a timer on it), never from a side thread: a
loop that stops turning stops them, and the primary kills the worker.
"""

from __future__ import annotations

import faulthandler
import gc
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from .._channel import Channel
from .._errors import ChannelClosed
from ._settings import Address, ClusterError, Settings, bound_address

LISTEN_TIMEOUT = 30.0


class WorkerSide:
    """This process as a cluster worker (one per worker process, made when ``forkio.cluster`` is imported)."""

    def __init__(self, worker_id: int, settings: Settings) -> None:
        from .._parent import parent

        self.id = worker_id
        self.settings = settings
        self.channel: Channel = parent.channel
        self.stopping = threading.Event()
        self.listened: list[socket.socket] = []
        #: Called (from any thread) when the primary asks for a graceful stop; when there are
        #: none, the worker finds and closes the servers that serve its cluster sockets.
        self.stop_hooks: list[Callable[[], None]] = []
        self._replies: queue.SimpleQueue[tuple[dict[str, Any], list[int]]] = queue.SimpleQueue()
        self._listen_lock = threading.Lock()
        self._last_beat = 0.0
        self._loops: set[int] = set()
        self._tasks: set[Any] = set()
        self._ready_sent = False
        self._interrupting = False  # our own interrupt_main(), not a Ctrl-C from the terminal
        self._closing_elsewise = 0  # servers of a loop whose close() leaves serve_forever() waiting (uvloop)
        self.channel.on_control = self._on_control
        faulthandler.enable(all_threads=True)  # SIGABRT from the primary on a hang prints where
        if hasattr(sys.stdout, "reconfigure"):
            sys.stdout.reconfigure(line_buffering=True)  # the primary relays lines: no long delays
        if threading.current_thread() is threading.main_thread():
            # Ctrl-C and SIGQUIT reach the whole process group: the primary decides what they mean.
            signal.signal(signal.SIGINT, self._on_sigint)
            signal.signal(signal.SIGQUIT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, self._on_sigterm)
        self._install_loop_hook()
        threading.Thread(target=self._watch, name="forkio-cluster-worker", daemon=True).start()
        self._control({"op": "online"})

    # ------------------------------------------------------------------ channel
    def _control(self, message: dict[str, Any], fds: list[int] = ()) -> None:  # type: ignore[assignment]
        try:
            self.channel.send_control(message, fds)
        except ChannelClosed:
            pass  # the primary is gone: the watcher exits this process

    def _watch(self) -> None:
        channel = self.channel
        while channel.connected:
            try:
                channel.fill()
            except Exception:  # a decode error is the reader's to report; the channel goes on
                continue
        if channel.ended:  # the primary died (or closed us off): no orphans, now
            _flush()
            os._exit(0 if self.stopping.is_set() else 1)

    def _on_control(self, message: dict[str, Any], fds: list[int]) -> None:
        op = message.get("op")
        if op == "listen":
            self._replies.put((message, fds))
        elif op == "stop":
            self.stop(quick=bool(message.get("quick")))

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._interrupting:
            raise KeyboardInterrupt

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if not self.channel.connected:  # the primary is gone (PR_SET_PDEATHSIG): do not linger
            _flush()
            os._exit(0)
        self.stop(quick=False)

    # ------------------------------------------------------------------ public operations
    def listen(self, address: Address) -> socket.socket:
        """A listening socket for ``address`` from the primary: the shared one, or this worker slot's."""
        with self._listen_lock:
            self._control({"op": "listen", "address": address})
            try:
                reply, fds = self._replies.get(timeout=LISTEN_TIMEOUT)
            except queue.Empty:
                raise ClusterError(f"the primary did not answer a listen request within {LISTEN_TIMEOUT} s") \
                    from None
        if not reply.get("ok") or not fds:
            for fd in fds:
                os.close(fd)
            raise OSError(reply.get("errno") or 0, f"cannot listen on {address}: {reply.get('error')}")
        sock = socket.socket(fileno=fds[0])
        for fd in fds[1:]:
            os.close(fd)
        self.listened.append(sock)
        self._control({"op": "listening", "address": bound_address(sock)})
        return sock

    def ready(self) -> None:
        if not self._ready_sent:
            self._ready_sent = True
            self._control({"op": "ready"})

    def recycle(self) -> None:
        self._control({"op": "recycle"})

    def heartbeat(self) -> None:
        interval = self.settings.beat_interval
        now = time.monotonic()
        if interval is not None and now - self._last_beat >= interval:
            self._last_beat = now
            self._control({"op": "beat"})

    # ------------------------------------------------------------------ event loops
    def _install_loop_hook(self) -> None:
        """Heartbeats from every asyncio loop the main thread makes (``asyncio.run`` included)."""
        if sys.version_info >= (3, 14):  # policies are deprecated there: loops call attach_loop
            return
        import asyncio

        side = self
        base: Any = type(asyncio.get_event_loop_policy())

        class _Policy(base):  # type: ignore[misc]
            def new_event_loop(self) -> asyncio.AbstractEventLoop:
                loop: asyncio.AbstractEventLoop = super().new_event_loop()
                if threading.current_thread() is threading.main_thread():
                    side.attach_loop(loop)
                return loop

        asyncio.set_event_loop_policy(_Policy())

    def attach_loop(self, loop: Any) -> None:
        """Send heartbeats from ``loop`` while it runs (stopping when it closes)."""
        interval = self.settings.beat_interval
        if interval is None or id(loop) in self._loops:
            return
        self._loops.add(id(loop))

        def beat() -> None:
            self._last_beat = time.monotonic()
            self._control({"op": "beat"})
            if not loop.is_closed():
                loop.call_later(interval, beat)

        loop.call_soon(beat)
        close = loop.close

        def closing() -> None:
            self._loops.discard(id(loop))
            self._control({"op": "beat", "off": True})  # a loop that ends is not a loop that hangs
            close()

        try:
            loop.close = closing
        except AttributeError:  # a loop class without instance attributes (uvloop): beats just stop
            pass

    # ------------------------------------------------------------------ stopping
    def stop(self, *, quick: bool) -> None:
        """Stop now (``quick``), or stop accepting, finish what is in flight and let ``serve`` return."""
        if quick:
            _flush()
            os._exit(0)
        if self.stopping.is_set():
            return
        self.stopping.set()
        if self.stop_hooks:
            for hook in list(self.stop_hooks):
                hook()
        elif not self._close_servers():
            # No server we know (or not serving yet): stop the main thread; run() expects it.
            self._interrupt_main()

    def _interrupt_main(self) -> None:
        import _thread

        self._interrupting = True
        _thread.interrupt_main()

    def _close_servers(self) -> bool:
        """Drain and close the asyncio servers (uvloop's too) and socketservers serving our sockets;
        False if none."""
        fds = {sock.fileno() for sock in self.listened}
        if not fds:
            return False
        aio = sys.modules.get("asyncio")
        socketserver = sys.modules.get("socketserver")
        uvloop = sys.modules.get("uvloop.loop")
        servers = tuple(kind for kind in (aio and aio.base_events.Server, uvloop and uvloop.Server) if kind)
        found = False
        for obj in gc.get_objects():
            if servers and isinstance(obj, servers):
                if any(s.fileno() in fds for s in obj.sockets):
                    obj.get_loop().call_soon_threadsafe(self._drain, obj)
                    found = True
            elif socketserver is not None and isinstance(obj, socketserver.BaseServer):
                sock = getattr(obj, "socket", None)
                if sock is not None and sock.fileno() in fds:
                    threading.Thread(target=obj.shutdown, daemon=True).start()
                    found = True
        return found

    def _drain(self, server: Any) -> None:
        """In the server's loop: stop accepting here, wait for its connections, then close it."""
        import asyncio

        if not isinstance(server.get_loop(), asyncio.selector_events.BaseSelectorEventLoop):
            self._closing_elsewise += 1
            task = server.get_loop().create_task(self._drain_elsewise(server))
        else:
            stop_accepting(server)

            async def drain() -> None:
                await settle_accepts()
                while getattr(server, "_active_count", 0) > 0:
                    await asyncio.sleep(0.02)
                server.close()  # and serve_forever() returns

            task = server.get_loop().create_task(drain())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain_elsewise(self, server: Any) -> None:
        """``_drain`` on a loop of another kind (uvloop): its ``close()`` stops accepting and its
        ``wait_closed()`` waits for the connections, if it was waiting before the close (after, it
        returns at once). That close leaves ``serve_forever()`` waiting for good, so once every such
        server is done the main thread is stopped, as for a server of unknown kind (run() expects it)."""
        import asyncio

        closed = asyncio.ensure_future(server.wait_closed())
        await asyncio.sleep(0)  # it waits now
        stop_accepting(server)
        await closed
        self._closing_elsewise -= 1
        if not self._closing_elsewise:  # from a callback, not this task: no "exception never retrieved"
            asyncio.get_running_loop().call_soon(self._interrupt_main)

    def run(self, serve: Callable[[], Any]) -> None:
        """A worker's part of ``cluster.run``: call ``serve`` (run it if it is a coroutine function)."""
        import inspect

        if self.stopping.is_set():  # asked to stop while it was booting
            return
        try:
            if inspect.iscoroutinefunction(serve):
                import asyncio

                asyncio.run(serve())
            else:
                result = serve()
                if inspect.iscoroutine(result):
                    import asyncio

                    asyncio.run(result)
        except BaseException:
            if not self.stopping.is_set():
                raise
            # Closing a server ends serve_forever() with CancelledError: asked for, not a failure.


def stop_accepting(server: Any) -> None:
    """In ``server``'s loop: this process stops accepting on its sockets, which stay open.

    Not ``server.close()`` yet: asyncio accepts a connection in one loop turn and makes its
    transport in a later one, and a server closed in between refuses it (``Server._attach``
    asserts, and the error is swallowed): the connection is dropped with its request unread,
    and its client sees a reset. Removing the readers stops new accepts while the ones under
    way still find their server. A loop of another kind (uvloop) accepts in its own way, with
    no readers to remove: its servers are closed.
    """
    import asyncio

    loop = server.get_loop()
    if isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop):
        for sock in server.sockets:
            loop.remove_reader(sock.fileno())  # only this process stops accepting: the socket stays open
    else:
        server.close()


async def settle_accepts() -> None:
    """Let connections accepted just before ``stop_accepting`` reach their protocol.

    A transport is made one loop turn after its accept, and its ``connection_made`` runs one
    turn later: only then do the servers count it (``_active_count``, uvicorn's connections).
    """
    import asyncio

    for _ in range(4):
        await asyncio.sleep(0)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
