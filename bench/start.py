"""Child start benchmark: forkio's zygote against exec, multiprocessing and Node's fork().

    .venv/bin/python bench/start.py            # a few minutes at most
    .venv/bin/python bench/start.py --quick    # a smoke run, well under a minute

1. One child: milliseconds from the call that starts it to its first message in the parent.
   forkio children are scripts that send "ready" at once (``children/start_child.py``), or that
   import numpy first (``children/start_numpy_child.py``): with ``preload=("numpy",)`` from the
   zygote, and exec'd for comparison. multiprocessing children run a function that sends
   "ready" over a Pipe; Node's fork() is timed inside Node (``children/node_start.js``).
2. 64 children at once: milliseconds from the first call to a message from every child.

Contenders alternate round by round (the order rotated each round) so that a noisy, shared
machine hurts them all alike. Tables give the median over rounds, the fastest round, and the
ratio of medians to forkio's zygote. Every child is stopped before the next contender runs.

Only stdlib modules are imported at the top: spawn and forkserver children import this file.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CHILDREN = os.path.join(HERE, "children")
START_CHILD = os.path.join(CHILDREN, "start_child.py")
NUMPY_CHILD = os.path.join(CHILDREN, "start_numpy_child.py")
NODE_START = os.path.join(CHILDREN, "node_start.js")

MODES = {
    "quick": {"rounds": 6, "burst_rounds": 2, "burst": 64},
    "default": {"rounds": 25, "burst_rounds": 5, "burst": 64},
}


# ------------------------------------------------------------------ multiprocessing targets
def _mp_ready(conn) -> None:
    conn.send("ready")
    conn.close()


# ------------------------------------------------------------------------------ contenders
def forkio_start(script: str = START_CHILD, **options) -> float:
    import forkio

    t0 = time.perf_counter()
    child = forkio.fork(script, **options)
    try:
        first = child.recv(timeout=60)
        t1 = time.perf_counter()
    finally:
        child.close(grace=5)
    assert first == "ready", first
    return (t1 - t0) * 1e3


def forkio_burst(n: int, script: str = START_CHILD, **options) -> float:
    import forkio

    t0 = time.perf_counter()
    children = []
    try:
        for _ in range(n):
            children.append(forkio.fork(script, **options))
        for child in children:
            assert child.recv(timeout=120) == "ready"
        t1 = time.perf_counter()
    finally:
        for child in children:
            child.disconnect()
        for child in children:
            child.close(grace=10)
    return (t1 - t0) * 1e3


def mp_start(method: str) -> float:
    return mp_burst(method, 1)


def mp_burst(method: str, n: int) -> float:
    import multiprocessing

    ctx = multiprocessing.get_context(method)
    t0 = time.perf_counter()
    started = []
    try:
        for _ in range(n):
            reader, writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_mp_ready, args=(writer,), daemon=True)
            proc.start()
            writer.close()
            started.append((proc, reader))
        for _, reader in started:
            assert reader.recv() == "ready"
        t1 = time.perf_counter()
    finally:
        for proc, reader in started:
            reader.close()
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return (t1 - t0) * 1e3


class Node:
    """``node children/node_start.js``: Node's fork(), timed by Node, one command per line."""

    def __init__(self) -> None:
        import subprocess

        env = dict(os.environ)
        env.pop("NODE_EXTRA_CA_CERTS", None)
        self.popen = subprocess.Popen(["node", NODE_START], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      env=env, text=True)

    def ask(self, command: str) -> float:
        import json

        assert self.popen.stdin is not None and self.popen.stdout is not None
        self.popen.stdin.write(command + "\n")
        self.popen.stdin.flush()
        reply = json.loads(self.popen.stdout.readline())
        if "error" in reply:
            raise RuntimeError(f"node: {reply['error']}")
        return float(reply["value"])

    def close(self) -> None:
        if self.popen.stdin is not None:
            self.popen.stdin.close()
        self.popen.wait(10)
        if self.popen.stdout is not None:
            self.popen.stdout.close()


# ------------------------------------------------------------------------------- running
def run_rounds(title: str, contenders: dict, rounds: int, log) -> dict[str, list[float]]:
    names = list(contenders)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            samples[name].append(contenders[name]())
        log(f"  {title} round {r + 1}/{rounds}: " + ", ".join(f"{n}={samples[n][-1]:.3g}" for n in names))
    return samples


def table(title: str, samples: dict[str, list[float]], unit: str, reference: str, notes: dict[str, str]) -> str:
    ref = statistics.median(samples[reference])
    lines = [f"### {title}", "", f"| contender | median {unit} | fastest {unit} | x {reference} | |",
             "|---|---:|---:|---:|---|"]
    for name, values in samples.items():
        median = statistics.median(values)
        lines.append(f"| {name} | {median:.2f} | {min(values):.2f} | {median / ref:.2f} | {notes.get(name, '')} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few rounds: a smoke run")
    parser.add_argument("-q", "--quiet", action="store_true", help="no per-round log")
    args = parser.parse_args()
    cfg = MODES["quick" if args.quick else "default"]
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))

    import shutil

    node = Node() if shutil.which("node") else None
    try:
        one = {
            "forkio zygote": forkio_start,
            "forkio exec": lambda: forkio_start(start="exec"),
            "forkio zygote, numpy script, preload numpy": lambda: forkio_start(NUMPY_CHILD, preload=("numpy",)),
            "forkio exec, numpy script": lambda: forkio_start(NUMPY_CHILD, start="exec"),
            "mp fork": lambda: mp_start("fork"),
            "mp forkserver": lambda: mp_start("forkserver"),
            "mp spawn": lambda: mp_start("spawn"),
        }
        if node is not None:
            one["Node fork()"] = lambda: node.ask("first")
        for fn in one.values():  # warm-up: zygotes and the forkserver started, page cache warm
            fn()
        single = run_rounds("start", one, cfg["rounds"], log)

        n = cfg["burst"]
        many = {
            f"forkio zygote x{n}": lambda: forkio_burst(n),
            f"forkio exec x{n}": lambda: forkio_burst(n, start="exec"),
            f"mp fork x{n}": lambda: mp_burst("fork", n),
            f"mp forkserver x{n}": lambda: mp_burst("forkserver", n),
            f"mp spawn x{n}": lambda: mp_burst("spawn", n),
        }
        if node is not None:
            many[f"Node fork() x{n}"] = lambda: node.ask(f"burst {n}")
        burst = run_rounds("burst", many, cfg["burst_rounds"], log)
    finally:
        if node is not None:
            node.close()

    notes = {
        "forkio zygote": "script child, forkio preloaded",
        "forkio zygote, numpy script, preload numpy": "the script imports numpy",
        "forkio exec, numpy script": "the script imports numpy",
        "mp fork": "unsafe in a threaded parent",
    }
    print(f"Child start on {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
          f"{'quick' if args.quick else 'default'} run ({cfg['rounds']} rounds, {cfg['burst_rounds']} for bursts).\n")
    print(table("Call to first message, one child", single, "ms", "forkio zygote", notes))
    print(table(f"{n} children at once: first call to a message from each", burst, "ms", f"forkio zygote x{n}", {}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
