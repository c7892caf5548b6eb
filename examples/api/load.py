"""How long does a light request wait while heavy ones run? Starts server.py twice, with the heavy
work inline in the event loop and then in a forkio.Pool, and measures /light's latency (p50, p99)
while a few clients keep /heavy busy.

    python load.py                      # 3 s per mode: 50 light requests/s, 2 heavy clients
    python load.py --seconds 10 --rate 100 --heavy-clients 4 --n 100000 --json

Everything is on 127.0.0.1, and the run stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import forkio

SERVER = Path(__file__).with_name("server.py")


async def get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    """One GET on a fresh connection; returns the HTTP status and the JSON body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        response = await reader.read()  # the server closes the connection after one response
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body or b"{}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def measure(port: int, *, seconds: float, rate: float, heavy_clients: int, n: int) -> dict[str, Any]:
    """For ``seconds``, send ``rate`` requests a second to /light while ``heavy_clients`` clients send
    /heavy requests back to back; the light latencies and the heavy throughput.

    Light requests go out on schedule whether or not earlier ones have been answered (an open
    loop), as real users' would: a stalled server then shows its full delay in the figures.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    heavy_done = 0

    async def heavy_client() -> None:
        nonlocal heavy_done
        while not stop.is_set():  # bounded: stops once the light requests are sent and answered
            if (await get(port, f"/heavy?n={n}"))[0] == 200:
                heavy_done += 1

    async def timed_light() -> tuple[float, bool, int]:
        sent = time.perf_counter()
        status, body = await get(port, "/light")
        return (time.perf_counter() - sent) * 1000, status == 200, body.get("heavy_running", 0)

    clients = [asyncio.create_task(heavy_client()) for _ in range(heavy_clients)]
    await asyncio.sleep(0.05)  # let the heavy requests get going first
    started = loop.time()
    light = []
    for i in range(max(1, round(seconds * rate))):
        await asyncio.sleep(max(0.0, started + i / rate - loop.time()))
        light.append(asyncio.create_task(timed_light()))
    results = await asyncio.gather(*light)
    stop.set()
    await asyncio.gather(*clients)
    elapsed = loop.time() - started
    latencies = [ms for ms, _, _ in results]
    return {"light_requests": len(results), "light_errors": sum(not ok for _, ok, _ in results),
            # answered while heavy work was running: never inline (the event loop was busy with it)
            "light_during_heavy": sum(running > 0 for _, _, running in results),
            "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99), "max_ms": max(latencies),
            "mean_ms": statistics.fmean(latencies), "heavy_done": heavy_done,
            "heavy_per_s": heavy_done / elapsed, "seconds": elapsed}


def run_mode(mode: str, *, seconds: float, rate: float, heavy_clients: int, n: int,
             workers: int | None) -> dict[str, Any]:
    """Start the server in ``mode`` as a forked child, measure, stop it."""
    args = ["--mode", mode, "--port", "0"] + (["--workers", str(workers)] if workers else [])
    with forkio.fork(SERVER, args) as server:  # leaving the block disconnects: the server stops
        port = server.recv(timeout=60)["port"]
        return asyncio.run(measure(port, seconds=seconds, rate=rate, heavy_clients=heavy_clients, n=n))


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--seconds", type=float, default=3.0, help="how long to send light requests, per mode")
    cli.add_argument("--rate", type=float, default=50.0, help="light requests per second (default 50)")
    cli.add_argument("--heavy-clients", type=int, default=2, help="clients sending /heavy (default 2)")
    cli.add_argument("--n", type=int, default=60_000, help="size of each heavy request (default 60000, ~0.1 s)")
    cli.add_argument("--workers", type=int, default=None, help="pool size for forkio mode (default: cores)")
    cli.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = cli.parse_args()
    results = {mode: run_mode(mode, seconds=args.seconds, rate=args.rate, heavy_clients=args.heavy_clients,
                              n=args.n, workers=args.workers)
               for mode in ("inline", "forkio")}
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        print()
        return
    clients = f"{args.heavy_clients} client{'s' if args.heavy_clients != 1 else ''}"
    print(f"/light latency while {clients} keep /heavy?n={args.n} busy "
          f"({results['inline']['light_requests']} light requests per mode, {args.rate:g}/s):")
    print(f"  {'heavy work':<22}{'p50':>10}{'p99':>10}{'max':>10}{'heavy req/s':>14}")
    for mode, label in (("inline", "inline (event loop)"), ("forkio", "forkio.Pool")):
        r = results[mode]
        print(f"  {label:<22}{r['p50_ms']:>8.1f}ms{r['p99_ms']:>8.1f}ms{r['max_ms']:>8.1f}ms{r['heavy_per_s']:>14.1f}")


if __name__ == "__main__":
    main()
