"""Dask benchmark: ``forkio.Pool(cluster=client)`` against plain ``client.map`` / ``client.submit``.

    .venv/bin/python bench/dask.py              # default: ~3 minutes on 2 cores
    .venv/bin/python bench/dask.py --rounds 2   # shorter

One ``distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True)`` for the whole
run, shared by both contenders, which alternate round by round (their order swapped every round)
so a noisy, shared machine hurts them alike. Medians over rounds, and the ratio.

1. tiny tasks ``x + 1`` over N items: ``pool.map`` (forkio batches) against ``client.map`` +
   ``client.gather``: items/s.
2. CPU-bound: 200 tasks of ~20 ms of pure Python: parallel efficiency = 200 x (one task's time,
   run here alone) / (2 workers x wall).
3. 2,000 tasks of ~5 ms of pure Python, submitted one by one (``pool.submit`` / ``client.submit``),
   then all results waited for: wall time, and forkio's overhead over plain Dask.

The forkio pool is created and warmed (its forkio children started on both Dask workers) outside
the timed region, as Dask's workers are.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
# This file is named dask.py: with bench/ on the path it would shadow the dask package (here and in
# Dask's workers). bench/ leaves the path; a folder holding only the task module takes its place.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]
TASKS_DIR = tempfile.mkdtemp(prefix="forkio-bench-dask-")
os.symlink(os.path.join(HERE, "pool_tasks.py"), os.path.join(TASKS_DIR, "pool_tasks.py"))
sys.path.insert(0, TASKS_DIR)
# Dask's worker processes import the task functions by name, as forkio's children do.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [TASKS_DIR, os.environ.get("PYTHONPATH")]))

from pool_tasks import inc, spin  # noqa: E402


def _bench_pool() -> Any:
    """bench/pool.py, for its calibration (the same as the local pool's benchmark uses)."""
    sys.path.append(HERE)  # after site-packages: its benchpaths import, never a shadowed dask
    spec = importlib.util.spec_from_file_location("pool_bench", os.path.join(HERE, "pool.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

WORKERS = 2


def tiny_plain(client: Any, n: int) -> float:
    t0 = time.perf_counter()
    assert client.gather(client.map(inc, range(n))) == list(range(1, n + 1))
    return n / (time.perf_counter() - t0)


def tiny_forkio(pool: Any, n: int) -> float:
    t0 = time.perf_counter()
    assert list(pool.map(inc, range(n))) == list(range(1, n + 1))
    return n / (time.perf_counter() - t0)


def cpu_plain(client: Any, iterations: int, tasks: int) -> float:
    t0 = time.perf_counter()
    client.gather(client.map(spin, [iterations] * tasks, pure=False))
    return time.perf_counter() - t0


def cpu_forkio(pool: Any, iterations: int, tasks: int) -> float:
    t0 = time.perf_counter()
    list(pool.map(spin, [iterations] * tasks))
    return time.perf_counter() - t0


def one_by_one_plain(client: Any, iterations: int, tasks: int) -> float:
    t0 = time.perf_counter()
    futures = [client.submit(spin, iterations, pure=False) for _ in range(tasks)]
    client.gather(futures)
    return time.perf_counter() - t0


def one_by_one_forkio(pool: Any, iterations: int, tasks: int) -> float:
    t0 = time.perf_counter()
    futures = [pool.submit(spin, iterations) for _ in range(tasks)]
    for future in futures:
        future.result()
    return time.perf_counter() - t0


def alternate(rounds: int, plain: Callable[[], float], forkio: Callable[[], float]) -> tuple[list[float], list[float]]:
    """Run both ``rounds`` times, order swapped each round; every figure as measured."""
    p: list[float] = []
    f: list[float] = []
    for r in range(rounds):
        order = [("plain", plain), ("forkio", forkio)]
        for name, run in order if r % 2 == 0 else reversed(order):
            (p if name == "plain" else f).append(run())
    return p, f


def describe(values: list[float], unit: str, digits: int = 1) -> str:
    return f"{statistics.median(values):,.{digits}f} {unit} (range {min(values):,.{digits}f}-{max(values):,.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tiny", type=int, default=2000, help="items in scenario 1")
    args = parser.parse_args()

    import distributed

    import forkio

    print(f"# forkio on Dask: {platform.python_version()}, distributed {distributed.__version__}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    bench = _bench_pool()
    n20 = bench.calibrate(20.0)
    n5 = n20 // 4  # one calibration: two could disagree on a machine whose load moves
    one20 = bench.single_task_seconds(n20)
    one5 = bench.single_task_seconds(n5)
    print(f"calibrated: {one20 * 1e3:.1f} ms and {one5 * 1e3:.1f} ms tasks here, alone")

    cluster = distributed.LocalCluster(n_workers=WORKERS, threads_per_worker=1, processes=True,
                                       dashboard_address=":0", host="127.0.0.1")
    client = distributed.Client(cluster, set_as_default=False)
    pool = forkio.Pool(cluster=client)
    try:
        list(pool.map(inc, range(8), chunksize=1))  # forkio children started on both Dask workers
        client.gather(client.map(inc, range(8), pure=False))

        plain, fio = alternate(args.rounds, lambda: tiny_plain(client, args.tiny), lambda: tiny_forkio(pool, args.tiny))
        print(f"\n1. tiny x+1, {args.tiny} items: plain Dask {describe(plain, 'items/s', 0)}; "
              f"forkio pool.map {describe(fio, 'items/s', 0)}; "
              f"ratio {statistics.median(fio) / statistics.median(plain):.1f}x")

        tasks = 200
        plain, fio = alternate(args.rounds, lambda: cpu_plain(client, n20, tasks), lambda: cpu_forkio(pool, n20, tasks))
        eff_plain = [tasks * one20 / (WORKERS * w) * 100 for w in plain]
        eff_fio = [tasks * one20 / (WORKERS * w) * 100 for w in fio]
        print(f"2. CPU-bound {tasks} x {one20 * 1e3:.0f} ms: efficiency plain Dask {describe(eff_plain, '%')}; "
              f"forkio {describe(eff_fio, '%')}")

        tasks = 2000
        plain, fio = alternate(args.rounds, lambda: one_by_one_plain(client, n5, tasks),
                               lambda: one_by_one_forkio(pool, n5, tasks))
        overhead = (statistics.median(fio) / statistics.median(plain) - 1) * 100
        print(f"3. {tasks} x {one5 * 1e3:.0f} ms one by one: plain Dask {describe(plain, 's', 2)}; "
              f"forkio {describe(fio, 's', 2)}; forkio's layer {overhead:+.1f} % of wall time")
        print(f"\nload average {os.getloadavg()[0]:.1f} at the end")
    finally:
        pool.shutdown()
        client.close()
        cluster.close()
        shutil.rmtree(TASKS_DIR, ignore_errors=True)


if __name__ == "__main__":
    main()
