"""The backup child, forked by backup.py: archive a folder into a compressed tar file, telling the
parent how far it has got.

The parent sends one job, ``{"source", "archive", "temp", "compression"}``. The archive is written
under the ``temp`` name (in the same folder) and renamed to ``archive`` only once it is complete
and on disk, so the final name never points at half an archive, whenever this process dies.

Messages to the parent: ``{"event": "started", "files", "bytes"}``, then ``"progress"`` (``done``,
``total``, ``file``) at most every ``PROGRESS_EVERY`` seconds, then ``"done"`` with a manifest
(name, size and SHA-256 of every member), or ``"failed"`` with the error.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, BinaryIO

from forkio import parent

PROGRESS_EVERY = 0.05  # seconds: often enough for a smooth bar, rarely enough to cost nothing


class _HashingReader:
    """A file wrapper that hashes what tarfile reads, so each file is read from disk only once."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self.sha256 = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data: bytes = self._f.read(size)
        self.sha256.update(data)
        return data


def open_tar(raw: BinaryIO, compression: str) -> tarfile.TarFile:
    """A tar writer over ``raw``. tarfile's defaults are its slowest settings (gzip -9, xz -6): several
    times the time for a few percent of size. These are gzip's own default and a middling xz."""
    if compression == "gz":
        return tarfile.open(fileobj=raw, mode="w:gz", compresslevel=6)
    if compression == "xz":
        return tarfile.open(fileobj=raw, mode="w:xz", preset=3)
    if compression == "bz2":
        return tarfile.open(fileobj=raw, mode="w:bz2")
    raise ValueError(f"unknown compression {compression!r}")


def files_under(source: Path) -> list[Path]:
    """Every regular file under ``source``, in a stable order (symlinks and other oddities skipped)."""
    found: list[Path] = []
    for folder, dirs, names in os.walk(source):
        dirs.sort()
        found.extend(Path(folder, name) for name in sorted(names) if Path(folder, name).is_file())
    return [path for path in found if not path.is_symlink()]


def archive(source: Path, target: Path, temp: Path, compression: str) -> dict[str, Any]:
    """Write the archive under ``temp``, then rename it to ``target``; return the ``done`` message."""
    if not source.is_dir():
        raise NotADirectoryError(f"not a folder: {source}")
    files = files_under(source)
    total = sum(path.stat().st_size for path in files)
    parent.send({"event": "started", "files": len(files), "bytes": total})
    manifest = []
    done = 0
    last_report = 0.0
    with open(temp, "xb") as raw:  # "x": never overwrite a file we did not create
        with open_tar(raw, compression) as tar:
            for number, path in enumerate(files, 1):
                name = path.relative_to(source).as_posix()
                info = tar.gettarinfo(path, arcname=name)
                with path.open("rb") as f:
                    reader = _HashingReader(f)
                    tar.addfile(info, reader)  # tarfile only calls read()
                manifest.append({"name": name, "size": info.size, "sha256": reader.sha256.hexdigest()})
                done += info.size
                now = time.monotonic()
                if now - last_report >= PROGRESS_EVERY or number == len(files):
                    last_report = now
                    parent.send({"event": "progress", "done": done, "total": total, "file": name,
                                 "files_done": number, "files": len(files)})
        raw.flush()
        os.fsync(raw.fileno())  # the data is on disk before the name says it is complete
    os.replace(temp, target)
    folder = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # and so is the rename
    finally:
        os.close(folder)
    return {"event": "done", "archive": str(target), "bytes": target.stat().st_size, "manifest": manifest}


def main() -> int:
    job = parent.recv()
    temp = Path(job["temp"])
    try:
        message = archive(Path(job["source"]), Path(job["archive"]), temp, job["compression"])
    except Exception as exc:
        temp.unlink(missing_ok=True)  # tidy up what we can; a SIGKILL leaves it to the parent
        parent.send({"event": "failed", "error": f"{type(exc).__name__}: {exc}"})
        return 1
    parent.send(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
