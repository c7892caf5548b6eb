"""A ``forkio serve`` worker: uvicorn on the sockets the primary hands over.

uvicorn's own signal handling is switched off: the primary decides (a graceful stop arrives as
a control message: this worker stops accepting, closes its connections after their next
response, then uvicorn finishes what is in flight). Heartbeats come from uvicorn's event loop;
``max_requests`` asks the primary for a replacement first, so recycling never leaves fewer
workers serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Iterator
from typing import Any

import uvicorn

from . import _side, listen, ready, recycle
from ._worker import settle_accepts, stop_accepting


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handlers, recycling through the primary."""

    max_requests: int | None = None
    _recycling = False

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[Any] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            ready()  # after the app's lifespan startup: a reload waits for this, not for listen()

    async def on_tick(self, counter: int) -> bool:
        if (self.max_requests is not None and not self._recycling
                and self.server_state.total_requests >= self.max_requests):
            self._recycling = True
            recycle()
        return await super().on_tick(counter)


class _Closing:
    """The app, wrapped: once the worker drains, each response says ``Connection: close``."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.draining = False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if not self.draining or scope["type"] != "http":
            return await self.app(scope, receive, send)  # type: ignore[no-any-return]

        async def send_closing(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
            await send(message)

        return await self.app(scope, receive, send_closing)  # type: ignore[no-any-return]


async def _stop_gracefully(server: _Server, app: _Closing, drain_for: float) -> None:
    """Stop accepting here, let each connection's next response close it, then stop uvicorn.

    uvicorn's shutdown closes every connection without a request in progress: an idle
    keep-alive connection whose client is sending its next request at that moment, or one
    accepted a moment ago whose request is not read yet, would fail. So accepting stops first
    (the other workers take the new connections), each connection's next response carries
    ``Connection: close`` (its client reconnects, to a worker that is staying), and uvicorn's
    own shutdown starts once no connection is left or after ``drain_for`` seconds (the
    keep-alive timeout: a connection idle that long could have been closed anyway).
    """
    loop = asyncio.get_running_loop()
    for listening in getattr(server, "servers", ()):
        stop_accepting(listening)  # this process only: the socket stays open, the others keep accepting
    app.draining = True
    await settle_accepts()  # a connection accepted a moment ago is counted before the wait below
    deadline = loop.time() + drain_for
    while server.server_state.connections and loop.time() < deadline:
        await asyncio.sleep(0.01)
    server.should_exit = True


def main() -> None:
    if _side is None:
        raise SystemExit("forkio.cluster._serve runs as a worker of `forkio serve`")
    settings = _side.settings
    options = settings.options
    sockets = [listen(f"unix:{b[1]}" if b[0] == "unix" else (b[1], int(b[2]))) for b in settings.binds]
    config = uvicorn.Config(options["app"], interface="asgi3" if options["interface"] == "asgi" else "wsgi",
                            access_log=bool(options.get("access_log")), lifespan="auto",
                            timeout_graceful_shutdown=int(settings.graceful_timeout) or None)
    config.load()
    app = _Closing(config.loaded_app)
    config.loaded_app = app
    server = _Server(config)
    if settings.max_requests is not None:
        server.max_requests = settings.max_requests + random.randint(0, settings.max_requests_jitter)
    side = _side

    tasks: set[asyncio.Task[None]] = set()

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        side.attach_loop(loop)

        def stop() -> None:
            drain_for = min(float(config.timeout_keep_alive), settings.graceful_timeout)
            loop.call_soon_threadsafe(lambda: tasks.add(loop.create_task(_stop_gracefully(server, app, drain_for))))

        side.stop_hooks.append(stop)
        await server.serve(sockets=sockets)

    factory: Any = config.get_loop_factory()  # uvloop when installed, as uvicorn would choose
    loop = factory() if factory is not None else asyncio.new_event_loop()
    try:
        loop.run_until_complete(serve())
    finally:
        loop.close()


if __name__ == "__main__":
    main()
