"""``forkio map``: run a Python function over many inputs in a crash-isolated pool.

GNU parallel / ``xargs -P`` for Python functions. Results stream out as JSON lines, one per
input, so an interrupted run keeps what it finished and ``--resume`` picks up from there.

What the command promises (each is tested through the real ``forkio`` command):

- standard output carries results only: whatever the function, its module or a preloaded module
  print goes to standard error (file descriptor 1 of this process and of every worker is its
  standard error; the results go to a private copy of the original standard output);
- every line is valid JSON (``_cli_results.value_fields`` says what happens to NaN or a set);
- bad usage or bad input (not UTF-8, not JSON, the input file is the output file, a preload that
  fails) is one line on stderr and exit status 2, before anything runs where that can be known;
- a closed pipe (``| head``) ends the run quietly, a full disk or a broken pool is one line and
  status 3, Ctrl-C at any moment is the one-line summary and status 130.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import IO, Any

from . import _cli_results as results
from ._errors import ForkioError

EXIT_OK, EXIT_FAILURES, EXIT_USAGE, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # what a shell reports for `cat` cut off by `head`


class CliError(Exception):
    """A run that cannot go on, reported as one line on stderr; ``status`` is the exit status."""

    status = EXIT_ERROR


class UsageError(CliError):
    """Bad usage or bad input: one line, exit status 2."""

    status = EXIT_USAGE


class RunError(CliError):
    """The run itself failed (results cannot be written, the pool broke): one line, exit status 3."""


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are ``UsageError`` (one line), not usage text and exit."""

    def error(self, message: str) -> Any:
        raise UsageError(message)


def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (argparse errors never show this function's name)."""
    return _whole_number(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: a whole number >= 0."""
    return _whole_number(text, 0)


def seconds_or_none(text: str) -> float | None:
    """argparse type: seconds > 0; ``inf`` means no limit (None)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return None if math.isinf(value) else value


def add_map_command(commands: Any) -> argparse.ArgumentParser:
    """Declare ``forkio map`` and its options; returns its parser (parsed with intermixed arguments)."""
    cmd: argparse.ArgumentParser = commands.add_parser(
        "map", help="run MODULE:FUNCTION over many inputs in parallel, crash-isolated",
        usage="forkio map [options] MODULE:FUNCTION [INPUT ...]",
        description="Run a Python function over many inputs in a pool of worker processes. Each input's "
                    "outcome is one JSON line on stdout (or in --output): its result, or its failure "
                    "(exception, timeout, crashed). What the function prints goes to stderr. Exit status: "
                    "0 all ok, 1 some failed, 2 bad usage or input, 3 the run failed (results could not "
                    "be written, the pool broke), 130 interrupted.")
    cmd.add_argument("function", nargs="?", metavar="MODULE:FUNCTION",
                     help="the function to call once per input, e.g. pkg.mod:func or path/to/file.py:func")
    cmd.add_argument("inputs", nargs="*", metavar="INPUT", help="inputs (else --input, else standard input)")
    cmd.add_argument("--input", "-i", metavar="FILE", help="read inputs from FILE, one per line ('-' for stdin)")
    cmd.add_argument("--jsonl", action="store_true", help="each input is a JSON value, not plain text")
    cmd.add_argument("-j", "--workers", type=positive_int, default=None, metavar="N",
                     help="worker processes (default: cores)")
    cmd.add_argument("--timeout", type=seconds_or_none, default=None, metavar="SECONDS",
                     help="stop an input that runs longer than this (its worker is replaced; inf: no limit)")
    cmd.add_argument("--retries", type=non_negative_int, default=0, metavar="N",
                     help="run an input again this many times if its worker crashes or it times out")
    cmd.add_argument("--cluster", metavar="ADDRESS", default=None,
                     help="run on a Dask cluster, e.g. tcp://scheduler:8786 (needs forkio[dask]; "
                          "the function's module must be importable on the Dask workers)")
    cmd.add_argument("--preload", action="append", default=[], metavar="MODULE",
                     help="import MODULE in the workers up front (repeatable)")
    cmd.add_argument("--ordered", action="store_true", help="write results in input order (default: as done)")
    cmd.add_argument("--output", "-o", metavar="FILE", help="write JSON lines to FILE (default: stdout)")
    cmd.add_argument("--resume", action="store_true",
                     help="skip inputs already answered in --output, add the rest, keep one line per input")
    cmd.add_argument("--retry-failed", action="store_true", help="with --resume: run failed inputs again")
    progress = cmd.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_true", default=None,
                          help="always show the progress bar (default: only on a terminal)")
    progress.add_argument("--no-progress", dest="progress", action="store_false")
    cmd.set_defaults(run=run_map, intermixed=True)
    return cmd


# ---- the function -------------------------------------------------------------------------------

def _shadowing(folder: str) -> list[tuple[str, str]]:
    """Files or packages in ``folder`` named like a standard-library module: (path, module name)."""
    found = []
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.endswith(".py") and entry.is_file():
                name = entry.name[:-3]
            elif entry.is_dir() and os.path.isfile(os.path.join(entry.path, "__init__.py")):
                name = entry.name
            else:
                continue
            if name in sys.stdlib_module_names and name != "__main__":
                found.append((entry.path, name))
    return sorted(found)


def load_function(spec: str) -> Callable[..., Any]:
    """``pkg.mod:func`` or ``path/to/file.py:func`` (its folder joins ``sys.path``, as for a script)."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise UsageError(f"expected MODULE:FUNCTION, got {spec!r}")
    if target.endswith(".py") or os.sep in target:
        if not os.path.exists(target):
            raise UsageError(f"no such file: {target}")
        if not target.endswith(".py") or not os.path.isfile(target):
            raise UsageError(f"{target} is not a Python file: give path/to/file.py:FUNCTION or "
                             f"package.module:FUNCTION")
        folder, filename = os.path.split(os.path.abspath(target))
        module_name = filename[:-3]
    else:
        folder, module_name = os.getcwd(), target  # like ``python -m``: modules in the current folder count
    # That folder comes first on sys.path, here and in the workers (they get this sys.path): a file in
    # it named like a standard-library module replaces that module for every import, forkio's own too.
    shadows = _shadowing(folder)
    if shadows:
        path, module = shadows[0]
        raise UsageError(f"{path} shadows the standard-library module {module!r} (its folder comes first "
                         f"on sys.path, as a script's does, for the workers too): rename it")
    sys.path.insert(0, folder)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name!r}: {exc}") from exc
    except (Exception, SystemExit) as exc:
        raise UsageError(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    for part in name.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"{module_name!r} has no attribute {name!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"{spec} is not callable")
    return obj  # type: ignore[no-any-return]


# ---- inputs -------------------------------------------------------------------------------------

def _text(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{where} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                         f"forkio map reads text, one input per line") from None


def _lines(handle: IO[bytes], name: str) -> Iterator[tuple[str, str]]:
    for number, raw in enumerate(handle, 1):
        text = _text(raw, f"{name} line {number}")
        if text.strip():
            yield f"{name} line {number}", text.rstrip("\r\n")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e400: valid JSON, but a float cannot hold it and the result line could not say it
        raise ValueError(f"{text} is too large for a float")
    return value


def _values(lines: Iterator[tuple[str, str]], jsonl: bool) -> Iterator[Any]:
    for where, text in lines:
        if not jsonl:
            yield text
            continue
        try:
            yield json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
        except (ValueError, RecursionError) as exc:
            raise UsageError(f"{where} is not JSON: {exc}") from None


class _Inputs:
    """Where the inputs come from: arguments, a file or standard input (``fd``: the file's)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.fd: int | None = None
        self.handle: IO[bytes] | None = None
        if args.inputs:
            if args.input:
                raise UsageError("give inputs as arguments or with --input, not both")
            return
        source = args.input or ("-" if not sys.stdin.isatty() else None)
        if source is None:
            raise UsageError("no inputs: give them as arguments, with --input FILE, or on standard input")
        self.name = "standard input" if source == "-" else source
        try:
            self.handle = sys.stdin.buffer if source == "-" else open(source, "rb")
            self.fd = self.handle.fileno()
        except OSError as exc:
            raise UsageError(f"cannot read {source}: {exc.strerror or exc}") from exc

    def read(self, skip: set[str]) -> tuple[Iterator[tuple[int, Any]], int | None]:
        """(index, value) of each input not in ``skip``, and how many, when that can be known up front.

        Arguments and files are read and checked (text, JSON) in full first, so that bad input stops
        the run before anything runs; standard input is read as it comes."""
        jsonl = self.args.jsonl

        def wanted(values: Iterator[Any]) -> Iterator[tuple[int, Any]]:
            return ((i, v) for i, v in enumerate(values) if not skip or results.input_key(v) not in skip)

        if self.handle is None:
            lines = [(f"input argument {n}", _text(os.fsencode(arg), f"input argument {n}"))
                     for n, arg in enumerate(self.args.inputs, 1)]
            todo = list(wanted(_values(iter(lines), jsonl)))
            return iter(todo), len(todo)
        handle, name = self.handle, self.name
        total = None
        if stat.S_ISREG(os.fstat(handle.fileno()).st_mode):  # not a pipe: it can be read twice
            try:
                total = sum(1 for _ in wanted(_values(_lines(handle, name), jsonl)))
                handle.seek(0)
            except OSError as exc:
                raise UsageError(f"cannot read {name}: {exc.strerror or exc}") from exc

        def read() -> Iterator[tuple[int, Any]]:
            try:
                yield from wanted(_values(_lines(handle, name), jsonl))
            finally:
                if handle is not sys.stdin.buffer:
                    handle.close()

        return read(), total


def _check_not_same_file(input_fd: int | None, output: str | None, stdout_fd: int) -> None:
    """Writing results into the file the inputs come from would empty or grow it while it is read."""
    if input_fd is None:
        return
    source = os.fstat(input_fd)
    if not stat.S_ISREG(source.st_mode):
        return
    try:
        target = os.stat(output) if output else os.fstat(stdout_fd)
    except OSError:
        return  # a new file cannot be the input
    if os.path.samestat(source, target):
        where = f"--output {output}" if output else "standard output"
        raise UsageError(f"the inputs are read from the file results are written to ({where}): "
                         f"write the results elsewhere")


# ---- the run ------------------------------------------------------------------------------------

class _Interrupts:
    """SIGINT raises ``KeyboardInterrupt`` once; a second Ctrl-C while the run stops is ignored,
    so the stop (killing the workers, tidying the results) finishes and the summary is printed."""

    def __init__(self) -> None:
        self.count = 0
        self.previous: Any = None

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.count += 1
        if self.count == 1:
            raise KeyboardInterrupt

    def check(self) -> None:
        """Raise ``KeyboardInterrupt`` if a Ctrl-C was swallowed (by the function's module, say)."""
        if self.count:
            raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            # Interrupted: this process is on its way out; a late Ctrl-C must not print a traceback.
            signal.signal(signal.SIGINT, signal.SIG_IGN if self.count else self.previous)


class _Output:
    """Where result lines go. Standard output is reserved for them from the start: fd 1 becomes a
    copy of stderr (inherited by every worker, so what the function's module and tasks print goes
    there) and results use a private copy of the original standard output, or the --output file."""

    def __init__(self) -> None:
        self._saved_stdout: Any = sys.stdout
        sys.stdout.flush()
        self.stdout_copy = os.dup(1)
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        self.file: IO[str] | None = None
        self.name = "standard output"

    def open(self, path: str | None, *, append: bool) -> None:
        try:
            if path is None:
                self.file = os.fdopen(os.dup(self.stdout_copy), "w", encoding="utf-8", newline="\n")
            else:
                self.name = path
                self.file = open(path, "a" if append else "w", encoding="utf-8", newline="\n")
        except OSError as exc:
            raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from exc

    def write(self, line: str) -> None:
        assert self.file is not None
        self.file.write(line)
        self.file.flush()  # an interrupted run keeps every answer it got

    def close(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError):  # a write that failed is still buffered: drop it
                self.file.close()
        if self.stdout_copy >= 0:
            os.dup2(self.stdout_copy, 1)
            os.close(self.stdout_copy)
            self.stdout_copy = -1
            sys.stdout = self._saved_stdout


def _check_cluster(args: argparse.Namespace) -> None:
    """``--cluster``: usage errors before anything runs (one line, status 2)."""
    from ._dask import DaskNotInstalled, pool_class

    if args.workers:
        raise UsageError("-j/--workers does not go with --cluster: the Dask workers' threads are the workers")
    try:
        pool_class()
    except DaskNotInstalled as exc:
        raise UsageError(str(exc)) from None


class _MapRun:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started = time.monotonic()
        self.done = 0
        self.failures: dict[str, int] = {}
        self.earlier_failures = 0

    def summary(self, how: str) -> str:
        failed = sum(self.failures.values())
        detail = ", ".join(f"{n} {kind}" for kind, n in sorted(self.failures.items()))
        text = (f"forkio map {how} {self.done} inputs, {self.done - failed} ok, {failed} failed"
                f"{f' ({detail})' if detail else ''} in {time.monotonic() - self.started:.1f} s")
        if self.earlier_failures:
            text += (f"; {self.args.output} still holds {self.earlier_failures} failed input"
                     f"{'s' if self.earlier_failures > 1 else ''} from an earlier run (--retry-failed runs "
                     f"{'them' if self.earlier_failures > 1 else 'it'} again)")
        return text

    def run(self, interrupts: _Interrupts) -> int:
        args = self.args
        if args.function is None:
            raise UsageError("missing MODULE:FUNCTION: forkio map MODULE:FUNCTION [INPUT ...] (see forkio map --help)")
        if args.resume and not args.output:
            raise UsageError("--resume needs --output FILE (the results to resume from)")
        if args.retry_failed and not args.resume:
            raise UsageError("--retry-failed goes with --resume")
        if args.cluster:
            _check_cluster(args)
        output = _Output()
        try:
            fn = load_function(args.function)
            interrupts.check()
            inputs = _Inputs(args)
            _check_not_same_file(inputs.fd, args.output, output.stdout_copy)
            skip: set[str] = set()
            if args.resume:
                if os.path.exists(args.output) and not os.path.isfile(args.output):
                    raise UsageError(f"--resume needs a regular file to read back, and {args.output} is not one")
                try:
                    skip = results.tidy(args.output).done(retry_failed=args.retry_failed)
                except results.ResultsFileError as exc:
                    raise UsageError(str(exc)) from None
                except OSError as exc:
                    raise UsageError(f"cannot resume from {args.output}: {exc.strerror or exc}") from exc
            todo, total = inputs.read(skip)
            output.open(args.output, append=args.resume)
            return self._map(fn, todo, total, output, interrupts)
        finally:
            output.close()
            if args.resume and output.file is not None:
                self._tidy_at_end()

    def _map(self, fn: Callable[..., Any], todo: Iterator[tuple[int, Any]], total: int | None, output: _Output,
             interrupts: _Interrupts) -> int:
        from ._pool import Pool
        from ._progress import ProgressBar

        args = self.args
        origin: dict[int, int] = {}  # position in what the pool is given -> index among all inputs

        def values() -> Iterator[Any]:
            for position, (index, value) in enumerate(todo):
                origin[position] = index
                yield value

        bar = ProgressBar(total, description="forkio map", enabled=args.progress)
        # Workers import the function's module as they start, so --timeout counts the work, not the import.
        try:
            pool = Pool(args.workers, task_timeout=args.timeout, retries=args.retries, preload=tuple(args.preload),
                        initializer=importlib.import_module, initargs=(fn.__module__,), cluster=args.cluster)
        except OSError as exc:
            if not args.cluster:
                raise
            raise RunError(f"cannot reach the Dask cluster at {args.cluster}: {exc}") from None
        try:
            try:
                for result in pool.stream(fn, values(), ordered=args.ordered):
                    stopped = _pool_stopped(result.error, self.done)
                    if stopped is not None:
                        raise stopped  # not this input's failure: the run cannot go on
                    line = results.encode_line(origin.pop(result.index), result.input, result.error, result.value)
                    try:
                        output.write(line)
                    except BrokenPipeError:
                        raise
                    except OSError as exc:
                        raise RunError(f"cannot write results to {output.name}: {exc.strerror or exc} "
                                       f"(after {self.done} inputs)") from exc
                    self.done += 1
                    if result.error is not None:
                        kind = results.describe_failure(result.error)["kind"]
                        self.failures[kind] = self.failures.get(kind, 0) + 1
                    bar.update(1, failed=result.error is not None)
                    interrupts.check()
            except ForkioError as exc:
                stopped = _pool_stopped(exc, self.done)
                if stopped is None:
                    raise
                raise stopped from exc
            except OSError as exc:
                if isinstance(exc, BrokenPipeError):
                    raise
                raise RunError(f"cannot read the inputs: {exc.strerror or exc} (after {self.done} inputs)") from exc
            pool.shutdown()
        except BaseException:
            pool.terminate()
            raise
        finally:
            bar.close()
        return EXIT_FAILURES if self.failures else EXIT_OK

    def _tidy_at_end(self) -> None:
        """One line per input, the latest (a retried input's earlier failure goes); count what still failed."""
        try:
            answers = results.tidy(self.args.output)
        except (OSError, results.ResultsFileError):
            return  # reported already, as the error that stopped the run
        self.earlier_failures = max(0, answers.failed - sum(self.failures.values()))


def _pool_stopped(error: BaseException | None, done: int) -> CliError | None:
    """The error to stop the run with when ``error`` says the pool itself stopped (a preload that
    fails, workers that cannot start), not that one input failed; None otherwise."""
    from ._pool import PoolClosed
    from ._zygote import PreloadError

    cause = error
    while cause is not None and not isinstance(cause, PreloadError):
        cause = cause.__cause__
    if cause is not None:
        return UsageError(f"--preload: {cause}".replace("forkio zygote: ", ""))
    if isinstance(error, PoolClosed):
        return RunError(f"the pool stopped after {done} inputs: {error}")
    return None


def run_map(args: argparse.Namespace) -> int:
    """``forkio map``: returns the exit status."""
    run = _MapRun(args)
    with _Interrupts() as interrupts:
        try:
            status = run.run(interrupts)
        except KeyboardInterrupt:
            print(run.summary("interrupted after"), file=sys.stderr)
            return EXIT_INTERRUPTED
        except BrokenPipeError:
            return EXIT_BROKEN_PIPE  # the reader has gone (`| head`): stop quietly, as `cat` does
        if status == EXIT_OK and run.earlier_failures:
            status = EXIT_FAILURES
        print(run.summary("done:"), file=sys.stderr)
        return status
