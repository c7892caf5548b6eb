"""The exception hierarchy. Every error forkio raises derives from ``ForkioError``.

::

    ForkioError
    ├── ChannelClosed (ConnectionError)     send/recv on a channel that is closed
    ├── SerializationError                  a message that cannot be encoded or decoded
    ├── ProtocolError                       the peer wrote something that is not a valid frame
    ├── WaitTimeout (TimeoutError)          recv(timeout=...) or wait(timeout=...) ran out
    │   └── TaskTimeout                     a pool task ran past its timeout and was stopped
    └── WorkerCrashed                       a pool worker died while running a task
"""

from __future__ import annotations

import signal as _signal


class ForkioError(Exception):
    """Root of every error raised by forkio."""


class ChannelClosed(ForkioError, ConnectionError):
    """The message channel is closed: by this side, by the peer, or because the peer broke it."""


class SerializationError(ForkioError):
    """A message could not be encoded (raised by ``send``) or decoded (raised by ``recv``).

    The channel stays usable: the frame boundaries are intact.
    """


class ProtocolError(ForkioError):
    """The peer wrote bytes that are not a valid frame; the channel is closed afterwards."""


class WaitTimeout(ForkioError, TimeoutError):
    """``recv(timeout=...)`` or ``wait(timeout=...)`` ran out of time; nothing was lost."""


def describe_exit(returncode: int | None) -> str:
    """Say how a process ended, as ``exit code 3`` or ``SIGSEGV (-11)``."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        return f"{signal_name(-returncode)} ({returncode})"
    return f"exit code {returncode}"


def signal_name(signum: int) -> str:
    """The name of a signal number, such as ``SIGKILL``; ``SIG<n>`` for unknown ones."""
    try:
        return _signal.Signals(signum).name
    except ValueError:
        return f"SIG{signum}"


class WorkerCrashed(ForkioError):
    """A worker process died while it was running the task."""

    def __init__(self, pid: int, exit_code: int | None, signal_code: str | None, detail: str = "") -> None:
        self.pid = pid
        self.exit_code = exit_code
        self.signal_code = signal_code
        self.detail = detail
        how = f"signal {signal_code}" if signal_code else f"exit code {exit_code}"
        hint = " (killed — out of memory?)" if signal_code == "SIGKILL" else ""
        message = f"worker {pid} died with {how}{hint}"
        if detail:
            message += f": {detail}"
        super().__init__(message)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.pid, self.exit_code, self.signal_code, self.detail))


class TaskTimeout(WaitTimeout):
    """A task ran longer than its timeout; its worker was stopped and replaced."""
