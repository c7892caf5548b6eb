"""The code blocks of the README and examples/README run as written, and succeed.

The convention, for everyone writing these pages (add a page to ``DOCUMENTS`` to cover it too):

- Every ```` ```python ```` and ```` ```bash ```` block is a complete program that a reader can copy
  and run from the repository root, after the README's set-up (``.venv`` made and the package
  installed): call the environment's programs by path (``.venv/bin/forkio``, ``.venv/bin/python``),
  since a fresh shell does not have them on ``PATH``. Blocks in other languages (``text``,
  ``js``, ``json``...) are shown, not run.
- A Python block whose first line is ``# NAME.py`` (a path relative to the repository root) is
  that file: it is written before the page's other blocks run, and they may use it.
- Each block is one test (``test_snippet[README.md:31]``). Blocks run in page order, in one copy
  of the repository per page (``.venv`` in it is this test's environment), so a block may use what
  an earlier block of the page made (a block tested alone runs the page's earlier blocks first).
  Python blocks run with this interpreter, bash blocks with ``bash -e``; neither finds ``forkio``
  on ``PATH``.
- A block must exit 0 within ``BLOCK_TIMEOUT`` seconds unless the line just before its fence says
  otherwise, with an HTML comment that readers do not see:

      <!-- snippet: exit: 1 -->          it exits with this status (say why in the text around it)
      <!-- snippet: skip: REASON -->     it is not run; REASON is required and says why, e.g. it
                                         installs packages, needs a Dask scheduler or runs a
                                         server until Ctrl-C. Keep these few: most blocks can run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from helpers import REPO, copy_of_repository

DOCUMENTS = ["README.md", "examples/README.md"]
BLOCK_TIMEOUT = 120
RUN = {"python", "bash"}

FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w+-]*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*snippet:\s*(?P<what>skip|exit):\s*(?P<value>.*?)\s*-->\s*$")
ANY_MARKER = re.compile(r"<!--\s*snippet\b")
FILE_LINE = re.compile(r"^# (?P<name>[\w./-]+\.py)\s*$")


@dataclass
class Block:
    document: str
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    skip: str | None = None
    status: int = 0

    @property
    def file(self) -> str | None:
        match = FILE_LINE.match(self.code.split("\n", 1)[0]) if self.lang == "python" else None
        return match["name"] if match else None

    def where(self) -> str:
        return f"{self.document}:{self.line}"


class SnippetError(Exception):
    """A page does not follow the convention (a marker this test does not know, a skip without a reason)."""


def blocks(document: str) -> list[Block]:
    """The fenced code blocks of a page, with what the marker before each says."""
    found: list[Block] = []
    lines = (REPO / document).read_text(encoding="utf-8").splitlines()
    number = 0
    while number < len(lines):
        fence = FENCE.match(lines[number])
        if not fence:
            if ANY_MARKER.search(lines[number]) and not MARKER.match(lines[number]):
                raise SnippetError(f"{document}:{number + 1}: a snippet marker this test does not know: "
                                   f"{lines[number]}")
            number += 1
            continue
        indent, start = len(fence["indent"]), number
        body: list[str] = []
        number += 1
        while number < len(lines) and lines[number].strip() != "```":
            text = lines[number]
            body.append(text[indent:] if not text[:indent].strip() else text.lstrip())  # a list item's block
            number += 1
        number += 1
        block = Block(document, start + 1, fence["lang"], "\n".join(body) + "\n")
        before = start - 1
        while before >= 0 and not lines[before].strip():
            before -= 1
        marker = MARKER.match(lines[before]) if before >= 0 else None
        if marker and marker["what"] == "skip":
            if not marker["value"]:
                raise SnippetError(f"{block.where()}: a skipped block must say why: <!-- snippet: skip: REASON -->")
            block.skip = marker["value"]
        elif marker:
            block.status = int(marker["value"])
        found.append(block)
    return found


def workspace(root: Path) -> Path:
    """A copy of the repository whose ``.venv`` is this test's Python environment."""
    copy_of_repository(root)
    venv = root / ".venv"
    if sys.prefix != sys.base_prefix:
        venv.symlink_to(sys.prefix, target_is_directory=True)  # pyvenv.cfg is found through the link
    else:  # not a virtual environment: stand-ins that run this interpreter
        (venv / "bin").mkdir(parents=True)
        for name, command in (("python", f'"{sys.executable}"'), ("forkio", f'"{sys.executable}" -m forkio')):
            script = venv / "bin" / name
            script.write_text(f'#!/bin/sh\nexec {command} "$@"\n')
            script.chmod(0o755)
    if not (venv / "bin" / "forkio").exists():
        pytest.fail(f"no forkio command in {sys.prefix}/bin: pip install -e '.[test]'")
    return root


def environment() -> dict[str, str]:
    """The caller's environment, minus this environment's bin folder on PATH (a fresh shell's)."""
    own = {str(Path(sys.executable).parent), str(Path(sys.prefix) / "bin")}
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p not in own]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    return {**env, "PATH": os.pathsep.join(path)}


def runnable(block: Block) -> bool:
    return block.lang in RUN and block.skip is None and block.file is None


def all_blocks() -> list[Block | str]:
    """Every runnable block of every page, or the error that stops a page from being read."""
    found: list[Block | str] = []
    for document in DOCUMENTS:
        try:
            found += [b for b in blocks(document) if runnable(b)]
        except SnippetError as exc:
            found.append(str(exc))
    return found


@dataclass
class Page:
    """One page's copy of the repository, and which of its blocks have run there."""

    root: Path
    blocks: list[Block]
    done: set[int] = field(default_factory=set)


@pytest.fixture(scope="module")
def pages() -> Iterator[dict[str, Page]]:
    made: dict[str, Page] = {}
    yield made
    made.clear()


def page(pages: dict[str, Page], document: str, tmp_path_factory: pytest.TempPathFactory) -> Page:
    if document not in pages:
        root = workspace(tmp_path_factory.mktemp("snippets") / "repo")
        found = blocks(document)
        for block in found:
            if block.file and block.skip is None:
                (root / block.file).parent.mkdir(parents=True, exist_ok=True)
                (root / block.file).write_text(block.code, encoding="utf-8")
        pages[document] = Page(root, found)
    return pages[document]


def run_block(block: Block, root: Path) -> None:
    script = root.parent / f"line{block.line}.{'py' if block.lang == 'python' else 'sh'}"
    script.write_text(block.code, encoding="utf-8")
    command = [sys.executable, str(script)] if block.lang == "python" else ["bash", "-e", str(script)]
    try:
        result = subprocess.run(command, cwd=root, env=environment(), capture_output=True, text=True,
                                timeout=BLOCK_TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{block.where()}: still running after {BLOCK_TIMEOUT} s\n{block.code}\n{exc.stderr!r}")
    assert result.returncode == block.status, (
        f"{block.where()}: exit status {result.returncode}, expected {block.status}\n--- block\n{block.code}"
        f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}")


def test_the_convention_is_followed() -> None:
    """Each page reads, has blocks to run, no two file blocks of the same name, markers only where they count."""
    for document in DOCUMENTS:
        found = blocks(document)
        assert any(runnable(b) for b in found), document
        names = [b.file for b in found if b.file]
        assert len(names) == len(set(names)), f"{document}: two blocks are the same file: {names}"
        for block in found:
            assert block.lang in RUN or (block.skip is None and block.status == 0), (
                f"{block.where()}: a marker on a {block.lang or 'plain'} block, which is never run")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("block", all_blocks(), ids=lambda b: b if isinstance(b, str) else b.where())
def test_snippet(block: Block | str, pages: dict[str, Page], tmp_path_factory: pytest.TempPathFactory) -> None:
    """The block runs as written and exits as the page says (after the page's earlier blocks)."""
    if isinstance(block, str):
        pytest.fail(block)
    here = page(pages, block.document, tmp_path_factory)
    for earlier in here.blocks:
        if earlier.line < block.line and runnable(earlier) and earlier.line not in here.done:
            run_block(earlier, here.root)
            here.done.add(earlier.line)
    run_block(block, here.root)
    here.done.add(block.line)
