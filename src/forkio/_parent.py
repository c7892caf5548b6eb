"""The child's side: ``forkio.parent``, the channel to whoever forked us (``aparent`` is its asyncio twin).

The channel is found the way Node's children find theirs: the fd number in
``NODE_CHANNEL_FD`` and the format in ``NODE_CHANNEL_SERIALIZATION_MODE``, both removed from
the environment so grandchildren do not inherit them. So a script that uses ``parent`` works
unchanged under a forkio parent and under a Node parent.
"""

from __future__ import annotations

import os
import socket
import sys

from ._channel import Channel
from ._endpoint import Endpoint

_NOT_FORKED = "this process was not started by forkio.fork() or Node's fork(): it has no parent channel"
# forkio starts Python children as ``python -c "...; import forkio._bootstrap as b; ..."`` (see
# ``_launch.BOOTSTRAP``); any other start with a channel in the environment is Node's fork().
BOOTSTRAP_MARK = "import forkio._bootstrap"


def _parent_is_node() -> bool:
    return not any(BOOTSTRAP_MARK in arg for arg in sys.orig_argv)


def _take_channel_from_environment() -> tuple[Channel | None, str, bool]:
    """The channel, or None and why not, and whether that is an error (not just "not forked")."""
    fd_text = os.environ.pop("NODE_CHANNEL_FD", None)
    mode = os.environ.pop("NODE_CHANNEL_SERIALIZATION_MODE", None) or "json"
    if fd_text is None:
        return None, _NOT_FORKED, False
    try:
        fd = int(fd_text)
        sock = socket.socket(fileno=fd)
    except (ValueError, OSError) as exc:
        return None, f"NODE_CHANNEL_FD={fd_text!r} is not a usable socket: {exc}", True
    sock.set_inheritable(False)
    try:
        return Channel(sock, serialization=mode, node_peer=mode == "json" and _parent_is_node()), "", False
    except ValueError as exc:  # e.g. Node's 'advanced' mode
        sock.close()
        return None, str(exc), True


class Parent(Endpoint):
    """The channel to the parent process (sync). ``connected`` is False outside a forked child."""

    @property
    def serialization(self) -> str | None:
        """``"pickle"`` or ``"json"``; None without a channel."""
        return self._channel.serialization if self._channel is not None else None

    def __repr__(self) -> str:
        if self._channel is None:
            return "<forkio.parent (not forked)>"
        state = "connected" if self.connected else "disconnected"
        return f"<forkio.parent pid={os.getppid()} {self._channel.serialization} {state}>"


_channel, _reason, _unusable = _take_channel_from_environment()
parent = Parent(_channel, _reason, unusable=_unusable)

