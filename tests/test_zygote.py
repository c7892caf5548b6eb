"""The zygote: children cloned from a preloaded process are indistinguishable from exec'd ones,
except by the clock; they are our children (reaped, signalled, tied to our death); the zygote
itself is restarted when it dies, dies with us, and serves many threads at once."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

import forkio
from forkio import _zygote
from forkio._zygote import PreloadError, ZygoteError
from helpers import gone


def _report(children: Path, **options: Any) -> dict[str, Any]:
    with forkio.fork(children / "report.py", ["report"], **options) as child:
        report: dict[str, Any] = child.recv(timeout=30)
        assert child.start_method == options.get("start", "zygote")
        child.send("bye")
    return report


def test_a_zygote_child_sees_what_an_execd_child_sees(children: Path, tmp_path: Path) -> None:
    """argv, sys.path, cwd, environment, signal dispositions, stdio objects, fds, parent: the same."""
    env = {**os.environ, "FORKIO_TEST_VAR": "yes"}
    execd = _report(children, start="exec", cwd=str(tmp_path), env=env)
    cloned = _report(children, start="zygote", cwd=str(tmp_path), env=env)
    for key in ("pid", "random"):
        assert execd.pop(key) != cloned.pop(key)
    assert cloned == execd
    assert cloned["ppid"] == os.getpid()  # our child, not the zygote's
    assert cloned["env"]["FORKIO_TEST_VAR"] == "yes" and "NODE_CHANNEL_FD" not in cloned["env"]
    assert cloned["signals"][signal.SIGINT] == "default_int_handler"
    assert cloned["signals"][signal.SIGPIPE] == "IGN" and cloned["signals"][signal.SIGTERM] == "DFL"


def test_ignored_signals_are_inherited_as_exec_would(children: Path) -> None:
    """SIG_IGN survives exec: a signal the parent ignores is ignored in the child, either way."""
    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        execd = _report(children, start="exec")["signals"]
        cloned = _report(children)["signals"]
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert cloned[signal.SIGUSR1] == execd[signal.SIGUSR1] == "IGN"
    assert _report(children)["signals"][signal.SIGUSR1] == "DFL"  # and no longer once we stop


def test_start_method_choice_and_repr(children: Path) -> None:
    """auto means the zygote for Python; exec when asked, for exec_args and for Node."""
    with forkio.fork(children / "echo.py") as child:
        assert child.start_method == "zygote" and " zygote " in repr(child)
    with forkio.fork(children / "echo.py", start="exec") as child:
        assert child.start_method == "exec" and " exec " in repr(child)
    with forkio.fork(children / "echo.py", exec_args=["-X", "utf8"]) as child:
        assert child.start_method == "exec"
    with pytest.raises(ValueError, match="start='zygote'"):
        forkio.fork(children / "echo.py", start="zygote", exec_args=["-X", "utf8"])
    with pytest.raises(ValueError, match="start must be"):
        forkio.fork(children / "echo.py", start="sometimes")


def test_module_child_from_the_zygote(children: Path) -> None:
    with forkio.fork(module="pkg.worker", args=["a"], cwd=str(children), start="zygote") as child:
        report = child.recv(timeout=10)
    assert report["module"] == "__main__" and report["spec"] == "pkg.worker" and report["argv"][1:] == ["a"]


def test_exit_codes_signals_and_tracebacks(children: Path) -> None:
    """Exit status, a signal's death, an uncaught exception (traceback on stderr, exit 1), Ctrl-C."""
    child = forkio.fork(children / "report.py", ["exit", "5"])
    assert child.wait(timeout=10) == 5 and child.exit_code == 5
    child.close()
    child = forkio.fork(children / "report.py", ["raise"], stdio="pipe")
    assert child.wait(timeout=10) == 1
    assert child.stderr is not None and b"ValueError: raised in the child" in child.stderr.read()
    child.close()
    child = forkio.fork(children / "report.py", ["interrupt"])
    assert child.wait(timeout=10) == -signal.SIGINT  # as CPython does for an uncaught KeyboardInterrupt
    child.close()
    child = forkio.fork(children / "sleeper.py")
    assert child.recv(timeout=10) == "sleeping"
    assert child.kill(signal.SIGKILL) and child.wait(timeout=10) == -signal.SIGKILL
    assert child.signal_code == "SIGKILL" and not child.kill()
    child.close()


def test_wait_timeout_and_sentinel(children: Path) -> None:
    """wait(timeout) times out while it runs; the sentinel fd turns readable when it exits."""
    for start in ("zygote", "exec"):
        child = forkio.fork(children / "sleeper.py", start=start)
        child.recv(timeout=30)
        with pytest.raises(forkio.WaitTimeout):
            child.wait(timeout=0.05)
        assert select.select([child.sentinel], [], [], 0)[0] == []
        child.kill(signal.SIGTERM)
        assert select.select([child.sentinel], [], [], 10)[0] == [child.sentinel]
        assert child.wait(timeout=10) == -signal.SIGTERM
        child.close()
        with pytest.raises(ValueError, match="closed"):
            child.sentinel  # noqa: B018  (closed with the child, not left as a stale number)


def test_sentinel_without_pidfd(children: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where there is no pidfd, the sentinel is a pipe that a waiting thread closes at exit."""

    def no_pidfd(pid: int) -> int:
        raise OSError("no pidfd here")

    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    child = forkio.fork(children / "sleeper.py")
    child.recv(timeout=30)
    sentinel = child.sentinel
    assert select.select([sentinel], [], [], 0)[0] == []
    child.kill(signal.SIGKILL)
    assert select.select([sentinel], [], [], 10)[0] == [sentinel]
    child.close()


def test_stdio_pipe_and_ignore(children: Path) -> None:
    with forkio.fork(children / "report.py", ["print", "x"], stdio="pipe") as child:
        assert child.recv(timeout=10) == "printed"
        child.send("bye")
        assert child.wait(timeout=10) == 0
        assert child.stdout is not None and child.stdout.read() == b"to stdout ['x']\n"
        assert child.stderr is not None and child.stderr.read() == b"to stderr\n"
    with forkio.fork(children / "report.py", ["stdin"], stdio="pipe") as child:
        assert child.stdin is not None
        child.stdin.write(b"a line\n")
        child.stdin.flush()
        assert child.recv(timeout=10) == "a line\n"
    report = _report(children, stdio="ignore")
    assert report["stdout"]["isatty"] is False


def test_inherited_stdio_is_the_parents_current_one(children: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """fds 0-2 are taken from this process at each fork, not from when the zygote started."""
    with forkio.fork(children / "report.py", ["print", "now"]) as child:
        assert child.recv(timeout=10) == "printed"
        child.send("bye")
        child.wait(timeout=10)
    out, err = capfd.readouterr()
    assert "to stdout ['now']" in out and "to stderr" in err


def test_random_state_differs_between_children(children: Path) -> None:
    """fork copies the generator's state; every child is reseeded (numpy's global state too)."""
    draws = [_report(children, preload=("numpy",)) for _ in range(3)]
    assert len({d["random"] for d in draws}) == 3
    assert len({d["numpy_random"] for d in draws}) == 3


def test_preloaded_modules_are_there_and_numpy_threads_are_quieted(children: Path) -> None:
    """Preloading numpy starts OpenBLAS threads; the zygote quiets them and still clones."""
    report = _report(children, preload=("numpy", "csv"))
    assert report["modules"] == ["csv", "numpy"]
    assert _report(children, preload=())["modules"] == []


def test_set_preload_is_the_default(children: Path) -> None:
    previous = forkio.set_preload(["decimal"])
    try:
        assert forkio.get_preload() == ("decimal",)
        assert _report(children)["modules"] == ["decimal"]
        assert _report(children, preload=())["modules"] == []
    finally:
        forkio.set_preload(previous)
    with pytest.raises(TypeError):
        forkio.set_preload("numpy")


def test_a_preload_that_fails_is_a_clear_error_once(children: Path) -> None:
    """PreloadError (an ImportError) names the module; asking again fails fast, no new zygote."""
    with pytest.raises(PreloadError, match="no_such_module_xyz") as info:
        forkio.fork(children / "echo.py", preload=("no_such_module_xyz",))
    assert isinstance(info.value, ImportError) and info.value.module == "no_such_module_xyz"
    zygotes = _zygote.long_lived_pids()
    started = time.perf_counter()
    with pytest.raises(PreloadError) as again:
        forkio.fork(children / "echo.py", preload=("no_such_module_xyz",))
    assert again.value is info.value and time.perf_counter() - started < 0.05
    assert _zygote.long_lived_pids() == zygotes
    with pytest.raises(ValueError):
        forkio.fork(children / "echo.py", preload=("not a module",))


def test_a_preload_that_starts_threads_means_exec(children: Path) -> None:
    """Threads in the zygote make a clone unsafe: auto execs, start="zygote" says why."""
    env = {**os.environ, "PYTHONPATH": str(children)}
    with forkio.fork(children / "echo.py", env=env, preload=("threaded_module",)) as child:
        assert child.start_method == "exec" and child.recv(timeout=30) == "ready"
    with pytest.raises(ZygoteError, match="threads"):
        forkio.fork(children / "echo.py", env=env, preload=("threaded_module",), start="zygote")


def test_a_dead_zygote_is_replaced_and_its_children_live_on(children: Path) -> None:
    first = forkio.fork(children / "echo.py")
    assert first.recv(timeout=10) == "ready"
    zygote = _zygote._zygotes[next(reversed(_zygote._zygotes))]
    os.kill(zygote.popen.pid, signal.SIGKILL)
    zygote.popen.wait()
    first.send("still here")
    assert first.recv(timeout=10) == "still here"  # a CLONE_PARENT child does not depend on it
    with forkio.fork(children / "echo.py") as second:
        assert second.recv(timeout=10) == "ready" and second.start_method == "zygote"
    assert zygote.popen.pid not in _zygote.long_lived_pids()
    first.close()


def test_many_threads_fork_at_once(children: Path) -> None:
    """32 forks from 8 threads: every child starts, talks and exits, each reported once."""
    results: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work() -> None:
        try:
            for _ in range(4):
                with forkio.fork(children / "echo.py") as child:
                    assert child.recv(timeout=30) == "ready"
                    child.send(child.pid)
                    got = child.recv(timeout=30)
                    child.disconnect()
                    assert child.wait(timeout=30) == 0
                with lock:
                    results.append(got)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert len(results) == 32 and len(set(results)) == 32


def test_many_tasks_afork_at_once(children: Path) -> None:
    async def one() -> int:
        child = await forkio.afork(children / "aecho.py")
        assert child.start_method == "zygote"
        assert await child.recv(timeout=30) == "ready"
        child.disconnect()
        return await child.wait(timeout=30)

    async def main() -> list[int]:
        return list(await asyncio.gather(*(one() for _ in range(16))))

    assert asyncio.run(main()) == [0] * 16


def test_bad_cwd_and_env_fail_as_exec_does(children: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        forkio.fork(children / "echo.py", cwd=str(tmp_path / "missing"))
    with pytest.raises(ValueError):
        forkio.fork(children / "echo.py", env={**os.environ, "A=B": "1"})
    with forkio.fork(children / "echo.py") as child:  # and the zygote is fine after that
        assert child.recv(timeout=10) == "ready"


def test_startup_environment_gets_a_matching_zygote(children: Path, tmp_path: Path) -> None:
    """PYTHONPATH is read at interpreter start: a child asking for another one gets a zygote with it."""
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    assert str(tmp_path) in _report(children, env=env)["path"]
    assert str(tmp_path) not in _report(children)["path"]


def test_umask_and_rlimits_are_the_parents_current_ones(children: Path) -> None:
    """Process attributes a child inherits at fork: a change here gets a zygote that has it."""
    import resource

    old_umask = os.umask(0o027)
    old_core = resource.getrlimit(resource.RLIMIT_CORE)
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, old_core[1]))
        report = _report(children)
        assert report["umask"] == 0o027 and tuple(report["core_limit"]) == (0, old_core[1])
    finally:
        os.umask(old_umask)
        resource.setrlimit(resource.RLIMIT_CORE, old_core)
    report = _report(children)
    assert report["umask"] == old_umask and tuple(report["core_limit"]) == old_core


CLOSED_STDIN = textwrap.dedent("""
    import os, sys, forkio
    os.close(0)
    reports = []
    for start in ("exec", "zygote"):
        with forkio.fork(sys.argv[1], ["report"], start=start) as child:
            reports.append(child.recv(timeout=30))
            child.send("bye")
    print(repr([(r["stdin"], r["fds"]) for r in reports]))
""")


def test_a_parent_without_stdin(children: Path) -> None:
    """fd 0 closed here: closed in the child too (not taken by the channel's socket meanwhile)."""
    done = subprocess.run([sys.executable, "-c", CLOSED_STDIN, str(children / "report.py")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    execd, cloned = eval(done.stdout)
    assert execd == cloned and execd[0] is None


PARENT = textwrap.dedent("""
    import os, sys, threading, time
    import forkio
    from forkio import _zygote
    def start():
        child = forkio.fork(sys.argv[1])
        child.recv(timeout=20)
        print(child.pid, child.start_method, *_zygote.long_lived_pids(), flush=True)
    t = threading.Thread(target=start); t.start(); t.join()  # the forking thread ends: nothing else does
    time.sleep(600)
""")


def test_child_and_zygote_die_with_a_sigkilled_parent(children: Path) -> None:
    """PDEATHSIG follows the real parent (not the zygote), and the zygote never outlives it."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(children / "sleeper.py")],
                              stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child_pid, method, zygote_pid = parent.stdout.readline().split()
    parent.stdout.close()
    assert method == "zygote"
    assert psutil.Process(int(child_pid)).ppid() == parent.pid
    parent.kill()
    parent.wait()
    assert gone(int(child_pid), within=2.0), "child outlived its SIGKILLed parent"
    assert gone(int(zygote_pid), within=2.0), "zygote outlived its SIGKILLed parent"


OS_FORK = textwrap.dedent("""
    import os, sys
    import forkio
    first = forkio.fork(sys.argv[1]); first.recv(timeout=20)
    pid = os.fork()
    if pid == 0:  # a copy of this process: the zygote is its parent's, it needs its own
        child = forkio.fork(sys.argv[1]); child.recv(timeout=20)
        ok = child.start_method == "zygote" and child.pid != first.pid
        child.close(); os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    first.send("still here"); assert first.recv(timeout=20) == "still here"
    first.close()
    sys.exit(os.waitstatus_to_exitcode(status))
""")


def test_os_fork_of_the_parent_gets_its_own_zygote(children: Path) -> None:
    done = subprocess.run([sys.executable, "-c", OS_FORK, str(children / "echo.py")], timeout=60)
    assert done.returncode == 0


def test_long_lived_pids_are_the_zygotes(children: Path) -> None:
    with forkio.fork(children / "echo.py") as child:
        child.recv(timeout=10)
        zygotes = _zygote.long_lived_pids()
        assert zygotes and child.pid not in zygotes
        assert all(psutil.Process(pid).ppid() == os.getpid() for pid in zygotes)


def test_zygote_refusal_falls_back_to_exec(children: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A zygote that cannot clone (threads it cannot stop, a kernel that says no): auto execs."""
    with forkio.fork(children / "echo.py") as child:
        child.recv(timeout=10)
    zygote = _zygote._zygotes[next(reversed(_zygote._zygotes))]
    monkeypatch.setattr(zygote, "problem", "pretend")
    with forkio.fork(children / "echo.py") as child:
        assert child.start_method == "exec" and child.recv(timeout=30) == "ready"
    with pytest.raises(ZygoteError, match="pretend"):
        forkio.fork(children / "echo.py", start="zygote")
