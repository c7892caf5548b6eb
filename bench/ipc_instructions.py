"""Instructions per small message (send + recv in one process), counted by valgrind's cachegrind.

    .venv/bin/python bench/ipc_instructions.py              # this checkout's src/
    .venv/bin/python bench/ipc_instructions.py --src DIR    # another forkio source tree (DIR/forkio)

Counts are of user-space instructions, so they come out the same on a busy machine as on a quiet
one (wall-clock benchmarks there do not): each figure is (count with N messages - count with none)
/ N, for a raw socketpair + pickle, a forkio pickle channel and a forkio JSON channel. Needs
``valgrind`` on PATH; about a minute.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SETUP = '''
import socket, sys
sys.path[:0] = [{src!r}, {bench!r}]
from forkio._channel import Channel
from forkio._endpoint import Endpoint
from ipc import MSG, RawConn as Raw  # the same reference and message as bench/ipc.py
def pair(kind):
    a, b = socket.socketpair()
    if kind == "raw":
        return Raw(a), Raw(b)
    return Endpoint(Channel(a, serialization=kind)), Endpoint(Channel(b, serialization=kind))
A, B = pair({kind!r})
for _ in range({n}):
    A.send(MSG); B.recv()
'''


def instructions(src: str, kind: str, n: int) -> int:
    code = SETUP.format(src=src, bench=HERE, kind=kind, n=n)
    result = subprocess.run(["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
                             sys.executable, "-c", code], capture_output=True, text=True, check=False)
    found = re.search(r"I\s+refs:\s+([\d,]+)", result.stderr)
    if result.returncode != 0 or found is None:
        raise SystemExit(f"cachegrind run failed:\n{result.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", default=os.path.join(os.path.dirname(HERE), "src"), help="forkio source tree")
    parser.add_argument("-n", type=int, default=20_000, help="messages per count")
    opts = parser.parse_args()
    rows = {kind: (instructions(opts.src, kind, opts.n) - instructions(opts.src, kind, 0)) / opts.n
            for kind in ("raw", "pickle", "json")}
    print(f"forkio from {opts.src}; instructions per message (send + recv), {opts.n} messages")
    for kind, count in rows.items():
        print(f"  {kind:7s} {count:8.0f}  {count / rows['raw']:.2f}x raw")
    return 0


if __name__ == "__main__":
    sys.exit(main())
