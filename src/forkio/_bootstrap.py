"""The first code a forked Python child runs: become the requested script or module.

Started as ``python -c <bootstrap> script|module TARGET ARGS...``. It arms parent-death
delivery, takes the channel from the environment (as Node does) and then runs the target as
``__main__`` with ``sys.argv`` and ``sys.path[0]`` set as ``python TARGET ARGS`` would set them.

Started as ``python -c <bootstrap> zygote ...`` it is the zygote instead (``_zygote_main``):
``serve`` returns only in a child cloned from it, already set up as this path sets up an exec'd
child, and the target then runs here through the same lines.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]
import io
import os
import runpy
import signal
import sys
from typing import Any

# runpy's own step from code to a run __main__ (private, in every version forkio supports): the
# target is found and compiled first (``prepare``), so that failing at that is told apart.
_run_module_code: Any = runpy._run_module_code  # type: ignore[attr-defined]


def parent_death_signal(term_ignored: bool) -> int:
    """The signal a child gets when its parent dies: SIGTERM, so that it can clean up as it ends;
    SIGKILL when SIGTERM would not end it, because it came ignored or blocked from the parent
    (exec keeps both): a parent's dispositions must never keep its children alive after it."""
    if term_ignored or signal.SIGTERM in _signal.pthread_sigmask(signal.SIG_BLOCK, ()):
        return signal.SIGKILL
    return signal.SIGTERM


def arm_parent_death_signal(parent_pid: int, signum: int | None = None) -> None:
    """Linux: get ``signum`` (``parent_death_signal()``'s by default) when the parent dies; exit now
    if it already has."""
    if not sys.platform.startswith("linux"):
        return
    if signum is None:
        signum = parent_death_signal(_signal.getsignal(signal.SIGTERM) == _signal.SIG_IGN)
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signum, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(128 + signum)


def main() -> None:
    kind, *rest = sys.argv[1:]
    prepared = None
    if kind == "zygote":
        from forkio import _zygote_main

        kind, target, args, prepared = _zygote_main.serve(rest)
    else:
        target, *args = rest
        parent_pid = os.environ.pop("FORKIO_PARENT_PID", None)
        if parent_pid:
            arm_parent_death_signal(int(parent_pid))
        from forkio import _parent  # noqa: F401  (takes the channel fd out of the environment)
    run(kind, target, args, prepared)


def run(kind: str, target: str, args: list[str], prepared: Any = None) -> None:
    """Run ``target`` as ``__main__``, as ``python TARGET ARGS`` or ``python -m TARGET ARGS`` would.

    ``prepared`` is what a zygote already found and compiled, ``(code, spec)``: the same
    runpy steps then run without repeating that work in the child. A target that cannot be found
    or compiled fails before any of its code runs: the parent is told why (``STARTUP_FAILED``),
    then the error goes on as Python reports it (traceback on stderr, exit status 1).
    """
    sys.argv = [target, *args]
    sys.path[0] = os.path.dirname(target) if kind == "script" else os.getcwd()
    if prepared is None:
        try:
            prepared = prepare(kind, target)
        except BaseException as exc:
            _tell_parent_startup_failed(exc)
            raise
    if prepared is None:  # a directory or zip file with a __main__: runpy's own way
        runpy.run_path(target, run_name="__main__")
    elif kind == "script":  # what run_path does for a plain file, from its compiled code
        _run_module_code(prepared[0], None, "__main__", pkg_name="", script_name=target)
    else:  # what run_module(alter_sys=True) does once it has the module's code and spec
        _run_module_code(prepared[0], None, "__main__", prepared[1])


def prepare(kind: str, target: str) -> tuple[Any, Any] | None:
    """Find and compile ``target`` as runpy would, running none of its code: ``(code, spec)``.

    None for a script that is a directory or a zip file (runpy finds its ``__main__`` itself).
    A module's parent packages are imported, as ``python -m`` imports them.
    """
    if kind == "script":
        from pkgutil import get_importer

        if get_importer(target) is not None:
            return None
        return code_from_file(target), None
    _name, spec, code = runpy._get_module_details(target)  # type: ignore[attr-defined]
    return code, spec


def code_from_file(path: str) -> Any:
    """The code ``runpy.run_path`` runs for a plain file: compiled bytecode or source."""
    from pkgutil import read_code

    with io.open_code(path) as file:
        code = read_code(file)
    if code is None:
        with io.open_code(path) as file:
            code = compile(file.read(), path, "exec")
    return code


def _tell_parent_startup_failed(exc: BaseException) -> None:
    """Send the parent ``STARTUP_FAILED`` with the error's text (best effort: it is about to end)."""
    from forkio import _parent
    from forkio._channel import STARTUP_FAILED

    channel = _parent._channel
    if channel is None:
        return
    try:
        import traceback

        message = {"cmd": STARTUP_FAILED, "error": "".join(traceback.format_exception_only(exc)).strip(),
                   "traceback": "".join(traceback.format_exception(exc))}
        channel.send_bytes(channel.codec.encode(message, control=True))
    except Exception:
        pass
