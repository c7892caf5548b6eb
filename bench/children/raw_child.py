"""Reference child for bench/ipc.py: plain socket + pickle, no library.

Frames are a 4-byte big-endian length then a pickle. Modes: ``echo`` | ``count`` |
``aecho`` (asyncio streams). The socket fd is argv[1]. Sends b"ready" first.
"""

import pickle
import socket
import struct
import sys

HDR = struct.Struct(">I")
mode, fd = sys.argv[1], int(sys.argv[2])

if mode == "aecho":
    import asyncio

    async def main() -> None:
        sock = socket.socket(fileno=fd)
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        p = pickle.dumps("ready", 5)
        writer.write(HDR.pack(len(p)) + p)
        await writer.drain()
        while True:
            try:
                head = await reader.readexactly(4)
            except asyncio.IncompleteReadError:
                break
            body = await reader.readexactly(HDR.unpack(head)[0])
            msg = pickle.loads(body)
            p = pickle.dumps(msg, 5)
            writer.write(HDR.pack(len(p)) + p)
            await writer.drain()
        writer.close()

    asyncio.run(main())
    raise SystemExit(0)

sock = socket.socket(fileno=fd)
dumps, loads, pack, unpack_from = pickle.dumps, pickle.loads, HDR.pack, HDR.unpack_from
recv, sendall = sock.recv, sock.sendall


def frames():
    """Every message received, in order, until EOF."""
    buf = b""
    while True:
        data = recv(65536)
        if not data:
            return
        buf = buf + data if buf else data
        pos, end = 0, len(buf)
        while end - pos >= 4:
            (n,) = unpack_from(buf, pos)
            if end - pos - 4 < n:
                break
            yield loads(buf[pos + 4:pos + 4 + n])
            pos += 4 + n
        buf = buf[pos:]


def send(msg):
    p = dumps(msg, 5)
    sendall(pack(len(p)) + p)


send("ready")
if mode == "echo":
    for msg in frames():
        send(msg)
elif mode == "count":  # count messages until a None, answer with the count
    count = 0
    for msg in frames():
        if msg is None:
            send(count)
            count = 0
        else:
            count += 1
else:
    raise SystemExit(f"unknown mode {mode!r}")
