"""What a JSON channel owes a Node peer beyond framing: Node's internal messages, answered as Node does.

A Node process runs its channel from the event loop, so it reads all the time, whatever the
user's code is doing. Its peers count on that:

* ``NODE_HANDLE`` (a message with a passed fd) is answered with ``NODE_HANDLE_ACK`` on arrival,
  or ``NODE_HANDLE_NACK`` when the fd did not come (Node then sends it again). Until the ACK
  comes, Node holds back everything else it would send.
* A ``net.Socket`` that a Node ``net.Server`` accepted arrives with a ``key`` (the server's
  connection key). From then on the server asks the receiver ``NODE_SOCKET_GET_COUNT`` (for
  ``getConnections()``; answer ``NODE_SOCKET_COUNT``) and ``NODE_SOCKET_NOTIFY_CLOSE`` (for
  ``close()``; answer ``NODE_SOCKET_ALL_CLOSED`` once every such socket is closed here).
* A Node receiver keeps one passed handle pending at a time, and a Node sender sends the next
  handle only after the ACK of the previous one; a Node child whose ACK cannot be written (the
  channel was closed under it) drops what it has not yet read, sockets included.

So a channel whose peer is Node (``node_peer``) reads in a background thread, as Node's runtime
does; sends a handle only once the previous one is acknowledged; and on ``close`` first waits
for the last acknowledgement. Between forkio processes none of this is needed (forkio queues
passed fds and never drops them), so JSON channels between forkio processes keep the plain
blocking, single-reader design; they still answer the internal messages when they read.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._errors import ChannelClosed, SerializationError
from ._handles import NODE_DGRAM, NODE_SOCKET, RAW_FD, Handle, close_fds, node_handle_fields, rebuild_handle

if TYPE_CHECKING:
    from ._channel import Channel
    from ._codec import Incoming

MAX_RETRANSMISSIONS = 3  # as Node: after this many NACKs the handle is given up
DISCONNECT_ACK_WAIT = 5.0  # seconds close() waits for the last handle's ACK from a live peer

_ACK = {"cmd": "NODE_HANDLE_ACK"}
_NACK = {"cmd": "NODE_HANDLE_NACK"}


class HandleNotDelivered(UserWarning):
    """A handle the peer could not receive, even after ``MAX_RETRANSMISSIONS`` tries."""


class _Unacked:
    """The last handle sent, kept (as a dup of its fd) until the peer acknowledges it."""

    __slots__ = ("data", "fd", "tries")

    def __init__(self, data: bytes, fd: int) -> None:
        self.data = data
        self.fd = fd
        self.tries = 0


class _SocketList:
    """The sockets received from one Node server (one ``key``), as Node's receiving side counts them."""

    __slots__ = ("closes_owed", "count")

    def __init__(self) -> None:
        self.count = 0
        self.closes_owed = 0  # NODE_SOCKET_NOTIFY_CLOSE requests to answer once count is 0


class NodeLink:
    """The Node-protocol state of one JSON channel (see the module docstring)."""

    def __init__(self, channel: Channel, *, node_peer: bool) -> None:
        self._channel = channel
        self.node_peer = node_peer
        self._lists: dict[Any, _SocketList] = {}
        self._keyed: dict[int, Any] = {}  # fd received with a key -> the key, until it is rebuilt
        self._lists_lock = threading.Lock()
        self._unacked: _Unacked | None = None  # guarded by the channel's condition
        self._handle_lock = threading.Lock()  # one handle in flight: senders queue here
        self._reader_pid = 0  # the process whose background reader runs (none survives a fork)
        self._start_lock = threading.Lock()
        self._wakers: list[Callable[[], None]] = []
        #: How answers to internal messages (and retransmitted handles) are written. The asyncio
        #: face replaces it so that one never lands in the middle of a frame its writer has half sent.
        self.write_reply: Callable[[bytes, list[int]], None] = self._write_now

    # ------------------------------------------------------------ reading side
    def start_reader(self) -> None:
        """Read in the background from now on (once per process; only toward a Node peer)."""
        if not self.node_peer or self._reader_pid == os.getpid():
            return
        with self._start_lock:
            if self._reader_pid == os.getpid() or not self._channel.connected:
                return
            self._reader_pid = os.getpid()
        threading.Thread(target=self._read_forever, name="forkio-node-reader", daemon=True).start()

    @property
    def reading(self) -> bool:
        """True while a background reader serves this channel in this process."""
        return self._reader_pid == os.getpid() and self._channel.connected

    def add_waker(self, wake: Callable[[], None]) -> None:
        """Call ``wake()`` (from the reader thread) after every read; for the asyncio face."""
        self._wakers.append(wake)

    def _read_forever(self) -> None:
        channel = self._channel
        try:
            while channel.connected:
                # The read lock is what a recv() in another thread would take: holding it, this
                # thread is simply "the one reading"; recv() callers wait for what it decodes.
                with channel._read_lock:
                    if channel.connected:
                        channel.read_available(block=True)
                self._wake_all()
        finally:
            self._wake_all()

    def _wake_all(self) -> None:
        with self._channel._cond:
            self._channel._cond.notify_all()
        for wake in list(self._wakers):
            wake()

    def internal(self, item: Incoming) -> None:
        """Handle one internal message (called by whichever thread is reading)."""
        msg, fds = item[0], item[1]
        cmd = msg.get("cmd") if isinstance(msg, dict) else None
        if cmd == "NODE_HANDLE":
            if not fds:  # the fd was lost on the way (truncated ancillary data): ask for it again
                self._reply(_NACK)
                return
            self._reply(_ACK)
            kind = msg.get("type")
            key = msg.get("key")
            if key is not None and kind == NODE_SOCKET and _hashable(key):
                with self._lists_lock:
                    self._lists.setdefault(key, _SocketList()).count += 1
                    self._keyed[fds[0]] = key
            self._channel._inbox.append((msg.get("msg"), fds, kind, False, None))
            return
        close_fds(fds)
        if cmd == "NODE_HANDLE_ACK" or cmd == "NODE_HANDLE_NACK":
            self._acknowledged(cmd == "NODE_HANDLE_ACK")
        elif cmd == "NODE_SOCKET_GET_COUNT" or cmd == "NODE_SOCKET_NOTIFY_CLOSE":
            self._socket_list_request(cmd, msg.get("key"))

    def rebuild(self, fd: int, kind: str) -> Handle:
        """The handle for a received fd; a socket received with a key is counted until it closes."""
        with self._lists_lock:
            key = self._keyed.pop(fd, _NO_KEY) if self._keyed else _NO_KEY
        if key is _NO_KEY:
            return rebuild_handle(fd, kind)
        try:
            sock = rebuild_handle(fd, kind, _TrackedSocket)
        except OSError:
            self._socket_gone(key)
            raise
        finalizer = weakref.finalize(sock, self._socket_gone, key)
        finalizer.atexit = False  # at exit the channel goes too: nobody is left to tell
        sock._forkio_gone = finalizer
        return sock

    def forget(self, fds: list[int]) -> None:
        """Received fds that nobody will rebuild (dropped, or taken raw): stop counting them."""
        if self._keyed:
            for fd in fds:
                with self._lists_lock:
                    key = self._keyed.pop(fd, _NO_KEY)
                if key is not _NO_KEY:
                    self._socket_gone(key)

    def _socket_list_request(self, cmd: str, key: Any) -> None:
        if not _hashable(key):
            return
        with self._lists_lock:
            sockets = self._lists.get(key)
            if sockets is None:
                return  # no socket of that server came here: Node's receiver would not answer either
            count = sockets.count
            answer_now = cmd == "NODE_SOCKET_GET_COUNT" or count == 0
            if not answer_now:
                sockets.closes_owed += 1
        if cmd == "NODE_SOCKET_GET_COUNT":
            self._reply({"cmd": "NODE_SOCKET_COUNT", "key": key, "count": count})
        elif answer_now:
            self._reply({"cmd": "NODE_SOCKET_ALL_CLOSED", "key": key})

    def _socket_gone(self, key: Any) -> None:
        with self._lists_lock:
            sockets = self._lists[key]
            sockets.count -= 1
            owed = sockets.closes_owed if sockets.count == 0 else 0
            sockets.closes_owed -= owed
        for _ in range(owed):
            self._reply({"cmd": "NODE_SOCKET_ALL_CLOSED", "key": key})

    def _reply(self, message: dict[str, Any]) -> None:
        if self._channel.connected:
            self.write_reply(self._channel.codec.encode(message), [])

    def _write_now(self, data: bytes, fds: list[int]) -> None:
        # Like Node, an answer that cannot be written is no error of the user's: the channel is
        # going away, and whoever uses it next hears about that.
        try:
            self._channel.send_bytes(data, fds)
        except ChannelClosed:
            pass

    # ------------------------------------------------------------ sending side
    def handle_fields(self, handle: Handle, kind: str) -> dict[str, str]:
        """The ``NODE_HANDLE`` envelope's extra fields for ``handle``; refuses what a Node peer would die on."""
        fields = node_handle_fields(handle)
        if self.node_peer:
            if kind == RAW_FD:
                raise SerializationError(f"cannot send {handle!r} to Node: Node takes sockets only, not plain fds")
            if kind == NODE_DGRAM and not fields:
                raise SerializationError(f"cannot send {handle!r} to Node: Node's datagram sockets are UDP only")
        return fields

    def send_handle(self, data: bytes, fds: list[int]) -> None:
        """Send a message that carries a handle: toward Node, only once the previous one is acknowledged."""
        channel = self._channel
        if not self.node_peer:
            channel.send_bytes(data, fds)
            return
        with self._handle_lock:
            self.wait_for_ack(None)
            self.expect_ack(data, fds[0])
            try:
                channel.send_bytes(data, fds)
            except BaseException:
                self.cancel_ack()
                raise

    def expect_ack(self, data: bytes, fd: int) -> None:
        """Record a handle about to go out; its fd is duplicated so that a NACK can be answered
        even when the sender closes its socket as soon as ``send`` returns."""
        if not self.node_peer:
            return
        self.start_reader()
        unacked = _Unacked(data, os.dup(fd))
        with self._channel._cond:
            self._unacked = unacked

    def cancel_ack(self) -> None:
        """The handle recorded by ``expect_ack`` did not go out."""
        with self._channel._cond:
            unacked, self._unacked = self._unacked, None
            self._channel._cond.notify_all()
        if unacked is not None:
            os.close(unacked.fd)

    @property
    def awaiting_ack(self) -> bool:
        """True while a handle sent to a Node peer waits for its acknowledgement."""
        return self._unacked is not None and self._channel.connected

    def wait_for_ack(self, timeout: float | None) -> bool:
        """Wait until no handle awaits acknowledgement (or the channel ends); False on timeout."""
        if self._unacked is None:
            return True
        self.start_reader()
        deadline = None if timeout is None else time.monotonic() + timeout
        cond = self._channel._cond
        with cond:
            while self._unacked is not None and self._channel.connected:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                cond.wait(remaining)
        return True

    def _acknowledged(self, ok: bool) -> None:
        channel = self._channel
        with channel._cond:
            unacked = self._unacked
            if unacked is None:
                return
            retry = not ok and unacked.tries < MAX_RETRANSMISSIONS
            if retry:
                unacked.tries += 1
            else:
                self._unacked = None
                channel._cond.notify_all()
        if retry:
            self.write_reply(unacked.data, [unacked.fd])
            return
        os.close(unacked.fd)
        if not ok:
            warnings.warn("a handle did not reach the Node peer after "
                          f"{MAX_RETRANSMISSIONS} retransmissions", HandleNotDelivered, stacklevel=1)

    def close(self) -> None:
        """The channel is closing: give up the handle kept for retransmission."""
        self.cancel_ack()


_NO_KEY = object()


def _hashable(key: Any) -> bool:
    try:
        hash(key)
    except TypeError:
        return False
    return True


class _TrackedSocket(socket.socket):
    """A socket that a Node server handed over with a key: its owner hears when it is closed.

    Closing, detaching and garbage collection all count: each calls the finalizer, which runs once.
    """

    __slots__ = ("_forkio_gone",)
    _forkio_gone: weakref.finalize[Any, Any]

    def _real_close(self, *args: Any, **kwargs: Any) -> None:
        super()._real_close(*args, **kwargs)  # type: ignore[misc]
        gone = getattr(self, "_forkio_gone", None)
        if gone is not None:
            gone()

    def detach(self) -> int:
        fd = super().detach()
        gone = getattr(self, "_forkio_gone", None)
        if gone is not None:
            gone()
        return fd
