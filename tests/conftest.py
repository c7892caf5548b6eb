"""Suite-wide guards: every test has a timeout (pyproject), and no test may leave a process behind."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

CHILDREN = Path(__file__).parent / "children"

# Pool workers import task functions by module name (tests/pool_tasks.py): let them find it.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))


def _live_children() -> list[psutil.Process]:
    alive = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.NoSuchProcess:
            pass
    return alive


# Processes a fixture keeps running on purpose across tests (a Dask LocalCluster's workers): see keep_processes.
_kept: set[int] = set()


def _long_lived() -> set[int]:
    """Processes kept on purpose between tests: forkio's zygote, those a fixture registered, and the
    multiprocessing resource tracker (the stdlib's per-process helper, started by a spawn, never stopped)."""
    keep = set(_kept)
    tracker = sys.modules.get("multiprocessing.resource_tracker")
    pid = getattr(getattr(tracker, "_resource_tracker", None), "_pid", None)
    if pid is not None:
        keep.add(pid)
    try:
        from forkio import _zygote  # type: ignore[attr-defined]
    except ImportError:
        return keep
    return keep | set(getattr(_zygote, "long_lived_pids", lambda: set())())


@pytest.fixture(scope="session")
def keep_processes() -> set[int]:
    """The pids a longer-lived fixture keeps running on purpose (add them when it starts them, discard
    them when it stops them): the leak check does not count them. Their own children still count."""
    return _kept


@pytest.fixture(autouse=True)
def no_leaked_processes(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test if it leaves a child process running (after a short grace)."""
    yield
    deadline = time.monotonic() + 3.0
    while True:
        keep = _long_lived()
        leaked = [p for p in _live_children() if p.pid not in keep]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    if leaked:
        described = []
        for proc in leaked:
            try:
                described.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        pytest.fail(f"test left {len(leaked)} process(es) running: {described}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A last sweep: anything still alive at the end fails the run."""
    keep = _long_lived()
    leaked = [p for p in _live_children() if p.pid not in keep]
    if leaked:
        for proc in leaked:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        print(f"\nforkio tests: {len(leaked)} process(es) left running at the end of the session", file=sys.stderr)
        session.exitstatus = 1


@pytest.fixture
def children() -> Path:
    """The folder of child scripts used by the tests."""
    return CHILDREN


@pytest.fixture
def python() -> str:
    return sys.executable

