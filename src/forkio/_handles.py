"""Turning passable handles (sockets, file descriptors) into fds for SCM_RIGHTS, and back.

A handle travels as one fd plus a small description of what it is, so the receiver can
rebuild a usable object. The names of the kinds are Node's, so the same description serves
Node's ``NODE_HANDLE`` protocol and forkio's own pickle frames.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from ._errors import SerializationError

Handle = Any  # socket.socket, an object with fileno(), or an int fd

NODE_SERVER = "net.Server"
NODE_SOCKET = "net.Socket"
NODE_DGRAM = "dgram.Socket"
RAW_FD = "fd"


def handle_fd(handle: Handle) -> tuple[int, str]:
    """The fd to send for ``handle`` and the kind the receiver should rebuild it as."""
    if isinstance(handle, int):
        fd = handle
    elif hasattr(handle, "fileno"):
        try:
            fd = handle.fileno()
        except (OSError, ValueError) as exc:
            raise SerializationError(f"cannot send handle {handle!r}: {exc}") from exc
    else:
        raise SerializationError(f"cannot send {type(handle).__name__} as a handle: need a socket, file or fd")
    if fd < 0:
        raise SerializationError(f"cannot send handle {handle!r}: it is closed")
    if isinstance(handle, socket.socket):
        if handle.type == socket.SOCK_DGRAM:
            return fd, NODE_DGRAM
        listening = handle.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        return fd, NODE_SERVER if listening else NODE_SOCKET
    return fd, RAW_FD


def rebuild_handle(fd: int, kind: str) -> Handle:
    """The object a received fd becomes: a ``socket.socket`` for sockets, else the int fd itself."""
    if kind in (NODE_SERVER, NODE_SOCKET, NODE_DGRAM):
        try:
            return socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            raise
    return fd


def close_fds(fds: list[int]) -> None:
    """Close fds nobody will claim, so that a dropped message leaks nothing."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
