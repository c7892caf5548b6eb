"""Large payload benchmark: a numpy array parent -> child, the child answers ``arr.sum()``.

    .venv/bin/python bench/bigdata.py            # a few minutes at most
    .venv/bin/python bench/bigdata.py --quick    # a smoke run, under a minute

For 1 MB, 16 MB and 128 MB float64 arrays, the time from ``send`` to the child's answer, and
the effective rate (array bytes / that time; the child's sum is part of it for everyone):

- forkio: zero-copy (the default: buffers of 256 KiB or more travel in a shared segment);
- forkio inline: ``zero_copy_threshold = None``, the array pickled into the socket stream;
- multiprocessing.Pipe: the array pickled through a Pipe to a spawned Process;
- reference: in this process, a copy into a preallocated array plus its sum (memory speed).

Children are started once and kept warm; contenders alternate round by round with the order
rotated, and the tables give medians, the best round and ratios to multiprocessing.Pipe.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SUM_CHILD = os.path.join(HERE, "children", "sum_child.py")
MB = 1024 * 1024

MODES = {
    "quick": {"sizes": (1, 16, 128), "rounds": {1: 20, 16: 8, 128: 4}, "per_round": {1: 20, 16: 3, 128: 1}},
    "default": {"sizes": (1, 16, 128), "rounds": {1: 30, 16: 15, 128: 10}, "per_round": {1: 50, 16: 5, 128: 1}},
}


def _mp_sum(conn) -> None:
    conn.send("ready")
    try:
        while True:
            array = conn.recv()
            conn.send(float(array.sum()))
    except (EOFError, OSError):
        pass


class ForkioChild:
    def __init__(self, threshold: int | str | None = "default") -> None:
        import forkio

        self.child = forkio.fork(SUM_CHILD)
        if threshold != "default":
            self.child.channel.zero_copy_threshold = threshold  # type: ignore[assignment]
        if self.child.recv(timeout=60) != "ready":
            raise RuntimeError("child did not start")

    def ask(self, array) -> float:
        self.child.send(array)
        return float(self.child.recv(timeout=120))

    def close(self) -> None:
        self.child.close(grace=10)


class MpChild:
    def __init__(self) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=_mp_sum, args=(child_conn,), daemon=True)
        self.proc.start()
        child_conn.close()
        if self.conn.recv() != "ready":
            raise RuntimeError("mp child did not start")

    def ask(self, array) -> float:
        self.conn.send(array)
        return float(self.conn.recv())

    def close(self) -> None:
        self.conn.close()
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few rounds: a smoke run")
    parser.add_argument("-q", "--quiet", action="store_true", help="no per-round log")
    args = parser.parse_args()
    cfg = MODES["quick" if args.quick else "default"]
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))

    import numpy as np

    zero_copy = ForkioChild()
    inline = ForkioChild(threshold=None)
    mp = MpChild()
    tables = []
    try:
        for size in cfg["sizes"]:
            array = np.random.default_rng(size).random(size * MB // 8)
            expected = float(array.sum())
            scratch = np.empty_like(array)
            k = cfg["per_round"][size]

            def timed(ask, array=array, expected=expected, k=k) -> float:
                t0 = time.perf_counter()
                for _ in range(k):
                    got = ask(array)
                elapsed = (time.perf_counter() - t0) / k
                assert abs(got - expected) <= 1e-6 * abs(expected), (got, expected)
                return elapsed

            def reference(array=array, scratch=scratch) -> float:
                np.copyto(scratch, array)
                return float(scratch.sum())

            contenders = {
                "forkio zero-copy": lambda: timed(zero_copy.ask),
                "forkio inline": lambda: timed(inline.ask),
                "multiprocessing.Pipe": lambda: timed(mp.ask),
                "memcpy + sum here": lambda: timed(reference),
            }
            for fn in contenders.values():
                fn()  # warm-up: segments allocated, pages faulted in
            names = list(contenders)
            samples: dict[str, list[float]] = {name: [] for name in names}
            for r in range(cfg["rounds"][size]):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    samples[name].append(contenders[name]())
                log(f"  {size} MB round {r + 1}: " + ", ".join(f"{n}={samples[n][-1] * 1e3:.3g} ms" for n in names))
            tables.append(_table(size, samples))
    finally:
        zero_copy.close()
        inline.close()
        mp.close()
    print(f"Large payloads on {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, numpy {np.__version__}, "
          f"{'quick' if args.quick else 'default'} run: parent -> child float64 array, child answers arr.sum().\n")
    print("\n".join(tables))
    return 0


def _table(size: int, samples: dict[str, list[float]]) -> str:
    ref = statistics.median(samples["multiprocessing.Pipe"])
    lines = [f"### {size} MB", "", "| contender | median ms | best ms | effective GB/s | x multiprocessing.Pipe |",
             "|---|---:|---:|---:|---:|"]
    for name, values in samples.items():
        median = statistics.median(values)
        rate = size * MB / median / 1e9
        lines.append(f"| {name} | {median * 1e3:.2f} | {min(values) * 1e3:.2f} | {rate:.2f} | {ref / median:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
