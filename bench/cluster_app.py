"""The app every contender serves in bench/cluster.py: ASGI, answers its pid; /block/S blocks the loop S s."""

import os
import time

PID = str(os.getpid()).encode()


async def app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    path = scope["path"]
    if path.startswith("/block/"):
        time.sleep(float(path.rsplit("/", 1)[1]))  # blocks the event loop, on purpose
    body = str(os.getpid()).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
