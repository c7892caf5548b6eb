"""No orphans: children exit when their parent dies, even by SIGKILL, unless detached."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil

import forkio
from helpers import gone

PARENT = textwrap.dedent("""
    import sys, threading, time
    import forkio
    detached = sys.argv[2] == "detached"
    def start():
        child = forkio.fork(sys.argv[1], detached=detached)
        print(child.pid, flush=True)
        child.recv(timeout=20)
        print("ready", flush=True)
    # Fork from a short-lived thread: the child must survive that thread, only not the process.
    t = threading.Thread(target=start); t.start(); t.join()
    time.sleep(600)
""")


def _start_parent(children: Path, mode: str) -> tuple[subprocess.Popen[str], int]:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(children / "sleeper.py"), mode],
                              stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child_pid = int(parent.stdout.readline())
    assert parent.stdout.readline().strip() == "ready"
    parent.stdout.close()
    return parent, child_pid


def test_child_dies_with_sigkilled_parent_not_with_its_thread(children: Path) -> None:
    parent, child_pid = _start_parent(children, "attached")
    assert psutil.pid_exists(child_pid)  # the thread that forked it has ended: still alive
    parent.kill()
    parent.wait()
    assert gone(child_pid, within=2.0), "child outlived its SIGKILLed parent"


def test_detached_child_survives_its_parent(children: Path) -> None:
    parent, child_pid = _start_parent(children, "detached")
    parent.kill()
    parent.wait()
    try:
        time.sleep(0.3)
        assert psutil.pid_exists(child_pid) and not gone(child_pid, within=0.2)
    finally:
        os.kill(child_pid, signal.SIGKILL)
    assert gone(child_pid, within=5)


def test_grandchildren_do_not_inherit_the_channel(children: Path) -> None:
    """NODE_CHANNEL_* vars are removed, so a grandchild forked by a child has its own channel."""
    with forkio.fork(children / "sleeper.py", ["grandchild"]) as child:
        report = child.recv(timeout=20)
        grandchild = report["grandchild"]
        assert psutil.pid_exists(grandchild)
        child.kill(signal.SIGKILL)
        child.wait(timeout=10)
    assert gone(grandchild, within=2.0)


def test_exit_event_from_many_children_concurrently(children: Path) -> None:
    """Every exit is reported exactly once, with many children ending at once."""
    exits: list[tuple[int, object, object]] = []
    lock = threading.Lock()
    done = threading.Semaphore(0)
    kids = [forkio.fork(children / "say_then_exit.py", ["3"]) for _ in range(8)]
    for kid in kids:
        kid.on("message", lambda m: None)
        kid.on("exit", lambda code, sig, pid=kid.pid: (lock.acquire(), exits.append((pid, code, sig)),
                                                       lock.release(), done.release()))
    for _ in kids:
        assert done.acquire(timeout=20)
    for kid in kids:
        kid.wait(timeout=5)
    assert sorted(e[0] for e in exits) == sorted(k.pid for k in kids)
    assert all(code == 7 and sig is None for _, code, sig in exits)
