"""`forkio map`: JSON-lines results, failures isolated, resumable, clean usage errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TASKS = str(Path(__file__).parent / "cli_tasks.py")


def forkio_cli(*args: str, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "forkio", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout)


def records(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_map_arguments_with_every_kind_of_failure() -> None:
    """Each input gets one line; an exception, a crash and a hang fail alone; exit status 1."""
    result = forkio_cli("map", f"{TASKS}:shout", "a", "boom", "die", "hang", "b", "--timeout", "2", "-j", "2")
    assert result.returncode == 1, result.stderr
    by_input = {r["input"]: r for r in records(result.stdout)}
    assert by_input["a"] == {"index": 0, "input": "a", "ok": True, "result": "A"}
    assert by_input["b"]["result"] == "B"
    assert by_input["boom"]["error"] == {"kind": "exception", "type": "ValueError", "message": "boom!"}
    assert by_input["die"]["error"]["kind"] == "crashed"  # type: ignore[index]
    assert by_input["hang"]["error"]["kind"] == "timeout"  # type: ignore[index]
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


def test_resume_skips_what_was_answered(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"index": 0, "input": "a", "ok": True, "result": "A"}) + "\n"
                   + json.dumps({"index": 1, "input": "boom", "ok": False, "error": {}}) + "\n"
                   + '{"index": 2, "inp')  # a line cut short by the interruption
    result = forkio_cli("map", f"{TASKS}:shout", "a", "boom", "c", "--output", str(out), "--resume")
    assert result.returncode == 0, result.stderr
    lines = out.read_text().splitlines()
    assert lines[2] == '{"index": 2, "inp'  # the cut-short line stays as it was, on its own line
    new = [json.loads(line) for line in lines[3:]]
    assert len(new) == 1 and new[0]["result"] == "C"
    assert "1 inputs, 1 ok" in result.stderr
    again = forkio_cli("map", f"{TASKS}:shout", "a", "boom", "c", "--output", str(out), "--resume",
                       "--retry-failed")
    assert again.returncode == 1 and "1 inputs, 0 ok, 1 failed" in again.stderr


@pytest.mark.parametrize("args,message", [
    (["nosuchmodule:fn", "x"], "cannot import 'nosuchmodule'"),
    ([f"{TASKS}:nosuch", "x"], "has no attribute 'nosuch'"),
    ([f"{TASKS}:not_callable", "x"], "is not callable"),
    (["missing.py:fn", "x"], "no such file"),
    (["justaname", "x"], "expected MODULE:FUNCTION"),
    ([f"{TASKS}:shout", "-j", "0", "x"], "must be at least 1"),
    ([f"{TASKS}:shout", "--timeout", "-1", "x"], "must be more than 0"),
    ([f"{TASKS}:shout", "--input", "/nonexistent/file"], "cannot read"),
    ([f"{TASKS}:shout", "x", "--resume"], "--resume needs --output"),
    ([f"{TASKS}:shout", "--jsonl", "{bad"], "not JSON"),
])
def test_bad_usage_is_one_line_and_status_2(args: list[str], message: str) -> None:
    result = forkio_cli("map", *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_ctrl_c_stops_cleanly_and_keeps_results(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "forkio", "map", f"{TASKS}:slow", *map(str, range(200)),
                             "-j", "2", "--output", str(out)], stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 30
    while not out.exists() or len(out.read_text().splitlines()) < 4:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal does: the whole group gets it
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert "interrupted after" in stderr and "Traceback" not in stderr
    done = records(out.read_text())
    assert 4 <= len(done) < 200 and all(r["ok"] for r in done)
