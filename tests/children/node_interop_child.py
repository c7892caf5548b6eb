"""The forkio side of the scenarios in node_interop_parent.js (a Node parent forks this script)."""
import os
import socket
import sys

from forkio import ChannelClosed, parent


def describe(handle):
    if not isinstance(handle, socket.socket):
        return repr(handle)
    # "waits": Python waits on it (no BlockingIOError), while the flag it shares with Node stays as Node set it
    return {"type": handle.type.name, "port": handle.getsockname()[1],
            "listening": bool(handle.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)),
            "waits": handle.gettimeout() is None or handle.gettimeout() >= 24 * 86400,
            "nonblocking_fd": not os.get_blocking(handle.fileno())}


def messages():
    while True:
        try:
            yield parent.recv(with_handle=True)
        except ChannelClosed:
            return


scenario = sys.argv[1]
if scenario == "socket-list":
    sockets = {}
    for message, handle in messages():
        if message.get("cmd") == "new":
            sockets[message["n"]] = handle
            if len(sockets) == 3:
                parent.send({"got": 3, "waits": [describe(s)["waits"] for s in sockets.values()]})
        elif "close" in message:
            sockets.pop(message["close"]).close()
            parent.send({"closed": message["close"]})
        elif message.get("closeAll"):
            parent.send({"closingAll": len(sockets)})
            for sock in sockets.values():
                sock.close()
elif scenario == "ack-without-reading":
    sys.stdin.readline()  # not a byte read from the channel until the parent says so
    got = []
    for message, handle in messages():
        got.append([message["n"], None if handle is None else describe(handle)])
        if handle is not None:
            handle.close()
        if len(got) == 3:
            parent.send({"got": got})
elif scenario == "handles-then-disconnect":
    for message, handle in messages():
        handle.sendall(f"hello {message['n']}".encode())
        handle.close()
elif scenario == "dgram":
    message, handle = parent.recv(with_handle=True)
    parent.send({"sent": message["port"], **describe(handle)})
    data, _ = handle.recvfrom(100)  # a plain wait: the datagram is sent only after this report
    parent.send({"received": data.decode()})
    handle.close()
    for _ in parent:
        pass
elif scenario == "async-echo":
    import asyncio

    from forkio import aparent

    async def main():
        for _ in range(3):
            message, handle = await aparent.recv(with_handle=True)
            await aparent.send({"echo": message, "handle": None if handle is None else describe(handle)})
            if handle is not None:
                server = handle
        await aparent.send("back", server)
        server.close()
        async for _ in aparent:
            pass

    asyncio.run(main())
elif scenario == "advanced-iter":
    for _ in parent:
        pass
    print("iteration ended quietly", file=sys.stderr)
