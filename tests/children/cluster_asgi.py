"""A tiny ASGI app for `forkio serve` tests: answers 'VERSION PID' (VERSION read from APP_VERSION_FILE at import)."""

import os

VERSION_FILE = os.environ.get("APP_VERSION_FILE")
VERSION = open(VERSION_FILE).read().strip() if VERSION_FILE else "v0"


async def app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] != "http":
        return
    body = f"{VERSION} {os.getpid()}\n".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
