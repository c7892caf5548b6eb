"""The benchmarks' own bookkeeping: the leak check knows helpers whatever the path, and the pages
name paths as a reader's clone has them."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def bench_pool(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    before = set(sys.modules)
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    yield importlib.import_module("pool")
    for name in set(sys.modules) - before:  # only what this imported: tests/pool_tasks.py stays
        del sys.modules[name]


def test_leak_check_finds_the_zygote_marker_after_a_long_command_line(bench_pool: ModuleType) -> None:
    """A helper whose marker comes after 160 characters (a long checkout path) is still a helper;
    an ordinary child is still a leak."""
    # As forkio starts its zygote: python -c "<bootstrap ... b.main()>" zygote FD PID PRELOAD
    padding = "x" * 300
    helper = subprocess.Popen([sys.executable, "-c", f"import time  # {padding}\ntime.sleep(60); b.main()",
                               "zygote", "5", "1", ""])
    ordinary = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        hygiene = bench_pool.Hygiene()
        assert {p.pid for p in hygiene.descendants()} == {ordinary.pid}
        described = hygiene.describe(next(p for p in hygiene.me.children() if p.pid == helper.pid))
        assert described["helper"] and len(described["short"]) <= 160 and "b.main() zygote" in described["cmd"]
    finally:
        for proc in (helper, ordinary):
            proc.kill()
            proc.wait()


def test_bench_shows_paths_relative_to_the_repository() -> None:
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from benchpaths import shown
    finally:
        sys.path.remove(str(REPO / "bench"))
        del sys.modules["benchpaths"]
    assert shown(str(REPO / "src" / "forkio")) == "src/forkio"
    assert shown("/usr/bin/python3") == "/usr/bin/python3"


PAGES = [*sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md")), "README.md", "examples/README.md"]


@pytest.mark.parametrize("page", PAGES)
def test_pages_name_no_absolute_path_of_the_machine(page: str) -> None:
    """A reader's clone is elsewhere: the pages name paths relative to the repository."""
    text = (REPO / page).read_text(encoding="utf-8")
    found = re.findall(r"(?<![\w.])/(?:work|tmp|root|home|Users)/[^\s`'\")]*", text)
    assert not found, f"{page} names paths of the machine it was written on: {found}"
