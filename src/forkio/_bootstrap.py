"""The first code a forked Python child runs: become the requested script or module.

Started as ``python -c <bootstrap> script|module TARGET ARGS...``. It arms parent-death
delivery, takes the channel from the environment (as Node does) and then runs the target as
``__main__`` with ``sys.argv`` and ``sys.path[0]`` set as ``python TARGET ARGS`` would set them.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys


def arm_parent_death_signal(parent_pid: int, signum: int = signal.SIGTERM) -> None:
    """Linux: get ``signum`` when the parent dies; exit now if it already has."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signum, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(128 + signum)


def main() -> None:
    kind, target, *args = sys.argv[1:]
    parent_pid = os.environ.pop("FORKIO_PARENT_PID", None)
    if parent_pid:
        arm_parent_death_signal(int(parent_pid))
    from forkio import _parent  # noqa: F401  (takes the channel fd out of the environment)

    if kind == "script":
        sys.argv = [target, *args]
        sys.path[0] = os.path.dirname(target)
        runpy.run_path(target, run_name="__main__")
    else:
        sys.argv = [target, *args]
        sys.path[0] = os.getcwd()
        runpy.run_module(target, run_name="__main__", alter_sys=True)
