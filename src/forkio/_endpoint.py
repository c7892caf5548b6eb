"""One end of a channel as sync code sees it: ``ChildProcess`` and ``parent`` are endpoints.

The asyncio twin is ``_aio.AsyncEndpoint``; both drive the same ``Channel`` and differ only in
how they wait.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from typing import Any

from ._channel import Channel
from ._check import timeout_arg
from ._errors import ChannelClosed
from ._events import EventEmitter
from ._handles import Handle


class Endpoint(EventEmitter):
    """Sync messaging over a channel, plus ``"message"``/``"disconnect"``/``"error"`` events.

    Adding a ``"message"`` listener starts a reader thread that hands every message to the
    listeners (as ``callback(message)``, or ``callback(message, handle)`` when the listener
    takes two arguments); without one, messages wait for ``recv()`` or iteration.
    """

    _events: tuple[str, ...] = ("message", "disconnect", "error")

    def __init__(self, channel: Channel | None, reason: str = "no channel", *, unusable: bool = False) -> None:
        super().__init__()
        self._channel = channel
        self._reason = reason  # why there is no channel, for the error when there is none
        self._unusable = unusable  # a channel was given but cannot be used (not just absent)
        self._reader: threading.Thread | None = None
        self._delivering = False  # the reader is inside a listener (see ``_delivered_all``)
        self._disconnect_lock = threading.Lock()
        self._disconnect_emitted = False
        if channel is not None:
            channel.read_in_background()  # only toward a Node peer

    @property
    def channel(self) -> Channel:
        if self._channel is None:
            raise ChannelClosed(self._reason)
        return self._channel

    @property
    def connected(self) -> bool:
        """True while messages can still be sent and received."""
        return self._channel is not None and self._channel.connected

    def send(self, message: Any, handle: Handle | None = None) -> None:
        """Send ``message`` (and optionally a socket or fd); blocks only while the peer is behind."""
        channel = self._channel
        if channel is None:
            raise ChannelClosed(self._reason)
        channel.send(message, handle)

    def send_many(self, messages: Iterable[Any]) -> None:
        """Send several messages in one write (all or none: each is encoded first).

        For streaming many small messages: one system call instead of one per message.
        """
        self.channel.send_many(messages)

    def recv(self, timeout: float | None = None, *, with_handle: bool = False) -> Any:
        """The next message; ``(message, handle_or_None)`` with ``with_handle=True``.

        Raises ``WaitTimeout`` after ``timeout`` seconds and ``ChannelClosed`` once the
        channel is closed and every message has been received.
        """
        if timeout is not None:
            timeout = timeout_arg(timeout)
        channel = self._channel
        try:
            if channel is None:
                raise ChannelClosed(self._reason)
            return channel.recv(timeout, with_handle=with_handle)
        except ChannelClosed:
            self._emit_disconnect()
            raise

    def __iter__(self) -> Iterator[Any]:
        """Every incoming message, in order, until the channel closes.

        Without a channel at all there is nothing to iterate over; a channel that could not be
        opened (Node's 'advanced' serialization, a bad fd) raises ``ChannelClosed`` saying why, as
        ``recv()`` does.
        """
        if self._channel is None:
            if self._unusable:
                raise ChannelClosed(self._reason)
            return
        inbox, pop = self._channel._inbox, self._channel.pop
        while True:
            # One read often decodes many messages: hand those out without a recv() each.
            while inbox:
                try:
                    message = pop(False)
                except IndexError:  # another thread took it first
                    break
                yield message
            try:
                yield self.recv()
            except ChannelClosed:
                return

    def disconnect(self) -> None:
        """Close the channel; the peer sees its end of messages. Idempotent."""
        if self._channel is not None:
            self._channel.close()
        self._emit_disconnect()

    def _emit_disconnect(self) -> None:
        with self._disconnect_lock:
            if self._disconnect_emitted:
                return
            self._disconnect_emitted = True
        self.emit("disconnect")

    def _listening(self, event: str) -> None:
        if event == "message" and self._reader is None and self._channel is not None:
            reader = threading.Thread(target=self._pump, name=f"forkio-reader-{self!r}", daemon=True)
            reader.start()
            self._reader = reader  # only once started: the exit watcher joins it

    def _pump(self) -> None:
        """Reader thread: deliver messages to listeners until the channel closes."""
        while True:
            try:
                message, handle = self.recv(with_handle=True)
            except ChannelClosed:
                return
            except Exception as exc:  # a message that failed to decode: report, keep reading
                self._delivering = True
                if not self.emit("error", exc):
                    import traceback

                    traceback.print_exception(exc)
                self._delivering = False
                continue
            self._delivering = True
            self._deliver(message, handle)
            self._delivering = False

    def _delivered_all(self, reader: threading.Thread) -> None:
        """Wait until the reader thread has delivered every message the peer sent before it exited.

        The reader ends at the channel's EOF, which follows the peer's exit unless another process
        (one it forked) still holds its end. Then the peer's last messages are in our socket
        already: they are all delivered once the socket and the inbox stay empty and the reader
        stays outside the listeners for a while (sampled, so that a thread switch between taking
        a message and calling its listener cannot pass for idleness).
        """
        import select
        import time

        channel = self._channel
        poller = select.poll()
        if channel is not None:
            poller.register(channel.fd, select.POLLIN)
        idle_since: float | None = None
        while True:
            reader.join(0.05)
            if not reader.is_alive() or channel is None:
                return
            if self._delivering or channel._inbox or poller.poll(0):
                idle_since = None
                continue
            now = time.monotonic()
            if idle_since is None:
                idle_since = now
            elif now - idle_since >= 0.25:
                return

    def _deliver(self, message: Any, handle: Handle | None) -> None:
        with self._listeners_lock:
            listeners = list(self._listeners.get("message", ()))
        for callback in listeners:
            try:
                if handle is not None or _takes_two(callback):
                    callback(message, handle)
                else:
                    callback(message)
            except Exception as exc:
                if not self.emit("error", exc):
                    import traceback

                    traceback.print_exception(exc)


def _takes_two(callback: Any) -> bool:
    import inspect

    try:
        params = inspect.signature(callback).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)
