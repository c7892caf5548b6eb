"""One end of a channel as asyncio code sees it: ``AsyncChildProcess`` and ``aparent``.

Kept apart from the sync face so that a child that never uses asyncio never imports it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from ._channel import Channel
from ._check import timeout_arg
from ._errors import ChannelClosed, WaitTimeout
from ._handles import Handle
from ._node import NodeLink

INBOX_HIGH_WATER = 1024  # decoded messages queued before the reader pauses


class AsyncEndpoint:
    """asyncio messaging over a channel; never blocks the event loop.

    Cancelling ``await recv()`` loses no message: messages stay queued in the channel until
    a ``recv`` returns them.
    """

    def __init__(self, channel: Channel | None, reason: str = "no channel", *, unusable: bool = False) -> None:
        self._channel = channel
        self._reason = reason  # why there is no channel, for the error when there is none
        self._unusable = unusable  # a channel was given but cannot be used (not just absent)
        self._outgoing: deque[_Outgoing] = deque()
        self._writer: asyncio.Task[None] | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self._reading = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watching: NodeLink | None = None  # the background reader that wakes us, if any
        if channel is not None:
            channel.read_in_background()  # only toward a Node peer

    @property
    def channel(self) -> Channel:
        if self._channel is None:
            raise ChannelClosed(self._reason)
        return self._channel

    @property
    def connected(self) -> bool:
        return self._channel is not None and self._channel.connected

    async def send(self, message: Any, handle: Handle | None = None) -> None:
        """Send ``message``; waits (without blocking the loop) while the peer is behind.

        Frames are never cut: cancelling a ``send`` whose frame has started going out lets the
        frame finish in the background (the cancellation still propagates); one that has not
        started is dropped.
        """
        channel = self.channel
        try:
            data, fds = channel.encode(message, handle, wait=False)
        except BlockingIOError:  # shared segments not yet read by the peer: wait without blocking the loop
            data, fds = await _encode(channel, message, handle)
        view = memoryview(data)
        started = False
        # Toward a Node peer a handle goes out only once the previous one is acknowledged.
        node = channel._node if handle is not None and channel._node is not None and channel._node.node_peer else None
        handle_data = None
        if node is not None:
            self._watch(channel, node)
            handle_data = data
        if not self._outgoing and (node is None or not node.awaiting_ack):
            sent = _try_send(channel, view, fds, handle_data)  # fast path: the whole frame fits now
            if sent == len(data):
                return
            handle_data = None
            if sent:
                view, fds, started = view[sent:], [], True
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        entry = _Outgoing(view, fds, done, started, handle_data)
        self._outgoing.append(entry)
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._write_outgoing(channel, loop))
        try:
            await done
        except asyncio.CancelledError:
            if not entry.started and entry in self._outgoing:
                self._outgoing.remove(entry)
                channel.withdraw(entry.fds)  # its shared segment goes back now, not at close
            raise

    async def _write_outgoing(self, channel: Channel, loop: asyncio.AbstractEventLoop) -> None:
        """The one writer of queued frames, in order, each to its end."""
        outgoing = self._outgoing
        while outgoing:
            entry = outgoing[0]
            try:
                if entry.handle_data is not None and channel._node is not None and channel._node.awaiting_ack:
                    await self._woken(loop)
                    continue  # an answer may have been put first meanwhile
                sent = _try_send(channel, entry.view, entry.fds, entry.handle_data)
                entry.handle_data = None
            except ChannelClosed as exc:
                for waiting in outgoing:
                    channel.withdraw(waiting.fds)
                    if waiting.done is not None and not waiting.done.done():
                        waiting.done.set_exception(exc)
                outgoing.clear()
                return
            if sent:
                entry.started = True
                entry.view, entry.fds = entry.view[sent:], []
                if not entry.view:
                    outgoing.popleft()
                    if entry.done is not None:
                        _resolve(entry.done)
                continue
            ready = loop.create_future()
            loop.add_writer(channel.fileno(), _resolve, ready)
            try:
                await ready
            finally:
                loop.remove_writer(channel.fileno())

    async def recv(self, timeout: float | None = None, *, with_handle: bool = False) -> Any:
        """The next message (see ``Endpoint.recv``), awaiting it without blocking the loop."""
        channel = self.channel
        if timeout is not None:
            timeout = timeout_arg(timeout)
        if timeout is None:
            return await self._recv(channel, with_handle)
        try:
            return await asyncio.wait_for(self._recv(channel, with_handle), timeout)
        except asyncio.TimeoutError:
            raise WaitTimeout(f"no message within {timeout} s") from None

    async def _recv(self, channel: Channel, with_handle: bool) -> Any:
        while True:
            if channel._inbox:
                message = channel.pop(with_handle)
                if not self._reading and channel.connected:
                    self._start_reading(channel)
                return message
            if not channel.connected:
                channel._check_open()
            if not self._reading:
                self._start_reading(channel)
            await self._woken(asyncio.get_running_loop())

    def _start_reading(self, channel: Channel) -> None:
        self._loop = asyncio.get_running_loop()
        node = channel._node
        if node is not None and node.reading:
            self._watch(channel, node)  # a thread reads this channel already: be woken by it
        else:
            self._loop.add_reader(channel.fileno(), self._on_readable, channel)
        self._reading = True

    def _stop_reading(self, channel: Channel) -> None:
        if self._reading:
            self._reading = False
            if self._watching is not None:
                return  # the background reader goes on; it stops at the end of the channel
            try:
                if self._loop is not None:
                    self._loop.remove_reader(channel.fileno())
            except (ValueError, OSError, RuntimeError):
                pass

    def _watch(self, channel: Channel, node: NodeLink) -> None:
        """Be woken by the channel's background reader, and have it write its answers through us."""
        if self._watching is not None:
            return
        loop = asyncio.get_running_loop()

        def wake() -> None:
            try:
                loop.call_soon_threadsafe(self._wake)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

        def reply(data: bytes, fds: list[int]) -> None:
            # Written by our one writer, so that an answer never splits a frame it is sending.
            try:
                loop.call_soon_threadsafe(self._queue_reply, channel, data, fds)
            except RuntimeError:  # the loop is closed: write it from here
                node.write_reply = node._write_now
                node._write_now(data, fds)

        self._watching = node
        node.write_reply = reply
        node.add_waker(wake)

    def _queue_reply(self, channel: Channel, data: bytes, fds: list[int]) -> None:
        # First in line (after a frame half sent), as Node's answers skip its queue: a handle of
        # ours waiting for its ACK must not hold back our ACK of the peer's.
        outgoing = self._outgoing
        reply = _Outgoing(memoryview(data), fds, None, False, None)
        outgoing.insert(1 if outgoing and outgoing[0].started else 0, reply)
        if self._writer is None or self._writer.done():
            loop = asyncio.get_running_loop()
            self._writer = loop.create_task(self._write_outgoing(channel, loop))

    async def _woken(self, loop: asyncio.AbstractEventLoop) -> None:
        waiter = loop.create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _on_readable(self, channel: Channel) -> None:
        # The reader stays registered between recv() calls (one epoll_ctl per burst, not per
        # message) and pauses once enough is queued, so a peer cannot make us buffer without bound.
        channel.read_available()
        if not channel.connected or len(channel._inbox) >= INBOX_HIGH_WATER:
            self._stop_reading(channel)
        self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            _resolve(waiter)

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[Any]:
        if self._channel is None and self._unusable:
            raise ChannelClosed(self._reason)  # as recv() would: say why, rather than end quietly
        while True:
            try:
                yield await self.recv()
            except ChannelClosed:
                return

    def disconnect(self) -> None:
        """Close the channel. Idempotent."""
        if self._channel is not None:
            self._stop_reading(self._channel)
            self._channel.close()
        self._wake()


async def _encode(channel: Channel, message: Any, handle: Handle | None) -> tuple[bytes, list[int]]:
    """``channel.encode`` without blocking the loop while the peer is behind on shared segments
    (called once ``encode`` has found no room: it waits before trying again)."""
    delay = 0.0005
    while True:
        await asyncio.sleep(delay)  # nothing signals the peer's reading: poll, backing off
        delay = min(delay * 2, 0.02)
        try:
            return channel.encode(message, handle, wait=False)
        except BlockingIOError:
            pass


class _Outgoing:
    """A frame waiting to be written: what is left of it, its fds, and who waits for it (None: nobody).

    ``handle_data`` is the whole frame of a handle for a Node peer, until it is recorded as
    awaiting acknowledgement (just before it goes out).
    """

    __slots__ = ("done", "fds", "handle_data", "started", "view")

    def __init__(self, view: memoryview, fds: list[int], done: asyncio.Future[None] | None, started: bool,
                 handle_data: bytes | None) -> None:
        self.view = view
        self.fds = fds
        self.done = done
        self.started = started
        self.handle_data = handle_data


def _try_send(channel: Channel, view: memoryview, fds: list[int], handle_data: bytes | None) -> int:
    """One non-blocking write; a handle for a Node peer is first recorded as awaiting its ACK."""
    node = channel._node
    if handle_data is None or node is None:
        return channel.try_send(view, fds)
    node.expect_ack(handle_data, fds[0])
    try:
        return channel.try_send(view, fds)
    except BaseException:
        node.cancel_ack()
        raise


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
