"""Launch under faults: a zygote killed mid-fork, process shortages, a parent that ignores
SIGTERM, a low fd limit; and the checks ``fork()`` and a child's methods make at the call."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

import forkio
from forkio import _zygote
from helpers import gone

HOOKS = ("zygote_hooks",)  # tests/zygote_hooks.py, preloaded: faults injected inside the zygote


def _our_children() -> set[int]:
    """This process's children (zombies too) that are not zygotes."""
    return {p.pid for p in psutil.Process().children()} - _zygote.long_lived_pids()


# ------------------------------------------------------------------ a zygote killed mid-fork
def test_zygote_killed_between_clone_and_answer_starts_one_child(
        children: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The child it cloned is the one fork() returns: the script runs once, nothing is left unreaped."""
    flag, log = tmp_path / "zygote-died", tmp_path / "runs"
    before = _our_children()
    monkeypatch.setenv("FORKIO_TEST_DIE_AFTER_CLONE", str(flag))
    child = forkio.fork(children / "mark.py", [str(log)], preload=HOOKS, start="zygote")
    assert flag.exists(), "the hook did not kill the zygote: nothing was tested"
    dead_zygote = int(flag.read_text())
    # Any second child would exist by now: the first clone happened before fork() returned.
    assert _our_children() - before - {dead_zygote} == {child.pid}
    assert child.close() == 0
    assert log.read_text().split() == [str(child.pid)]
    # The next fork finds the zygote dead and starts another.
    monkeypatch.delenv("FORKIO_TEST_DIE_AFTER_CLONE")
    with forkio.fork(children / "echo.py", preload=HOOKS, start="zygote") as again:
        assert again.recv(timeout=20) == "ready"
    assert dead_zygote not in _our_children(), "the dead zygote was not reaped"


# ------------------------------------------------------------------ a process shortage
def test_one_eagain_from_clone_fails_one_fork_only(
        children: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EAGAIN (RLIMIT_NPROC full) fails that fork with the OSError; the next one clones again."""
    monkeypatch.setenv("FORKIO_TEST_CLONE_EAGAIN", str(tmp_path / "eagain"))
    for start in ("zygote", "auto"):
        (tmp_path / "eagain").unlink(missing_ok=True)
        with pytest.raises(BlockingIOError) as info:
            forkio.fork(children / "echo.py", preload=HOOKS, start=start)
        assert info.value.errno == errno.EAGAIN
        for _ in range(2):
            with forkio.fork(children / "echo.py", preload=HOOKS, start=start) as child:
                assert child.recv(timeout=20) == "ready"
                assert child.start_method == "zygote"


# ------------------------------------------------------------------ a parent that ignores SIGTERM
ORPHANING_PARENT = textwrap.dedent("""
    import json, signal, sys, time
    if sys.argv[2] == "ignore":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:  # blocked in every thread started from here on, the launcher's included
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
    import forkio
    from forkio import _zygote
    kids = [forkio.fork(sys.argv[1], start="zygote"), forkio.fork(sys.argv[1], start="exec")]
    for kid in kids:
        assert kid.recv(timeout=30) == "sleeping"
    pool = forkio.Pool(1)
    assert pool.submit(pow, 2, 3).result(timeout=30) == 8
    print(json.dumps([kid.pid for kid in kids] + [w["pid"] for w in pool.stats()]
                     + sorted(_zygote.long_lived_pids())), flush=True)
    time.sleep(600)
""")


@pytest.mark.parametrize("sigterm", ["ignore", "block"])
def test_children_die_with_a_parent_that_ignores_sigterm(children: Path, sigterm: str) -> None:
    """Zygote child, exec'd child, pool worker and zygote: all gone after the parent's SIGKILL."""
    parent = subprocess.Popen([sys.executable, "-c", ORPHANING_PARENT, str(children / "sleeper.py"), sigterm],
                              stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    pids: list[int] = []
    try:
        pids = json.loads(parent.stdout.readline())
        assert len(pids) >= 4 and all(psutil.pid_exists(pid) for pid in pids)
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
    survivors = [pid for pid in pids if not gone(pid, within=5.0)]
    for pid in survivors:
        os.kill(pid, 9)
    assert not survivors, f"outlived their SIGKILLed parent: {survivors} of {pids}"


# ------------------------------------------------------------------ a low fd limit
LOW_FD_PARENT = textwrap.dedent("""
    import os, resource, sys
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    import forkio

    def echo():
        with forkio.fork(sys.argv[1], start="zygote") as child:
            assert child.recv(timeout=20) == "ready"
            child.send("hi")
            assert child.recv(timeout=20) == "hi"

    echo()
    os.close(0)  # a free low fd, below the zygote's control socket
    for _ in range(3):
        echo()
    print("ok", flush=True)
""")


def test_zygote_children_work_under_a_low_fd_limit_with_a_free_low_fd(children: Path) -> None:
    """RLIMIT_NOFILE=256 and fd 0 closed: a child's channel never lands on the zygote's own fds."""
    done = subprocess.run([sys.executable, "-c", LOW_FD_PARENT, str(children / "echo.py")],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ok"]
