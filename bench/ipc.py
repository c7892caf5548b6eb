"""IPC benchmark: forkio against multiprocessing, a raw socketpair and Node's own fork().

    .venv/bin/python bench/ipc.py            # default: about 2.5 minutes (+ up to 1 min waiting for quiet)
    .venv/bin/python bench/ipc.py --quick    # a smoke run, under a minute
    .venv/bin/python bench/ipc.py --only rt,async_rt --cpus 0   # round trips only, all on CPU 0

Three measurements (four sections), each run round by round with the contenders alternating
(their order rotated every round) so that a noisy, shared 2-core machine hurts them all alike;
the tables give the median over rounds, the range, and the ratio of medians to the reference:

1. start: call -> first message from the child (reference: Node's fork()).
2. round trip: send a small dict, the child echoes it, receive it (reference: raw socketpair
   + pickle); 2b: asyncio faces against plain asyncio streams.
3. one-way: send N small dicts and a None, the child counts them and answers once with the
   count (reference: raw socketpair + pickle).

Every round starts fresh children for every contender (see ``run_rounds`` for why), warms up,
then takes one sample; Node's side (``children/node_parent.js``, started fresh each round too)
times itself with ``hrtime``. Every child is stopped in a ``finally``, whatever happens. Before
each round the benchmark waits a little for other processes to go quiet, and it reports how
much CPU everything else used during the rounds.

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


def _mp_count(conn) -> None:
    conn.send("ready")
    recv, send = conn.recv, conn.send
    count = 0
    try:
        while True:
            if recv() is None:
                send(count)
                count = 0
            else:
                count += 1
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
        try:
            if not self.conn.poll(60) or self.conn.recv() != "ready":
                raise RuntimeError("mp child did not say ready")
        except BaseException:
            self.close()
            raise

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

    def __init__(self, *, python_children: bool = False) -> None:
        import subprocess

        env = node_env()
        if python_children:  # node_parent.js forks forkio children (JSON) instead of Node ones
            env["FORKIO_BENCH_PYTHON"] = sys.executable
        self.popen = subprocess.Popen(["node", NODE_PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
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


def rotate(items: list, by: int) -> list:
    by %= len(items)
    return items[by:] + items[:by]


def run_rounds(title: str, contenders: dict, rounds: int, log, warm: int) -> dict[str, list[float]]:
    """Each round, each contender in turn (order rotated every round): a fresh child, a warm-up, one sample.

    A contender is a function returning a context manager that starts its children and yields
    ``measure(count) -> float``; leaving it stops them. A fresh child every round matters on a
    2-CPU machine: where the scheduler happens to put a parent/child pair (same CPU or not)
    changes a round trip by 1.5-3x and sticks for the life of the pair, so one pair per
    contender for the whole run would measure placement luck rather than the code.
    """
    import contextlib

    names = list(contenders)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        QUIET.before_round()
        with QUIET.round(title):
            for name in rotate(names, r):
                with contextlib.ExitStack() as stack:
                    measure = stack.enter_context(contenders[name]())
                    if warm:
                        measure(warm)
                    samples[name].append(measure(None))
        log(f"  {title} round {r + 1}/{rounds} (other load {QUIET.last:.2f} cores): "
            + ", ".join(f"{n}={samples[n][-1]:.4g}" for n in names))
    return samples


def _forkio_session(mode: str, timed, serialization: str | None = None, script: str = FORKIO_CHILD,
                    many: bool = False):
    import contextlib

    @contextlib.contextmanager
    def session():
        child = forkio_child(mode, serialization=serialization, script=script)
        try:
            yield lambda count: timed(child.send_many if many else child.send, child.recv, count)
        finally:
            child.close(grace=3)

    return session


def _raw_session(mode: str, timed):
    import contextlib

    @contextlib.contextmanager
    def session():
        raw = RawChild(mode)
        try:
            if raw.conn.recv() != "ready":
                raise RuntimeError("raw child did not say ready")
            yield lambda count: timed(raw.conn.send, raw.conn.recv, count)
        finally:
            raw.close()

    return session


def _mp_session(target, timed):
    import contextlib

    @contextlib.contextmanager
    def session():
        mp = MpChild(target)
        try:
            yield lambda count: timed(mp.conn.send, mp.conn.recv, count)
        finally:
            mp.close()

    return session


def _node_session(command: str, default: int, *, python_children: bool = False):
    import contextlib

    @contextlib.contextmanager
    def session():
        node = NodeController(python_children=python_children)
        try:
            yield lambda count: node.ask(f"{command} {count or default}")
        finally:
            node.close()

    return session


# ------------------------------------------------------------------------------ 1. start
def bench_start(cfg: dict, log) -> dict[str, list[float]]:
    """Milliseconds from the call that starts a child to its first message in the parent."""
    import contextlib

    import forkio

    env_node = node_env()
    perf = time.perf_counter

    @contextlib.contextmanager
    def forkio_first(serialization: str | None = None, script: str = FORKIO_CHILD):
        def measure(_count) -> float:
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

        yield measure

    @contextlib.contextmanager
    def mp_first(method: str):
        import multiprocessing

        ctx = multiprocessing.get_context(method)

        def measure(_count) -> float:
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

        yield measure

    contenders = {
        "forkio pickle": forkio_first,
        "forkio json": lambda: forkio_first("json"),
        "forkio -> Node child": lambda: forkio_first(script=NODE_CHILD),
        "mp spawn": lambda: mp_first("spawn"),
        "mp forkserver": lambda: mp_first("forkserver"),
        "mp fork": lambda: mp_first("fork"),
        "Node fork()": _node_session("first", 0),
    }
    # Each round warms up with one start of the same kind first (page cache, forkserver up, node loaded).
    return run_rounds("start", contenders, cfg["start_rounds"], log, warm=1)


# ------------------------------------------------------------------------ 2. round trip
def _timed_rt(cfg: dict):
    perf = time.perf_counter_ns

    def timed(send, recv, count: int | None) -> float:
        k = count or cfg["rt_k"]
        msg = MSG
        t0 = perf()
        for _ in range(k):
            send(msg)
            recv()
        return (perf() - t0) / 1e3 / k

    return timed


def bench_rt(cfg: dict, log) -> dict[str, list[float]]:
    """Microseconds per round trip of MSG, sync faces; mean of K in a row, per round."""
    timed = _timed_rt(cfg)
    contenders = {
        "forkio pickle": _forkio_session("echo", timed),
        "forkio json": _forkio_session("echo", timed, serialization="json"),
        "forkio json -> Node child": _forkio_session("echo", timed, script=NODE_CHILD),
        "raw socketpair + pickle": _raw_session("echo", timed),
        "multiprocessing.Pipe": _mp_session(_mp_echo, timed),
        "Node fork() json": _node_session("rt", cfg["rt_k"]),
        "Node parent -> forkio json child": _node_session("rt", cfg["rt_k"], python_children=True),
    }
    return run_rounds("rt", contenders, cfg["rt_rounds"], log, warm=cfg["rt_k"] // 5)


# ---------------------------------------------------------------- 2b. asyncio round trip
def bench_async_rt(cfg: dict, log) -> dict[str, list[float]]:
    import asyncio
    import contextlib

    import forkio

    perf = time.perf_counter_ns

    async def timed(send, recv, count: int | None) -> float:
        k = count or cfg["art_k"]
        msg = MSG
        t0 = perf()
        for _ in range(k):
            await send(msg)
            await recv()
        return (perf() - t0) / 1e3 / k

    def afork_session(mode: str):
        @contextlib.asynccontextmanager
        async def session():
            child = await forkio.afork(FORKIO_CHILD, [mode])
            try:
                if await child.recv(timeout=30) != "ready":
                    raise RuntimeError("forkio child did not say ready")
                yield lambda count: timed(child.send, child.recv, count)
            finally:
                await child.close(grace=3)

        return session

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

    def streams_session(mode: str):
        @contextlib.asynccontextmanager
        async def session():
            raw = RawChild(mode)
            try:
                reader, writer = await asyncio.open_unix_connection(sock=raw.sock)
                try:
                    s = Streams(reader, writer)
                    if await asyncio.wait_for(s.recv(), 30) != "ready":
                        raise RuntimeError("raw child did not say ready")
                    yield lambda count: timed(s.send, s.recv, count)
                finally:
                    writer.transport.abort()  # closes raw.sock, so the child sees EOF
            finally:
                raw.close()

        return session

    contenders = {
        "forkio afork <-> aparent child": afork_session("aecho"),
        "forkio afork <-> sync parent child": afork_session("echo"),
        "asyncio streams <-> asyncio streams child": streams_session("aecho"),
        "asyncio streams <-> raw sync child": streams_session("echo"),
    }
    try:
        import uvloop
    except ImportError:
        uvloop = None
    if uvloop is not None:  # the parent on uvloop's loop (the children keep asyncio's own)
        contenders["uvloop: forkio afork <-> sync parent child"] = afork_session("echo")
        contenders["uvloop: asyncio streams <-> raw sync child"] = streams_session("echo")

    async def one(name: str) -> float:
        async with contenders[name]() as measure:
            await measure(cfg["art_k"] // 5)
            return await measure(None)

    def on_its_loop(name: str) -> float:
        # A fresh loop per sample (as asyncio.run would make), of the kind the contender names.
        loop = uvloop.new_event_loop() if name.startswith("uvloop:") else asyncio.new_event_loop()
        try:
            return loop.run_until_complete(one(name))
        finally:
            loop.close()

    names = list(contenders)
    samples: dict[str, list[float]] = {n: [] for n in names}
    rounds = cfg["rt_rounds"]
    for r in range(rounds):
        QUIET.before_round()
        with QUIET.round("async rt"):
            for name in rotate(names, r):
                samples[name].append(on_its_loop(name))
        log(f"  async rt round {r + 1}/{rounds} (other load {QUIET.last:.2f} cores): "
            + ", ".join(f"{n}={samples[n][-1]:.4g}" for n in names))
    return samples


# --------------------------------------------------------------------------- 3. one-way
def bench_oneway(cfg: dict, log) -> dict[str, list[float]]:
    """Messages per second: N sends of MSG and a None, then the child's one reply (its count)."""
    perf = time.perf_counter

    def timed(send, recv, count: int | None) -> float:
        n = count or cfg["ow_n"]
        msg = MSG
        t0 = perf()
        for _ in range(n):
            send(msg)
        send(None)
        got = recv()
        t1 = perf()
        if got != n:
            raise RuntimeError(f"child counted {got} messages, expected {n}")
        return n / (t1 - t0)

    def timed_batches(send_many, recv, count: int | None) -> float:
        n = count or cfg["ow_n"]
        batch = [MSG] * 256
        t0 = perf()
        for _ in range(n // 256):
            send_many(batch)
        send_many([None])
        got = recv()
        t1 = perf()
        if got != n // 256 * 256:
            raise RuntimeError(f"child counted {got} messages, expected {n // 256 * 256}")
        return n // 256 * 256 / (t1 - t0)

    contenders = {
        "forkio pickle": _forkio_session("count", timed),
        "forkio pickle, send_many x256": _forkio_session("count", timed_batches, many=True),
        "forkio json": _forkio_session("count", timed, serialization="json"),
        "forkio json -> Node child": _forkio_session("count", timed, script=NODE_CHILD),
        "raw socketpair + pickle": _raw_session("count", timed),
        "multiprocessing.Pipe": _mp_session(_mp_count, timed),
        "Node fork() json": _node_session("oneway", cfg["ow_n"]),
        "Node parent -> forkio json child": _node_session("oneway", cfg["ow_n"], python_children=True),
    }
    return run_rounds("one-way", contenders, cfg["ow_rounds"], log, warm=cfg["ow_n"] // 5)


# ----------------------------------------------------------------------------- report
def summarise(samples: dict[str, list[float]], ref: str, unit: str, fmt: str, higher_is_better: bool) -> list[str]:
    import statistics

    ref_med = statistics.median(samples[ref])
    ratio_head = "rate ÷ ref (higher is better)" if higher_is_better else "time ÷ ref (lower is better)"
    lines = [f"| contender | median {unit} | range (min-max) | {ratio_head} |", "|---|---:|---:|---:|"]
    for name, vals in samples.items():
        med = statistics.median(vals)
        mark = " (ref)" if name == ref else ""
        lines.append(f"| {name}{mark} | {fmt.format(med)} | {fmt.format(min(vals))}-{fmt.format(max(vals))} "
                     f"| {med / ref_med:.2f}x |")
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
        line(ratio <= 1.1,
             f"forkio pickle round trip ≤ 1.1x raw socketpair: {rt['forkio pickle']:.1f} µs = {ratio:.2f}x")
        for name in ("forkio json", "forkio json -> Node child", "Node parent -> forkio json child"):
            line(rt[name] <= rt["Node fork() json"],
                 f"{name} round trip ≤ Node's: {rt[name]:.1f} µs vs {rt['Node fork() json']:.1f} µs")
    if "async_rt" in med:
        art = med["async_rt"]
        for name in ("forkio afork <-> aparent child", "forkio afork <-> sync parent child"):
            line(art[name] <= 40.0, f"asyncio round trip ≤ 40 µs ({name}): {art[name]:.1f} µs")
        uv = "uvloop: forkio afork <-> sync parent child"
        if uv in art:
            out.append(f"- measured: forkio under uvloop: {art[uv]:.1f} µs per round trip "
                       f"(uvloop streams: {art['uvloop: asyncio streams <-> raw sync child']:.1f} µs)")
    if "oneway" in med:
        ow = med["oneway"]
        ratio = ow["forkio pickle"] / ow["raw socketpair + pickle"]
        line(ratio >= 0.9, f"forkio pickle one-way (plain send) ≥ 0.9x raw socketpair: "
                           f"{ow['forkio pickle'] / 1e3:.0f}k/s = {ratio:.2f}x")
        node = ow["Node fork() json"]
        for name in ("forkio json", "forkio json -> Node child", "Node parent -> forkio json child"):
            line(ow[name] >= node, f"{name} one-way ≥ Node's: {ow[name] / 1e3:.0f}k/s vs {node / 1e3:.0f}k/s")
    if "start" in med:
        st = med["start"]
        line(st["forkio json"] <= st["Node fork()"],
             f"forkio json start ≤ Node's fork(): {st['forkio json']:.1f} ms vs {st['Node fork()']:.1f} ms")
    return out


def _machine_cpu() -> tuple[float, float, float]:
    """(busy, steal, total) CPU seconds since boot, all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / hz, steal / hz, sum(fields[:8]) / hz


def _process_cpu() -> dict[int, tuple[float, str]]:
    """CPU seconds used so far by every process on the machine, with its command line."""
    hz = os.sysconf("SC_CLK_TCK")
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(name)] = ((int(fields[11]) + int(fields[12])) / hz, cmd[:100])
    return out


def _own_cpu() -> float:
    """CPU seconds used by this process and every child it has reaped (they reap theirs)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Quiet:
    """Before a round, wait (within a budget) for other processes to calm down; during it, measure them.

    "Other load" for a round is the machine's busy CPU time minus this benchmark's own (its
    process and the children it reaped), divided by the round's wall time: 1.0 means
    something else kept one of the CPUs busy for the whole round.
    """

    def __init__(self, threshold: float = 0.3, per_round: float = 0.0, budget: float = 0.0) -> None:
        self.threshold, self.per_round, self.budget = threshold, per_round, budget
        self.ok = os.path.exists("/proc/stat")
        self.waited = 0.0
        self.gave_up = 0
        self.last = float("nan")
        self.loads: dict[str, list[float]] = {}

    def before_round(self) -> None:
        if not self.ok or self.per_round <= 0:
            return
        start = time.monotonic()
        while True:
            b0, o0, t0 = _machine_cpu()[0], _own_cpu(), time.monotonic()
            time.sleep(0.25)
            busy = (_machine_cpu()[0] - b0 - (_own_cpu() - o0)) / (time.monotonic() - t0)
            if busy <= self.threshold:
                break
            if time.monotonic() - start >= self.per_round or self.waited + time.monotonic() - start >= self.budget:
                self.gave_up += 1
                break
        self.waited += time.monotonic() - start

    def round(self, section: str):
        import contextlib

        @contextlib.contextmanager
        def measuring():
            if not self.ok:
                yield
                return
            b0, o0, t0 = _machine_cpu()[0], _own_cpu(), time.monotonic()
            yield
            wall = time.monotonic() - t0
            self.last = max(0.0, (_machine_cpu()[0] - b0 - (_own_cpu() - o0)) / wall)
            self.loads.setdefault(section, []).append(self.last)

        return measuring()

    def report(self) -> list[str]:
        import statistics

        if not self.loads:
            return []
        parts = [f"{sec} median {statistics.median(v):.2f}, max {max(v):.2f}" for sec, v in self.loads.items()]
        line = "- other load during the rounds, in cores: " + "; ".join(parts)
        if self.per_round > 0:
            line += (f". Before each round it waited for other load ≤ {self.threshold} cores: "
                     f"{self.waited:.0f} s in all, {self.gave_up} rounds started without quiet")
        return [line]


QUIET = Quiet()


class LoadMeter:
    """What else ran during the benchmark: machine CPU time minus this benchmark's own."""

    def __init__(self) -> None:
        self.ok = os.path.exists("/proc/stat")
        if self.ok:
            self.t0 = time.monotonic()
            self.machine0 = _machine_cpu()
            self.procs0 = _process_cpu()
            self.own0 = sum(os.times()[:4])

    def report(self) -> list[str]:
        if not self.ok:
            return []
        wall = time.monotonic() - self.t0
        busy1, steal1, _ = _machine_cpu()
        busy = busy1 - self.machine0[0]
        steal = steal1 - self.machine0[1]
        own = sum(os.times()[:4]) - self.own0  # this process and every child it reaped
        other = max(0.0, busy - own)
        ncpu = os.cpu_count() or 1
        lines = [f"- during the run ({wall:.0f} s, {ncpu} CPUs = {wall * ncpu:.0f} CPU-s): this benchmark used "
                 f"{own:.0f} CPU-s, everything else {other:.0f} CPU-s ({other / wall:.2f} cores on average), "
                 f"hypervisor steal {steal:.1f} CPU-s"]
        procs1 = _process_cpu()
        me = os.getpid()
        busiest = sorted(((t1 - self.procs0[pid][0], cmd) for pid, (t1, cmd) in procs1.items()
                          if pid in self.procs0 and pid != me), reverse=True)
        busiest = [(dt, cmd) for dt, cmd in busiest[:3] if dt >= 1.0]
        if busiest:
            lines.append("- busiest other processes alive at start and end: "
                         + "; ".join(f"`{cmd}` {dt:.0f} CPU-s" for dt, cmd in busiest))
        return lines


def source_version() -> str:
    """Which forkio ran: where it was imported from, and the git state when that is this checkout."""
    import subprocess

    import forkio
    from benchpaths import ROOT, shown

    where = os.path.dirname(os.path.abspath(forkio.__file__))
    root = ROOT
    if where != os.path.join(root, "src", "forkio"):
        return f"- forkio {forkio.__version__} imported from {shown(where)} (not this checkout's src/)"
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "src"], capture_output=True,
                               text=True).stdout.strip()
    except OSError:
        head, dirty = "", ""
    state = f"git {head}{' + uncommitted changes in src/' if dirty else ''}" if head else "no git"
    return f"- forkio {forkio.__version__} from {shown(where)} ({state})"


def environment() -> list[str]:
    import platform
    import subprocess

    from benchpaths import shown

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
    return [f"- CPUs: {os.cpu_count()} x {cpu}; load average at start {load}",
            f"- Python {platform.python_version()} ({shown(sys.executable)}); Node {node}; {platform.platform()}"]


SECTIONS = ("start", "rt", "async_rt", "oneway")


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few rounds, small batches (< 60 s)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--json", metavar="PATH", help="also write every sample to PATH")
    ap.add_argument("-q", "--quiet", action="store_true", help="no per-round progress on stderr")
    ap.add_argument("--wait-quiet", type=float, metavar="S", default=None,
                    help="before each round wait up to S s for other processes to go quiet\n"
                         "(default 3, or 0 with --quick); at most 60 s in all")
    ap.add_argument("--cpus", metavar="LIST", help="pin the benchmark and every child to these CPUs, e.g. 0 or 0,1")
    opts = ap.parse_args(argv)
    cfg = MODES["quick" if opts.quick else "default"]
    wanted = [s.strip() for s in opts.only.split(",") if s.strip()]
    unknown = set(wanted) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections: {', '.join(sorted(unknown))}")

    global QUIET
    import signal

    def _terminate(signum, _frame):  # SIGTERM unwinds like Ctrl-C, so every finally stops its children
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _terminate)
    wait = opts.wait_quiet if opts.wait_quiet is not None else (0.0 if opts.quick else 3.0)
    QUIET = Quiet(per_round=wait, budget=60.0 if wait > 0 else 0.0)
    if opts.cpus:
        os.sched_setaffinity(0, {int(c) for c in opts.cpus.split(",")})  # children inherit it

    def log(text: str) -> None:
        if not opts.quiet:
            print(text, file=sys.stderr, flush=True)

    t_start = time.monotonic()
    env_lines = [*environment(), source_version()]
    meter = LoadMeter()
    results: dict[str, dict[str, list[float]]] = {}
    for section in SECTIONS:
        if section not in wanted:
            continue
        log(f"[{section}]")
        fn = {"start": bench_start, "rt": bench_rt, "async_rt": bench_async_rt, "oneway": bench_oneway}[section]
        results[section] = fn(cfg, log)  # every child is stopped in a finally as its round ends
    elapsed = time.monotonic() - t_start
    env_lines += meter.report() + QUIET.report()

    out = [f"## forkio IPC benchmark ({'quick' if opts.quick else 'default'} mode, {elapsed:.0f} s)", "", *env_lines,
           f"- config: {cfg}" + (f"; pinned to CPUs {opts.cpus}" if opts.cpus else "; not pinned"), ""]
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
