"""Instructions per small message (send + recv in one process), counted by valgrind's cachegrind.

    .venv/bin/python bench/ipc_instructions.py              # this checkout's src/
    .venv/bin/python bench/ipc_instructions.py --src DIR    # another forkio source tree (DIR/forkio)
    .venv/bin/python bench/ipc_instructions.py --asyncio    # asyncio round trips (add --uvloop for uvloop's)

Counts are of user-space instructions, so they come out the same on a busy machine as on a quiet
one (wall-clock benchmarks there do not): each figure is (count with N messages - count with none)
/ N, for a raw socketpair + pickle, a forkio pickle channel and a forkio JSON channel. With
``--asyncio``, per round trip between two asyncio endpoints on one loop (the second echoes from a
task with ``async for``), forkio's against asyncio streams with the raw framing: the event loop's
own work is counted in both. Needs ``valgrind`` on PATH; about a minute.
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
ASYNC_SETUP = '''
import asyncio, socket, sys
sys.path[:0] = [{src!r}, {bench!r}]
from forkio._aio import AsyncEndpoint
from forkio._channel import Channel
from ipc import MSG, StreamsConn  # the same reference and message as bench/ipc.py
async def pair(kind):
    a, b = socket.socketpair()
    if kind == "asyncio streams":
        return [StreamsConn(*await asyncio.open_unix_connection(sock=s)) for s in (a, b)]
    return AsyncEndpoint(Channel(a)), AsyncEndpoint(Channel(b))
async def echo(end):
    while (msg := await end.recv()) is not None:
        await end.send(msg)
async def iterate(end):
    async for msg in end:
        if msg is None:
            return
        await end.send(msg)
async def main():
    A, B = await pair({kind!r})
    task = asyncio.ensure_future(echo(B) if {kind!r} == "asyncio streams" else iterate(B))
    for _ in range({n}):
        await A.send(MSG); await A.recv()
    await A.send(None); await task
{loop}.run(main())
'''


def instructions(src: str, kind: str, n: int, loop: str | None = None) -> int:
    """Instructions for ``n`` messages (or asyncio round trips, on ``loop``) of ``kind``."""
    if loop is None:
        code = SETUP.format(src=src, bench=HERE, kind=kind, n=n)
    else:
        code = ASYNC_SETUP.format(src=src, bench=HERE, kind=kind, n=n, loop=loop)
    result = subprocess.run(["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
                             sys.executable, "-c", code], capture_output=True, text=True, check=False)
    found = re.search(r"I\s+refs:\s+([\d,]+)", result.stderr)
    if result.returncode != 0 or found is None:
        raise SystemExit(f"cachegrind run failed:\n{result.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", default=os.path.join(os.path.dirname(HERE), "src"), help="forkio source tree")
    parser.add_argument("-n", type=int, default=None, help="messages per count (20,000; asyncio: 5,000)")
    parser.add_argument("--asyncio", action="store_true", help="asyncio round trips instead of sync messages")
    parser.add_argument("--uvloop", action="store_true", help="with --asyncio: on uvloop's loop")
    opts = parser.parse_args()
    if opts.asyncio:
        loop = "__import__('uvloop')" if opts.uvloop else "asyncio"
        kinds, unit, n = ("asyncio streams", "forkio"), "asyncio round trip", opts.n or 5_000
    else:
        loop, kinds, unit, n = None, ("raw", "pickle", "json"), "message (send + recv)", opts.n or 20_000
    rows = {kind: (instructions(opts.src, kind, n, loop) - instructions(opts.src, kind, 0, loop)) / n
            for kind in kinds}
    print(f"forkio from {opts.src}; instructions per {unit}{' on uvloop' if opts.uvloop else ''}, {n} of them")
    for kind, count in rows.items():
        print(f"  {kind:15s} {count:8.0f}  {count / rows[kinds[0]]:.2f}x {kinds[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
