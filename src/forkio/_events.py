"""A minimal event emitter, Node style: ``on``, ``off``, ``once`` and ``emit``."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

Listener = Callable[..., Any]


class EventEmitter:
    """Listeners by event name. A listener that raises is reported on stderr, never propagated."""

    _events: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._listeners: dict[str, list[Listener]] = {}
        self._listeners_lock = threading.Lock()

    def on(self, event: str, callback: Listener) -> Listener:
        """Call ``callback`` each time ``event`` happens; returns it, so this works as a decorator."""
        if event not in self._events:
            raise ValueError(f"unknown event {event!r}; expected one of {', '.join(self._events)}")
        with self._listeners_lock:
            self._listeners.setdefault(event, []).append(callback)
        self._listening(event)
        return callback

    def once(self, event: str, callback: Listener) -> Listener:
        """Like ``on``, for the next occurrence only."""

        def wrapper(*args: Any) -> None:
            self.off(event, wrapper)
            callback(*args)

        self.on(event, wrapper)
        return callback

    def off(self, event: str, callback: Listener) -> None:
        """Remove a listener added with ``on``; unknown ones are ignored."""
        with self._listeners_lock:
            listeners = self._listeners.get(event, [])
            if callback in listeners:
                listeners.remove(callback)

    def listener_count(self, event: str) -> int:
        return len(self._listeners.get(event, ()))

    def emit(self, event: str, *args: Any) -> bool:
        """Call the listeners of ``event``; True if there were any."""
        with self._listeners_lock:
            listeners = list(self._listeners.get(event, ()))
        for callback in listeners:
            try:
                callback(*args)
            except Exception:
                import traceback  # here, not at the top: a child's start-up should not pay for it

                print(f"forkio: exception in {event!r} listener {callback!r}:", file=sys.stderr)
                traceback.print_exc()
        return bool(listeners)

    def _listening(self, event: str) -> None:
        """Hook: a listener for ``event`` was added."""
