"""``forkio map``'s results: one JSON line per input, and the ``--resume`` bookkeeping.

Every line is valid JSON (RFC 8259), whatever the function returns: a value JSON cannot hold
exactly is written as its ``repr`` (see :func:`value_fields`). With ``--resume`` the results
file is read back, and rewritten atomically (a temporary file renamed over it) whenever it holds
a line cut short by an interruption or more than one answer for an input, so that it ends with
exactly one line, the latest answer, per input.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ._errors import TaskTimeout, WorkerCrashed


class ResultsFileError(Exception):
    """The results file given to ``--resume`` is not one forkio map wrote (said in one line)."""


def input_key(value: Any) -> str:
    """What identifies an input across runs: its value, as canonical JSON."""
    return json.dumps(value, sort_keys=True)


def value_fields(value: Any) -> dict[str, str]:
    """A result's fields, already encoded: ``result`` when JSON holds the value, else ``repr``.

    JSON has no NaN or Infinity, no sets, bytes or other objects: rather than write invalid JSON
    (``NaN``) or a string that looks like a result (``"{1, 2}"``), such a value is written as
    ``"repr": "<its Python repr>"`` and the line has no ``result``. Tuples become arrays and dict
    keys strings, as ``json.dumps`` always does.
    """
    try:
        return {"result": json.dumps(value, allow_nan=False)}
    except (TypeError, ValueError, RecursionError):
        pass
    try:
        text = repr(value)
    except Exception as exc:  # a broken __repr__ must not lose the line
        text = f"<{type(value).__qualname__} object; repr() raised {type(exc).__name__}>"
    return {"repr": json.dumps(text)}


def describe_failure(error: BaseException) -> dict[str, Any]:
    """The ``error`` field of a failed input's line: kind, exception type name, message."""
    if isinstance(error, TaskTimeout):
        kind = "timeout"
    elif isinstance(error, WorkerCrashed):
        kind = "crashed"
    else:
        kind = "exception"
    type_name = getattr(error, "type_name", None) or type(error).__name__
    return {"kind": kind, "type": type_name, "message": str(error)}


def encode_line(index: int, value: Any, error: BaseException | None, result: Any = None) -> str:
    """One input's line (with its newline): ``{"index", "input", "ok", "result"|"repr"|"error"}``."""
    fields = {"index": json.dumps(index), "input": json.dumps(value, allow_nan=False),
              "ok": json.dumps(error is None)}
    if error is None:
        fields.update(value_fields(result))
    else:
        fields["error"] = json.dumps(describe_failure(error))
    return "{" + ", ".join(f'"{name}": {text}' for name, text in fields.items()) + "}\n"


@dataclass
class Answers:
    """What a results file holds: its lines to keep, in order, and the answers by input."""

    lines: list[str] = field(default_factory=list)
    latest: dict[str, dict[str, Any]] = field(default_factory=dict)
    untidy: bool = False  # a cut-short line or a superseded answer: the file needs a rewrite

    @property
    def failed(self) -> int:
        return sum(1 for record in self.latest.values() if not record.get("ok"))

    def done(self, *, retry_failed: bool) -> set[str]:
        """The inputs a resumed run skips."""
        return {key for key, record in self.latest.items() if record.get("ok") or not retry_failed}


def _records(path: str) -> Iterator[tuple[int, str, dict[str, Any] | None]]:
    with open(path, encoding="utf-8", newline="\n") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                # Only what an interruption leaves: the start of one of our own lines.
                if line.startswith('{"index": ') and not line.endswith("}\n"):
                    yield number, line, None
                    continue
                raise ResultsFileError(f"{path} line {number} is not JSON: refusing to resume into a file "
                                       f"forkio map did not write") from None
            if not (isinstance(record, dict) and "input" in record and "ok" in record):
                raise ResultsFileError(f"{path} line {number} is not a forkio map result: refusing to resume "
                                       f"into a file forkio map did not write")
            yield number, line if line.endswith("\n") else line + "\n", record


def read_answers(path: str) -> Answers:
    """Read a results file (missing: no answers). The latest line for an input is its answer."""
    answers = Answers()
    kept: list[tuple[str, str, dict[str, Any]]] = []
    try:
        for _, line, record in _records(path):
            if record is None:
                answers.untidy = True
                continue
            kept.append((input_key(record["input"]), line, record))
    except FileNotFoundError:
        return answers
    except UnicodeDecodeError as exc:
        raise ResultsFileError(f"{path} is not UTF-8 text ({exc.reason}): refusing to resume into it") from None
    last = {key: position for position, (key, _, _) in enumerate(kept)}
    answers.untidy = answers.untidy or len(last) < len(kept)
    for position, (key, line, record) in enumerate(kept):
        if last[key] == position:
            answers.lines.append(line)
            answers.latest[key] = record
    return answers


def rewrite(path: str, lines: list[str]) -> None:
    """Replace ``path`` with ``lines`` atomically: readers see the old file or the new, whole."""
    path = os.path.realpath(path)  # through a symlink: replace the file, not the link
    folder, name = os.path.split(path)
    temp = os.path.join(folder, f".{name}.forkio-{os.getpid()}.tmp")
    try:
        with open(temp, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temp, stat.S_IMODE(os.stat(path).st_mode))
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


def tidy(path: str) -> Answers:
    """Read a results file and rewrite it if it is untidy; what it holds afterwards."""
    answers = read_answers(path)
    if answers.untidy:
        rewrite(path, answers.lines)
        answers.untidy = False
    return answers
