"""`forkio map` and `forkio demo`, always through the installed `forkio` command in a subprocess:
JSON-lines results whatever the task prints or returns, failures isolated, resumable, one clean
line and a documented exit status for every kind of bad usage, bad input or interruption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

TASKS = str(Path(__file__).parent / "cli_tasks.py")
FORKIO = Path(sys.executable).with_name("forkio")  # the console script pip installed beside this Python


def forkio_cmd(*args: str | bytes) -> list[str | bytes]:
    if not FORKIO.exists():  # not a skip: the test extra installs the package, so this is a broken setup
        pytest.fail(f"no forkio command beside {sys.executable}: pip install -e '.[test]'")
    return [str(FORKIO), *args]


def forkio_cli(*args: str | bytes, stdin: str | bytes | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess[str]:
    data = stdin.encode() if isinstance(stdin, str) else stdin
    result = subprocess.run(forkio_cmd(*args), input=data, capture_output=True, timeout=timeout)
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(),
                                       result.stderr.decode(errors="replace"))


def strict_json(line: str) -> Any:
    """Parse as RFC 8259 JSON: no NaN or Infinity, which Python's json would accept."""
    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")
    return json.loads(line, parse_constant=refuse)


def records(text: str) -> list[dict[str, Any]]:
    return [strict_json(line) for line in text.splitlines() if line.strip()]


def assert_one_line_error(result: subprocess.CompletedProcess[str], message: str, status: int = 2) -> None:
    assert result.returncode == status, result.stderr
    assert message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("forkio: error: ")
    assert "Traceback" not in result.stderr


def test_map_arguments_with_every_kind_of_failure() -> None:
    """Each input gets one line; an exception, a crash and a hang fail alone; exit status 1."""
    result = forkio_cli("map", f"{TASKS}:shout", "a", "boom", "die", "hang", "b", "--timeout", "2", "-j", "2")
    assert result.returncode == 1, result.stderr
    by_input = {r["input"]: r for r in records(result.stdout)}
    assert by_input["a"] == {"index": 0, "input": "a", "ok": True, "result": "A"}
    assert by_input["b"]["result"] == "B"
    assert by_input["boom"]["error"] == {"kind": "exception", "type": "ValueError", "message": "boom!"}
    assert by_input["die"]["error"]["kind"] == "crashed"
    assert by_input["hang"]["error"]["kind"] == "timeout"
    assert "5 inputs, 2 ok, 3 failed" in result.stderr
    assert "Traceback" not in result.stderr


def test_all_ok_exits_zero_and_ordered_keeps_order(tmp_path: Path) -> None:
    inputs = [str(i) for i in range(40)]
    (tmp_path / "in.txt").write_text("\n".join(inputs) + "\n")
    out = tmp_path / "out.jsonl"
    result = forkio_cli("map", f"{TASKS}:shout", "--input", str(tmp_path / "in.txt"), "--ordered",
                        "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert [r["input"] for r in records(out.read_text())] == inputs


def test_inputs_and_options_in_any_order() -> None:
    result = forkio_cli("map", f"{TASKS}:shout", "a", "--ordered", "b", "-j", "1", "c")
    assert result.returncode == 0, result.stderr
    assert [r["result"] for r in records(result.stdout)] == ["A", "B", "C"]


def test_jsonl_input_from_stdin() -> None:
    result = forkio_cli("map", f"{TASKS}:double", "--jsonl", "--ordered", stdin='{"n": 2}\n3\n"ab"\n')
    assert result.returncode == 0, result.stderr
    assert [r["result"] for r in records(result.stdout)] == [4, 6, "abab"]


def test_input_file_that_is_a_pipe_is_read_once() -> None:
    """--input /dev/stdin on a pipe (or `<(command)`): read as it comes, not counted first."""
    result = forkio_cli("map", f"{TASKS}:shout", "--input", "/dev/stdin", "--ordered", stdin="a\nb\n")
    assert result.returncode == 0, result.stderr
    assert [r["result"] for r in records(result.stdout)] == ["A", "B"]


def test_infinite_timeout_means_no_limit() -> None:
    result = forkio_cli("map", f"{TASKS}:double", "--jsonl", "--ordered", "3", "4", "--timeout", "inf")
    assert result.returncode == 0, result.stderr
    assert [r["result"] for r in records(result.stdout)] == [6, 8]


# ---- 1. what tasks print ------------------------------------------------------------------------

NOISY = """\
import os

print("module imported")  # at import: in forkio map's own process, then in each worker


def noisy(text):
    print(f"task says {text}")
    os.write(1, f"fd 1 says {text}\\n".encode())  # as C code would
    return text
"""


@pytest.mark.parametrize("to_file", [False, True])
def test_what_tasks_print_goes_to_stderr_never_into_the_results(tmp_path: Path, to_file: bool) -> None:
    """print() in the task, a write to fd 1, and the module's import-time print all go to stderr."""
    (tmp_path / "noisy.py").write_text(NOISY)
    out = tmp_path / "out.jsonl"
    result = forkio_cli("map", f"{tmp_path}/noisy.py:noisy", "x", "y", "z", "-j", "2",
                        *(["--output", str(out)] if to_file else []))
    assert result.returncode == 0, result.stderr
    lines = (out.read_text() if to_file else result.stdout).splitlines()
    assert sorted(r["result"] for r in map(strict_json, lines)) == ["x", "y", "z"]  # every line parses
    if to_file:
        assert result.stdout == ""
    for word in "xyz":
        assert f"task says {word}" in result.stderr and f"fd 1 says {word}" in result.stderr
    assert "module imported" in result.stderr


# ---- 2. input file = output file ----------------------------------------------------------------

def test_input_file_that_is_also_the_output_is_refused(tmp_path: Path) -> None:
    """--input x -o x (or stdin from x) would empty x before it is read: refused, x untouched."""
    same = tmp_path / "same.txt"
    same.write_text("a\nb\n")
    assert_one_line_error(forkio_cli("map", f"{TASKS}:shout", "--input", str(same), "-o", str(same)),
                          "the inputs are read from the file results are written to")
    with same.open("rb") as stdin:
        result = subprocess.run(forkio_cmd("map", f"{TASKS}:shout", "-o", str(same)), stdin=stdin,
                                capture_output=True, text=True, timeout=60)
    assert_one_line_error(result, "the inputs are read from the file results are written to")
    assert same.read_text() == "a\nb\n"


# ---- 3. a preload that fails --------------------------------------------------------------------

def test_failing_preload_is_one_line_and_status_2() -> None:
    result = forkio_cli("map", f"{TASKS}:shout", *map(str, range(200)), "--preload", "nosuchmod")
    assert_one_line_error(result, "preloading 'nosuchmod' failed")
    assert "No module named 'nosuchmod'" in result.stderr


CRASH_IN_WORKERS = """\
import os
import signal

# Imports fine in forkio map's own process, dies in every worker (a native extension might).
if os.environ.setdefault("CRASH_OWNER_PID", str(os.getpid())) != str(os.getpid()):
    os.kill(os.getpid(), signal.SIGSEGV)


def f(x):
    return x
"""


def test_workers_that_cannot_start_stop_the_run_with_status_3(tmp_path: Path) -> None:
    """Not one failure line per input: one line saying why the pool broke, status 3."""
    (tmp_path / "crashy.py").write_text(CRASH_IN_WORKERS)
    result = forkio_cli("map", f"{tmp_path}/crashy.py:f", *map(str, range(50)), timeout=30)
    assert_one_line_error(result, "the pool stopped after 0 inputs: the pool is broken", status=3)
    assert "SIGSEGV" in result.stderr and result.stdout == ""


# ---- 4. input that is not text ------------------------------------------------------------------

def test_input_that_is_not_utf8_is_refused_on_every_route(tmp_path: Path) -> None:
    """Arguments, --input FILE and standard input: one line naming where, status 2, nothing run."""
    garbage = b"ok\n\xff\xfe\x00garbage\n"
    (tmp_path / "in.bin").write_bytes(garbage)
    by_argument = forkio_cli("map", f"{TASKS}:shout", "ok", b"\xff\xfe")
    assert_one_line_error(by_argument, "input argument 2 is not UTF-8 text (byte 0xff at offset 0)")
    by_file = forkio_cli("map", f"{TASKS}:shout", "--input", str(tmp_path / "in.bin"))
    assert_one_line_error(by_file, f"{tmp_path / 'in.bin'} line 2 is not UTF-8 text")
    assert by_argument.stdout == by_file.stdout == ""  # checked before anything ran
    by_stdin = forkio_cli("map", f"{TASKS}:shout", stdin=garbage)
    assert_one_line_error(by_stdin, "standard input line 2 is not UTF-8 text")
    assert "\\udc" not in by_stdin.stdout  # no lone surrogates smuggled into the results


def test_jsonl_input_refuses_nan_and_floats_out_of_range() -> None:
    assert_one_line_error(forkio_cli("map", f"{TASKS}:double", "--jsonl", "1", "NaN"),
                          "input argument 2 is not JSON: NaN is not valid JSON")
    assert_one_line_error(forkio_cli("map", f"{TASKS}:double", "--jsonl", "1", "[1e400]"),
                          "input argument 2 is not JSON: 1e400 is too large for a float")


# ---- 5. closed pipe, full disk ------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_closed_pipe_ends_the_run_quietly() -> None:
    """`forkio map ... | head -1`: no BrokenPipeError traceback, status 141 (as `cat` gets), no worker left."""
    with subprocess.Popen(forkio_cmd("map", f"{TASKS}:shout", *map(str, range(5000)), "-j", "2"),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stdout.readline()
        proc.stdout.close()  # as `head -1` does once it has its line
        stderr = proc.stderr.read().decode()
        assert proc.wait(timeout=60) == 141, stderr
    assert strict_json(first.decode())["ok"]
    assert stderr == ""


def test_full_disk_is_one_line_and_status_3() -> None:
    result = forkio_cli("map", f"{TASKS}:shout", "a", "b", "-o", "/dev/full")
    assert_one_line_error(result, "cannot write results to /dev/full: No space left on device", status=3)


# ---- 6. --resume --------------------------------------------------------------------------------

def line(index: int, value: str, ok: bool = True) -> str:
    record = {"index": index, "input": value, "ok": ok}
    record.update({"result": value.upper()} if ok else {"error": {"kind": "exception", "type": "ValueError",
                                                                   "message": "boom!"}})
    return json.dumps(record) + "\n"


def test_resume_skips_what_was_answered_and_says_failures_remain(tmp_path: Path) -> None:
    """A cut-short line is dropped (the file is rewritten whole), answered inputs are skipped, and
    failures still in the file make the exit status 1, with how many."""
    out = tmp_path / "out.jsonl"
    out.write_text(line(0, "a") + line(1, "boom", ok=False) + '{"index": 2, "inp')  # cut short by an interruption
    result = forkio_cli("map", f"{TASKS}:shout", "a", "boom", "c", "--output", str(out), "--resume")
    assert result.returncode == 1, result.stderr
    assert "1 inputs, 1 ok, 0 failed" in result.stderr
    assert "still holds 1 failed input from an earlier run (--retry-failed runs it again)" in result.stderr
    answers = records(out.read_text())  # every line parses: the cut-short one is gone
    assert [(r["index"], r["input"], r["ok"]) for r in answers] == [(0, "a", True), (1, "boom", False),
                                                                    (2, "c", True)]


def test_resume_retry_failed_keeps_one_line_per_input(tmp_path: Path) -> None:
    """--retry-failed: the new answer replaces the old failure (no second line for the input)."""
    out = tmp_path / "out.jsonl"
    out.write_text(line(0, "a") + line(1, "b", ok=False) + line(2, "boom", ok=False))
    result = forkio_cli("map", f"{TASKS}:shout", "a", "b", "boom", "--output", str(out), "--resume",
                        "--retry-failed")
    assert result.returncode == 1, result.stderr
    assert "2 inputs, 1 ok, 1 failed" in result.stderr and "earlier run" not in result.stderr
    answers = records(out.read_text())
    assert sorted((r["index"], r["input"], r["ok"]) for r in answers) == [(0, "a", True), (1, "b", True),
                                                                          (2, "boom", False)]
    again = forkio_cli("map", f"{TASKS}:shout", "a", "b", "--output", str(out), "--resume")
    assert again.returncode == 1 and "0 inputs" in again.stderr and "still holds 1 failed input" in again.stderr


def test_resume_leaves_a_file_it_did_not_write_alone(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\nnot JSON at all\n")
    assert_one_line_error(forkio_cli("map", f"{TASKS}:shout", "a", "-o", str(notes), "--resume"),
                          "line 1 is not JSON: refusing to resume")
    assert notes.read_text() == "my notes\nnot JSON at all\n"


# ---- 7. values JSON cannot hold -----------------------------------------------------------------

def test_values_json_cannot_hold_are_written_as_their_repr() -> None:
    """NaN, Infinity, sets, bytes, objects: `"repr"` instead of `"result"`; every line is strict JSON."""
    names = ["nan", "inf", "nested_nan", "set", "bytes", "object", "bad_repr", "tuple", "int_keys", "text"]
    result = forkio_cli("map", f"{TASKS}:awkward", *names)
    assert result.returncode == 0, result.stderr
    by_input = {r["input"]: r for r in records(result.stdout)}  # strict: a bare NaN would fail here
    assert by_input["nan"] == {"index": 0, "input": "nan", "ok": True, "repr": "nan"}
    assert by_input["inf"]["repr"] == "inf"
    assert by_input["nested_nan"]["repr"] == "{'scores': [1.0, -inf]}"
    assert by_input["set"]["repr"] == "{1, 2, 3}"
    assert by_input["bytes"]["repr"] == "b'\\x00\\xff'"
    assert by_input["object"]["repr"].startswith("<object object at ")
    assert by_input["bad_repr"]["repr"] == "<_BadRepr object; repr() raised RuntimeError>"
    for name in ("nan", "set", "object"):
        assert "result" not in by_input[name]
    assert by_input["tuple"]["result"] == [1, 2] and by_input["int_keys"]["result"] == {"1": "a"}
    assert by_input["text"]["result"] == "plain"


# ---- 8. Ctrl-C ----------------------------------------------------------------------------------

def wait_for(condition: Any, proc: subprocess.Popen[str], what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert proc.poll() is None, f"forkio map exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after 30 s"
        time.sleep(0.02)


def test_ctrl_c_stops_cleanly_and_keeps_results(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(forkio_cmd("map", f"{TASKS}:slow", *map(str, range(200)), "-j", "2", "--output",
                                       str(out)), stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(lambda: out.exists() and len(out.read_text().splitlines()) >= 4, proc, "4 results")
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal does: the whole group gets it
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert "interrupted after" in stderr and "Traceback" not in stderr
    done = records(out.read_text())
    assert 4 <= len(done) < 200 and all(r["ok"] for r in done)


def test_ctrl_c_while_the_function_module_imports(tmp_path: Path) -> None:
    """A Ctrl-C during a slow import (before any worker exists): status 130 and the summary."""
    ready = tmp_path / "importing"
    (tmp_path / "slow_import.py").write_text(
        f"import pathlib, time\npathlib.Path({str(ready)!r}).touch()\ntime.sleep(30)\n\n\ndef f(x):\n    return x\n")
    proc = subprocess.Popen(forkio_cmd("map", f"{tmp_path}/slow_import.py:f", "a"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(ready.exists, proc, "the import")
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert stderr.startswith("forkio map interrupted after 0 inputs, 0 ok, 0 failed in ")
    assert len(stderr.splitlines()) == 1 and stdout == ""


def test_ctrl_c_again_and_again_while_stopping(tmp_path: Path) -> None:
    """Ctrl-C pressed repeatedly, also while the workers are being stopped: still one summary line,
    status 130, no traceback."""
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(forkio_cmd("map", f"{TASKS}:slow", *map(str, range(200)), "-j", "2", "--output",
                                       str(out)), stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(lambda: out.exists() and len(out.read_text().splitlines()) >= 2, proc, "2 results")
    deadline = time.monotonic() + 20
    while proc.poll() is None and time.monotonic() < deadline:
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.001)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert [text for text in stderr.splitlines() if text.strip()] == [stderr.strip()]
    assert stderr.startswith("forkio map interrupted after ")


# ---- 9. messages --------------------------------------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["map", "nosuchmodule:fn", "x"], "cannot import 'nosuchmodule'"),
    (["map", f"{TASKS}:nosuch", "x"], "has no attribute 'nosuch'"),
    (["map", f"{TASKS}:not_callable", "x"], "is not callable"),
    (["map", "missing.py:fn", "x"], "no such file: missing.py"),
    (["map", "/etc/passwd:f", "x"], "/etc/passwd is not a Python file"),
    (["map", f"{Path(TASKS).parent}:f", "x"], "is not a Python file"),
    (["map", "justaname", "x"], "expected MODULE:FUNCTION"),
    (["map"], "missing MODULE:FUNCTION"),
    (["map", f"{TASKS}:shout", "-j", "0", "x"], "argument -j/--workers: must be at least 1, not 0"),
    (["map", f"{TASKS}:shout", "-j", "abc", "x"], "argument -j/--workers: expected a whole number, got 'abc'"),
    (["map", f"{TASKS}:shout", "--retries", "x1", "x"], "argument --retries: expected a whole number, got 'x1'"),
    (["map", f"{TASKS}:shout", "--timeout", "-1", "x"], "must be more than 0"),
    (["map", f"{TASKS}:shout", "--timeout", "soon", "x"], "expected a number of seconds, got 'soon'"),
    (["map", f"{TASKS}:shout", "--input", "/nonexistent/file"], "cannot read /nonexistent/file"),
    (["map", f"{TASKS}:shout", "x", "--resume"], "--resume needs --output"),
    (["map", f"{TASKS}:shout", "x", "--resume", "-o", "/dev/null"], "--resume needs a regular file"),
    (["map", f"{TASKS}:shout", "x", "--retry-failed", "-o", "/dev/null"], "--retry-failed goes with --resume"),
    (["map", f"{TASKS}:shout", "x", "--input", "/dev/null"], "give inputs as arguments or with --input, not both"),
    (["map", f"{TASKS}:shout", "--jsonl", "{bad"], "input argument 1 is not JSON"),
    (["demo", "--children", "0"], "argument --children: must be at least 1, not 0"),
    (["demo", "--jobs", "-1"], "argument --jobs: must be at least 0, not -1"),
    ([], "the following arguments are required: COMMAND"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_usage_is_one_line_and_status_2(args: list[str], message: str) -> None:
    result = forkio_cli(*args)
    assert_one_line_error(result, message)
    assert "_positive_int" not in result.stderr and "_non_negative" not in result.stderr


@pytest.mark.parametrize("module", ["json", "argparse"])
def test_a_file_shadowing_the_standard_library_is_named(tmp_path: Path, module: str) -> None:
    (tmp_path / "tasks.py").write_text("def f(x):\n    return x\n")
    (tmp_path / f"{module}.py").write_text("raise SystemExit('not the real module')\n")
    result = forkio_cli("map", f"{tmp_path}/tasks.py:f", "a")
    assert_one_line_error(result, f"{tmp_path}/{module}.py shadows the standard-library module '{module}'")


def test_version() -> None:
    from forkio import __version__

    result = forkio_cli("--version")
    assert result.returncode == 0 and result.stdout == f"forkio {__version__}\n"


def test_help_names_no_private_function() -> None:
    result = forkio_cli("map", "--help")
    assert result.returncode == 0 and "MODULE:FUNCTION" in result.stdout and "_positive" not in result.stdout


def test_demo_runs() -> None:
    result = forkio_cli("demo", "--children", "2", "--jobs", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(" is up (") == 2 and "2² = 4" in result.stdout
