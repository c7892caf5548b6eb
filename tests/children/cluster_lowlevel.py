"""Node's lower level, no run(): setup_primary, fork, workers, ready, reload, kill, scale.

argv: PORT. The primary prints what it sees; the test reads it.
"""

import asyncio
import sys
import threading

import forkio
from forkio import cluster

PORT = int(sys.argv[1])

if cluster.is_primary:
    up: set[int] = set()
    exited: dict[int, bool] = {}
    changed = threading.Condition()

    @cluster.on("message")
    def _message(worker: cluster.Worker, message: dict) -> None:
        with changed:
            up.add(message["up"])
            changed.notify_all()

    @cluster.on("exit")
    def _exit(worker: cluster.Worker, code: object, sig: object) -> None:
        print(f"exit {worker.id} code={code} signal={sig} asked={worker.exited_after_disconnect}", flush=True)
        with changed:
            exited[worker.id] = worker.exited_after_disconnect
            changed.notify_all()

    def wait(predicate) -> None:  # type: ignore[no-untyped-def]
        with changed:
            if not changed.wait_for(predicate, timeout=30):
                print("timed out", flush=True)
                sys.exit(3)

    cluster.setup_primary(wait_ready=True, timeout=5, graceful_timeout=5)
    first = [cluster.fork(), cluster.fork()]
    wait(lambda: {1, 2} <= up)
    print("workers", sorted(cluster.workers), flush=True)
    cluster.scale(2)  # from now on the cluster keeps 2
    cluster.reload()
    wait(lambda: {1, 2} <= set(exited) and {3, 4} <= up)
    print("after reload", sorted(cluster.workers), flush=True)
    cluster.workers[3].kill()
    wait(lambda: 3 in exited and 5 in up)
    print("after kill", sorted(cluster.workers), flush=True)
    cluster.scale(1)
    wait(lambda: len(cluster.workers) == 1)
    print("after scale", len(cluster.workers), flush=True)
    cluster.scale(0)
    wait(lambda: not cluster.workers)
    print("done", flush=True)
else:
    async def main() -> None:
        sock = cluster.listen(("127.0.0.1", PORT))
        server = await asyncio.start_server(lambda r, w: w.close(), sock=sock)
        await asyncio.sleep(0.05)  # "warm-up"
        cluster.ready()
        forkio.parent.send({"up": cluster.worker})
        async with server:
            await server.serve_forever()

    cluster.run(main)
