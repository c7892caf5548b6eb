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

INBOX_HIGH_WATER = 1024  # decoded messages queued before the reader pauses


class AsyncEndpoint:
    """asyncio messaging over a channel; never blocks the event loop.

    Cancelling ``await recv()`` loses no message: messages stay queued in the channel until
    a ``recv`` returns them.
    """

    def __init__(self, channel: Channel | None, reason: str = "no channel") -> None:
        self._channel = channel
        self._reason = reason  # why there is no channel, for the error when there is none
        self._outgoing: deque[_Outgoing] = deque()
        self._writer: asyncio.Task[None] | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self._reading = False
        self._loop: asyncio.AbstractEventLoop | None = None

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
        data, fds = await _encode(channel, message, handle)
        view = memoryview(data)
        started = False
        if not self._outgoing:
            sent = channel.try_send(view, fds)  # fast path: the whole frame fits now
            if sent == len(data):
                return
            if sent:
                view, fds, started = view[sent:], [], True
        loop = asyncio.get_running_loop()
        entry = _Outgoing(view, fds, loop.create_future(), started)
        self._outgoing.append(entry)
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._write_outgoing(channel, loop))
        try:
            await entry.done
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
                sent = channel.try_send(entry.view, entry.fds)
            except ChannelClosed as exc:
                for waiting in outgoing:
                    channel.withdraw(waiting.fds)
                    if not waiting.done.done():
                        waiting.done.set_exception(exc)
                outgoing.clear()
                return
            if sent:
                entry.started = True
                entry.view, entry.fds = entry.view[sent:], []
                if not entry.view:
                    outgoing.popleft()
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
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def _start_reading(self, channel: Channel) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(channel.fileno(), self._on_readable, channel)
        self._reading = True

    def _stop_reading(self, channel: Channel) -> None:
        if self._reading:
            self._reading = False
            try:
                if self._loop is not None:
                    self._loop.remove_reader(channel.fileno())
            except (ValueError, OSError, RuntimeError):
                pass

    def _on_readable(self, channel: Channel) -> None:
        # The reader stays registered between recv() calls (one epoll_ctl per burst, not per
        # message) and pauses once enough is queued, so a peer cannot make us buffer without bound.
        channel.read_available()
        if not channel.connected or len(channel._inbox) >= INBOX_HIGH_WATER:
            self._stop_reading(channel)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            _resolve(waiter)

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[Any]:
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
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            _resolve(waiter)


async def _encode(channel: Channel, message: Any, handle: Handle | None) -> tuple[bytes, list[int]]:
    """``channel.encode`` without blocking the loop while the peer is behind on shared segments."""
    delay = 0.0005
    while True:
        try:
            return channel.encode(message, handle, wait=False)
        except BlockingIOError:
            await asyncio.sleep(delay)  # nothing signals the peer's reading: poll, backing off
            delay = min(delay * 2, 0.02)


class _Outgoing:
    """A frame waiting to be written: what is left of it, its fds, and who waits for it."""

    __slots__ = ("done", "fds", "started", "view")

    def __init__(self, view: memoryview, fds: list[int], done: asyncio.Future[None], started: bool) -> None:
        self.view = view
        self.fds = fds
        self.done = done
        self.started = started


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
