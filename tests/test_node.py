"""Node interop both ways: Node's own IPC wire format, handles included."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import forkio
from forkio import SerializationError
from forkio._handles import LONG_WAIT


def test_python_parent_node_child(children: Path) -> None:
    """A .js script becomes a Node child speaking json; process.send/on('message') just work."""
    with forkio.fork(children / "echo.js") as child:
        assert child.recv(timeout=20) == "ready"
        message = {"a": [1, 2.5, None, True], "s": "héllo \"q\" \n ☃ \u2028"}
        child.send(message)
        assert child.recv(timeout=10) == {"echo": message}
        with pytest.raises(SerializationError):
            child.send(float("nan"))  # would crash the Node child
        child.send("exit")
        assert child.wait(timeout=10) == 3


def test_handles_node_cannot_take_are_refused(children: Path) -> None:
    """A plain fd or a Unix datagram socket would kill a Node child: refused, and the channel goes on."""
    r, w = os.pipe()
    unix_dgram, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with unix_dgram, other, forkio.fork(children / "echo.js") as child:
        assert child.recv(timeout=20) == "ready"
        for handle in (r, unix_dgram):
            with pytest.raises(SerializationError, match="to Node"):
                child.send("take this", handle)
        child.send("still here")
        assert child.recv(timeout=10) == {"echo": "still here"}
    os.close(r)
    os.close(w)


def test_python_parent_hands_server_to_node(children: Path) -> None:
    """A listening socket goes to Node as net.Server (NODE_HANDLE), and comes back the same way."""
    server = socket.create_server(("127.0.0.1", 0))
    with server, forkio.fork(children / "echo.js") as child:
        assert child.recv(timeout=20) == "ready"
        child.send("take this", server)
        reply, handle = child.recv(timeout=10, with_handle=True)
        assert reply == {"got": "handle", "kind": "Server", "port": server.getsockname()[1]}
        assert isinstance(handle, socket.socket)
        assert handle.getsockname() == server.getsockname()
        handle.close()
        child.send("after the handle")  # Node answered NODE_HANDLE_ACK and the channel flows on
        assert child.recv(timeout=10) == {"echo": "after the handle"}


def test_node_parent_python_child(children: Path) -> None:
    """Node's child_process.fork() runs a forkio script unchanged, handles included."""
    env = {k: v for k, v in os.environ.items() if k != "NODE_EXTRA_CA_CERTS"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(forkio.__file__).parent.parent), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        ["node", str(children / "node_parent.js"), str(children / "for_node.py"), sys.executable],
        capture_output=True, text=True, timeout=30, env=env,
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[0] == {"message": {"done": 1}, "handle": None}
    assert lines[1] == {"message": {"done": 2}, "handle": None}
    assert lines[2]["message"]["served"] == "hi from node"
    assert lines[2]["message"]["kind"] == "SOCK_STREAM"
    assert lines[-1] == {"exit": 0, "signal": None}


# ----------------------------------------------------------------------------------------------
# Node's own IPC protocol beyond plain messages (issue 9): each scenario runs against real Node,
# with Node as the parent (node_interop_parent.js + node_interop_child.py) and with forkio as the
# parent (node_interop_child.js).


def _node_parent(children: Path, scenario: str) -> list[dict[str, Any]]:
    """Run a scenario of node_interop_parent.js against node_interop_child.py; its output lines."""
    env = {k: v for k, v in os.environ.items() if k != "NODE_EXTRA_CA_CERTS"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(forkio.__file__).parent.parent), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        ["node", str(children / "node_interop_parent.js"), scenario, str(children / "node_interop_child.py"),
         sys.executable],
        capture_output=True, text=True, timeout=40, env=env,
    )
    assert result.returncode == 0, (result.stdout, result.stderr)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert {"fail": "timed out"} not in lines, (lines, result.stderr)
    return lines


def _accepted(server: socket.socket, count: int) -> tuple[list[socket.socket], list[socket.socket]]:
    """``count`` client connections to ``server``, and the server's ends of them."""
    clients = [socket.create_connection(server.getsockname()) for _ in range(count)]
    return clients, [server.accept()[0] for _ in clients]


def test_node_server_counts_and_closes_through_forkio_child(children: Path) -> None:
    """A Node server's sockets held by a forkio child: getConnections() counts them, close() waits for them."""
    lines = _node_parent(children, "socket-list")
    assert lines == [
        {"message": {"got": 3, "waits": [True, True, True]}},  # Python waits on them (no BlockingIOError)
        {"count": 3, "err": None},  # NODE_SOCKET_GET_COUNT answered with the sockets held
        {"message": {"closed": 0}},
        {"count": 2, "err": None},
        {"message": {"closingAll": 2}},  # NODE_SOCKET_NOTIFY_CLOSE answered only after these closed
        {"serverClosed": True},
        {"exit": 0, "signal": None},
    ]


def test_forkio_parent_answers_node_child_server(children: Path) -> None:
    """The same protocol with forkio as the parent holding a Node child's sockets."""
    with forkio.fork(children / "node_interop_child.js", ["socket-list"]) as child:
        held = {}
        for _ in range(2):
            message, sock = child.recv(timeout=20, with_handle=True)
            assert message["cmd"] == "new" and isinstance(sock, socket.socket)
            held[message["n"]] = sock
        child.send("count")
        assert child.recv(timeout=10) == {"count": 2, "err": None}
        held.pop(0).close()
        child.send("count")
        assert child.recv(timeout=10) == {"count": 1, "err": None}
        child.send("close")
        assert child.recv(timeout=10) == {"closing": True}
        with pytest.raises(forkio.WaitTimeout):
            child.recv(timeout=0.5)  # the server's 'close' waits for the socket still held here
        held.pop(1).close()
        assert child.recv(timeout=10) == {"serverClosed": True}
        assert child.wait(timeout=10) == 0


def test_forkio_child_acknowledges_handles_without_reading(children: Path) -> None:
    """Node holds back what follows a handle until the ACK: a forkio child that is not reading still sends it.

    The two handles are a net.Server and a bare TCP handle (net.Native): both arrive as sockets.
    """
    lines = _node_parent(children, "ack-without-reading")
    assert lines[0] == {"delivered": "three"}  # both ACKs came before the child read anything
    got = lines[1]["message"]["got"]
    port = got[0][1]["port"]
    listening = {"type": "SOCK_STREAM", "port": port, "listening": True, "waits": True, "nonblocking_fd": True}
    assert got == [["one", listening], ["two", listening], ["three", None]]
    assert lines[1]["nodeServerNonBlocking"]  # the flag Node's own server shares was left alone
    assert lines[2] == {"exit": 0, "signal": None}


def test_forkio_parent_acknowledges_handles_without_reading(children: Path) -> None:
    """The same with forkio as the parent: it acknowledges a Node child's handles while nobody reads."""
    with forkio.fork(children / "node_interop_child.js", ["ack-without-reading"], stdio="pipe") as child:
        assert child.stdout is not None
        assert child.stdout.readline() == b"delivered three\n"  # the channel untouched so far
        got = [child.recv(timeout=10, with_handle=True) for _ in range(3)]
        assert [message["n"] for message, _ in got] == ["one", "two", "three"]
        for message, handle in got[:2]:  # net.Server, then net.Native: sockets both
            assert isinstance(handle, socket.socket)
            assert handle.getsockname()[1] == message["port"]
            assert handle.gettimeout() == LONG_WAIT  # waits like a blocking socket...
            assert not os.get_blocking(handle.fileno())  # ...without changing the flag Node shares
            handle.close()
        assert got[2][1] is None


def test_forkio_parent_delivers_every_handle_before_disconnecting(children: Path) -> None:
    """Sockets sent to a Node child right before disconnect() all arrive (each waits for the last ACK)."""
    server = socket.create_server(("127.0.0.1", 0))
    with server, forkio.fork(children / "node_interop_child.js", ["take-sockets"]) as child:
        clients, accepted = _accepted(server, 4)
        for n, conn in enumerate(accepted):
            child.send({"n": n}, conn)
            conn.close()  # ours is closed at once: the one in flight must still arrive
        child.disconnect()
        for n, client in enumerate(clients):
            client.settimeout(10)
            with client:
                assert client.makefile("rb").read() == f"hello {n}".encode()
        assert child.wait(timeout=10) == 0


def test_node_parent_delivers_every_handle_to_forkio_child_before_disconnecting(children: Path) -> None:
    """The same with Node as the sender: its disconnect() waits for the forkio child's ACKs."""
    lines = _node_parent(children, "handles-then-disconnect")
    assert {"replies": ["hello 0", "hello 1", "hello 2"]} in lines
    assert lines[-1] == {"exit": 0, "signal": None}


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["udp4", "udp6"])
def test_udp_socket_to_node_child(children: Path, family: socket.AddressFamily) -> None:
    """A UDP socket goes to Node with its dgramType, and arrives as a dgram.Socket of that type."""
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    try:
        udp = socket.socket(family, socket.SOCK_DGRAM)
        udp.bind((host, 0))
    except OSError as exc:  # no IPv6 on this machine
        pytest.skip(f"cannot bind a {family.name} UDP socket: {exc}")
    with udp, forkio.fork(children / "node_interop_child.js", ["take-dgram"]) as child:
        child.send("udp", udp)
        reply = child.recv(timeout=20)
        assert reply["type"] == ("udp4" if family == socket.AF_INET else "udp6")
        assert reply["port"] == udp.getsockname()[1]


def test_udp_socket_from_node_parent(children: Path) -> None:
    """A Node dgram.Socket arrives in a forkio child as a SOCK_DGRAM socket on which a plain recvfrom() waits."""
    lines = _node_parent(children, "dgram")
    reply = lines[0]["message"]
    assert reply == {"sent": reply["port"], "type": "SOCK_DGRAM", "port": reply["port"], "listening": False,
                     "waits": True, "nonblocking_fd": True}
    assert lines[1] == {"message": {"received": "datagram"}}  # sent only once the child was waiting
    assert lines[2] == {"exit": 0, "signal": None}


def test_async_child_of_node_parent(children: Path) -> None:
    """aparent under a Node parent: messages and a handle in order, answers out, a handle back to Node."""
    lines = _node_parent(children, "async-echo")
    port = lines[1]["message"]["echo"]["port"]
    assert lines == [
        {"message": {"echo": {"n": 1}, "handle": None}, "handle": None},
        {"message": {"echo": {"n": 2, "port": port},
                     "handle": {"type": "SOCK_STREAM", "port": port, "listening": True, "waits": True,
                                "nonblocking_fd": True}},
         "handle": None},
        {"message": {"echo": {"n": 3}, "handle": None}, "handle": None},
        {"message": "back", "handle": "Server"},
        {"exit": 0, "signal": None},
    ]


def test_iterating_advanced_channel_raises(children: Path) -> None:
    """Under serialization 'advanced', `for msg in parent` fails as recv() does, instead of ending quietly."""
    lines = _node_parent(children, "advanced-iter")
    assert "'advanced' (V8) serialization is not supported" in lines[0]["stderr"]
    assert "ChannelClosed" in lines[0]["stderr"]
    assert lines[1] == {"exit": 1, "signal": None}


def test_node_peer_detection_matches_bootstrap() -> None:
    """A forkio-started child recognises its parent as forkio by the bootstrap command line."""
    from forkio import _launch, _parent

    assert _parent.BOOTSTRAP_MARK in _launch.BOOTSTRAP


def test_async_face_passes_handles_both_ways_with_node_child(children: Path) -> None:
    """afork() of a Node child: handles go one at a time, come back acknowledged, and messages flow on."""
    import asyncio

    async def main() -> None:
        servers = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
        try:
            async with await forkio.afork(children / "echo.js") as child:
                assert await child.recv(timeout=20) == "ready"
                for n, server in enumerate(servers):
                    await child.send(n, server)  # the second waits for the first one's ACK
                await child.send("plain")
                for server in servers:
                    reply, handle = await child.recv(timeout=10, with_handle=True)
                    assert reply == {"got": "handle", "kind": "Server", "port": server.getsockname()[1]}
                    handle.close()
                assert await child.recv(timeout=10) == {"echo": "plain"}
                await child.send("exit")
                assert await child.wait(timeout=10) == 3
        finally:
            for server in servers:
                server.close()

    asyncio.run(main())
