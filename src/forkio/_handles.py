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
# Node sends bare libuv handles (a TCP/pipe handle, a UDP handle) under these names.
NODE_NATIVE = "net.Native"
NODE_DGRAM_NATIVE = "dgram.Native"
RAW_FD = "fd"
SOCKET_KINDS = frozenset((NODE_SERVER, NODE_SOCKET, NODE_DGRAM, NODE_NATIVE, NODE_DGRAM_NATIVE))
# The longest wait Python's socket timeouts get from poll() in one go (its int milliseconds):
# about 24.8 days. See rebuild_handle.
LONG_WAIT = (2**31 - 1) // 1000


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


def node_handle_fields(handle: Handle) -> dict[str, str]:
    """What Node's ``NODE_HANDLE`` envelope carries besides the kind: a UDP socket's ``dgramType``.

    Node rebuilds a datagram socket with ``dgram.Socket(dgramType)`` and fails without it.
    """
    if isinstance(handle, socket.socket) and handle.type == socket.SOCK_DGRAM:
        if handle.family == socket.AF_INET:
            return {"dgramType": "udp4"}
        if handle.family == socket.AF_INET6:
            return {"dgramType": "udp6"}
    return {}


def rebuild_handle(fd: int, kind: str, socket_class: type[socket.socket] = socket.socket) -> Handle:
    """The object a received fd becomes: a ``socket_class`` for sockets, else the int fd itself.

    A socket waits like a blocking one whatever mode it arrives in. One that arrives
    non-blocking (all of Node's do) keeps O_NONBLOCK: the flag belongs to the open file,
    which the sender shares, and clearing it would make a Node sender's event loop block in
    its next read or accept on that socket. It gets a timeout of ``LONG_WAIT`` seconds instead,
    so that Python waits for it with poll(): no BlockingIOError, and ``gettimeout()`` says so.
    """
    if kind in SOCKET_KINDS:
        try:
            sock = socket_class(fileno=fd)
        except OSError:
            os.close(fd)
            raise
        if not os.get_blocking(fd):
            sock.settimeout(LONG_WAIT)
        return sock
    return fd


def close_fds(fds: list[int]) -> None:
    """Close fds nobody will claim, so that a dropped message leaks nothing."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
