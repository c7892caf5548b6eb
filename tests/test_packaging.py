"""The package as published: its metadata and licence, and an sdist whose tests run as they are."""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from helpers import REPO, copy_of_repository


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist built from a copy of this checkout (the build leaves an egg-info folder behind)."""
    root = tmp_path_factory.mktemp("sdist")
    copy_of_repository(root / "src")
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))",
         str(root / "dist")], cwd=root / "src", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return root / "dist" / result.stdout.strip().splitlines()[-1]


def members(archive: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(archive) as tar:
        return {m.name.split("/", 1)[1]: m for m in tar.getmembers() if "/" in m.name}


@pytest.mark.timeout(120)
def test_sdist_carries_the_tests_with_their_helpers_the_examples_and_the_docs(sdist: Path) -> None:
    inside = members(sdist)
    for folder in ("tests", "examples", "docs", "bench"):
        for path in (REPO / folder).rglob("*"):
            relative = path.relative_to(REPO).as_posix()
            if path.is_file() and not {"__pycache__", "out"} & set(path.relative_to(REPO).parts):
                assert relative in inside, f"{relative} is not in the sdist"
    for name in ("LICENSE", "README.md", "CHANGELOG.md", "tests/conftest.py", "tests/helpers.py",
                 "tests/children/echo.py"):
        assert name in inside, name
    assert inside["examples/thumbnails/run.sh"].mode & 0o111  # still executable
    assert not [name for name in inside if "__pycache__" in name or name.endswith(".pyc")]


@pytest.mark.timeout(120)
def test_sdist_tests_collect(sdist: Path, tmp_path: Path) -> None:
    """Unpacked, the sdist's test suite collects (conftest.py, helpers.py and children/ are there)."""
    with tarfile.open(sdist) as tar:
        if hasattr(tarfile, "data_filter"):  # 3.10.12+, 3.11.4+
            tar.extractall(tmp_path, filter="data")
        else:
            tar.extractall(tmp_path)  # our own archive, just built
    (unpacked,) = tmp_path.iterdir()
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                            cwd=unpacked, capture_output=True, text=True, timeout=100)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"^\d{3,} tests collected", result.stdout, re.M), result.stdout[-1000:]


def test_metadata_names_the_licence_authors_and_classifiers(sdist: Path) -> None:
    with tarfile.open(sdist) as tar:
        info = next(m for m in tar.getmembers() if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO"))
        extracted = tar.extractfile(info)
        assert extracted is not None
        pkg_info = extracted.read().decode()
    headers = [line.split(": ", 1) for line in pkg_info.split("\n\n", 1)[0].splitlines() if ": " in line]
    fields: dict[str, list[str]] = {}
    for key, value in headers:
        fields.setdefault(key, []).append(value)
    assert fields["License-Expression"] == ["MIT"]  # an SPDX string, not the deprecated table
    assert fields["License-File"] == ["LICENSE"]
    assert fields["Author"] and fields["Keywords"]
    for version in ("3.10", "3.11", "3.12", "3.13"):
        assert f"Programming Language :: Python :: {version}" in fields["Classifier"]
    assert "Typing :: Typed" in fields["Classifier"]
    licence = (REPO / "LICENSE").read_text()
    assert licence.startswith("MIT License") and "WITHOUT WARRANTY OF ANY KIND" in licence
