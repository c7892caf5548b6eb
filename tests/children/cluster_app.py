"""A cluster test app: a tiny asyncio HTTP server in each worker, the primary reporting events.

argv: PORT [WORKERS]. Environment: APP_TIMEOUT, APP_GRACE (seconds), APP_VERSION_FILE (read at
import: the "code version" served, so a test can edit it between reloads),
APP_CRASH=1 (die at boot), APP_EXIT=1 (exit 0 as soon as it listens, as does the code version
"exits"), APP_SHARED=1 (one shared socket, not one per worker), APP_UVLOOP=1 (workers serve on uvloop),
APP_RECYCLE_AFTER=N (a worker asks to be recycled after N requests, as docs/cluster.md shows).
"""

import asyncio
import os
import sys
import time

import forkio
from forkio import cluster

PORT = int(sys.argv[1])
WORKERS = int(sys.argv[2]) if len(sys.argv) > 2 else 2
VERSION_FILE = os.environ.get("APP_VERSION_FILE")
VERSION = open(VERSION_FILE).read().strip() if VERSION_FILE else "v0"
RECYCLE_AFTER = int(os.environ.get("APP_RECYCLE_AFTER", "0"))
served = 0
if VERSION == "broken" and not cluster.is_primary:
    raise SyntaxError("the new code does not even start")


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    global served
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()
        return
    path = head.split(b" ", 2)[1].decode()
    if path.startswith("/sleep/"):
        print(f"sleep start {os.getpid()}", flush=True)
        await asyncio.sleep(float(path.rsplit("/", 1)[1]))
    elif path.startswith("/block/"):
        print(f"block start {os.getpid()}", flush=True)
        time.sleep(float(path.rsplit("/", 1)[1]))  # blocks the loop, on purpose
    body = f"{VERSION} {os.getpid()} {cluster.worker}\n".encode()
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
    served += 1
    if served == RECYCLE_AFTER:
        cluster.recycle()  # a replacement starts; this worker is stopped gracefully once it is up
    try:
        await writer.drain()
    finally:
        writer.close()


async def main() -> None:
    if os.environ.get("APP_CRASH"):
        raise RuntimeError("boom at boot")
    sock = cluster.listen(("127.0.0.1", PORT))
    if os.environ.get("APP_EXIT") or VERSION == "exits":
        return  # ready (it listens), then gone on its own: exit status 0
    forkio.parent.on("message", lambda message: forkio.parent.send({"echo": message, "worker": cluster.worker}))
    server = await asyncio.start_server(handle, sock=sock)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    @cluster.on("message")
    def _message(worker: cluster.Worker, message: object) -> None:
        print(f"message from {worker.id}: {message!r}", flush=True)

    @cluster.on("exit")
    def _exit(worker: cluster.Worker, code: object, sig: object) -> None:
        print(f"exit {worker.id} {worker.pid} {code} {sig} asked={worker.exited_after_disconnect}", flush=True)

    for name in ("fork", "online", "disconnect"):
        cluster.on(name, lambda worker, name=name: print(f"{name} {worker.id} {worker.pid}", flush=True))

    @cluster.on("listening")
    def _listening(worker: cluster.Worker, address: object) -> None:
        print(f"listening {worker.id} {worker.pid}", flush=True)
        if os.environ.get("APP_BROADCAST") and len(cluster.workers) >= WORKERS:
            cluster.broadcast("hello")

    def main_on_uvloop() -> None:
        import uvloop

        uvloop.run(main())

    serve = main_on_uvloop if os.environ.get("APP_UVLOOP") else main
    cluster.run(serve, workers=WORKERS, timeout=float(os.environ.get("APP_TIMEOUT", "30")),
                graceful_timeout=float(os.environ.get("APP_GRACE", "10")),
                reuse_port=None if not os.environ.get("APP_SHARED") else False)
