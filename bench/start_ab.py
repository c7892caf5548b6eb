"""A/B child start: this checkout's forkio against another source tree, asked alternately.

    git archive <base-commit> src | tar -x -C /tmp/base
    .venv/bin/python bench/start_ab.py /tmp/base/src src [ROUNDS]     # ONLY="one zygote" for one case

Two servers, each importing ``bench/start.py`` with its own ``PYTHONPATH``, run the same
contenders (``forkio_start``/``forkio_burst``) round by round, the order swapped every round, so a
busy machine hurts both alike. Prints a markdown row per case: medians (ms) and branch/base.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import start as b
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "one":
        value = b.forkio_start(start=cmd[1])
    elif cmd[0] == "numpy":
        value = b.forkio_start(b.NUMPY_CHILD, preload=("numpy",))
    else:
        value = b.forkio_burst(int(cmd[1]), start=cmd[2])
    print(json.dumps(value), flush=True)
"""


def server(src: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(src))
    return subprocess.Popen([sys.executable, "-c", SERVER, HERE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)


def ask(proc: subprocess.Popen[str], command: str) -> float:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(command + "\n")
    proc.stdin.flush()
    return float(json.loads(proc.stdout.readline()))


def main() -> int:
    base, branch = sys.argv[1], sys.argv[2]
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 30
    servers = {"base": server(base), "branch": server(branch)}
    cases = [("zygote, one child", "one zygote", rounds), ("exec, one child", "one exec", rounds // 2),
             ("zygote, numpy preloaded", "numpy", rounds // 2),
             ("zygote, 64 at once", "burst 64 zygote", max(3, rounds // 6))]
    if os.environ.get("ONLY"):
        cases = [case for case in cases if case[1] == os.environ["ONLY"]]
    print("| case | rounds | base median ms | branch median ms | branch/base |\n|---|---:|---:|---:|---:|")
    try:
        for title, command, n in cases:
            for proc in servers.values():
                ask(proc, command)  # warm-up: zygote started, page cache warm
            samples: dict[str, list[float]] = {name: [] for name in servers}
            for r in range(n):
                for name in (list(servers) if r % 2 == 0 else list(servers)[::-1]):
                    samples[name].append(ask(servers[name], command))
            a, b = statistics.median(samples["base"]), statistics.median(samples["branch"])
            print(f"| {title} | {n} | {a:.2f} | {b:.2f} | {b / a:.2f} |", flush=True)
    finally:
        for proc in servers.values():
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.close()
            proc.wait(60)
            proc.stdout.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
