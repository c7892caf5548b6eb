"""The runnable examples under examples/, each run end to end on small data."""

from __future__ import annotations

import importlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str, str], ModuleType]]:
    """Import a module of one example as its own scripts do (their folder on ``sys.path``, which
    pool workers inherit), and forget it afterwards."""
    imported: list[str] = []

    def load(folder: str, name: str) -> ModuleType:
        monkeypatch.syspath_prepend(str(EXAMPLES / folder))
        imported.append(name)
        return importlib.import_module(name)

    yield load
    for name in imported:
        sys.modules.pop(name, None)


def run(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, env=env)


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---- thumbnails -----------------------------------------------------------------------------------

def test_thumbnails_run_sh(tmp_path: Path) -> None:
    """run.sh: 40 thumbnails and a contact-sheet PDF; the corrupt and the hanging input fail alone."""
    try:
        from PIL import Image
    except ImportError:  # not a skip: Pillow is in the test extra, so its absence is a broken setup
        pytest.fail("the thumbnails example needs Pillow: pip install -e '.[test]'")
    # Without the repository's .venv, run.sh takes forkio from PATH: make that this interpreter's.
    env = {**os.environ, "TIMEOUT": "3", "THUMBS_DIR": str(tmp_path / "thumbs"),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    result = run("bash", str(EXAMPLES / "thumbnails" / "run.sh"), str(tmp_path), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "42 inputs, 40 ok, 2 failed (1 exception, 1 timeout)" in result.stderr  # forkio map's summary
    assert f"PDF: {tmp_path}/contact-sheet.pdf" in result.stdout

    records = lines(tmp_path / "results.jsonl")
    assert sorted(r["index"] for r in records) == list(range(42))
    failed = {Path(r["input"]).name: r["error"] for r in records if not r["ok"]}
    assert failed["broken.jpg"]["kind"] == "exception"
    assert failed["broken.jpg"]["type"] == "UnidentifiedImageError"
    assert failed["stuck.jpg"]["kind"] == "timeout"
    assert len(failed) == 2
    for record in records:
        if record["ok"]:
            info = record["result"]
            with Image.open(info["thumbnail"]) as thumb:
                assert thumb.size == (info["width"], info["height"])
                assert max(thumb.size) == 160 or thumb.size == (info["source_width"], info["source_height"])
    assert (tmp_path / "images" / "stuck.jpg").is_fifo()  # kept, so that a rerun hangs on it again

    pdf = (tmp_path / "contact-sheet.pdf").read_bytes()
    assert pdf.startswith(b"%PDF")
    assert len(re.findall(rb"/Type\s*/Page\b", pdf)) == 3  # 20 thumbnails a page, then the failures

    # Everything is answered: --resume has nothing left to run and changes nothing, but its exit
    # status still says that two inputs failed.
    before = (tmp_path / "results.jsonl").read_bytes()
    again = run(str(Path(sys.executable).with_name("forkio")), "map",
                f"{EXAMPLES}/thumbnails/thumbs.py:make_thumbnail", "--input", str(tmp_path / "inputs.txt"),
                "--output", str(tmp_path / "results.jsonl"), "--resume", env=env)
    assert again.returncode == 1, again.stderr
    assert "0 inputs" in again.stderr and "still holds 2 failed inputs" in again.stderr
    assert (tmp_path / "results.jsonl").read_bytes() == before

    # --retry-failed runs the two failures again: each fails for the same reason as before.
    retried = run(str(Path(sys.executable).with_name("forkio")), "map",
                  f"{EXAMPLES}/thumbnails/thumbs.py:make_thumbnail", "--input", str(tmp_path / "inputs.txt"),
                  "--output", str(tmp_path / "results.jsonl"), "--resume", "--retry-failed", "--timeout", "1",
                  env=env)
    assert retried.returncode == 1, retried.stderr
    assert "2 inputs, 0 ok, 2 failed (1 exception, 1 timeout)" in retried.stderr
    records = lines(tmp_path / "results.jsonl")
    assert sorted(r["index"] for r in records) == list(range(42))  # still one line per input
    assert {Path(r["input"]).name: r["error"]["kind"] for r in records if not r["ok"]} == {
        "broken.jpg": "exception", "stuck.jpg": "timeout"}


# ---- scraping -------------------------------------------------------------------------------------

def test_scraping_crawl(example: Callable[[str, str], ModuleType]) -> None:
    """Every page is crawled once; a hung page times out (retried once), an HTTP 500 fails alone,
    a page that stalls once succeeds on the pool's retry, a flaky one on the fetcher's own."""
    testsite = example("scraping", "testsite")
    scrape = example("scraping", "scrape")
    out = io.StringIO()
    with testsite.Site(pages=12) as site:
        counts = scrape.crawl(site.url, out, workers=4, timeout=1.5, retries=1)
        hits = dict(site.hits)
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    by_path = {r["url"].split("/", 3)[3]: r for r in records}
    assert len(by_path) == len(records) == 1 + 12 + len(testsite.MISBEHAVING)  # each page exactly once
    for n in range(12):
        assert by_path[f"page/{n}"]["title"] == f"Page {n}"
    assert by_path[""]["ok"] and by_path["slow/1"]["ok"] and by_path["slow/2"]["ok"]

    assert by_path["never"]["error"]["kind"] == "timeout"
    assert hits["/never"] == 2  # the first try and one retry, then it fails
    assert by_path["broken"]["error"] == {"kind": "exception", "type": "HTTPStatusError",
                                          "message": f"HTTP 500 from {site.url}broken"}
    assert hits["/broken"] == scrape.HTTP_ATTEMPTS  # exceptions are not the pool's to retry
    assert by_path["stalls-once"]["ok"] and hits["/stalls-once"] == 2
    assert by_path["flaky"]["ok"] and by_path["flaky"]["http_attempts"] == 2
    assert counts == {"ok": len(records) - 2, "failed": 2}
    assert max(hits.values()) <= 2 * scrape.HTTP_ATTEMPTS  # bounded: (retries + 1) tasks of HTTP_ATTEMPTS tries


# ---- background backup ----------------------------------------------------------------------------

def test_backup_script_archives_and_verifies(tmp_path: Path, example: Callable[[str, str], ModuleType]) -> None:
    """backup.py: the parent ticks while the child archives; the archive matches the source."""
    backup = example("backup", "backup")
    source = backup.make_sample(tmp_path / "source", files=30)
    archive = tmp_path / "out" / "source.tar.gz"
    archive.parent.mkdir()
    result = run(sys.executable, str(EXAMPLES / "backup" / "backup.py"), str(source), str(archive))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "parent: tick   1" in result.stdout
    assert "verified: 30 members" in result.stdout
    assert list(archive.parent.iterdir()) == [archive]  # no temporary file left beside it
    with tarfile.open(archive) as tar:
        sizes = {m.name: m.size for m in tar}
    assert sizes == {p.relative_to(source).as_posix(): p.stat().st_size for p in source.rglob("*") if p.is_file()}


def test_backup_without_arguments_leaves_the_archive_it_names(tmp_path: Path) -> None:
    """backup.py with no arguments: the archive it reports is still there afterwards (out/ beside
    the script), and the sample folder it made is gone."""
    shutil.copytree(EXAMPLES / "backup", tmp_path / "backup", ignore=shutil.ignore_patterns("out", "__pycache__"))
    result = run(sys.executable, str(tmp_path / "backup" / "backup.py"))
    assert result.returncode == 0, result.stdout + result.stderr
    archive = Path(re.findall(r"^archived .*: (.+)$", result.stdout, re.M)[0])
    assert archive == tmp_path / "backup" / "out" / "sample.tar.gz" and tarfile.is_tarfile(archive)
    sample = Path(re.findall(r"^made a sample folder to back up \(removed at the end\): (.+)$", result.stdout,
                             re.M)[0])
    assert not sample.exists()


def test_backup_killed_midway_leaves_nothing(tmp_path: Path, example: Callable[[str, str], ModuleType]) -> None:
    """A child killed after its first progress message leaves no archive and no temporary file."""
    backup = example("backup", "backup")
    source = backup.make_sample(tmp_path / "source", files=60)
    out = tmp_path / "out"
    out.mkdir()
    progress: list[dict[str, Any]] = []
    first_progress = threading.Event()

    def on_progress(message: dict[str, Any]) -> None:
        progress.append(message)
        first_progress.set()

    job = backup.Backup(source, out / "source.tar.gz", on_progress=on_progress)
    assert first_progress.wait(30)
    assert progress[0]["files_done"] == 1 and job.temp.exists()  # half written
    job.child.kill(signal.SIGKILL)
    with pytest.raises(backup.BackupFailed, match="SIGKILL"):
        job.wait(30)
    assert job.child.returncode == -signal.SIGKILL  # killed, not finished
    assert list(out.iterdir()) == []


def test_backup_of_a_missing_folder_fails_cleanly(tmp_path: Path, example: Callable[[str, str], ModuleType]) -> None:
    """The child's own error comes back as ``BackupFailed`` with its message; nothing is left."""
    backup = example("backup", "backup")
    job = backup.Backup(tmp_path / "missing", tmp_path / "x.tar.gz")
    with pytest.raises(backup.BackupFailed, match="NotADirectoryError"):
        job.wait(30)
    assert list(tmp_path.iterdir()) == []


# ---- API offloading heavy work --------------------------------------------------------------------

def test_api_load_light_latency_with_and_without_forkio() -> None:
    """load.py measures /light under heavy load in both modes; with forkio it is not held up: light
    requests are answered while heavy work runs, which inline cannot ever do (no timing compared)."""
    result = run(sys.executable, str(EXAMPLES / "api" / "load.py"), "--seconds", "1", "--rate", "40",
                 "--n", "60000", "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    for mode in ("inline", "forkio"):
        assert figures[mode]["light_requests"] == 40
        assert figures[mode]["light_errors"] == 0
        assert figures[mode]["heavy_done"] > 0
    assert figures["inline"]["light_during_heavy"] == 0, figures  # the event loop was computing
    assert figures["forkio"]["light_during_heavy"] > 0, figures  # the event loop only awaited the pool
