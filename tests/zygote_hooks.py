"""Preloaded into a zygote by tests/test_launch_hardening.py: faults injected inside the zygote.

Each fault fires once per flag file, named by an environment variable the zygote inherits:

- ``FORKIO_TEST_DIE_AFTER_CLONE``: SIGKILL the zygote right after a clone, before it answers
  with the child's pid (the window the OOM killer or a kill storm can hit);
- ``FORKIO_TEST_HANG_AFTER_CLONE``: the zygote hangs right after a clone, before it answers;
- ``FORKIO_TEST_CLONE_EAGAIN``: the next clone fails with EAGAIN (as under RLIMIT_NPROC).
"""

from __future__ import annotations

import errno
import os
import signal
import time

from forkio import _zygote_main


def _first_time(variable: str) -> bool:
    """True the first time for the flag file named by ``variable`` (which it then creates)."""
    flag = os.environ.get(variable)
    if not flag:
        return False
    try:
        fd = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return False
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def _die_after_clone() -> None:
    if _first_time("FORKIO_TEST_DIE_AFTER_CLONE"):
        os.kill(os.getpid(), signal.SIGKILL)
    if _first_time("FORKIO_TEST_HANG_AFTER_CLONE"):
        time.sleep(3600)


os.register_at_fork(after_in_parent=_die_after_clone)  # the zygote's Cloner runs these hooks too

_clone = _zygote_main.Cloner.fork


def _clone_or_eagain(self: _zygote_main.Cloner) -> int:
    if _first_time("FORKIO_TEST_CLONE_EAGAIN"):
        raise OSError(errno.EAGAIN, "clone(CLONE_PARENT) failed: " + os.strerror(errno.EAGAIN))
    return _clone(self)


_zygote_main.Cloner.fork = _clone_or_eagain  # type: ignore[method-assign]
