"""forkio serve beside gunicorn + uvicorn worker, uvicorn --workers, granian and Node's cluster.

Same app (bench/cluster_app.py; Node: bench/cluster_node.js), same worker count, same load
generator, contenders alternated in each round; medians over rounds. Needs, in the venv:
uvicorn uvloop httptools gunicorn uvicorn-worker granian; and autocannon (npm) for req/s:

    npm install --prefix "$HOME/bench-node" autocannon
    .venv/bin/python bench/cluster.py --rounds 3 --autocannon "$HOME/bench-node/node_modules/.bin/autocannon"

Rows: hello req/s (32 keep-alive connections, autocannon), requests per worker max/min (new
connections / keep-alive), a worker SIGKILLed under ~400 req/s (failed, first answer from a new
worker), two SIGHUP reloads under load (failed), a handler blocking the loop 60 s with timeout 5 s,
the primary SIGKILLed (workers alive 1 s later), SIGINT stop when idle, launch to first 200,
SIGTTIN to a new worker answering. ``--modes`` adds forkio with --no-reuse-port (one shared
socket), the balance test that picked forkio's default (a SO_REUSEPORT socket per worker slot).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).parent
BIN = Path(sys.executable).parent
WORKERS = 2


def contenders(port: int) -> dict[str, list[str]]:
    py = sys.executable
    host = "127.0.0.1"
    return {
        "forkio": [py, "-m", "forkio", "serve", "cluster_app:app", "--workers", str(WORKERS), "--bind",
                   f"{host}:{port}", "--timeout", "5", "--graceful-timeout", "10"],
        "forkio-shared": [py, "-m", "forkio", "serve", "cluster_app:app", "--workers", str(WORKERS), "--bind",
                          f"{host}:{port}", "--timeout", "5", "--graceful-timeout", "10", "--no-reuse-port"],
        "gunicorn": [str(BIN / "gunicorn"), "-k", "uvicorn_worker.UvicornWorker", "-w", str(WORKERS), "-b",
                     f"{host}:{port}", "--timeout", "5", "--graceful-timeout", "10", "cluster_app:app"],
        "uvicorn": [str(BIN / "uvicorn"), "cluster_app:app", "--workers", str(WORKERS), "--host", host, "--port",
                    str(port), "--no-access-log", "--timeout-graceful-shutdown", "10"],
        "granian": [str(BIN / "granian"), "--interface", "asgi", "--workers", str(WORKERS), "--host", host,
                    "--port", str(port), "cluster_app:app"],
        "node": ["node", str(HERE / "cluster_node.js"), str(port), str(WORKERS)],
    }


# ---------------------------------------------------------------------------- client side
def get(port: int, path: str = "/", conn: http.client.HTTPConnection | None = None,
        timeout: float = 10.0) -> tuple[str, http.client.HTTPConnection | None]:
    """One request (on ``conn`` when given: keep-alive); the body (the worker's pid) and the connection."""
    own = conn is None
    if conn is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={} if not own else {"Connection": "close"})
        response = conn.getresponse()
        body = response.read().decode()
        if response.status != 200:
            raise RuntimeError(f"status {response.status}")
        return body, None if own else conn
    except BaseException:
        conn.close()
        raise
    finally:
        if own:
            conn.close()


class Load:
    """``threads`` keep-alive clients paced to ``rate`` requests/s in all; bounded by ``seconds``."""

    def __init__(self, port: int, rate: float = 400, threads: int = 8, seconds: float = 30) -> None:
        self.port, self.period = port, threads / rate
        self.ok: list[tuple[float, str]] = []
        self.failed: list[tuple[float, str]] = []
        self.stop_at = time.monotonic() + seconds
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        next_at = time.monotonic()
        while not self._stop.is_set() and time.monotonic() < self.stop_at:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                body, conn = get(self.port, conn=conn)
                self.ok.append((time.monotonic(), body))
            except Exception as exc:
                self.failed.append((time.monotonic(), type(exc).__name__))
                conn = None
            next_at += self.period
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                next_at = time.monotonic()

    def finish(self) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(15)


def wait_until(predicate: Callable[[], bool], within: float, step: float = 0.005) -> float | None:
    """Seconds until ``predicate()`` held (None if it did not within ``within``)."""
    start = time.monotonic()
    while time.monotonic() - start < within:
        try:
            if predicate():
                return time.monotonic() - start
        except Exception:
            pass
        time.sleep(step)
    return None


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False


def pids_serving(port: int, want: int = WORKERS, attempts: int = 300) -> set[str]:
    """Worker pids seen over fresh connections (bounded)."""
    seen: set[str] = set()
    for _ in range(attempts):
        try:
            seen.add(get(port)[0])
        except Exception:
            time.sleep(0.01)
        if len(seen) >= want:
            break
    return seen


# ---------------------------------------------------------------------------- one server
class Server:
    def __init__(self, name: str, port: int, log_dir: Path) -> None:
        self.name, self.port = name, port
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
        self.log = open(log_dir / f"{name}.log", "ab")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(contenders(port)[name], cwd=HERE, env=env, stdout=self.log, stderr=self.log,
                                     start_new_session=True)
        self.seen: set[str] = set()

    def first_200(self, within: float = 30) -> float | None:
        took = wait_until(lambda: bool(get(self.port, timeout=1)[0]), within)
        return None if took is None else time.monotonic() - self.started

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its whole session: orphans included
        except ProcessLookupError:
            pass
        for pid in self.seen:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        self.proc.wait()
        self.log.close()


# ---------------------------------------------------------------------------- measures
def throughput(server: Server, autocannon: str | None, seconds: int) -> float | None:
    if autocannon is None:
        return None
    out = subprocess.run([autocannon, "-c", "32", "-d", str(seconds), "--json", f"http://127.0.0.1:{server.port}/"],
                         capture_output=True, text=True, timeout=seconds + 60)
    data = json.loads(out.stdout)
    return float(data["requests"]["average"])


def balance(server: Server) -> tuple[float, float]:
    """max/min requests per worker: new connections (8 clients x 50), keep-alive (32 connections x 25)."""
    def spread(counts: Counter[str]) -> float:
        values = list(counts.values()) + [0] * max(0, WORKERS - len(counts))
        return max(values) / max(1, min(values)) if min(values) else float("inf")

    fresh: Counter[str] = Counter()
    kept: Counter[str] = Counter()
    lock = threading.Lock()

    def new_connections() -> None:
        for _ in range(50):
            body = get(server.port)[0]
            with lock:
                fresh[body] += 1

    conns = [http.client.HTTPConnection("127.0.0.1", server.port, timeout=10) for _ in range(32)]
    barrier = threading.Barrier(32)

    def keep_alive(conn: http.client.HTTPConnection) -> None:
        barrier.wait()  # all 32 connect at once, as a load generator does
        for _ in range(25):
            body = get(server.port, conn=conn)[0]
            with lock:
                kept[body] += 1
        conn.close()

    for target, args in ((new_connections, [()] * 8), (keep_alive, [(c,) for c in conns])):
        threads = [threading.Thread(target=target, args=a) for a in args]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    server.seen |= set(fresh) | set(kept)
    return spread(fresh), spread(kept)


def kill_worker(server: Server) -> tuple[int, float | None]:
    """A worker SIGKILLed under ~400 req/s: failed requests, seconds to the first answer from a new worker."""
    load = Load(server.port, seconds=12)
    wait_until(lambda: len(load.ok) > 400, 10)
    before = {body for _, body in load.ok}
    server.seen |= before
    victim = int(sorted(before)[0])
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    # A prober on fresh connections (keep-alive clients stay where they are): the first answer from a new pid.
    first = wait_until(lambda: (lambda body: body.isdigit() and body not in before)(_try(server.port, "/")), 8, 0.002)
    answered = time.monotonic()
    load.finish()
    new = [answered] if first is not None else []
    server.seen |= {body for _, body in load.ok}
    return len(load.failed), (min(new) - killed_at) if new else None


def reloads(server: Server) -> tuple[int, int, bool]:
    """Two SIGHUPs 4 s apart under ~400 req/s for ~11 s: failed, total, whether all pids changed."""
    load = Load(server.port, seconds=11)
    time.sleep(1.5)
    before = {body for _, body in load.ok}
    for _ in range(2):
        server.proc.send_signal(signal.SIGHUP)
        time.sleep(4)
    load.finish()
    after = {body for t, body in load.ok[-100:]}
    server.seen |= {body for _, body in load.ok}
    return len(load.failed), len(load.ok) + len(load.failed), not (after & before)


def blocked(server: Server) -> tuple[float | None, int]:
    """GET /block/60 (timeout 5 s where the server has one): seconds until that worker died, other failures."""
    current = pids_serving(server.port)  # the workers serving now (not ones a reload is still stopping)
    server.seen |= current
    sent = time.monotonic()
    threading.Thread(target=_try, args=(server.port, "/block/60"), daemon=True).start()
    time.sleep(0.3)  # let the blocking request reach its worker before the load starts
    load = Load(server.port, rate=100, threads=2, seconds=14)
    time.sleep(0.5)
    stuck = current - {body for _, body in load.ok}
    waited_from = time.monotonic()
    died = wait_until(lambda: any(not alive(int(p)) for p in stuck), 13, 0.02) if stuck else None
    load.finish()
    server.seen |= {body for _, body in load.ok}
    return (None if died is None else waited_from - sent + died), len(load.failed)


def _try(port: int, path: str) -> str:
    try:
        return get(port, path, timeout=70)[0]
    except Exception as exc:
        return type(exc).__name__


def primary_killed(server: Server) -> int:
    """SIGKILL the primary; workers alive 1 s later."""
    pids = pids_serving(server.port)
    server.seen |= pids
    server.proc.kill()
    server.proc.wait()
    time.sleep(1.0)
    return sum(alive(int(p)) for p in pids)


def sigint_stop(server: Server) -> float | None:
    """SIGINT when idle: seconds until the primary exited (35 s at most)."""
    server.seen |= pids_serving(server.port)
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGINT)
    try:
        server.proc.wait(35)
    except subprocess.TimeoutExpired:
        return None
    return time.monotonic() - t0


def ttin(server: Server) -> float | None:
    """SIGTTIN: seconds until a worker not seen before answers a fresh connection."""
    before = pids_serving(server.port, attempts=100)
    server.seen |= before
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTTIN)
    took = wait_until(lambda: get(server.port, timeout=2)[0] not in before, 5, 0.001)
    answered = time.monotonic() - t0
    server.seen |= pids_serving(server.port, want=WORKERS + 1, attempts=50)
    return None if took is None else answered


# ---------------------------------------------------------------------------- the run
def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--rounds", type=int, default=3)
    cli.add_argument("--seconds", type=int, default=5, help="autocannon duration")
    cli.add_argument("--autocannon", default=shutil.which("autocannon"), help="default: autocannon on PATH")
    cli.add_argument("--only", nargs="*", default=["forkio", "gunicorn", "uvicorn", "granian", "node"])
    cli.add_argument("--modes", action="store_true", help="also forkio --no-reuse-port (one shared socket)")
    cli.add_argument("--skip", nargs="*", default=[], help="rows to skip: kill reload block primary sigint ttin")
    cli.add_argument("--logs", default=os.path.join(tempfile.gettempdir(), "forkio-bench-cluster"))
    args = cli.parse_args()
    names = list(args.only) + (["forkio-shared"] if args.modes else [])
    log_dir = Path(args.logs)
    log_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, list[object]]] = {n: {} for n in names}
    port = 18800

    def record(name: str, row: str, value: object) -> None:
        results[name].setdefault(row, []).append(value)
        print(f"  {name:17} {row:10} {value}", flush=True)

    for rnd in range(args.rounds):
        print(f"round {rnd + 1}", flush=True)
        order = names if rnd % 2 == 0 else names[::-1]
        for name in order:
            steps: list[tuple[str, Callable[[Server], object]]] = [
                ("req/s", lambda s: throughput(s, args.autocannon, args.seconds)),
                ("balance", balance),
                ("kill", kill_worker),
                ("reload", reloads),
                ("ttin", ttin),
                ("block", blocked),
                ("primary", primary_killed),
            ]
            port += 1
            server = Server(name, port, log_dir)
            try:
                record(name, "launch", server.first_200())
                for row, step in steps:
                    if row in args.skip or (row == "block" and rnd > 0):
                        continue
                    if server.proc.poll() is not None:  # the last step took the whole server down (granian)
                        server.stop()
                        port += 1
                        server = Server(name, port, log_dir)
                        server.first_200()
                    if row in ("ttin",) and name in ("granian", "node"):
                        continue
                    record(name, row, step(server))
            finally:
                server.stop()
            if "sigint" not in args.skip and name != "forkio-shared":
                port += 1
                server = Server(name, port, log_dir)
                try:
                    server.first_200()
                    record(name, "sigint", sigint_stop(server))
                finally:
                    server.stop()
    print(json.dumps(results, default=str))
    summary(results)


def summary(results: dict[str, dict[str, list[object]]]) -> None:
    def med(values: list[object], pick: Callable[[object], float | None] = lambda v: v) -> str:  # type: ignore
        xs = [pick(v) for v in values]
        xs = [x for x in xs if x is not None]
        return f"{statistics.median(xs):.3g}" if xs else "—"

    print("\n| measure | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    rows = [
        ("hello keep-alive 32 conns: req/s", "req/s", lambda v: v),
        ("per worker max/min, new conns", "balance", lambda v: v[0]),
        ("per worker max/min, keep-alive", "balance", lambda v: v[1]),
        ("worker SIGKILL @400 req/s: failed", "kill", lambda v: v[0]),
        ("... first answer from new worker (s)", "kill", lambda v: v[1]),
        ("two SIGHUP reloads: failed", "reload", lambda v: v[0]),
        ("... requests", "reload", lambda v: v[1]),
        ("blocked loop: killed after (s)", "block", lambda v: v[0]),
        ("blocked loop: other failures", "block", lambda v: v[1]),
        ("primary SIGKILL: workers alive at 1 s", "primary", lambda v: v),
        ("SIGINT stop, idle (s)", "sigint", lambda v: v),
        ("launch -> first 200 (s)", "launch", lambda v: v),
        ("SIGTTIN -> new worker answering (s)", "ttin", lambda v: v),
    ]
    for label, key, pick in rows:
        print(f"| {label} | " + " | ".join(med(results[n].get(key, []), pick) for n in results) + " |")


if __name__ == "__main__":
    main()
