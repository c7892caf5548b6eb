"""Pool scaling: bench/pool.py's tiny-task and CPU-bound scenarios at several worker counts.

    .venv/bin/python bench/pool_scaling.py                      # 1, 2, 4, 8, 16 workers
    .venv/bin/python bench/pool_scaling.py --workers 1,2 --quick

Made for a many-core machine (issue 13 asks for 1-16 workers beside the peers): every worker
count is one run of ``bench/pool.py --only 1,3`` (contenders alternating round by round, as
there), and this script gathers their medians into two tables, tasks/s and parallel efficiency
by worker count, in markdown on stdout. Each run's full report goes to stderr as it finishes.
Worker counts above the machine's CPUs are run too, but marked: they measure oversubscription.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def run(workers: int, quick: bool, label: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.json")
        cmd = [sys.executable, os.path.join(HERE, "pool.py"), "--workers", str(workers), "--only", "1,3",
               "--json", out, *(["--quick"] if quick else []), *(["--label", label] if label else [])]
        report = subprocess.run(cmd, capture_output=True, text=True, check=False)
        sys.stderr.write(report.stdout)
        if report.returncode != 0 or not os.path.exists(out):
            raise SystemExit(f"bench/pool.py --workers {workers} failed:\n{report.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)


def table(title: str, key: str, runs: dict[int, dict], fmt: str, cpus: int) -> list[str]:
    names = list(next(iter(runs.values()))[key]["summary"])
    head = "| contender | " + " | ".join(f"{w} workers{' (> CPUs)' if w > cpus else ''}" for w in runs) + " |"
    lines = [f"**{title}**", "", head, "|---|" + "---:|" * len(runs)]
    for name in names:
        cells = []
        for result in runs.values():
            median = result[key]["summary"].get(name, {}).get("median")
            cells.append(fmt.format(median) if median is not None else "—")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2,4,8,16", help="worker counts, comma-separated")
    parser.add_argument("--quick", action="store_true", help="bench/pool.py's quick mode")
    parser.add_argument("--label", default="", help="what forkio this is, passed to bench/pool.py")
    opts = parser.parse_args()
    counts = [int(w) for w in opts.workers.split(",")]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    runs = {w: run(w, opts.quick, opts.label) for w in counts}
    first = next(iter(runs.values()))["machine"]
    print(f"`{' '.join([sys.executable, *sys.argv])}`: {cpus} CPUs ({first.get('cpu')}), Python "
          f"{first.get('python')}, {'quick' if opts.quick else 'default'} mode; medians of each run's rounds\n")
    print("\n".join(table("Tiny tasks `x + 1`, one `submit()` each: tasks/s", "s1", runs, "{:,.0f}", cpus)))
    print("\n".join(table("CPU-bound tasks: parallel efficiency, %", "s3", runs, "{:.1f}", cpus)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
