"""Node's internal messages on a JSON channel, with a raw socket playing the Node peer (no Node needed)."""

from __future__ import annotations

import array
import json
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from forkio import WaitTimeout
from forkio import _channel as channel_module
from forkio._channel import Channel
from forkio._handles import LONG_WAIT, NODE_SOCKET, rebuild_handle


class FakeNode:
    """The peer's end: reads JSON lines (and the fds that come with them), writes lines."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(10)
        self.buffer = b""
        self.fds: list[int] = []

    def line(self, timeout: float = 10) -> Any:
        self.sock.settimeout(timeout)
        while b"\n" not in self.buffer:
            data, ancdata, _flags, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(16 * 4))
            if not data:
                raise EOFError
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                    self.fds.extend(fds)
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def send(self, message: Any, fd: int | None = None) -> None:
        data = (json.dumps(message) + "\n").encode()
        if fd is None:
            self.sock.sendall(data)
        else:
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])

    def close(self) -> None:
        self.sock.close()
        for fd in self.fds:
            socket.socket(fileno=fd).close()


@pytest.fixture
def pair() -> Iterator[tuple[Channel, FakeNode]]:
    """A JSON channel whose peer is (as far as it knows) Node, and the fake Node at the other end."""
    ours, theirs = socket.socketpair()
    channel = Channel(ours, serialization="json", node_peer=True)
    channel.read_in_background()  # as the endpoints do: a Node peer expects answers at any time
    node = FakeNode(theirs)
    yield channel, node
    channel.close()
    node.close()


def test_handle_without_its_fd_is_nacked(pair: tuple[Channel, FakeNode]) -> None:
    """A NODE_HANDLE whose fd did not come is answered NODE_HANDLE_NACK and not delivered; then ACK as usual."""
    channel, node = pair
    node.send({"cmd": "NODE_HANDLE", "type": "net.Socket", "msg": "lost"})
    assert node.line() == {"cmd": "NODE_HANDLE_NACK"}
    a, b = socket.socketpair()
    with a, b:
        node.send({"cmd": "NODE_HANDLE", "type": "net.Socket", "msg": "again"}, a.fileno())
        assert node.line() == {"cmd": "NODE_HANDLE_ACK"}
        message, handle = channel.recv(timeout=10, with_handle=True)
        assert message == "again" and isinstance(handle, socket.socket)
        handle.close()


def test_nack_retransmits_and_one_handle_is_in_flight(pair: tuple[Channel, FakeNode]) -> None:
    """A NACKed handle is sent again (even though the sender closed it); the next handle waits for the ACK."""
    channel, node = pair
    first = socket.create_server(("127.0.0.1", 0))
    second = socket.create_server(("127.0.0.1", 0))
    address = first.getsockname()
    with second:
        with first:
            channel.send("first", first)
        assert node.line() == {"cmd": "NODE_HANDLE", "type": "net.Server", "msg": "first"}
        later = threading.Thread(target=channel.send, args=("second", second))
        later.start()
        with pytest.raises(TimeoutError):
            node.line(timeout=0.3)  # the second handle waits for the first one's ACK
        node.send({"cmd": "NODE_HANDLE_NACK"})
        assert node.line() == {"cmd": "NODE_HANDLE", "type": "net.Server", "msg": "first"}  # sent again
        assert len(node.fds) == 2
        with socket.socket(fileno=node.fds.pop()) as again:
            assert again.getsockname() == address
        node.send({"cmd": "NODE_HANDLE_ACK"})
        assert node.line() == {"cmd": "NODE_HANDLE", "type": "net.Server", "msg": "second"}
        later.join(10)
        node.send({"cmd": "NODE_HANDLE_ACK"})


def test_close_waits_for_the_last_ack_a_bounded_time(pair: tuple[Channel, FakeNode],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """close() gives a silent peer DISCONNECT_ACK_WAIT seconds for the last ACK, then closes anyway."""
    channel, node = pair
    monkeypatch.setattr(channel_module, "DISCONNECT_ACK_WAIT", 0.2)
    server = socket.create_server(("127.0.0.1", 0))
    with server:
        channel.send("take", server)
    assert node.line()["msg"] == "take"
    channel.close()
    with pytest.raises(EOFError):
        node.line()


def test_socket_list_counts_keyed_sockets(pair: tuple[Channel, FakeNode]) -> None:
    """Sockets received with a key are counted until closed or detached; unknown keys get no answer."""
    channel, node = pair
    key = "4:127.0.0.1:1234"
    node.send({"cmd": "NODE_SOCKET_GET_COUNT", "key": "unknown"})
    ends = [socket.socketpair() for _ in range(2)]
    for n, (a, _b) in enumerate(ends):
        node.send({"cmd": "NODE_HANDLE", "type": "net.Socket", "msg": n, "key": key}, a.fileno())
        assert node.line() == {"cmd": "NODE_HANDLE_ACK"}
    node.send({"cmd": "NODE_SOCKET_GET_COUNT", "key": key})
    assert node.line() == {"cmd": "NODE_SOCKET_COUNT", "key": key, "count": 2}  # nothing for "unknown"
    held = [channel.recv(timeout=10, with_handle=True)[1] for _ in ends]
    node.send({"cmd": "NODE_SOCKET_NOTIFY_CLOSE", "key": key})
    held[0].close()
    socket.socket(fileno=held[1].detach()).close()
    assert node.line() == {"cmd": "NODE_SOCKET_ALL_CLOSED", "key": key}
    node.send({"cmd": "NODE_SOCKET_NOTIFY_CLOSE", "key": key})
    assert node.line() == {"cmd": "NODE_SOCKET_ALL_CLOSED", "key": key}  # already none: at once
    for a, b in ends:
        a.close()
        b.close()
    with pytest.raises(WaitTimeout):
        channel.recv(timeout=0.05)


def test_received_sockets_wait_and_keep_the_flags_they_share() -> None:
    """A socket that arrives non-blocking waits like a blocking one, and its shared O_NONBLOCK stays set.

    The flag belongs to the open file, shared with the sender: clearing it would block a Node
    sender's event loop. A blocking socket arrives as it was (no timeout).
    """
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)  # as Node (or asyncio) keeps its sockets
        received = rebuild_handle(os.dup(a.fileno()), NODE_SOCKET)
        with received:
            assert received.gettimeout() == LONG_WAIT
            threading.Timer(0.1, b.sendall, (b"late",)).start()
            assert received.recv(4) == b"late"  # waited for it: no BlockingIOError
            assert not os.get_blocking(a.fileno())  # the sender's side is still non-blocking
        a.setblocking(True)
        with rebuild_handle(os.dup(a.fileno()), NODE_SOCKET) as plain:
            assert plain.gettimeout() is None
