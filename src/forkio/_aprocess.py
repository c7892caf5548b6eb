"""The asyncio faces: ``afork()``/``AsyncChildProcess`` in the parent, ``aparent`` in the child.

Kept apart so that code which never uses asyncio never imports it.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Sequence

from . import _parent
from ._aio import AsyncEndpoint, _resolve
from ._channel import Channel
from ._check import timeout_arg
from ._codec import DEFAULT_MAX_FRAME
from ._errors import WaitTimeout
from ._launch import LaunchSpec, ProcessHandle, submit_start
from ._process import DEFAULT_GRACE, _ForkPlan, _Process


class AsyncChildProcess(_Process, AsyncEndpoint):
    """A running child with a message channel (asyncio face). Create with ``await forkio.afork()``."""

    def __init__(self, popen: ProcessHandle, channel: Channel, spec: LaunchSpec, *,
                 kill_signal: int, timeout: float | None, start_method: str = "exec") -> None:
        AsyncEndpoint.__init__(self, channel)
        self._init_process(popen, spec, kill_signal, start_method)
        self._arm_timeout(timeout)

    async def wait(self, timeout: float | None = None) -> int:
        """Wait for exit without blocking the loop; return the returncode."""
        timeout = timeout_arg(timeout)
        if timeout is not None:
            try:
                return await asyncio.wait_for(self.wait(), timeout)
            except asyncio.TimeoutError:
                raise WaitTimeout(f"child {self.pid} still running after {timeout} s") from None
        code = self._popen.poll()
        if code is None:
            code = await _exited(self._popen, self._sentinel if self._release_sentinel.alive else None)
        self._cancel_timeout()
        return code

    async def close(self, grace: float = DEFAULT_GRACE) -> int:
        """Disconnect, wait ``grace`` seconds, then stop the child (TERM, then KILL)."""
        steps = self._stop_steps(grace)  # first: a bad grace changes nothing
        self.disconnect()
        for sig, wait_for in steps:
            if sig is not None:
                self.kill(sig)
            try:
                code = await self.wait(wait_for)
            except WaitTimeout:
                continue
            self._release()
            return code
        raise AssertionError("unreachable: the last step waits without a limit")

    async def __aenter__(self) -> AsyncChildProcess:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return self._describe("AsyncChildProcess", self.connected)


async def _exited(popen: ProcessHandle, pidfd: int | None) -> int:
    """Await a process's exit: its pidfd in the event loop where there is one, else a thread."""
    loop = asyncio.get_running_loop()
    if pidfd is None:
        return await loop.run_in_executor(None, popen.wait)
    ready = loop.create_future()
    loop.add_reader(pidfd, _resolve, ready)
    try:
        if popen.poll() is None:
            await ready
    finally:
        loop.remove_reader(pidfd)
    return popen.wait()


async def afork(script: str | os.PathLike[str] | None = None, args: Sequence[str] = (), *,
                module: str | None = None, cwd: str | None = None, env: dict[str, str] | None = None,
                executable: str | None = None, exec_args: Sequence[str] = (), stdio: str = "inherit",
                serialization: str | None = None, timeout: float | None = None,
                kill_signal: int | str = signal.SIGTERM, detached: bool = False,
                max_frame_size: int = DEFAULT_MAX_FRAME, start: str = "auto",
                preload: Sequence[str] | None = None) -> AsyncChildProcess:
    """``fork()`` for asyncio code: the same options, an ``AsyncChildProcess`` back."""
    plan = _ForkPlan.checked(**locals())  # first line: locals() is afork()'s own arguments, nothing else
    return plan.child(AsyncChildProcess, *await asyncio.wrap_future(submit_start(plan.spec)))


class AsyncParent(AsyncEndpoint):
    """The channel to the parent process, for asyncio code: ``await aparent.recv()``."""

    def __repr__(self) -> str:
        return "<forkio.aparent>" if self._channel is not None else "<forkio.aparent (not forked)>"


aparent = AsyncParent(_parent.parent._channel, _parent.parent._reason, unusable=_parent.parent._unusable)
