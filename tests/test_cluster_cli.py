"""`forkio serve` and `forkio cluster` from the command line, plus the cluster's small pure parts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from forkio import cluster
from forkio.cluster._settings import ClusterError, Settings, parse_address
from forkio.cluster._starts import RESTART_DELAY_MAX, StartLimit, restart_delay
from test_cluster import APP, App, Load, free_port, get

CHILDREN = Path(__file__).parent / "children"


def forkio_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "forkio", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["serve", "no_colon"], "expected MODULE:APP"),
    (["serve", "m:app", "--bind", "localhost:http"], "not a port"),
    (["serve", "m:app", "--workers", "0"], "must be at least 1"),
    (["serve", "m:app", "--max-requests-jitter", "-1"], "must be at least 0"),
    (["cluster", "--workers", "two", "app.py"], "expected a whole number"),
    (["serve", "m:app", "--timeout", "soon"], "not a number of seconds"),
    (["serve", "m:app", "--min-uptime", "-1"], "seconds must be >= 0"),
    (["cluster", "no_such_script.py"], "no such script"),
])
def test_bad_usage_is_one_line_and_status_2(args: list[str], message: str) -> None:
    """Bad usage: one line on stderr, exit status 2, nothing started."""
    result = forkio_cli(*args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


class Serve(App):
    """`forkio serve tests/children/cluster_asgi:app` as a subprocess."""

    def __init__(self, tmp_path: Path, *options: str, **env: str) -> None:
        self.port = free_port()
        self.out_path, self.err_path = tmp_path / "out.txt", tmp_path / "err.txt"
        full_env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(CHILDREN), os.environ["PYTHONPATH"]])}
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "forkio", "serve", "cluster_asgi:app", "--workers", "2",
                 "--bind", f"127.0.0.1:{self.port}", *options], stdout=out, stderr=err, env=full_env, cwd=tmp_path)

    def serving(self, n: int = 2, attempts: int = 400) -> set[int]:
        self.wait_for(lambda: self.err.count("Application startup complete") >= n)
        return self.answering(n, attempts)


@pytest.mark.timeout(90)
def test_serve_reloads_new_code_under_load_without_a_failure(tmp_path: Path) -> None:
    """forkio serve: uvicorn in each worker; SIGHUP with the app edited serves the new code, 0 failures."""
    pytest.importorskip("uvicorn")
    version = tmp_path / "version.txt"
    version.write_text("v1")
    app = Serve(tmp_path, "--preload", APP_VERSION_FILE=str(version))
    try:
        first = app.serving(2)
        load = Load(app.port)
        app.wait_for(lambda: sum(load.ok.values()) > 30)
        version.write_text("v2")
        app.proc.send_signal(signal.SIGHUP)
        app.wait_for(lambda: "reload done" in app.err)
        app.wait_for(lambda: not (app.worker_pids() & first))
        app.wait_for(lambda: sum(n for body, n in list(load.ok.items()) if body.startswith("v2")) > 10)
        load.finish()
        assert load.failures == []
        assert get(app.port).startswith("v2")  # --preload: a new zygote imported the new code
        assert "[worker 1 pid" in app.err  # worker output, attributed
        assert app.stop() == 0
    finally:
        app.stop()


@pytest.mark.timeout(90)
def test_serve_max_requests_recycles_with_a_replacement_first(tmp_path: Path) -> None:
    """--max-requests: a worker that served enough is replaced, the replacement ready first: 0 failures."""
    pytest.importorskip("uvicorn")
    app = Serve(tmp_path, "--max-requests", "20", "--max-requests-jitter", "5")
    try:
        first = app.serving(2)
        load = Load(app.port, clients=2, limit=200)
        app.wait_for(lambda: "asked to be recycled" in app.err)
        app.wait_for(lambda: bool(app.worker_pids() - first))
        app.wait_for(lambda: "(asked)" in app.err)  # the recycled one stopped once its replacement was ready
        load.finish()
        assert load.failures == []
    finally:
        app.stop()


@pytest.mark.timeout(60)
def test_cluster_command_runs_a_script_with_its_options(tmp_path: Path) -> None:
    """forkio cluster SCRIPT.py --workers 3 ARGS: the script's run() forks 3 workers."""
    port = free_port()
    with open(tmp_path / "out.txt", "wb") as out, open(tmp_path / "err.txt", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "forkio", "cluster", "--workers", "3", str(APP), str(port), "2"],
                                stdout=out, stderr=err)
    app = App.__new__(App)
    app.proc, app.port, app.out_path, app.err_path = proc, port, tmp_path / "out.txt", tmp_path / "err.txt"
    try:
        assert len(app.serving(3)) == 3
    finally:
        assert app.stop() == 0


@pytest.mark.parametrize("given, parsed", [
    (("127.0.0.1", 80), ("tcp", "127.0.0.1", "80")),
    ("localhost:8000", ("tcp", "localhost", "8000")),
    ("[::1]:8000", ("tcp", "::1", "8000")),
    (8000, ("tcp", "0.0.0.0", "8000")),
    ("unix:/tmp/x.sock", ("unix", "/tmp/x.sock")),
])
def test_addresses_are_parsed(given: object, parsed: tuple[str, ...]) -> None:
    """Every address form the docs name turns into one normal form."""
    assert parse_address(given) == parsed  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["nonsense", ("h", 70000), "unix:", True, ("h",), "h:port"])
def test_bad_addresses_are_refused(bad: object) -> None:
    """A bad address is a ClusterError naming it."""
    with pytest.raises(ClusterError, match="not a"):
        parse_address(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("options", [{"timeout": 0}, {"graceful_timeout": -1}, {"max_requests": 0},
                                     {"min_uptime": -1}, {"min_uptime": float("nan")},
                                     {"max_requests_jitter": -2}])
def test_bad_settings_are_refused(options: dict[str, float]) -> None:
    """Out-of-range settings are a ValueError at once."""
    with pytest.raises(ValueError):
        Settings(**options)  # type: ignore[arg-type]


def test_settings_travel_through_the_environment() -> None:
    """What the primary puts in a worker's environment comes back equal."""
    settings = Settings(timeout=5, reuse_port=True, binds=[("tcp", "127.0.0.1", "80")], options={"app": "m:a"})
    assert Settings.from_env(settings.to_env()) == settings
    assert settings.beat_interval == 0.25


def test_this_process_is_a_primary_and_events_are_checked() -> None:
    """Outside a cluster worker: is_primary, no worker id; an unknown event is a ValueError."""
    assert cluster.is_primary and not cluster.is_worker and cluster.worker is None
    with pytest.raises(ValueError, match="unknown cluster event"):
        cluster.on("nonsense", print)
    with pytest.raises(ClusterError):
        cluster.recycle()


def test_control_messages_go_to_their_hook_never_to_recv() -> None:
    """A control message (with an fd) reaches on_control, in order with user messages, never recv()."""
    import socket as socket_module

    from forkio._channel import Channel

    left, right = socket_module.socketpair(socket_module.AF_UNIX, socket_module.SOCK_STREAM)
    a, b = Channel(left), Channel(right)
    got: list[tuple[object, int]] = []
    b.on_control = lambda message, fds: got.append((message["op"], len(fds))) or [os.close(fd) for fd in fds]
    try:
        with open(os.devnull) as null:
            a.send("before")
            a.send_control({"op": "listen"}, [null.fileno()])
            a.send("after")
        assert b.recv(timeout=5) == "before"
        assert b.recv(timeout=5) == "after"
        assert got == [("listen", 1)]
    finally:
        a.close()
        b.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("preload", [True, False])
def test_serve_an_app_that_cannot_import_stops_with_one_line_and_status_1(tmp_path: Path, preload: bool) -> None:
    """An app module that does not import: with --preload the zygote says so at once, without it the
    workers die at boot until the crash-loop stop; either way one line from the primary and status 1."""
    pytest.importorskip("uvicorn")
    result = forkio_cli("serve", "no_such_module_here:app", "--workers", "2", "--bind", f"127.0.0.1:{free_port()}",
                        *(["--preload"] if preload else []))
    assert result.returncode == 1
    ours = [line for line in result.stderr.splitlines()
            if line.startswith("forkio cluster:") and line.endswith("stopping") and "worker(s)" not in line]
    assert len(ours) == 1, result.stderr
    assert ("no_such_module_here" in ours[0]) if preload else ("died at boot" in ours[0])


def test_the_cluster_public_names_exist_and_are_documented() -> None:
    """Every name in forkio.cluster.__all__ exists; the callables and classes say what they do."""
    import forkio

    assert forkio.cluster is cluster
    for name in cluster.__all__:
        obj = getattr(cluster, name)
        if callable(obj):
            assert (obj.__doc__ or "").strip(), f"forkio.cluster.{name} has no docstring"
    assert issubclass(cluster.ClusterError, forkio.ForkioError)


def test_restarts_after_unstable_starts_back_off_doubling_to_a_cap() -> None:
    """The first unstable start is replaced at once; then the wait doubles from 0.1 s up to its cap."""
    assert [restart_delay(n) for n in range(6)] == [0.0, 0.0, 0.1, 0.2, 0.4, 0.8]
    assert restart_delay(1000) == RESTART_DELAY_MAX


def test_five_unstable_starts_in_ten_seconds_are_a_crash_loop_and_starts_wait_meanwhile() -> None:
    """The start limit as a pure rule: waits grow in a row and hold starts back until they pass; the
    fifth in the window is a crash loop; a worker that stays up ends the run of waits."""
    starts = StartLimit()
    assert starts.unstable(0.0, restarting=True) == (False, 0.0) and not starts.held(0.0)
    assert starts.unstable(1.0, restarting=True) == (False, 0.1)
    assert starts.held(1.05) and not starts.held(1.1)
    assert starts.unstable(2.0, restarting=True) == (False, 0.2)
    starts.stable()  # a worker stayed up: the next one is replaced at once again
    assert starts.unstable(3.0, restarting=True) == (False, 0.0)
    assert starts.unstable(4.0, restarting=True) == (True, 0.0)  # 5 within 10 s
    assert not starts.held(4.0) and not starts.recent and starts.in_a_row == 0


def test_unstable_starts_spread_wider_than_the_window_are_no_crash_loop() -> None:
    """One unstable start every 3 s never puts 5 in a 10-second window; the waits still grow, to a cap."""
    starts = StartLimit()
    outcomes = [starts.unstable(3.0 * n, restarting=True) for n in range(20)]
    assert not any(loop for loop, _ in outcomes)
    assert outcomes[-1][1] == RESTART_DELAY_MAX
