"""IPC benchmark: forkio against multiprocessing, a raw socketpair and Node's own fork().

    .venv/bin/python bench/ipc.py            # default: a few minutes at most
    .venv/bin/python bench/ipc.py --quick    # a smoke run, under a minute

Three measurements, each run round by round with the contenders alternating (and their order
rotated every round) so that a noisy, shared 2-core machine hurts them all alike; the tables
give the median over rounds, the range, and the ratio to the reference:

1. start: call -> first message from the child (reference: Node's fork()).
2. round trip: send a small dict, the child echoes it, receive it (reference: raw socketpair
   + pickle); asyncio faces against plain asyncio streams.
3. one-way: send N small dicts, the child counts them and answers once (reference: raw
   socketpair + pickle).

Round-trip and one-way children are started once and kept warm across rounds (Node's too:
``children/node_parent.js`` is driven over stdin and times itself with ``hrtime``). Every
child is stopped in a ``finally``, whatever happens.

Only stdlib modules that a ``multiprocessing`` spawn child imports anyway are imported at the
top: the spawn contender re-imports this file, and must not pay for what it does not use.
"""

from __future__ import annotations

import os
import pickle
import socket
import struct
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CHILDREN = os.path.join(HERE, "children")
FORKIO_CHILD = os.path.join(CHILDREN, "forkio_child.py")
RAW_CHILD = os.path.join(CHILDREN, "raw_child.py")
NODE_CHILD = os.path.join(CHILDREN, "node_child.js")
NODE_PARENT = os.path.join(CHILDREN, "node_parent.js")

# The small message every contender sends (node_parent.js has the same one).
MSG = {"seq": 0, "op": "ping", "args": [1, 2, 3], "ok": True}
HDR = struct.Struct(">I")

MODES = {
    #           start rounds, rt rounds, rt per round, async rt per round, oneway rounds, oneway N
    "quick": dict(start_rounds=5, rt_rounds=5, rt_k=1000, art_k=1000, ow_rounds=4, ow_n=20_000),
    "default": dict(start_rounds=20, rt_rounds=15, rt_k=3000, art_k=3000, ow_rounds=10, ow_n=100_000),
}


# ------------------------------------------------------------------ multiprocessing targets
# Module level so that spawn children can import them.
def _mp_first(conn) -> None:
    conn.send("ready")
    conn.close()


def _mp_echo(conn) -> None:
    conn.send("ready")
    recv, send = conn.recv, conn.send
    try:
        while True:
            send(recv())
    except (EOFError, OSError):
        pass


def _mp_count(conn, n: int) -> None:
    conn.send("ready")
    recv, send = conn.recv, conn.send
    try:
        while True:
            for _ in range(n):
                recv()
            send(n)
    except (EOFError, OSError):
        pass


# ------------------------------------------------------------------------------ helpers
def node_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("NODE_EXTRA_CA_CERTS", None)
    return env


class RawConn:
    """The reference: a socket, a 4-byte length and a pickle; nothing else."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def send(self, msg, _dumps=pickle.dumps, _pack=HDR.pack) -> None:
        p = _dumps(msg, 5)
        self.sock.sendall(_pack(len(p)) + p)

    def recv(self, _loads=pickle.loads, _unpack=HDR.unpack_from):
        buf = self.buf
        while True:
            if len(buf) >= 4:
                (n,) = _unpack(buf, 0)
                if len(buf) >= 4 + n:
                    self.buf = buf[4 + n:]
                    return _loads(buf[4:4 + n])
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("raw child closed the socket")
            buf = buf + data if buf else data


class RawChild:
    """``raw_child.py`` on one end of a socketpair (subprocess, inherited fd)."""

    def __init__(self, mode: str, *args: str) -> None:
        import subprocess

        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            fd = child_end.fileno()
            self.popen = subprocess.Popen([sys.executable, RAW_CHILD, mode, str(fd), *args], pass_fds=(fd,))
        except BaseException:
            parent_end.close()
            raise
        finally:
            child_end.close()
        self.sock = parent_end
        self.conn = RawConn(parent_end)

    def close(self) -> None:
        import subprocess

        try:
            self.sock.close()
        finally:
            try:
                self.popen.wait(3)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


class MpChild:
    """A multiprocessing.Process with a duplex Pipe (spawn context unless told otherwise)."""

    def __init__(self, target, *args, method: str = "spawn") -> None:
        import multiprocessing

        ctx = multiprocessing.get_context(method)
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(child_conn, *args), daemon=True)
        try:
            self.proc.start()
        finally:
            child_conn.close()
        if self.conn.recv() != "ready":
            raise RuntimeError("mp child did not say ready")

    def close(self) -> None:
        try:
            self.conn.close()
        finally:
            self.proc.join(3)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()


class NodeController:
    """``node node_parent.js``: Node's own fork(), timed inside Node, one command at a time."""

    def __init__(self) -> None:
        import subprocess

        self.popen = subprocess.Popen(["node", NODE_PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      env=node_env())
        self._buf = b""

    def ask(self, command: str, timeout: float = 120.0) -> float:
        import json
        import select

        assert self.popen.stdin is not None and self.popen.stdout is not None
        self.popen.stdin.write(command.encode() + b"\n")
        self.popen.stdin.flush()
        fd = self.popen.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"node did not answer {command!r} within {timeout} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"node exited (rc={self.popen.poll()}) during {command!r}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"node failed {command!r}: {reply['error']}")
        return float(reply["value"])

    def close(self) -> None:
        import subprocess

        try:
            if self.popen.stdin is not None:
                self.popen.stdin.close()  # node_parent.js disconnects its children and exits
            self.popen.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            self.popen.kill()
            self.popen.wait()
        finally:
            if self.popen.stdout is not None:
                self.popen.stdout.close()


def forkio_child(mode: str, *args: str, serialization: str | None = None, script: str = FORKIO_CHILD):
    """A forkio child that has said "ready"."""
    import forkio

    env = node_env() if script.endswith(".js") else None
    child = forkio.fork(script, [mode, *args], serialization=serialization, env=env)
    try:
        if child.recv(timeout=30) != "ready":
            raise RuntimeError("forkio child did not say ready")
    except BaseException:
        child.close(grace=1)
        raise
    return child


def close_forkio(child) -> None:
    child.close(grace=3)


def rotate(items: list, by: int) -> list:
    by %= len(items)
    return items[by:] + items[:by]


def run_rounds(title: str, contenders: dict, rounds: int, log) -> dict[str, list[float]]:
    """Call each contender once a round, the order rotated each round; collect the samples."""
    names = list(contenders)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in rotate(names, r):
            samples[name].append(contenders[name]())
        log(f"  {title} round {r + 1}/{rounds}: " + ", ".join(f"{n}={samples[n][-1]:.4g}" for n in names))
    return samples


# ------------------------------------------------------------------------------ 1. start
def bench_start(cfg: dict, stack, log) -> dict[str, list[float]]:
    """Milliseconds from the call that starts a child to its first message in the parent."""
    import forkio

    node = NodeController()
    stack.callback(node.close)
    env_node = node_env()
    perf = time.perf_counter

    def forkio_first(serialization: str | None = None, script: str = FORKIO_CHILD) -> float:
        env = env_node if script.endswith(".js") else None
        t0 = perf()
        child = forkio.fork(script, ["first"], serialization=serialization, env=env)
        try:
            first = child.recv(timeout=30)
            t1 = perf()
        finally:
            child.close(grace=3)
        assert first == "ready", first
        return (t1 - t0) * 1e3

    def mp_first(method: str) -> float:
        import multiprocessing

        ctx = multiprocessing.get_context(method)
        t0 = perf()
        reader, writer = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_mp_first, args=(writer,), daemon=True)
        try:
            proc.start()
            writer.close()
            first = reader.recv()
            t1 = perf()
        finally:
            reader.close()
            proc.join(3)
            if proc.is_alive():
                proc.kill()
                proc.join()
        assert first == "ready", first
        return (t1 - t0) * 1e3

    contenders = {
        "forkio pickle": forkio_first,
        "forkio json": lambda: forkio_first("json"),
        "forkio -> Node child": lambda: forkio_first(script=NODE_CHILD),
        "mp spawn": lambda: mp_first("spawn"),
        "mp forkserver": lambda: mp_first("forkserver"),
        "mp fork": lambda: mp_first("fork"),
        "Node fork()": lambda: node.ask("first"),
    }
    for fn in contenders.values():  # warm-up: page cache, forkserver started, node loaded
        fn()
    return run_rounds("start", contenders, cfg["start_rounds"], log)


# ------------------------------------------------------------------------ 2. round trip
def bench_rt(cfg: dict, stack, log) -> dict[str, list[float]]:
    """Microseconds per round trip of MSG, sync faces; mean of K in a row, per round."""
    k = cfg["rt_k"]
    perf = time.perf_counter_ns

    def timed(send, recv) -> float:
        msg = MSG
        t0 = perf()
        for _ in range(k):
            send(msg)
            recv()
        return (perf() - t0) / 1e3 / k

    fp = forkio_child("echo")
    stack.callback(close_forkio, fp)
    fj = forkio_child("echo", serialization="json")
    stack.callback(close_forkio, fj)
    fn = forkio_child("echo", script=NODE_CHILD)
    stack.callback(close_forkio, fn)
    raw = RawChild("echo")
    stack.callback(raw.close)
    if raw.conn.recv() != "ready":
        raise RuntimeError("raw child did not say ready")
    mp = MpChild(_mp_echo)
    stack.callback(mp.close)
    node = NodeController()
    stack.callback(node.close)

    contenders = {
        "forkio pickle": lambda: timed(fp.send, fp.recv),
        "forkio json": lambda: timed(fj.send, fj.recv),
        "forkio json -> Node child": lambda: timed(fn.send, fn.recv),
        "raw socketpair + pickle": lambda: timed(raw.conn.send, raw.conn.recv),
        "multiprocessing.Pipe": lambda: timed(mp.conn.send, mp.conn.recv),
        "Node fork() json": lambda: node.ask(f"rt {k}"),
    }
    for fn_ in contenders.values():
        fn_()  # warm-up round, not counted
    return run_rounds("rt", contenders, cfg["rt_rounds"], log)


# ---------------------------------------------------------------- 2b. asyncio round trip
def bench_async_rt(cfg: dict, log) -> dict[str, list[float]]:
    import asyncio
    import contextlib

    import forkio

    k = cfg["art_k"]
    perf = time.perf_counter_ns

    async def timed(send, recv) -> float:
        msg = MSG
        t0 = perf()
        for _ in range(k):
            await send(msg)
            await recv()
        return (perf() - t0) / 1e3 / k

    async def afork_child(mode: str):
        child = await forkio.afork(FORKIO_CHILD, [mode])
        try:
            if await child.recv(timeout=30) != "ready":
                raise RuntimeError("forkio child did not say ready")
        except BaseException:
            await child.close(grace=1)
            raise
        return child

    class Streams:
        def __init__(self, reader, writer) -> None:
            self.reader, self.writer = reader, writer

        async def send(self, msg, _dumps=pickle.dumps, _pack=HDR.pack) -> None:
            p = _dumps(msg, 5)
            self.writer.write(_pack(len(p)) + p)
            await self.writer.drain()

        async def recv(self, _loads=pickle.loads, _unpack=HDR.unpack):
            head = await self.reader.readexactly(4)
            return _loads(await self.reader.readexactly(_unpack(head)[0]))

    async def streams_child(stack, mode: str) -> Streams:
        raw = RawChild(mode)
        stack.callback(raw.close)
        reader, writer = await asyncio.open_unix_connection(sock=raw.sock)
        stack.callback(writer.transport.abort)  # closes raw.sock before raw.close() waits
        s = Streams(reader, writer)
        if await asyncio.wait_for(s.recv(), 30) != "ready":
            raise RuntimeError("raw child did not say ready")
        return s

    async def main() -> dict[str, list[float]]:
        async with contextlib.AsyncExitStack() as stack:
            a_async = await afork_child("aecho")
            stack.push_async_callback(a_async.close, 3)
            a_sync = await afork_child("echo")
            stack.push_async_callback(a_sync.close, 3)
            s_async = await streams_child(stack, "aecho")
            s_sync = await streams_child(stack, "echo")
            contenders = {
                "forkio afork <-> aparent child": lambda: timed(a_async.send, a_async.recv),
                "forkio afork <-> sync parent child": lambda: timed(a_sync.send, a_sync.recv),
                "asyncio streams <-> asyncio streams child": lambda: timed(s_async.send, s_async.recv),
                "asyncio streams <-> raw sync child": lambda: timed(s_sync.send, s_sync.recv),
            }
            for fn in contenders.values():
                await fn()
            names = list(contenders)
            samples: dict[str, list[float]] = {n: [] for n in names}
            for r in range(cfg["rt_rounds"]):
                for name in rotate(names, r):
                    samples[name].append(await contenders[name]())
                log(f"  async rt round {r + 1}/{cfg['rt_rounds']}: "
                    + ", ".join(f"{n}={samples[n][-1]:.4g}" for n in names))
            return samples

    return asyncio.run(main())


# --------------------------------------------------------------------------- 3. one-way
def bench_oneway(cfg: dict, stack, log) -> dict[str, list[float]]:
    """Messages per second: N sends of MSG, then the child's one reply (its count)."""
    n = cfg["ow_n"]
    perf = time.perf_counter

    def timed(send, recv) -> float:
        msg = MSG
        t0 = perf()
        for _ in range(n):
            send(msg)
        got = recv()
        t1 = perf()
        assert got == n, got
        return n / (t1 - t0)

    fp = forkio_child("count", str(n))
    stack.callback(close_forkio, fp)
    fj = forkio_child("count", str(n), serialization="json")
    stack.callback(close_forkio, fj)
    fn = forkio_child("count", str(n), script=NODE_CHILD)
    stack.callback(close_forkio, fn)
    raw = RawChild("count", str(n))
    stack.callback(raw.close)
    if raw.conn.recv() != "ready":
        raise RuntimeError("raw child did not say ready")
    mp = MpChild(_mp_count, n)
    stack.callback(mp.close)
    node = NodeController()
    stack.callback(node.close)

    contenders = {
        "forkio pickle": lambda: timed(fp.send, fp.recv),
        "forkio json": lambda: timed(fj.send, fj.recv),
        "forkio json -> Node child": lambda: timed(fn.send, fn.recv),
        "raw socketpair + pickle": lambda: timed(raw.conn.send, raw.conn.recv),
        "multiprocessing.Pipe": lambda: timed(mp.conn.send, mp.conn.recv),
        "Node fork() json": lambda: node.ask(f"oneway {n}"),
    }
    for fn_ in contenders.values():
        fn_()
    return run_rounds("one-way", contenders, cfg["ow_rounds"], log)


# ----------------------------------------------------------------------------- report
def summarise(samples: dict[str, list[float]], ref: str, unit: str, fmt: str, higher_is_better: bool) -> list[str]:
    import statistics

    ref_med = statistics.median(samples[ref])
    ratio_head = "rate ÷ ref (higher is better)" if higher_is_better else "time ÷ ref (lower is better)"
    lines = [f"| contender | median {unit} | range (min–max) | {ratio_head} |", "|---|---:|---:|---:|"]
    for name, vals in samples.items():
        med = statistics.median(vals)
        mark = " (ref)" if name == ref else ""
        lines.append(f"| {name}{mark} | {fmt.format(med)} | {fmt.format(min(vals))}–{fmt.format(max(vals))} "
                     f"| {med / ref_med:.2f}× |")
    return lines


def verdicts(results: dict[str, dict[str, list[float]]]) -> list[str]:
    import statistics

    med = {sec: {n: statistics.median(v) for n, v in s.items()} for sec, s in results.items()}
    out = []

    def line(ok: bool, text: str) -> None:
        out.append(f"- {'PASS' if ok else 'MISS'}: {text}")

    if "rt" in med:
        rt = med["rt"]
        ratio = rt["forkio pickle"] / rt["raw socketpair + pickle"]
        line(ratio <= 1.1, f"forkio pickle round trip ≤ 1.1× raw socketpair: {rt['forkio pickle']:.1f} µs = {ratio:.2f}×")
        line(rt["forkio json"] <= rt["Node fork() json"],
             f"forkio json round trip ≤ Node's: {rt['forkio json']:.1f} µs vs {rt['Node fork() json']:.1f} µs")
    if "async_rt" in med:
        art = med["async_rt"]
        for name in ("forkio afork <-> aparent child", "forkio afork <-> sync parent child"):
            line(art[name] <= 40.0, f"asyncio round trip ≤ 40 µs ({name}): {art[name]:.1f} µs")
    if "oneway" in med:
        ow = med["oneway"]
        line(ow["forkio pickle"] >= 450_000, f"forkio pickle one-way ≥ 450k msg/s: {ow['forkio pickle'] / 1e3:.0f}k/s")
        line(ow["forkio json"] >= ow["Node fork() json"],
             f"forkio json one-way ≥ Node's: {ow['forkio json'] / 1e3:.0f}k/s vs {ow['Node fork() json'] / 1e3:.0f}k/s")
    if "start" in med:
        st = med["start"]
        line(st["forkio json"] <= st["Node fork()"],
             f"forkio json start ≤ Node's fork(): {st['forkio json']:.1f} ms vs {st['Node fork()']:.1f} ms")
    return out


def environment() -> list[str]:
    import platform
    import subprocess

    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        pass
    try:
        node = subprocess.run(["node", "--version"], capture_output=True, text=True, env=node_env()).stdout.strip()
    except OSError:
        node = "not found"
    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    return [f"- CPUs: {os.cpu_count()} × {cpu}; load average at start {load}",
            f"- Python {platform.python_version()} ({sys.executable}); Node {node}; {platform.platform()}"]


SECTIONS = ("start", "rt", "async_rt", "oneway")


def main(argv: list[str] | None = None) -> int:
    import argparse
    import contextlib
    import json

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few rounds, small batches (< 60 s)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--json", metavar="PATH", help="also write every sample to PATH")
    ap.add_argument("-q", "--quiet", action="store_true", help="no per-round progress on stderr")
    opts = ap.parse_args(argv)
    cfg = MODES["quick" if opts.quick else "default"]
    wanted = [s.strip() for s in opts.only.split(",") if s.strip()]
    unknown = set(wanted) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections: {', '.join(sorted(unknown))}")

    def log(text: str) -> None:
        if not opts.quiet:
            print(text, file=sys.stderr, flush=True)

    t_start = time.monotonic()
    env_lines = environment()
    results: dict[str, dict[str, list[float]]] = {}
    for section in SECTIONS:
        if section not in wanted:
            continue
        log(f"[{section}]")
        if section == "async_rt":
            results[section] = bench_async_rt(cfg, log)
            continue
        with contextlib.ExitStack() as stack:  # every child of the section stopped, even on error
            fn = {"start": bench_start, "rt": bench_rt, "oneway": bench_oneway}[section]
            results[section] = fn(cfg, stack, log)
    elapsed = time.monotonic() - t_start

    out = [f"## forkio IPC benchmark ({'quick' if opts.quick else 'default'} mode, {elapsed:.0f} s)", "", *env_lines,
           f"- config: {cfg}", ""]
    tables = {
        "start": ("### 1. Start: call → first message", "Node fork()", "ms", "{:.1f}", False),
        "rt": ("### 2. Round trip, small dict (sync)", "raw socketpair + pickle", "µs", "{:.1f}", False),
        "async_rt": ("### 2b. Round trip, small dict (asyncio parent)", "asyncio streams <-> asyncio streams child",
                     "µs", "{:.1f}", False),
        "oneway": ("### 3. One-way throughput, small dicts", "raw socketpair + pickle", "msg/s", "{:,.0f}", True),
    }
    for section, samples in results.items():
        title, ref, unit, fmt, higher = tables[section]
        out += [title, "", *summarise(samples, ref, unit, fmt, higher), ""]
    out += ["### Targets", "", *verdicts(results), ""]
    print("\n".join(out))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"config": cfg, "elapsed_s": elapsed, "samples": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
