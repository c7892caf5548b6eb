"""What a cluster's primary and workers agree on: settings, addresses, and how a socket is bound."""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from .._errors import ForkioError

ENV_ID = "FORKIO_CLUSTER_WORKER"  # the worker's id, set by the primary (Node's NODE_UNIQUE_ID)
ENV_SETTINGS = "FORKIO_CLUSTER_SETTINGS"  # the settings below, as JSON
BACKLOG = 2048
MIN_UPTIME = 1.0  # a worker that dies sooner after ready is an unstable start (see _starts)
REUSE_PORT_DEFAULT = sys.platform.startswith("linux")  # elsewhere SO_REUSEPORT does not spread connections

# ("tcp", host, port) or ("unix", path): hashable, picklable, the same in primary and workers.
Address = tuple[str, ...]
AddressLike = tuple[str, int] | str | int


class ClusterError(ForkioError):
    """The cluster cannot do what was asked (bad address, a call that only a primary or a worker can make...)."""


@dataclass
class Settings:
    """A cluster's options; the primary hands them to each worker in its environment."""

    timeout: float | None = 30.0  # heartbeat: a worker whose loop is silent this long is killed
    graceful_timeout: float = 30.0  # a worker asked to stop is killed after this long
    # Each worker slot accepts on its own SO_REUSEPORT socket (the kernel spreads connections
    # evenly; measured in docs/benchmarks-cluster.md) instead of all sharing one. Linux only.
    reuse_port: bool = REUSE_PORT_DEFAULT
    wait_ready: bool = False  # a worker is ready when it calls cluster.ready(), not when it listens
    min_uptime: float = MIN_UPTIME  # a worker that dies sooner after ready is an unstable start
    max_requests: int | None = None  # forkio serve: recycle a worker after this many requests ...
    max_requests_jitter: int = 0  # ... plus a random 0..jitter
    binds: list[Address] = field(default_factory=list)  # forkio serve: the addresses to serve
    options: dict[str, Any] = field(default_factory=dict)  # forkio serve: the server's own options

    def __post_init__(self) -> None:
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds or None, not {self.timeout!r}")
        if self.graceful_timeout < 0:
            raise ValueError(f"graceful_timeout must be >= 0 seconds, not {self.graceful_timeout!r}")
        if not self.min_uptime >= 0:  # NaN too
            raise ValueError(f"min_uptime must be >= 0 seconds, not {self.min_uptime!r}")
        if self.max_requests is not None and self.max_requests < 1:
            raise ValueError(f"max_requests must be >= 1 or None, not {self.max_requests!r}")
        if self.max_requests_jitter < 0:
            raise ValueError(f"max_requests_jitter must be >= 0, not {self.max_requests_jitter!r}")

    @property
    def beat_interval(self) -> float | None:
        """How often a worker's loop says it is alive: often enough to time out within 5 %."""
        if self.timeout is None:
            return None
        return min(1.0, max(0.02, self.timeout / 20))

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls, text: str | None) -> Settings:
        if not text:
            return cls()
        data = json.loads(text)
        data["binds"] = [tuple(b) for b in data.get("binds", ())]
        return cls(**data)


def parse_address(address: AddressLike) -> Address:
    """Any accepted address form as ``("tcp", host, port)`` or ``("unix", path)``."""
    if isinstance(address, bool):
        raise ClusterError(f"not an address: {address!r}")
    if isinstance(address, int):
        return ("tcp", "0.0.0.0", str(_port(address)))
    if isinstance(address, (tuple, list)) and len(address) == 2:
        host, port = address
        if not isinstance(host, str):
            raise ClusterError(f"not an address: {address!r} (host must be a string)")
        return ("tcp", host, str(_port(port)))
    if isinstance(address, str):
        if address.startswith("unix:"):
            path = address[5:]
            if not path:
                raise ClusterError(f"not an address: {address!r} (unix: needs a path)")
            return ("unix", os.path.abspath(path))
        host, sep, port_text = address.rpartition(":")
        if sep:
            return ("tcp", host.strip("[]") or "0.0.0.0", str(_port(port_text)))
    raise ClusterError(f"not an address: {address!r} (expected (host, port), 'HOST:PORT', a port or 'unix:PATH')")


def _port(port: object) -> int:
    try:
        number = int(str(port))
    except (TypeError, ValueError):
        raise ClusterError(f"not a port: {port!r}") from None
    if not 0 <= number <= 65535:
        raise ClusterError(f"not a port: {port!r} (0..65535)")
    return number


def describe(address: Address) -> str:
    return f"unix:{address[1]}" if address[0] == "unix" else f"{address[1]}:{address[2]}"


def bind(address: Address, *, reuse_port: bool = False, listen: bool = True) -> socket.socket:
    """A listening socket for ``address`` (a stale unix socket file is replaced).

    ``listen=False`` (with ``reuse_port``): bound only, which holds the port and checks it is
    free without joining the group the kernel spreads connections over.
    """
    if address[0] == "unix":
        path = address[1]
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                os.unlink(path)
        except FileNotFoundError:
            pass
        return socket.create_server(path, family=socket.AF_UNIX, backlog=BACKLOG)
    host, port = address[1], int(address[2])
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if listen:
        return socket.create_server((host, port), family=family, backlog=BACKLOG, reuse_port=reuse_port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def bound_address(sock: socket.socket) -> Address:
    """What ``sock`` is bound to, as an ``Address`` (the real port when 0 was asked)."""
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return ("unix", name if isinstance(name, str) else name.decode())
    return ("tcp", name[0], str(name[1]))
