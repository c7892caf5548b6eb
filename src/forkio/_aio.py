"""One end of a channel as asyncio code sees it: ``AsyncChildProcess`` and ``aparent``.

Kept apart from the sync face so that a child that never uses asyncio never imports it.

Per message, the loop's reader callback reads and decodes what has arrived, and resumes the task
waiting in ``recv`` right there (see ``_Wakeup``), rather than one pass of the loop later: a
small message costs one ``epoll_wait``, one read and one write, as it would with a protocol.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
from collections import deque
from collections.abc import Callable, Coroutine, Generator
from typing import Any

from ._channel import Channel
from ._check import timeout_arg
from ._errors import ChannelClosed, WaitTimeout
from ._handles import Handle
from ._node import NodeLink

INBOX_HIGH_WATER = 1024  # decoded messages queued before the reader pauses
# Marks a method that returns a coroutine as one (inspect.iscoroutinefunction), where Python can (3.12+).
_coroutine_function: Callable[[Any], Any] = getattr(inspect, "markcoroutinefunction", lambda function: function)


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
        self._waiters: list[_Wakeup] = []
        self._reading = False
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop our reader is registered with
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
        channel = self._channel
        if channel is None:
            raise ChannelClosed(self._reason)
        try:
            data, fds = channel.encode(message, handle, wait=False)
        except BlockingIOError:  # shared segments not yet read by the peer: wait without blocking the loop
            data, fds = await _encode(channel, message, handle)
        sent = 0
        handle_data = None
        if handle is None:
            if not self._outgoing:  # the fast path: the whole frame fits now (no task, no future)
                sent = channel.try_send(data, fds)
                if sent == len(data):
                    return
        else:
            # Toward a Node peer a handle goes out only once the previous one is acknowledged.
            node = channel._node if channel._node is not None and channel._node.node_peer else None
            if node is not None:
                self._watch(channel, node)
                handle_data = data
            if not self._outgoing and (node is None or not node.awaiting_ack):
                sent = _try_send(channel, data, fds, handle_data)
                if sent == len(data):
                    return
                handle_data = None
        view = memoryview(data)
        started = sent > 0
        if started:
            view, fds = view[sent:], []
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
            if not entry.started and entry.done is not None and entry.done.cancelled():
                # Its send was cancelled and has not run its handler yet: a frame not started is
                # dropped, whoever gets there first (this loop can write many frames in one go).
                outgoing.popleft()
                channel.withdraw(entry.fds)
                continue
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

    # recv hands out one coroutine, rather than being one that awaits another: each layer of
    # awaits costs about as much as the read itself. Every check runs once it is awaited.
    @_coroutine_function
    def recv(self, timeout: float | None = None, *, with_handle: bool = False) -> Coroutine[Any, Any, Any]:
        """The next message (see ``Endpoint.recv``), awaiting it without blocking the loop."""
        if timeout is None:
            return self._receive(with_handle, False)
        return self._receive_within(timeout, with_handle)

    async def _receive_within(self, timeout: float, with_handle: bool) -> Any:
        limit = timeout_arg(timeout)
        if limit is None:
            return await self._receive(with_handle, False)
        try:
            return await asyncio.wait_for(self._receive(with_handle, False), limit)
        except asyncio.TimeoutError:
            raise WaitTimeout(f"no message within {limit} s") from None

    def __aiter__(self) -> AsyncEndpoint:
        return self

    async def _receive(self, with_handle: bool = False, ending: bool = True) -> Any:
        """The next message; at the end of the channel ``ChannelClosed``, or ``StopAsyncIteration``
        if ``ending`` (where there is no channel at all, unless it was unusable: then say why).
        With its defaults it is ``__anext__``: ``async for`` calls it directly."""
        channel = self._channel
        if channel is None:
            if ending and not self._unusable:
                raise StopAsyncIteration
            raise ChannelClosed(self._reason)
        inbox = channel._inbox
        while True:
            if inbox:
                message = channel.pop(with_handle)
                if not self._reading and channel.connected:
                    self._start_reading(channel)  # the reader paused with a full inbox: room again
                return message
            loop = asyncio.get_running_loop()
            # While our reader is registered on this loop the channel is open (the reader stops at
            # its end; a socket closed under it has fileno -1): only otherwise ask channel.connected.
            if not self._reading or self._loop is not loop or channel.sock.fileno() < 0:
                if not channel.connected:
                    if ending:
                        raise StopAsyncIteration
                    channel._check_open()
                self._start_reading(channel)
            waiter = _Wakeup(loop)
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:  # cancelled: the message, if one came meanwhile, stays in the inbox
                self._forget(waiter)
                raise

    __anext__ = _receive

    def _start_reading(self, channel: Channel) -> None:
        loop = asyncio.get_running_loop()
        if self._reading and self._loop is not loop and self._watching is None:
            self._stop_reading(channel)  # registered with a loop that has ended (asyncio.run again)
        self._loop = loop
        node = channel._node
        if node is not None and node.reading:
            self._watch(channel, node)  # a thread reads this channel already: be woken by it
        else:
            loop.add_reader(channel.fileno(), self._on_readable, channel)
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
        waiter = _Wakeup(loop)
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            self._forget(waiter)
            raise

    def _forget(self, waiter: _Wakeup) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)

    def _on_readable(self, channel: Channel) -> None:
        # The reader stays registered between recv() calls (one epoll_ctl per burst, not per
        # message) and pauses once enough is queued, so a peer cannot make us buffer without bound.
        channel.read_available()
        if not channel.connected or len(channel._inbox) >= INBOX_HIGH_WATER:
            self._stop_reading(channel)
        if len(self._waiters) == 1:  # the usual case: one recv waiting, resumed here and now
            self._waiters.pop().wake_now()
        elif self._waiters:
            self._wake()  # several: each in its turn, so that one's error cannot strand the others

    def _wake(self) -> None:
        """Wake every waiter, each in the loop's next pass (this may be called from a task)."""
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.wake_soon()

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


_PENDING, _WOKEN = 0, 1  # a _Wakeup's states; cancelled, it holds the CancelledError to raise


class _Wakeup:
    """What a task awaits until a loop callback has news for it: a one-shot, Future-compatible
    object that the callback can resume the task with at once.

    An ``asyncio.Future`` hands its task to ``call_soon``: the task would run one pass of the
    loop after the message was read, a second ``epoll_wait`` and trip through the loop per
    message. asyncio's tasks accept any object that keeps the Future protocol they use
    (``_asyncio_future_blocking``, ``_loop``, ``add_done_callback``, ``result``, ``cancel``;
    see ``asyncio.isfuture``), and so do other loops' (uvloop runs asyncio's own tasks); without
    a ``get_loop`` method they read ``_loop``, one Python call less per message. Only
    the loop may call ``wake_now`` (from a callback, when no task is running: a task cannot be
    stepped from inside another); everyone else uses ``wake_soon``. Cancelling it wakes the task
    in the next pass, with ``CancelledError``, as a Future would.
    """

    __slots__ = ("_asyncio_future_blocking", "_callback", "_context", "_loop", "_state")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._state: int | asyncio.CancelledError = _PENDING
        self._asyncio_future_blocking = False
        self._callback: Callable[[Any], object] | None = None
        self._context: contextvars.Context | None = None

    def __await__(self) -> Generator[Any, None, None]:
        if self._state == _PENDING:
            self._asyncio_future_blocking = True
            yield self  # the task calls add_done_callback, then result() once woken
        elif self._state != _WOKEN:
            self.result()  # cancelled before it was awaited

    def add_done_callback(self, fn: Callable[[Any], object], *, context: contextvars.Context | None = None) -> None:
        if self._callback is not None:
            raise RuntimeError("a _Wakeup has one waiter: the task that awaits it")
        self._callback, self._context = fn, context
        if self._state != _PENDING:
            self._schedule()

    def remove_done_callback(self, fn: Callable[[Any], object]) -> int:
        if self._callback is None or self._callback != fn:
            return 0
        self._callback = self._context = None
        return 1

    def done(self) -> bool:
        return self._state != _PENDING

    def cancelled(self) -> bool:
        return isinstance(self._state, asyncio.CancelledError)

    def result(self) -> None:
        state = self._state
        if state == _PENDING:
            raise asyncio.InvalidStateError("not woken yet")
        if isinstance(state, asyncio.CancelledError):
            raise state

    def exception(self) -> BaseException | None:
        self.result()
        return None

    def cancel(self, msg: Any = None) -> bool:
        if self._state != _PENDING:
            return False
        self._state = asyncio.CancelledError() if msg is None else asyncio.CancelledError(msg)
        self._schedule()
        return True

    def wake_now(self) -> None:
        """Resume the waiting task here (the caller is the loop, running no task)."""
        if self._state == _PENDING:
            self._state = _WOKEN
            callback, context = self._callback, self._context
            if callback is not None:
                self._callback = self._context = None
                if context is None:
                    callback(self)
                else:
                    context.run(callback, self)

    def wake_soon(self) -> None:
        """Resume the waiting task in the loop's next pass (from anywhere on the loop's thread)."""
        if self._state == _PENDING:
            self._state = _WOKEN
            self._schedule()

    def _schedule(self) -> None:
        callback = self._callback
        if callback is not None:
            self._loop.call_soon(callback, self, context=self._context)
            self._callback = self._context = None

    def __repr__(self) -> str:
        state = "pending" if self._state == _PENDING else "woken" if self._state == _WOKEN else "cancelled"
        return f"<forkio wake-up {state}>"


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


def _try_send(channel: Channel, view: memoryview | bytes, fds: list[int], handle_data: bytes | None) -> int:
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
