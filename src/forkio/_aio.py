"""One end of a channel as asyncio code sees it: ``AsyncChildProcess`` and ``aparent``.

Kept apart from the sync face so that a child that never uses asyncio never imports it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from ._channel import Channel
from ._errors import ChannelClosed, WaitTimeout
from ._handles import Handle

INBOX_HIGH_WATER = 1024  # decoded messages queued before the reader pauses


class AsyncEndpoint:
    """asyncio messaging over a channel; never blocks the event loop.

    Cancelling ``await recv()`` loses no message: messages stay queued in the channel until
    a ``recv`` returns them.
    """

    def __init__(self, channel: Channel | None) -> None:
        self._channel = channel
        self._send_lock: asyncio.Lock | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self._reading = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def channel(self) -> Channel:
        if self._channel is None:
            raise ChannelClosed("no channel")
        return self._channel

    @property
    def connected(self) -> bool:
        return self._channel is not None and self._channel.connected

    async def send(self, message: Any, handle: Handle | None = None) -> None:
        """Send ``message``; waits (without blocking the loop) while the peer is behind."""
        channel = self.channel
        data, fds = channel.encode(message, handle)
        sent = 0
        if self._send_lock is None or not self._send_lock.locked():
            sent = channel.try_send(data, fds)  # fast path: the whole frame fits now
            if sent == len(data):
                return
        if self._send_lock is None:
            self._send_lock = asyncio.Lock()
        async with self._send_lock:
            loop = asyncio.get_running_loop()
            view = memoryview(data)[sent:]
            if sent:
                fds = []
            while view:
                n = channel.try_send(view, fds)
                if n:
                    view = view[n:]
                    fds = []
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


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
