"""A small asyncio HTTP service with a light endpoint and a CPU-heavy one.

    python server.py --mode forkio     # /heavy runs in a forkio.Pool: the event loop stays free
    python server.py --mode inline     # /heavy runs in the event loop: everything waits for it

Then ``curl 127.0.0.1:8080/light`` and ``curl '127.0.0.1:8080/heavy?n=60000'``. Listens on
127.0.0.1 only. Forked by load.py, it tells the parent its port and serves until the parent
disconnects.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
from typing import Any
from urllib.parse import parse_qs, urlsplit

from heavy import count_primes

import forkio

HEAVY_TIMEOUT = 10.0  # seconds: a heavy request stuck longer than this gets a 504 and its worker is replaced
MAX_N = 2_000_000  # bounds the work one request can ask for


class App:
    """The endpoints. ``mode`` says where /heavy runs: ``"forkio"`` (a pool) or ``"inline"``."""

    def __init__(self, mode: str, workers: int | None = None) -> None:
        self.mode = mode
        self.pool = forkio.Pool(workers) if mode == "forkio" else None
        self.heavy_running = 0  # /light reports it: inline, a light request is only ever answered at 0

    async def heavy(self, n: int) -> int:
        self.heavy_running += 1
        try:
            if self.pool is None:
                return count_primes(n)  # blocks the event loop, and with it every other request
            # If this request's task is cancelled (the server stops), the pool stops the computation too.
            return await self.pool.options(timeout=HEAVY_TIMEOUT).run(count_primes, n)  # type: ignore[no-any-return]
        finally:
            self.heavy_running -= 1

    async def route(self, path: str, query: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        if path == "/light":
            return 200, {"ok": True, "pid": os.getpid(), "heavy_running": self.heavy_running}
        if path == "/heavy":
            try:
                n = int(query.get("n", ["60000"])[0])
            except ValueError:
                return 400, {"error": "n must be an integer"}
            if not 0 < n <= MAX_N:
                return 400, {"error": f"n must be between 1 and {MAX_N}"}
            try:
                return 200, {"n": n, "primes": await self.heavy(n)}
            except forkio.TaskTimeout:
                return 504, {"error": f"took longer than {HEAVY_TIMEOUT} s"}
        return 404, {"error": "not found"}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One HTTP/1.1 request per connection: enough for this example, not a general server."""
        try:
            request_line = await reader.readline()
            while (await reader.readline()).strip():
                pass  # headers: none of them matter here
            try:
                _method, target, _version = request_line.decode("latin-1").split()
            except ValueError:
                status, body = 400, {"error": "bad request line"}
            else:
                url = urlsplit(target)
                status, body = await self.route(url.path, parse_qs(url.query))
            payload = json.dumps(body).encode()
            writer.write(f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\n"
                         f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
                         "Connection: close\r\n\r\n".encode() + payload)
            await writer.drain()
        except ConnectionError:
            pass  # the client went away
        finally:
            writer.close()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


async def serve(mode: str, port: int, workers: int | None) -> None:
    """Serve on 127.0.0.1:``port`` (0: any free port) until the parent disconnects, or forever."""
    app = App(mode, workers)
    try:
        if app.pool is not None:
            await app.pool.run(count_primes, 10)  # start the workers before the first real request
        server = await asyncio.start_server(app.handle, "127.0.0.1", port)
        port = server.sockets[0].getsockname()[1]
        async with server:
            if forkio.aparent.connected:  # forked by load.py: report the port, stop when it lets go
                await forkio.aparent.send({"port": port, "pid": os.getpid()})
                async for _ in forkio.aparent:
                    pass
            else:
                print(f"serving on http://127.0.0.1:{port}/ (mode {mode}); Ctrl-C stops", flush=True)
                await server.serve_forever()
    finally:
        app.close()


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--mode", choices=["forkio", "inline"], default="forkio")
    cli.add_argument("--port", type=int, default=8080, help="0 picks a free port (default 8080)")
    cli.add_argument("--workers", type=int, default=None, help="pool size (default: one per core)")
    args = cli.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop like Ctrl-C: pool shut down cleanly
    try:
        asyncio.run(serve(args.mode, args.port, args.workers))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
