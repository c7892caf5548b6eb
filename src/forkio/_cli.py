"""``forkio map``: run a Python function over many inputs in a crash-isolated pool.

GNU parallel / ``xargs -P`` for Python functions. Results stream out as JSON lines, one per
input, so an interrupted run keeps what it finished and ``--resume`` picks up from there.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import IO, Any

from ._errors import TaskTimeout, WorkerCrashed

EXIT_OK, EXIT_FAILURES, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """Bad usage: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, not usage + traceback
        raise UsageError(message)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


def add_map_command(commands: Any) -> argparse.ArgumentParser:
    """Declare ``forkio map`` and its options; returns its parser."""
    cmd = commands.add_parser(
        "map", help="run MODULE:FUNCTION over many inputs in parallel, crash-isolated",
        description="Run a Python function over many inputs in a pool of worker processes. Each input's "
                    "outcome is one JSON line: its result, or its failure (exception, timeout, crashed).")
    cmd.add_argument("function", metavar="MODULE:FUNCTION",
                     help="the function to call once per input, e.g. pkg.mod:func or path/to/file.py:func")
    cmd.add_argument("inputs", nargs="*", metavar="INPUT", help="inputs (else --input, else standard input)")
    cmd.add_argument("--input", "-i", metavar="FILE", help="read inputs from FILE, one per line ('-' for stdin)")
    cmd.add_argument("--jsonl", action="store_true", help="each input line is a JSON value, not plain text")
    cmd.add_argument("-j", "--workers", type=_positive_int, default=None, help="worker processes (default: cores)")
    cmd.add_argument("--timeout", type=_positive_float, default=None, metavar="SECONDS",
                     help="stop an input that runs longer than this (its worker is replaced)")
    cmd.add_argument("--retries", type=_non_negative_int, default=0,
                     help="run an input again this many times if its worker crashes or it times out")
    cmd.add_argument("--cluster", metavar="ADDRESS", default=None,
                     help="run on a Dask cluster, e.g. tcp://scheduler:8786 (needs forkio[dask]; "
                          "the function's module must be importable on the Dask workers)")
    cmd.add_argument("--preload", action="append", default=[], metavar="MODULE",
                     help="import MODULE in the workers up front (repeatable)")
    cmd.add_argument("--ordered", action="store_true", help="write results in input order (default: as done)")
    cmd.add_argument("--output", "-o", metavar="FILE", help="write JSON lines to FILE (default: stdout)")
    cmd.add_argument("--resume", action="store_true",
                     help="skip inputs already answered in --output and append the rest")
    cmd.add_argument("--retry-failed", action="store_true", help="with --resume: run failed inputs again")
    progress = cmd.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_true", default=None,
                          help="always show the progress bar (default: only on a terminal)")
    progress.add_argument("--no-progress", dest="progress", action="store_false")
    cmd.set_defaults(run=run_map)
    return cmd  # type: ignore[no-any-return]


def load_function(spec: str) -> Callable[..., Any]:
    """``pkg.mod:func`` or ``path/to/file.py:func`` (its folder joins ``sys.path``, as for a script)."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise UsageError(f"expected MODULE:FUNCTION, got {spec!r}")
    if target.endswith(".py") or os.sep in target:
        if not os.path.isfile(target):
            raise UsageError(f"no such file: {target}")
        folder, filename = os.path.split(os.path.abspath(target))
        sys.path.insert(0, folder)
        module_name = filename[:-3] if filename.endswith(".py") else filename
    else:
        sys.path.insert(0, os.getcwd())  # like ``python -m``: modules in the current folder count
        module_name = target
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name!r}: {exc}") from exc
    except Exception as exc:
        raise UsageError(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    for part in name.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"{module_name!r} has no attribute {name!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"{spec} is not callable")
    return obj  # type: ignore[no-any-return]


def _lines(args: argparse.Namespace) -> tuple[Iterator[str], int | None]:
    """The raw input lines, and how many there are when that is cheap to know."""
    if args.inputs:
        if args.input:
            raise UsageError("give inputs as arguments or with --input, not both")
        return iter(args.inputs), len(args.inputs)
    source = args.input or ("-" if not sys.stdin.isatty() else None)
    if source is None:
        raise UsageError("no inputs: give them as arguments, with --input FILE, or on standard input")
    if source == "-":
        return (line.rstrip("\r\n") for line in sys.stdin if line.strip()), None
    try:
        with open(source, encoding="utf-8") as f:
            total = sum(1 for line in f if line.strip())
        handle = open(source, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {source}: {exc.strerror or exc}") from exc

    def read() -> Iterator[str]:
        with handle:
            for line in handle:
                if line.strip():
                    yield line.rstrip("\r\n")

    return read(), total


def _values(lines: Iterator[str], jsonl: bool) -> Iterator[Any]:
    for number, line in enumerate(lines, 1):
        if not jsonl:
            yield line
            continue
        try:
            yield json.loads(line)
        except ValueError as exc:
            raise UsageError(f"input line {number} is not JSON: {exc}") from exc


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _answered(path: str, retry_failed: bool) -> set[str]:
    """Inputs already answered in an earlier run's output (``--resume``)."""
    done: set[str] = set()
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut short by the interruption: that input runs again
                if isinstance(record, dict) and "input" in record and (record.get("ok") or not retry_failed):
                    done.add(_key(record["input"]))
    except FileNotFoundError:
        pass
    return done


def _call(fn: Callable[[Any], Any], indexed: tuple[int, Any]) -> Any:
    """Runs in a worker: call the user's function on the input, leaving the index behind."""
    return fn(indexed[1])


def describe_failure(error: BaseException) -> dict[str, Any]:
    """The ``error`` field of a failed input's JSON line."""
    if isinstance(error, TaskTimeout):
        kind = "timeout"
    elif isinstance(error, WorkerCrashed):
        kind = "crashed"
    else:
        kind = "exception"
    type_name = getattr(error, "type_name", None) or type(error).__name__
    return {"kind": kind, "type": type_name, "message": str(error)}


def run_map(args: argparse.Namespace) -> int:
    """``forkio map``: returns the exit status."""
    from ._pool import Pool
    from ._progress import ProgressBar

    if args.resume and not args.output:
        raise UsageError("--resume needs --output FILE (the results to resume from)")
    if args.retry_failed and not args.resume:
        raise UsageError("--retry-failed goes with --resume")
    if args.cluster and args.workers:
        raise UsageError("-j/--workers does not go with --cluster: the Dask workers' threads are the workers")
    fn = load_function(args.function)
    lines, total = _lines(args)
    skip = _answered(args.output, args.retry_failed) if args.resume else set()
    pending = ((i, v) for i, v in enumerate(_values(lines, args.jsonl)) if not skip or _key(v) not in skip)
    if total is not None and skip:
        total = max(0, total - len(skip))
    try:
        out: IO[str] = (open(args.output, "a" if args.resume else "w", encoding="utf-8")
                        if args.output else sys.stdout)
    except OSError as exc:
        raise UsageError(f"cannot write {args.output}: {exc.strerror or exc}") from exc
    if args.resume and out.tell() > 0:
        with open(args.output, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                out.write("\n")  # end the line an interruption cut short, so ours start clean

    bar = ProgressBar(total, description="forkio map", enabled=args.progress)
    failures: dict[str, int] = {}
    started = time.monotonic()
    status = EXIT_OK
    # Workers import the function's module as they start, so --timeout counts the work, not the import.
    pool = Pool(args.workers, task_timeout=args.timeout, retries=args.retries, preload=tuple(args.preload),
                initializer=importlib.import_module, initargs=(fn.__module__,), cluster=args.cluster)
    try:
        for result in pool.stream(partial(_call, fn), pending, ordered=args.ordered):
            index, value = result.input
            record: dict[str, Any] = {"index": index, "input": value, "ok": result.ok}
            if result.ok:
                record["result"] = result.value
            else:
                record["error"] = describe_failure(result.error)  # type: ignore[arg-type]
                kind = record["error"]["kind"]
                failures[kind] = failures.get(kind, 0) + 1
            out.write(json.dumps(record, default=repr) + "\n")
            out.flush()  # an interrupted run keeps every answer it got
            bar.update(1, failed=not result.ok)
        pool.shutdown()
    except KeyboardInterrupt:
        pool.terminate()
        status = EXIT_INTERRUPTED
    except UsageError:
        pool.terminate()
        raise
    finally:
        bar.close()
        if out is not sys.stdout:
            out.close()
    failed = sum(failures.values())
    if status == EXIT_OK and failed:
        status = EXIT_FAILURES
    detail = ", ".join(f"{n} {kind}" for kind, n in sorted(failures.items()))
    how = "interrupted after" if status == EXIT_INTERRUPTED else "done:"
    print(f"forkio map {how} {bar.done} inputs, {bar.done - failed} ok, {failed} failed"
          f"{f' ({detail})' if detail else ''} in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return status


def parser() -> argparse.ArgumentParser:
    return _Parser(prog="forkio", description="forkio: child processes with a message channel, and a crash-proof pool")
