"""Launch under faults: a zygote killed mid-fork, process shortages, a parent that ignores
SIGTERM, a low fd limit; and the checks ``fork()`` and a child's methods make at the call."""

from __future__ import annotations

import errno
import json
import os
import shutil
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


def test_zygote_hung_after_clone_is_killed_and_its_child_taken(
        children: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A zygote that stops answering is killed; the child it had cloned answers for itself."""
    flag, log = tmp_path / "zygote-hung", tmp_path / "runs"
    monkeypatch.setattr(_zygote, "REPLY_TIMEOUT", 1.0)
    monkeypatch.setenv("FORKIO_TEST_HANG_AFTER_CLONE", str(flag))
    before = _our_children()
    child = forkio.fork(children / "mark.py", [str(log)], preload=HOOKS, start="zygote")
    hung_zygote = int(flag.read_text())
    assert _our_children() - before - {hung_zygote} == {child.pid}
    assert child.close() == 0
    assert log.read_text().split() == [str(child.pid)]
    assert gone(hung_zygote, within=5.0)


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


# ------------------------------------------------------------------ arguments checked at the call
def test_fork_refuses_bad_args_and_env_at_the_call(children: Path) -> None:
    """Not str(None), not an AttributeError later: a TypeError/ValueError, and no child started."""
    before = _our_children()
    echo = children / "echo.py"
    with pytest.raises(TypeError, match="args\\[0\\]"):
        forkio.fork(echo, [None, b"x"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="env key"):
        forkio.fork(echo, env={1: "a"})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="env\\['A'\\]"):
        forkio.fork(echo, env={"A": None})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="illegal environment variable name"):
        forkio.fork(echo, env={"A=B": "1"})
    with pytest.raises(TypeError):
        forkio.fork(echo, module=42)  # type: ignore[arg-type]
    for bad in (-1, 0, float("nan")):
        with pytest.raises(ValueError, match="timeout"):
            forkio.fork(echo, timeout=bad)
    with pytest.raises(TypeError, match="timeout"):
        forkio.fork(echo, timeout="1")  # type: ignore[arg-type]
    for bad_signal in ("SIGNOPE", 12345):
        with pytest.raises(ValueError, match="kill_signal"):
            forkio.fork(echo, kill_signal=bad_signal)
    assert _our_children() == before


@pytest.mark.parametrize("start", ["zygote", "exec"])
def test_bytes_and_paths_are_accepted_as_args_and_env(children: Path, start: str) -> None:
    env = {**os.environ, "FORKIO_TEST_VAR": b"bytes"}  # type: ignore[dict-item]
    with forkio.fork(children / "argv_env.py", [b"raw", Path("a/b"), "s"], env=env, start=start) as child:
        report = child.recv(timeout=20)
    assert report["argv"][1:] == ["raw", "a/b", "s"]
    assert report["custom"] == "bytes"


def test_an_infinite_timeout_is_no_timeout(children: Path) -> None:
    with forkio.fork(children / "echo.py", timeout=float("inf")) as child:
        assert child.recv(timeout=float("inf")) == "ready"
        child.send("x")
        assert child.recv(timeout=20) == "x"


def test_wait_recv_close_refuse_negative_timeouts(children: Path) -> None:
    with forkio.fork(children / "echo.py") as child:
        assert child.recv(timeout=20) == "ready"
        for call in (child.wait, child.recv, child.close):
            with pytest.raises(ValueError):
                call(-1)
        with pytest.raises(TypeError):
            child.recv("soon")  # type: ignore[arg-type]
        assert child.connected  # a refused close() changed nothing
        with pytest.raises(forkio.WaitTimeout):
            child.wait(0)


def test_async_wait_and_recv_refuse_negative_timeouts(children: Path) -> None:
    import asyncio

    async def main() -> None:
        child = await forkio.afork(children / "echo.py")
        try:
            assert await child.recv(timeout=20) == "ready"
            with pytest.raises(ValueError):
                await child.recv(-1)
            with pytest.raises(ValueError):
                await child.wait(-1)
            with pytest.raises(ValueError):
                await child.close(-1)
        finally:
            await child.close()
        with pytest.raises(ValueError):
            await forkio.afork(children / "echo.py", timeout=-1)

    asyncio.run(main())


def test_kill_takes_signal_names_and_refuses_bad_signals_alive_or_dead(children: Path) -> None:
    import signal

    child = forkio.fork(children / "sleeper.py")
    try:
        assert child.recv(timeout=20) == "sleeping"
        assert child.kill(0) is True  # alive: nothing sent
        for bad in (12345, -1, "SIGNOPE", "TERM"):
            with pytest.raises(ValueError):
                child.kill(bad)
        with pytest.raises(TypeError):
            child.kill(1.5)  # type: ignore[arg-type]
        assert child.kill("SIGTERM") is True
        assert child.wait(timeout=20) == -signal.SIGTERM
        assert child.kill(signal.SIGKILL) is False  # dead: nothing sent, whatever the signal
        assert child.kill("SIGKILL") is False
        with pytest.raises(ValueError):
            child.kill(12345)  # dead or alive, an invalid signal is invalid
    finally:
        child.close()


# ------------------------------------------------------------------ targets that cannot start
def test_a_missing_directory_or_unreadable_script_fails_at_fork(children: Path, tmp_path: Path) -> None:
    before = _our_children()
    with pytest.raises(FileNotFoundError):
        forkio.fork(tmp_path / "missing.py")
    with pytest.raises(FileNotFoundError):
        forkio.fork("echo.py", cwd=str(tmp_path))  # relative to cwd, as the child would look for it
    with pytest.raises(IsADirectoryError):
        forkio.fork(tmp_path)
    with pytest.raises(FileNotFoundError):
        forkio.fork(tmp_path / "missing.js")  # a Node script too
    assert _our_children() == before
    (tmp_path / "__main__.py").write_text("from forkio import parent\nparent.send('main')\n")
    with forkio.fork(tmp_path) as child:  # a directory with a __main__.py runs, as with python DIR
        assert child.recv(timeout=20) == "main"


UNREADABLE = textwrap.dedent("""
    import sys
    import forkio
    try:
        forkio.fork(sys.argv[1])
    except PermissionError:
        print("PermissionError")
""")


def test_an_unreadable_script_fails_at_fork(tmp_path: Path) -> None:
    script = tmp_path / "secret.py"
    script.write_text("pass\n")
    script.chmod(0)
    argv = [sys.executable, "-c", UNREADABLE, str(script)]
    if os.geteuid() == 0:  # root reads anything: run without the capabilities that let it
        if shutil.which("setpriv") is None:
            pytest.skip("as root, setpriv is needed to drop CAP_DAC_OVERRIDE")
        argv = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--", *argv]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["PermissionError"], done.stderr


@pytest.mark.parametrize("start", ["zygote", "exec"])
def test_a_child_that_cannot_start_says_why(tmp_path: Path, start: str) -> None:
    """A syntax error or a missing module: the error text in recv()'s ChannelClosed, in
    startup_error (set before 'exit' listeners run) and in repr, not only on stderr."""
    import threading

    bad = tmp_path / "bad.py"
    bad.write_text("x = (\n")
    child = forkio.fork(bad, start=start, stdio="pipe")
    seen: list[str | None] = []
    exited = threading.Event()
    child.on("exit", lambda code, sig: (seen.append(child.startup_error), exited.set()))
    with pytest.raises(forkio.ChannelClosed, match="SyntaxError"):
        child.recv(timeout=20)
    assert exited.wait(20)
    assert seen and seen[0] is not None and "SyntaxError" in seen[0] and str(bad) in seen[0]
    assert child.close() == 1
    assert "failed to start: SyntaxError" in repr(child)
    with forkio.fork(module="no_such_module_xyz", start=start, stdio="pipe") as child:
        with pytest.raises(forkio.ChannelClosed, match="No module named no_such_module_xyz"):
            child.recv(timeout=20)
        assert child.wait(timeout=20) == 1
        assert child.startup_error is not None and "ImportError" in child.startup_error


def test_an_error_in_the_targets_own_code_is_not_a_startup_failure(tmp_path: Path) -> None:
    script = tmp_path / "raises.py"
    script.write_text("raise ValueError('mine')\n")
    with forkio.fork(script, stdio="pipe") as child:
        with pytest.raises(forkio.ChannelClosed) as info:
            child.recv(timeout=20)
        assert "failed to start" not in str(info.value)
        assert child.wait(timeout=20) == 1
        assert child.startup_error is None
