"""Back up a folder in the background: a forked child (archiver.py) writes a compressed tar
archive and reports its progress, while this process carries on with its own work.

    python backup.py                                  # backs up a generated sample folder to out/
    python backup.py SOURCE ARCHIVE.tar.gz [--compression gz|xz|bz2]

The archive appears under its final name only when it is complete (written under a temporary
name, then renamed), and is then verified: every member's name, size and SHA-256 checked against
the source. A child killed half-way leaves nothing under the final name, and this side removes
its temporary file.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import secrets
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import forkio

ARCHIVER = Path(__file__).with_name("archiver.py")


class BackupFailed(Exception):
    """The child did not produce the archive (it raised, or it was killed)."""


@dataclass
class BackupResult:
    archive: Path
    files: int
    bytes_in: int
    bytes_out: int
    seconds: float
    manifest: list[dict[str, Any]]


class Backup:
    """One backup, running in a forked child from the moment this object exists.

    Messages are handled on forkio's reader thread (``child.on("message")``), so the thread that
    started the backup is free; ``on_progress`` receives each progress message there.
    """

    def __init__(self, source: str | Path, archive: str | Path, *, compression: str = "gz",
                 on_progress: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.source = Path(source).resolve()
        self.archive = Path(archive).resolve()
        # Same folder as the archive: a rename is atomic only within one file system.
        self.temp = self.archive.with_name(f".{self.archive.name}.{secrets.token_hex(4)}.part")
        self.on_progress = on_progress
        self.progress: dict[str, Any] | None = None
        self._outcome: dict[str, Any] | None = None
        self._exited = threading.Event()
        self._started = time.monotonic()
        self.child = forkio.fork(ARCHIVER)
        self.child.on("message", self._on_message)
        self.child.on("exit", lambda code, sig: self._exited.set())  # after every message
        self.child.send({"source": str(self.source), "archive": str(self.archive), "temp": str(self.temp),
                         "compression": compression})

    def _on_message(self, message: dict[str, Any]) -> None:
        if message["event"] == "progress":
            self.progress = message
            if self.on_progress is not None:
                self.on_progress(message)
        elif message["event"] in ("done", "failed"):
            self._outcome = message

    @property
    def running(self) -> bool:
        return not self._exited.is_set()

    def wait(self, timeout: float | None = None) -> BackupResult:
        """Wait for the child to finish; the result, or ``BackupFailed`` (temporary file removed)."""
        if not self._exited.wait(timeout):
            raise TimeoutError(f"backup still running after {timeout} s")
        code = self.child.close()
        outcome = self._outcome
        if outcome is None or outcome["event"] != "done":
            # A child killed by a signal had no chance to remove its temporary file: we do.
            self.temp.unlink(missing_ok=True)
            why = outcome["error"] if outcome else f"the archiver died ({self.child.signal_code or f'exit {code}'})"
            raise BackupFailed(f"backup of {self.source} failed: {why}")
        manifest = outcome["manifest"]
        return BackupResult(self.archive, len(manifest), sum(m["size"] for m in manifest), outcome["bytes"],
                            time.monotonic() - self._started, manifest)

    def cancel(self) -> None:
        """Stop the child; ``wait()`` then raises ``BackupFailed``."""
        self.child.kill()


def verify(archive: Path, source: Path, manifest: list[dict[str, Any]]) -> list[str]:
    """Read the archive back and compare it with the source folder and the child's manifest;
    return the problems found (none: the archive is good)."""
    problems = []
    expected = {m["name"]: m for m in manifest}
    on_disk = {p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file() and not p.is_symlink()}
    if set(expected) != on_disk:
        problems.append(f"manifest and source differ: {sorted(set(expected) ^ on_disk)[:5]}")
    seen = set()
    with tarfile.open(archive) as tar:
        for member in tar:
            seen.add(member.name)
            entry = expected.get(member.name)
            extracted = tar.extractfile(member)
            if entry is None or extracted is None:
                problems.append(f"unexpected member {member.name}")
                continue
            digest = hashlib.sha256(extracted.read()).hexdigest()
            source_digest = hashlib.sha256((source / member.name).read_bytes()).hexdigest()
            if member.size != entry["size"] or digest != entry["sha256"] or digest != source_digest:
                problems.append(f"{member.name}: size or content differs")
    missing = set(expected) - seen
    if missing:
        problems.append(f"missing from the archive: {sorted(missing)[:5]}")
    return problems


def make_sample(folder: Path, files: int = 120, seed: int = 7) -> Path:
    """A folder worth backing up: nested folders of text (compresses well) and random bytes (does not)."""
    rng = random.Random(seed)
    words = "forkio child process channel archive backup parent progress message worker".split()
    for number in range(files):
        path = folder / f"dir{number % 6}" / f"sub{number % 3}" / f"file{number:03d}.{'txt' if number % 3 else 'bin'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        size = rng.randint(20_000, 400_000)
        if number % 3:
            path.write_text(" ".join(rng.choices(words, k=size // 7)))
        else:
            path.write_bytes(rng.randbytes(size))
    return folder


def _own_work(seconds: float) -> int:
    """Stand-in for whatever the program is really for: here, summing numbers for a while."""
    end, rounds = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        sum(range(10_000))
        rounds += 1
    return rounds


def main() -> int:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("source", nargs="?", type=Path, help="folder to back up (default: a generated sample)")
    cli.add_argument("archive", nargs="?", type=Path,
                     help="archive to write (default: out/sample.tar.<compression> beside this script)")
    cli.add_argument("--compression", choices=["gz", "xz", "bz2"], default="gz")
    args = cli.parse_args()
    with tempfile.TemporaryDirectory(prefix="forkio-backup-") as scratch:
        if args.source is None:
            args.source = make_sample(Path(scratch) / "sample")
            print(f"made a sample folder to back up (removed at the end): {args.source}")
        archive = args.archive or Path(__file__).resolve().parent / "out" / f"sample.tar.{args.compression}"
        archive.parent.mkdir(parents=True, exist_ok=True)
        job = Backup(args.source, archive, compression=args.compression)
        ticks = work = 0
        while job.running:  # the parent's own loop: never blocked by the backup
            work += _own_work(0.25)
            ticks += 1
            progress = job.progress
            status = (f"{progress['done'] / max(1, progress['total']):6.1%} of {progress['total'] / 1e6:.1f} MB, "
                      f"{progress['files_done']}/{progress['files']} files" if progress else "starting")
            print(f"parent: tick {ticks:3d}, {work:6d} rounds of its own work | child: {status}")
        try:
            result = job.wait()
        except BackupFailed as exc:
            print(exc, file=sys.stderr)
            return 1
        print(f"archived {result.files} files, {result.bytes_in / 1e6:.1f} MB -> {result.bytes_out / 1e6:.1f} MB "
              f"in {result.seconds:.1f} s: {result.archive}")
        problems = verify(result.archive, args.source.resolve(), result.manifest)
        for problem in problems:
            print(f"verify: {problem}", file=sys.stderr)
        if problems:
            return 1
        print(f"verified: {result.files} members, names, sizes and SHA-256 match the source")
    return 0


if __name__ == "__main__":
    sys.exit(main())
