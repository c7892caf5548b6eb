"""forkio.cluster end to end: a real HTTP app on 127.0.0.1 under bounded client loops."""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from helpers import gone

APP = Path(__file__).parent / "children" / "cluster_app.py"
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="cluster tests run on Linux")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(port: int, path: str = "/", timeout: float = 10.0) -> str:
    """One request on a fresh connection; the body ('VERSION PID WORKER_ID')."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read().decode()
        assert response.status == 200, body
        return body
    finally:
        conn.close()


class App:
    """The test app's primary as a subprocess, its output in files."""

    def __init__(self, tmp_path: Path, workers: int = 2, **env: str) -> None:
        self.port = free_port()
        self.out_path = tmp_path / "out.txt"
        self.err_path = tmp_path / "err.txt"
        full_env = {**os.environ, **env}
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, str(APP), str(self.port), str(workers)],
                                         stdout=out, stderr=err, env=full_env, cwd=tmp_path)

    @property
    def out(self) -> str:
        return self.out_path.read_text()

    @property
    def err(self) -> str:
        return self.err_path.read_text()

    def wait_for(self, predicate: object, within: float = 30.0) -> None:
        """Wait (bounded) until ``predicate()`` is true (generous: CI runs this on 2 busy cores)."""
        deadline = time.monotonic() + within
        while not predicate():  # type: ignore[operator]
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"condition not met within {within} s\n--- out\n{self.out}\n--- err\n{self.err}")
            time.sleep(0.02)

    def worker_pids(self) -> set[int]:
        """The live workers, from the primary's log (started, not exited) and the process table."""
        started = set(map(int, re.findall(r"\(pid (\d+)\) started", self.err)))
        exited = set(map(int, re.findall(r"\(pid (\d+)\) exited", self.err)))
        return {pid for pid in started - exited if not gone(pid)}

    def serving(self, n: int = 2, attempts: int = 400) -> set[int]:
        """Request until ``n`` different workers answered (bounded); their pids."""
        self.wait_for(lambda: self.out.count("listening") >= n)
        return self.answering(n, attempts)

    def answering(self, n: int, attempts: int = 400) -> set[int]:
        seen: set[int] = set()
        for _ in range(attempts):
            seen.add(int(get(self.port).split()[1]))
            if len(seen) >= n:
                return seen
        raise AssertionError(f"only {len(seen)} worker(s) answered in {attempts} requests")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


class Load:
    """Client threads sending requests back to back (bounded in count and time).

    ``timeout`` is per request and generous: a request queued on a hung worker's slot waits for
    its replacement, which a loaded 2-core machine can take seconds to start (not a speed test).
    """

    def __init__(self, port: int, clients: int = 2, limit: int = 20000, seconds: float = 40.0,
                 timeout: float = 20.0) -> None:
        self.port = port
        self.timeout = timeout
        self.ok: Counter[str] = Counter()
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._limit, self._deadline = limit, time.monotonic() + seconds
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        for _ in range(self._limit):
            if self._stop.is_set() or time.monotonic() > self._deadline:
                return
            try:
                self.ok[get(self.port, timeout=self.timeout)] += 1
            except Exception as exc:
                self.failures.append(repr(exc))

    def bodies(self) -> list[str]:
        return list(self.ok)

    def finish(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 10)  # a request still waiting ends, as a success or a failure counted
        assert not any(thread.is_alive() for thread in self._threads), "a load client is stuck"


@pytest.fixture
def make_app(tmp_path: Path) -> Iterator[Callable[..., App]]:
    """Start the app with extra environment variables; stopped at the end of the test."""
    started: list[App] = []

    def make(**env: str) -> App:
        started.append(App(tmp_path, **env))
        return started[-1]

    yield make
    for running in started:
        running.stop()


@pytest.fixture
def app(make_app: Callable[..., App]) -> App:
    return make_app()


@pytest.mark.timeout(60)
def test_workers_share_the_socket_and_stop_gracefully(app: App) -> None:
    """Both workers answer on the one port; SIGTERM stops them, each exit logged as asked."""
    pids = app.serving(2)
    assert pids == app.worker_pids()
    assert app.stop() == 0
    assert app.out.count("asked=True") == 2
    for pid in pids:  # Node's events, in Node's order, for each worker
        events = [line.split()[0] for line in app.out.splitlines() if line.endswith(f" {pid}")]
        assert events == ["fork", "online", "listening", "disconnect"], app.out
    assert "forkio cluster: worker 1 (pid" in app.err and "started" in app.err


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sockets", ["per-worker", "shared"])
def test_worker_sigkilled_under_load_is_replaced(make_app: Callable[..., App], sockets: str) -> None:
    """A worker SIGKILLed under load: only its in-flight requests may fail; a replacement serves."""
    app = make_app(**({"APP_SHARED": "1"} if sockets == "shared" else {}))
    before = app.serving(2)
    load = Load(app.port)
    app.wait_for(lambda: sum(load.ok.values()) > 50)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    app.wait_for(lambda: len(app.worker_pids() - before) == 1)
    replacement = (app.worker_pids() - before).pop()
    app.wait_for(lambda: any(body.split()[1] == str(replacement) for body in load.bodies()))
    load.finish()
    assert len(load.failures) <= 2, load.failures  # two clients: at most two requests in flight there
    # Unasked either way; within min_uptime of ready it is also an unstable start (replaced at once: the first)
    assert re.search(rf"\(pid {victim}\) exited: killed by SIGKILL(, [\d.]+ s after ready \(unstable start\)"
                     r"| \(unexpected\))\n", app.err), app.err
    assert f"exit 1 {victim} None SIGKILL asked=False" in app.out or f"{victim} None SIGKILL asked=False" in app.out


@pytest.mark.timeout(90)
@pytest.mark.parametrize("sockets, loop", [("per-worker", "asyncio"), ("shared", "asyncio"), ("per-worker", "uvloop")])
def test_two_reloads_under_load_drop_nothing_and_serve_new_code(tmp_path: Path, sockets: str, loop: str) -> None:
    """SIGHUP twice, the app's code edited between: zero failed requests, all pids new, new code served."""
    if loop == "uvloop":
        pytest.importorskip("uvloop", reason="uvloop is not installed (pip install 'forkio[bench]')")
    version = tmp_path / "version.txt"
    version.write_text("v1")
    app = App(tmp_path, APP_VERSION_FILE=str(version), **({"APP_SHARED": "1"} if sockets == "shared" else {}),
              **({"APP_UVLOOP": "1"} if loop == "uvloop" else {}))
    try:  # (not make_app: the version file must exist first)
        first = app.serving(2)
        load = Load(app.port)
        app.wait_for(lambda: sum(load.ok.values()) > 50)
        seen = set(first)
        for done, new in enumerate(("v2", "v3"), 1):
            version.write_text(new)
            app.proc.send_signal(signal.SIGHUP)
            app.wait_for(lambda new=new: any(b.startswith(new) for b in load.bodies()))
            app.wait_for(lambda done=done: app.err.count("reload done") >= done)
            app.wait_for(lambda seen=seen: not (app.worker_pids() & seen))
            seen |= app.worker_pids()
            served = Counter(b.split()[0] for b in load.bodies())
            assert served[new] > 0
        load.finish()
        assert load.failures == []
        assert get(app.port).startswith("v3")
        assert not (app.worker_pids() & first)
    finally:
        app.stop()


@pytest.mark.timeout(90)
def test_a_blocked_loop_is_killed_at_the_timeout_with_a_traceback(make_app: Callable[..., App]) -> None:
    """A handler blocking its loop: SIGABRT at the timeout (traceback logged), replaced; others keep serving."""
    app = make_app(APP_TIMEOUT="2")
    app.serving(2)
    blocked: list[object] = []
    started = time.monotonic()
    thread = threading.Thread(target=lambda: blocked.append(_attempt(app.port, "/block/30")), daemon=True)
    thread.start()
    # The load starts once the loop is blocked: a request its worker accepted just before is in
    # flight on a hung worker and lost with it; one queued on its slot waits for the replacement.
    app.wait_for(lambda: "block start" in app.out)
    load = Load(app.port, clients=1)
    app.wait_for(lambda: "event loop silent" in app.err)
    killed_after = time.monotonic() - started
    app.wait_for(lambda: "killed by SIGABRT" in app.err)
    app.wait_for(lambda: "worker 3" in app.err and app.out.count("listening") >= 3)
    load.finish()
    thread.join(15)
    assert load.failures == []
    assert killed_after >= 1.8  # not before the timeout (2 s)
    assert "Fatal Python error: Aborted" in app.err
    assert any(line.startswith("[worker ") and "time.sleep" not in line and "in handle" in line
               for line in app.err.splitlines()), app.err


def _attempt(port: int, path: str) -> object:
    try:
        return get(port, path, timeout=20)
    except Exception as exc:
        return exc


@pytest.mark.timeout(60)
def test_workers_crashing_at_boot_stop_the_cluster_with_status_1(make_app: Callable[..., App]) -> None:
    """Workers that die at boot again and again: one line, exit status 1, nobody left."""
    app = make_app(APP_CRASH="1")
    assert app.proc.wait(30) == 1
    lines = [line for line in app.err.splitlines() if line.startswith("forkio cluster: workers died at boot")]
    assert len(lines) == 1, app.err
    assert "boom at boot" in app.err


@pytest.mark.timeout(60)
def test_primary_sigkilled_leaves_no_worker(app: App) -> None:
    """SIGKILL the primary: every worker is gone within a second."""
    app.serving(2)
    pids = app.worker_pids()
    assert len(pids) == 2
    app.proc.kill()
    app.proc.wait()
    assert all(gone(pid, within=1.0) for pid in pids)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_sigterm_lets_a_request_in_flight_finish(make_app: Callable[..., App], loop: str) -> None:
    """SIGTERM with a 2 s request in flight: the request completes, then the cluster exits 0 (workers on
    asyncio's loop, and on uvloop when it is installed)."""
    if loop == "uvloop":
        pytest.importorskip("uvloop", reason="uvloop is not installed (pip install 'forkio[bench]')")
    app = make_app(**({"APP_UVLOOP": "1"} if loop == "uvloop" else {}))
    app.serving(2)
    results: list[object] = []
    thread = threading.Thread(target=lambda: results.append(_attempt(app.port, "/sleep/2")), daemon=True)
    thread.start()
    app.wait_for(lambda: "sleep start" in app.out)
    app.proc.send_signal(signal.SIGTERM)
    assert app.proc.wait(20) == 0
    thread.join(15)
    assert isinstance(results[0], str) and results[0].startswith("v0"), results
    assert "Traceback" not in app.err and "never retrieved" not in app.err, app.err


@pytest.mark.timeout(60)
def test_broadcast_reaches_every_worker_and_replies_carry_the_worker(make_app: Callable[..., App]) -> None:
    """broadcast() reaches each worker; each reply reaches the primary's handler with its worker."""
    app = make_app(APP_BROADCAST="1")
    app.wait_for(lambda: "message from 1:" in app.out and "message from 2:" in app.out)
    assert "message from 1: {'echo': 'hello', 'worker': 1}" in app.out
    assert "message from 2: {'echo': 'hello', 'worker': 2}" in app.out
    assert "NODE_CLUSTER" not in app.out  # the cluster's own messages never reach user handlers


@pytest.mark.timeout(60)
def test_sigttin_adds_a_worker_and_sigttou_removes_one(app: App) -> None:
    """SIGTTIN: a third worker serves; SIGTTOU: one is stopped gracefully (asked)."""
    app.serving(2)
    app.proc.send_signal(signal.SIGTTIN)
    app.wait_for(lambda: len(app.worker_pids()) == 3 and app.out.count("listening") >= 3)
    app.proc.send_signal(signal.SIGTTOU)
    app.wait_for(lambda: "asked=True" in app.out)
    app.wait_for(lambda: len(app.worker_pids()) == 2)


@pytest.mark.timeout(60)
def test_sigint_stops_at_once(app: App) -> None:
    """SIGINT (Ctrl-C): quick stop, every worker gone."""
    app.serving(2)
    pids = app.worker_pids()
    app.proc.send_signal(signal.SIGINT)
    assert app.proc.wait(10) == 0
    assert all(gone(pid, within=2.0) for pid in pids)


@pytest.mark.timeout(60)
def test_a_sync_worker_heartbeats_from_its_loop_and_stops_gracefully(tmp_path: Path) -> None:
    """http.server calling cluster.heartbeat() from its loop: a blocked loop is killed; SIGTERM stops it (0)."""
    app = App(tmp_path)
    app.proc.kill()
    app.proc.wait()
    with open(app.out_path, "wb") as out, open(app.err_path, "wb") as err:
        app.proc = subprocess.Popen([sys.executable, str(APP.parent / "cluster_sync.py"), str(app.port)],
                                    stdout=out, stderr=err)
    try:
        app.wait_for(lambda: app.out.count("listening") >= 2)
        assert get(app.port).startswith("sync")
        blocked: list[object] = []
        threading.Thread(target=lambda: blocked.append(_attempt(app.port, "/block/30")), daemon=True).start()
        app.wait_for(lambda: "event loop silent" in app.err)
        app.wait_for(lambda: "killed by SIGABRT" in app.err)
        app.wait_for(lambda: app.out.count("listening") >= 3)
        assert get(app.port).startswith("sync")
    finally:
        assert app.stop() == 0
    assert app.err.count("(asked)") == 2


@pytest.mark.timeout(60)
def test_sigterm_while_workers_boot_stops_them(tmp_path: Path) -> None:
    """SIGTERM before the workers serve: they stop anyway, promptly, exit status 0."""
    app = App(tmp_path)
    app.wait_for(lambda: app.err.count("started") >= 2, within=20)
    app.proc.send_signal(signal.SIGTERM)
    assert app.proc.wait(15) == 0


@pytest.mark.timeout(90)
def test_the_lower_level_without_run(tmp_path: Path) -> None:
    """setup_primary(wait_ready), fork(), workers, ready(), reload(), worker.kill(), scale(): as Node's."""
    result = subprocess.run([sys.executable, str(APP.parent / "cluster_lowlevel.py"), str(free_port())],
                            capture_output=True, text=True, timeout=80)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "workers [1, 2]" in out
    assert "exit 1 code=0 signal=None asked=True" in out and "exit 2 code=0 signal=None asked=True" in out
    assert "after reload [3, 4]" in out
    assert "exit 3 code=0 signal=None asked=True" in out
    assert "after kill [4, 5]" in out
    assert "after scale 1" in out and out.rstrip().endswith("done")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("new_code", ["broken", "exits"])
def test_a_reload_whose_new_code_cannot_start_keeps_the_old_workers(tmp_path: Path, new_code: str) -> None:
    """SIGHUP with code whose workers die at boot ("broken"), or listen and exit at once ("exits"): the
    old workers are not stopped (a reload's replacements must stay up min_uptime first), the reload is
    abandoned in one line, the old workers keep serving without a failure; fixed code then reloads."""
    version = tmp_path / "version.txt"
    version.write_text("v1")
    app = App(tmp_path, APP_VERSION_FILE=str(version))
    try:
        first = app.serving(2)
        load = Load(app.port, clients=1)
        version.write_text(new_code)
        app.proc.send_signal(signal.SIGHUP)
        app.wait_for(lambda: "reload failed" in app.err)
        app.wait_for(lambda: app.worker_pids() == first)  # the new ones still there are killed
        assert app.proc.poll() is None
        assert app.answering(2) == first
        assert not any(f"(pid {pid}) exited" in app.err for pid in first), app.err
        version.write_text("v2")
        app.proc.send_signal(signal.SIGHUP)
        app.wait_for(lambda: "reload done" in app.err)
        app.wait_for(lambda: get(app.port).startswith("v2"))
        app.wait_for(lambda: not (app.worker_pids() & first))
        load.finish()
        assert load.failures == []
    finally:
        assert app.stop() == 0


@pytest.mark.timeout(60)
def test_workers_exiting_soon_after_ready_stop_the_cluster_with_status_1(make_app: Callable[..., App]) -> None:
    """Workers that listen and then exit 0 on their own, again and again: an unstable start each time, so
    the crash-loop rule stops the cluster (one line, status 1), with the restarts backing off meanwhile."""
    app = make_app(APP_EXIT="1")
    assert app.proc.wait(30) == 1
    lines = [line for line in app.err.splitlines() if line.startswith("forkio cluster: workers died at boot")]
    assert len(lines) == 1, app.err
    assert "exit code 0" in lines[0]
    assert app.out.count("listening") >= 2  # they were ready: not deaths at boot
    assert "next start in" in app.err  # backed off
    assert all(gone(pid) for pid in map(int, re.findall(r"\(pid (\d+)\) started", app.err)))


@pytest.mark.timeout(60)
def test_a_library_worker_recycles_itself_after_n_requests_without_a_failure(make_app: Callable[..., App]) -> None:
    """The library's max_requests: the app counts its requests and calls cluster.recycle(); a replacement
    starts first and the recycled worker stops gracefully: no request fails."""
    app = make_app(APP_RECYCLE_AFTER="30")
    first = app.serving(2)
    load = Load(app.port, clients=2, limit=300)
    app.wait_for(lambda: "asked to be recycled" in app.err)
    app.wait_for(lambda: bool(app.worker_pids() - first))
    app.wait_for(lambda: all(f"(pid {pid}) exited: exit code 0 (asked)" in app.err for pid in first))
    load.finish()
    assert load.failures == []
