"""The channel engine: one AF_UNIX stream socket, a codec, and the rules both faces share.

The socket stays in blocking mode: a sync ``send`` or ``recv`` is one system call, and a
full socket blocks the sender (backpressure). Non-blocking attempts pass ``MSG_DONTWAIT``;
the asyncio face uses only those, waiting with the event loop's reader and writer callbacks.
Either way the same engine decodes, orders, answers Node's internal messages and keeps
received fds from leaking.

Thread safety: any number of threads may send and receive at once. Sends are serialised by
a lock (frames never interleave); among receivers, one at a time reads the socket (a plain
lock, taken without waiting) and the others wait on a condition for what it decodes.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import select
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import Any, cast

from . import _shm
from ._codec import (
    _NO_FDS,
    DEFAULT_MAX_FRAME,
    Codec,
    Incoming,
    JsonCodec,
    PickleCodec,
    make_codec,
    segment_layout,
    speedups,
)
from ._errors import ChannelClosed, ProtocolError, SerializationError, WaitTimeout
from ._handles import RAW_FD, Handle, close_fds, handle_fd, rebuild_handle
from ._node import DISCONNECT_ACK_WAIT, NodeLink

RECV_SIZE = 64 * 1024
CONTROL_CMD = "NODE_CLUSTER"  # Node's own name for cluster messages: internal on both kinds of channel
# A forkio child that fails before its target's first line (a syntax error, a module not found)
# says why in this internal message before it exits. NODE_ prefix: a Node parent ignores it.
STARTUP_FAILED = "NODE_FORKIO_STARTUP_FAILED"
_MAX_FDS_PER_READ = 64
_ANC_SIZE = socket.CMSG_SPACE(_MAX_FDS_PER_READ * 4)
# Plain ints: or-ing the socket module's IntFlag members costs a microsecond per read.
_RECV_FLAGS = int(getattr(socket, "MSG_CMSG_CLOEXEC", 0))
_RECV_FLAGS_NOWAIT = _RECV_FLAGS | int(socket.MSG_DONTWAIT)
_OUTQ: int | None = 0x5411 if sys.platform.startswith("linux") else None  # SIOCOUTQ (== TIOCOUTQ)

Message = Any
_MORE = speedups.MORE if speedups is not None else object()  # Wire.recv_message: "not one plain frame"


def _unread_in_socket(sock: socket.socket) -> int:
    """Bytes we sent that the peer has not read yet (0 where the system cannot say)."""
    global _OUTQ
    if _OUTQ is None:
        return 0
    try:
        return int.from_bytes(fcntl.ioctl(sock.fileno(), _OUTQ, b"\0\0\0\0"), sys.byteorder, signed=True)
    except OSError as exc:
        if exc.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
            _OUTQ = None  # not on this system's sockets: no backpressure for segments
        return 0


def _fds_from_ancdata(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - (len(data) % arr.itemsize)])
            fds.extend(arr)
    return fds


class Channel:
    """A message channel over a connected AF_UNIX stream socket."""

    def __init__(self, sock: socket.socket, *, serialization: str = "pickle",
                 max_frame_size: int = DEFAULT_MAX_FRAME, recv_buffer: bytearray | None = None,
                 node_peer: bool = False) -> None:
        """``node_peer``: the other end is a Node process (see ``_node``); only with ``"json"``."""
        sock.setblocking(True)
        self.sock = sock
        self.fd = sock.fileno()  # kept after close, to unregister from event loops
        self.serialization = serialization
        self.codec: Codec = make_codec(serialization, max_frame_size=max_frame_size)
        self._pickle = self.codec if isinstance(self.codec, PickleCodec) else None
        #: Buffers of at least this many bytes travel through shared memory (None: never).
        self.zero_copy_threshold: int | None = _shm.DEFAULT_THRESHOLD if self._pickle is not None else None
        self._outbox: _shm.Outbox | None = None
        self._inbox_segments: _shm.Inbox | None = None
        self._owned: dict[int, int] = {}  # segment fds encoded but not yet handed to the kernel -> size
        #: Bytes of shared segments sent and perhaps not yet read by the peer before ``encode``
        #: waits (None: never waits). A single bigger message still goes, alone.
        self.shm_in_flight_limit: int | None = _shm.IN_FLIGHT_BYTES
        self._unread = 0  # segment bytes sent since the peer was last seen to have read everything
        self._reusable = _shm.REUSABLE
        self._decoder = self._pickle.decoder(self._map_segment) if self._pickle is not None else self.codec.decoder()
        self._recv_buffer = recv_buffer if recv_buffer is not None else bytearray(RECV_SIZE)
        self._recv_view = memoryview(self._recv_buffer)
        self._recv_views = [self._recv_view]  # recvmsg_into's argument, built once
        self._inbox: deque[Incoming] = deque()
        self._send_lock = threading.Lock()
        self._read_lock = threading.Lock()  # held by the one thread reading the socket
        self._cond = threading.Condition(threading.Lock())  # where the other readers wait
        self._waiting = 0
        self._eof = False
        self._closed = False
        self._broken: BaseException | None = None
        #: What the peer said about failing to start (``STARTUP_FAILED``), once received.
        self.peer_failure: str | None = None
        # Used only by the one thread reading at a time, for recv(timeout=...).
        self._in_poll = select.poll()
        self._in_poll.register(sock, select.POLLIN)
        #: Called as ``on_control(message, fds)`` for each control message (``cmd == "NODE_CLUSTER"``),
        #: by whichever thread reads; it owns the fds. Without it they are dropped, as Node drops them.
        self.on_control: Any = None
        self._node = NodeLink(self, node_peer=node_peer) if serialization == "json" else None
        # The compiled hot path (see _speedups.c) where it is built: the same socket, send lock and
        # receive buffer, so both paths can take turns.
        self._wire = (speedups.Wire(self.fd, self._send_lock, self._recv_buffer, max_frame_size, self._inbox, _NO_FDS,
                                    **({} if self._pickle is not None else cast(JsonCodec, self.codec).wire_options()))
                      if speedups is not None else None)

    # ----------------------------------------------------------------- state
    @property
    def connected(self) -> bool:
        """True until either side closes the channel (or it breaks)."""
        return not (self._closed or self._eof or self._broken)

    @property
    def exhausted(self) -> bool:
        """True once the channel is closed and every message received has been taken."""
        return not self._inbox and not self.connected

    @property
    def ended(self) -> bool:
        """True once the peer closed its end or the channel broke (not when this end closed it)."""
        return self._eof or self._broken is not None

    def fileno(self) -> int:
        return self.fd

    def read_in_background(self) -> None:
        """Toward a Node peer, read all the time from a thread, as Node's runtime does (else nothing).

        Started by the endpoints, in the process that uses the channel: a thread started
        before a fork would not exist in the child.
        """
        if self._node is not None:
            self._node.start_reader()

    def close(self) -> None:
        """Close this end; the peer sees EOF. Undelivered messages are dropped, their fds closed.

        Toward a Node peer, the last handle sent is first given time to be acknowledged: a Node
        child that cannot write its ACK closes its end and drops what it has not read yet.
        """
        node = self._node
        if node is not None:
            node.wait_for_ack(DISCONNECT_ACK_WAIT)
        with self._cond:
            if self._closed:
                return
            self._closed = True
            while self._inbox:
                close_fds(self._inbox.popleft()[1])
            self._cond.notify_all()
        self._release_socket()
        if node is not None:
            node.close()
        self._disown(list(self._owned))
        if self._outbox is not None:
            self._outbox.close()
        if self._inbox_segments is not None:
            self._inbox_segments.close()

    def _release_socket(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes any thread blocked on this socket
        except OSError:
            pass
        with self._send_lock:
            if self._wire is not None:
                self._wire.disable()  # before the fd number can be reused
            self.sock.close()
        self._decoder.close()  # fds of a frame that will never complete

    # ---------------------------------------------------------------- sending
    def encode(self, message: Message, handle: Handle | None = None, *,
               wait: bool = True) -> tuple[bytes, list[int]]:
        """Frame bytes and fds for one message; raises ``SerializationError`` and sends nothing.

        Large buffers are copied into a shared segment whose fd ends the list; the channel closes
        that fd once the frame has been handed to the kernel (or failed to be), or ``withdraw``
        does for a frame that will not be sent. While the peer has not read
        ``shm_in_flight_limit`` bytes of earlier segments, this waits (backpressure, as a full
        socket blocks ``send``); with ``wait=False`` it raises ``BlockingIOError`` instead.
        """
        codec = self._pickle
        threshold = self.zero_copy_threshold
        if handle is None:
            if codec is None or threshold is None:
                return self.codec.encode(message), []
            data, shared = codec.encode_message(message, threshold, self._reusable)
            if not shared:
                return data, []
            return data, [self._pack(shared, wait)]
        fd, kind = handle_fd(handle)
        if codec is None:  # json: Node's NODE_HANDLE envelope
            fields = cast(NodeLink, self._node).handle_fields(handle, kind)
            return cast(JsonCodec, self.codec).encode(message, kind, handle_fields=fields), [fd]
        if threshold is None:
            return codec.encode(message, kind), [fd]
        data, shared = codec.encode_shared(message, kind, threshold=threshold, reusable=_shm.REUSABLE)
        return data, ([fd, self._pack(shared, wait)] if shared else [fd])

    def encode_fds(self, message: Message, fds: list[int]) -> tuple[bytes, list[int]]:
        """Like ``encode``, for a message that carries several plain fds (received as a list)."""
        if self._pickle is None:
            raise ValueError("several fds per message need serialization='pickle'")
        data, shared = self._pickle.encode_shared(message, raw_fds=len(fds), threshold=self.zero_copy_threshold,
                                                  reusable=_shm.REUSABLE)
        return data, ([*fds, self._pack(shared)] if shared else list(fds))

    def _pack(self, shared: list[memoryview], wait: bool = True) -> int:
        offsets, size = segment_layout(shared)
        if self.shm_in_flight_limit is not None:
            self._make_room(size, self.shm_in_flight_limit, wait)
        if self._outbox is None:
            self._outbox = _shm.Outbox()
        try:
            fd = self._outbox.pack(shared, offsets, size)
        except OSError as exc:
            raise SerializationError(f"cannot place {size} bytes in shared memory: {exc}") from exc
        self._owned[fd] = size
        self._unread += size
        return fd

    def _make_room(self, size: int, limit: int, wait: bool) -> None:
        """Wait until the segments in flight leave room for ``size`` more bytes.

        The frames that carry segments are tiny, so a full socket never stops them: what is in
        flight is counted here instead, and forgotten once the peer has read everything we sent
        (the socket's send queue is empty). Polled: nothing signals that moment.
        """
        delay = 0.0005
        while self._unread and self._unread + size > limit:
            if not _unread_in_socket(self.sock):
                self._unread = 0
                return
            self._check_sendable()
            if not wait:
                raise BlockingIOError(f"{self._unread} bytes of shared memory not yet read by the peer")
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    def _disown(self, fds: list[int]) -> None:
        """Close the segment fds among ``fds``: they are in flight now, or will never be."""
        for fd in fds:
            if self._owned.pop(fd, None) is not None:
                os.close(fd)

    def withdraw(self, fds: list[int]) -> None:
        """Release what ``encode`` took for a frame that will never be sent (its segment)."""
        for fd in fds:
            size = self._owned.pop(fd, None)
            if size is not None:
                self._unread = max(0, self._unread - size)
                os.close(fd)

    def send(self, message: Message, handle: Handle | None = None) -> None:
        """Send one message, blocking while the peer is behind (backpressure)."""
        if handle is None:
            wire = self._wire
            if wire is not None and self._broken is None:
                # Compiled: encode, frame and write in one call (under the send lock).
                try:
                    rest = wire.send(message, self.zero_copy_threshold)
                except OSError as exc:
                    raise self._send_failed(exc) from exc
                except BaseException as exc:
                    if wire.torn:
                        self._break(exc)
                    raise
                if rest is None:
                    return
            # The hot path, flattened: what ``encode`` and ``send_bytes`` do for a message
            # without fds, less their layers of calls (each costs more than the write's own Python).
            codec = self._pickle
            if codec is None:
                data = self.codec.encode(message)
            else:
                data, shared = codec.encode_message(message, self.zero_copy_threshold, self._reusable)
                if shared:
                    self.send_bytes(data, [self._pack(shared, True)])
                    return
            with self._send_lock:
                if self._closed or self._broken is not None:
                    self._check_sendable()
                try:
                    self.sock.sendall(data)
                except OSError as exc:
                    raise self._send_failed(exc) from exc
                except BaseException as exc:
                    self._break(exc)
                    raise
            return
        data, fds = self.encode(message, handle)
        if self._node is not None:  # a handle (messages without one returned above)
            self._node.send_handle(data, fds)
        else:
            self.send_bytes(data, fds)

    def send_many(self, messages: Iterable[Message]) -> None:
        """Send several messages in one write: the way to stream many small ones fast.

        Each is encoded first, so one that cannot be (``SerializationError``) sends none.
        Messages whose buffers would go through shared memory are sent inline here.
        """
        if self._pickle is not None:
            encode = self._pickle.encode_message
            frames = [encode(message, None, False)[0] for message in messages]
        else:
            frames = [self.codec.encode(message) for message in messages]
        if frames:
            self.send_bytes(b"".join(frames))

    def send_control(self, message: dict[str, Any], fds: Iterable[int] = ()) -> None:
        """Send a control message (``cmd`` set to ``"NODE_CLUSTER"``) that the peer's ``recv`` never returns.

        Pickle channels mark it as a control frame; JSON channels rely on Node's ``NODE_`` prefix.
        """
        message = {**message, "cmd": CONTROL_CMD}
        fds = list(fds)
        if self._pickle is not None:
            data = self._pickle.encode(message, control=True, raw_fds=len(fds))
        else:
            data = self.codec.encode(message)
        self.send_bytes(data, fds)

    def fill(self) -> None:
        """Wait for data and decode it into the inbox, as one reader among others.

        For a thread that watches a channel (its control messages, its end) while other threads
        ``recv`` its messages: what it decodes waits in the inbox for them.
        """
        with self._read_lock:
            if self.connected:
                self.read_available(block=True)
        if self._waiting:
            with self._cond:
                self._cond.notify_all()

    def send_fds(self, message: Message, fds: list[int]) -> None:
        """Send one message with several fds; the receiver gets them from ``recv_fds``."""
        data, all_fds = self.encode_fds(message, fds)
        self.send_bytes(data, all_fds)

    def send_bytes(self, data: bytes, fds: list[int] = ()) -> None:  # type: ignore[assignment]
        """Write encoded frames whole; blocks while the socket is full (backpressure).

        ``fds`` are the ones ``encode`` returned: a shared segment's among them is closed here
        once it is in flight (or failed to be), as ``try_send`` does.

        If a signal handler raises during the write (Ctrl-C in a big send), nobody can tell how
        much of the frame went out: Python drops the byte count when the handler's exception
        replaces the call's result. Rather than risk half a frame, which would turn everything
        after it into garbage for the peer, the channel is broken: the peer sees the end of
        the channel, later sends raise ``ChannelClosed``, and the exception goes on.
        """
        with self._send_lock:
            try:
                self._check_sendable()
                if fds:
                    sent = self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                    if sent < len(data):
                        self.sock.sendall(memoryview(data)[sent:])
                else:
                    self.sock.sendall(data)
            except ChannelClosed:  # from _check_sendable: say it as it is
                raise
            except OSError as exc:  # EPIPE / ECONNRESET: the peer is gone (or we closed meanwhile)
                raise self._send_failed(exc) from exc
            except BaseException as exc:
                self._break(exc)
                raise
            finally:
                if fds and self._owned:  # segment fds from encode(): in flight now, or never
                    self._disown(fds)

    def _break(self, exc: BaseException) -> None:
        """A write was interrupted part-way (see ``send_bytes``): no frame can follow it."""
        self._broken = exc
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def try_send(self, view: memoryview | bytes, fds: list[int] = ()) -> int:  # type: ignore[assignment]
        """One non-blocking write; returns the bytes sent (0 when the socket is full)."""
        if not fds:
            if self._closed or self._broken is not None:
                self._check_sendable()
            try:
                return self.sock.send(view, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return 0
            except OSError as exc:
                raise self._send_failed(exc) from exc
        try:
            self._check_sendable()
            sent = self.sock.sendmsg(
                [view], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))], socket.MSG_DONTWAIT)
        except BlockingIOError:
            return 0
        except OSError as exc:
            self._disown(fds)
            raise self._send_failed(exc) from exc
        except BaseException:
            self._disown(fds)
            raise
        if self._owned:
            self._disown(fds)
        return sent

    def _check_sendable(self) -> None:
        if self._closed:
            raise ChannelClosed("channel is closed")
        if self._broken is not None:
            raise ChannelClosed("channel is broken") from self._broken

    def _send_failed(self, exc: OSError) -> ChannelClosed:
        if self._closed:
            return ChannelClosed("channel is closed")
        return ChannelClosed(f"peer closed the channel ({exc.strerror or exc})")

    # -------------------------------------------------------------- receiving
    def read_available(self, *, block: bool = False) -> bool:
        """Read once (waiting for data if ``block``) and decode. False when there was nothing to read."""
        wire = self._wire
        if wire is not None and self._decoder.idle:
            # Compiled: the read's whole plain messages go to the inbox; the rest below.
            try:
                done = wire.fill(block)
            except OSError as exc:
                self._read_failed(exc)
                return True
            if done is None:
                return True
            if done is False:
                return False
            block = False  # what fill() left is read below without waiting
        try:
            if wire is not None:
                got = wire.read(block)
                if got is None:
                    return False
                start, nbytes, fds = got
            else:
                start = 0
                nbytes, ancdata, _flags, _ = self.sock.recvmsg_into(
                    self._recv_views, _ANC_SIZE, _RECV_FLAGS if block else _RECV_FLAGS_NOWAIT)
                fds = _fds_from_ancdata(ancdata) if ancdata else _NO_FDS
        except BlockingIOError:
            return False
        except OSError as exc:
            self._read_failed(exc)
            return True
        if nbytes == 0:
            self._ended(fds)
            return True
        try:
            items = self._decoder.feed(self._recv_view[start:nbytes], fds)
        except ProtocolError as exc:
            self._broken = exc
            self._inbox.append((None, [], None, False, exc))
            return True
        for item in items:
            if item[3]:
                self._internal(item)
            else:
                self._inbox.append(item)
        return True

    def _read_failed(self, exc: OSError) -> None:
        """A read raised: the end of the channel (broken unless the peer reset it)."""
        if not self._closed:
            if not isinstance(exc, ConnectionResetError):
                self._broken = exc
            self._ended(_NO_FDS)

    def _ended(self, fds: list[int]) -> None:
        close_fds(fds)
        self._eof = True
        self._release_socket()  # nothing more can come: give the fd back now

    def _internal(self, item: Incoming) -> None:
        """Internal messages: control and startup reports for forkio; Node's answered as Node does."""
        msg, fds = item[0], item[1]
        cmd = msg.get("cmd") if isinstance(msg, dict) else None
        if cmd == CONTROL_CMD and self.on_control is not None:
            self.on_control(msg, fds)
        elif cmd == STARTUP_FAILED:
            self.peer_failure = str(msg.get("error"))
            close_fds(fds)
        elif self._node is not None:
            self._node.internal(item)
        else:
            close_fds(fds)

    def _map_segment(self, fd: int, reusable: bool) -> memoryview:
        if self._inbox_segments is None:
            self._inbox_segments = _shm.Inbox()
        return self._inbox_segments.map(fd, reusable)

    def pop(self, with_handle: bool) -> Any:
        """Take the next decoded message (raising the error that replaced it, if any)."""
        item = self._inbox.popleft()
        if with_handle is False and not item[1] and item[4] is None:
            return item[0]
        return self._take(item, with_handle)

    def _take(self, item: Incoming, with_handle: bool) -> Any:
        """What ``pop`` returns for ``item``."""
        message, fds, handle_kind, _internal, error = item
        if error is not None:
            raise error
        if not fds:
            return (message, None) if with_handle else message
        kind = handle_kind or RAW_FD
        handle = rebuild_handle(fds[0], kind) if self._node is None else self._node.rebuild(fds[0], kind)
        close_fds(fds[1:])
        if with_handle:
            return message, handle
        if isinstance(handle, int):
            os.close(handle)
        else:
            handle.close()
        return message

    def _check_open(self) -> None:
        if self._closed:
            raise ChannelClosed("channel is closed")
        if self._broken is not None and not isinstance(self._broken, ProtocolError):
            raise ChannelClosed("channel is broken") from self._broken
        if self.peer_failure is not None:
            raise ChannelClosed(f"peer closed the channel: it failed to start: {self.peer_failure}")
        raise ChannelClosed("peer closed the channel")

    def read_pending(self, wait: float = 0.0) -> None:
        """Decode what has arrived, without waiting for more. While another thread reads, leave it
        to that thread; with ``wait``, when there is something to read, wait up to that long for
        it to have decoded it (a reader blocked on an idle socket is not waited for)."""
        locked = self._read_lock.acquire(blocking=False)
        if not locked and wait > 0:
            poller = select.poll()
            poller.register(self.fd, select.POLLIN)
            if any(events & (select.POLLIN | select.POLLHUP) for _, events in poller.poll(0)):
                locked = self._read_lock.acquire(timeout=wait)
        if locked:
            try:
                while self.connected and self.read_available():
                    pass
            finally:
                self._read_lock.release()
            if self._waiting:
                with self._cond:
                    self._cond.notify_all()

    def pop_fds(self) -> tuple[Any, list[int]]:
        """Take the next decoded message with every fd that came with it (the caller owns them)."""
        message, fds, _handle_kind, _internal, error = self._inbox.popleft()
        if error is not None:
            raise error
        if self._node is not None:
            self._node.forget(fds)
        return message, list(fds)

    def recv_fds(self, timeout: float | None = None) -> tuple[Any, list[int]]:
        """The next message and all its fds (see ``send_fds``)."""
        result: tuple[Any, list[int]] = self.recv(timeout, with_handle=None)
        return result

    def recv(self, timeout: float | None = None, *, with_handle: bool | None = False) -> Any:
        """The next message, waiting up to ``timeout`` seconds (forever when None).

        ``with_handle=None`` is ``recv_fds``: the message and a list of its fds.
        """
        if timeout is None and with_handle is False:
            # The hot path: one message at a time, waiting forever. Whatever is not plain
            # (fds, errors, another reader, the end) goes on to the general loop below.
            inbox = self._inbox
            lock = self._read_lock
            while True:
                if inbox:
                    try:
                        item = inbox.popleft()
                    except IndexError:  # another thread took it first
                        continue
                    if item[1] or item[4] is not None:
                        return self._take(item, False)
                    return item[0]
                # acquire(False), not blocking=False: the keyword costs a thousand instructions.
                if self._closed or self._eof or self._broken is not None or not lock.acquire(False):
                    break
                try:
                    if not inbox:
                        wire = self._wire
                        if wire is not None and self._decoder.idle:
                            # Compiled: one read; the first message when it holds whole plain frames.
                            try:
                                message = wire.recv_message()
                            except OSError as exc:
                                self._read_failed(exc)
                            else:
                                if message is not _MORE:
                                    return message
                                self.read_available()  # decodes what recv_message left
                        else:
                            self.read_available(block=True)
                finally:
                    lock.release()
                    if self._waiting:
                        with self._cond:
                            self._cond.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        inbox = self._inbox
        looked = False  # whether the socket was read (or a reader waited for) since the call
        while True:
            if inbox:
                try:
                    return self.pop_fds() if with_handle is None else self.pop(with_handle)
                except IndexError:  # another thread took it first
                    continue
            if not self.connected:
                self._check_open()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                if looked:
                    raise WaitTimeout(f"no message within {timeout} s")
                remaining = 0.0  # timeout=0, or a deadline passed before any look: one look still
            looked = True
            if self._read_lock.acquire(False):
                try:
                    if inbox:
                        continue
                    if remaining is None:
                        self.read_available(block=True)
                    elif not self.read_available():
                        self._in_poll.poll(max(0.0, remaining * 1000))
                finally:
                    self._read_lock.release()
                    if self._waiting:
                        with self._cond:
                            self._cond.notify_all()
            else:
                # Another thread is reading: wait for it to hand over what it decodes.
                with self._cond:
                    self._waiting += 1
                    try:
                        if not inbox and self._read_lock.locked():
                            self._cond.wait(remaining)
                    finally:
                        self._waiting -= 1

    def __iter__(self) -> Channel:
        return self

    def __next__(self) -> Any:
        try:
            return self.recv()
        except ChannelClosed:
            raise StopIteration from None
