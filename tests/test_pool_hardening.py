"""The pool keeps its promises under races, resource shortages and hostile task code.

One test (at least) per hardening item: the pool's manager never blocks on one worker, never
writes to an fd it closed, fails only the task a shortage or a size limit affects, retries
starting workers with back-off, breaks (as a ``BrokenExecutor``, saying why) only when no worker
can start, and contains whatever user code raises in its thread.
"""

from __future__ import annotations

import concurrent.futures
import gc
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

import forkio
import pool_tasks as tasks
from forkio import BrokenPool, Pool, PoolClosed, SerializationError, WorkerCrashed, _pool, _pool_proc, _shm
from helpers import gone, wait_until

HERE = Path(__file__).parent


_wait_for = wait_until


def _run_script(code: str, *, timeout: float = 40.0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=HERE)


def _ready_pids(pool: Pool, count: int) -> list[int]:
    ready = _wait_for(lambda: len([r for r in pool.stats() if r["ready"] and r["pid"]]) == count, 30)
    assert ready, f"{pool!r}: {pool.stats()}"
    return [r["pid"] for r in pool.stats() if r["pid"]]


def _warm_for_batches(pool: Pool) -> None:
    """A worker up, and a scheduler that believes tasks are tiny: it then sends later tasks
    ahead, in batches, however loaded the machine is (the case these tests need)."""
    pool.submit(tasks.inc, 1).result(timeout=30)  # its run time is averaged in before this returns
    pool._sched.avg_seconds = 1e-6


def _sent_ahead(pool: Pool, future: Any) -> bool:
    return any(future._task in w.assigned for w in list(pool._sched.workers.values()))


# ---- item 1: nothing is ever written to an fd the pool closed ------------------------------
def test_terminate_and_cancel_after_shutdown_write_to_no_fd(tmp_path: Path) -> None:
    before = set(os.listdir("/proc/self/fd"))
    pool = Pool(1)
    late = pool.submit(tasks.sleep_then, 0.01, "x")
    assert late.result(timeout=30) == "x"
    pool_fds = {int(fd) for fd in set(os.listdir("/proc/self/fd")) - before}
    pool.shutdown()
    opened = []
    for i in range(64):  # reoccupy the numbers the pool let go of, as a program's files would
        fd = os.open(tmp_path / f"victim{i}", os.O_RDWR | os.O_CREAT, 0o600)
        opened.append(fd)
        if pool_fds <= set(opened) | {int(f) for f in os.listdir("/proc/self/fd")} - pool_fds:
            break
    try:
        assert pool_fds & set(opened), "setup: none of the pool's fd numbers came back"
        pool.terminate()
        late.cancel()
        with pytest.raises(PoolClosed):
            pool.submit(tasks.inc, 1)
        assert all(os.fstat(fd).st_size == 0 for fd in opened)
    finally:
        for fd in opened:
            os.close(fd)


# ---- item 7: submit() racing shutdown() ---------------------------------------------------------
class _SlowPickle:
    """Pickles (to 5) only once ``release`` is set: submit() is caught between its checks."""

    def __init__(self, entered: threading.Event, release: threading.Event) -> None:
        self.entered, self.release = entered, release

    def __reduce__(self) -> Any:
        self.entered.set()
        self.release.wait(10)
        return (int, (5,))


def test_a_submit_that_races_shutdown_is_refused_or_runs() -> None:
    pool = Pool(1)
    assert pool.submit(tasks.inc, 1).result(timeout=30) == 2
    entered, release = threading.Event(), threading.Event()
    outcome: dict[str, Any] = {}

    def submitter() -> None:
        try:
            outcome["future"] = pool.submit(tasks.inc, _SlowPickle(entered, release))
        except PoolClosed as exc:
            outcome["refused"] = exc

    thread = threading.Thread(target=submitter)
    thread.start()
    assert entered.wait(10)  # past the first "closed?" check, pickling
    pool.shutdown(wait=False)
    release.set()
    thread.join(10)
    pool.shutdown(wait=True)  # returns: nothing was left queued for workers already retired
    assert "refused" in outcome and not isinstance(outcome["refused"], BrokenPool)


# ---- items 8, 9, 17, 29: a broken pool ----------------------------------------------------------
def test_a_failing_initializer_breaks_the_pool_as_a_broken_executor_that_says_why() -> None:
    pool = Pool(2, initializer=tasks.bad_init)
    pending = pool.submit(tasks.inc, 1).exception(timeout=30)
    assert isinstance(pending, BrokenPool) and isinstance(pending, concurrent.futures.BrokenExecutor)
    assert isinstance(pending, forkio.ForkioError)
    assert "broken" in str(pending) and "initializer failed on purpose" in str(pending)
    assert isinstance(pending.__cause__, RuntimeError)
    with pytest.raises(BrokenPool, match=r"broken.*initializer failed on purpose") as later:
        pool.submit(tasks.inc, 1)
    assert isinstance(later.value.__cause__, RuntimeError)
    assert "broken" in repr(pool)
    pool.shutdown()
    with pytest.raises(PoolClosed):
        pool.submit(tasks.inc, 1)


def test_a_shut_down_pool_says_shut_down_not_broken() -> None:
    pool = Pool(1)
    pool.shutdown()
    with pytest.raises(PoolClosed, match="shut down") as refused:
        pool.submit(tasks.inc, 1)
    assert not isinstance(refused.value, BrokenPool)


def test_when_a_busy_worker_dies_in_a_broken_pool_its_task_is_resolved(tmp_path: Path) -> None:
    """The pool breaks while a task runs; then its worker dies: no worker can retry it."""
    counter, mark = tmp_path / "inits", tmp_path / "busy.pid"
    pool = Pool(2, retries=1, initializer=tasks.fail_on_init_number, initargs=(str(counter), 3))
    try:
        pids = _ready_pids(pool, 2)
        running = pool.submit(tasks.mark_then_sleep, str(mark), 600, None)
        assert _wait_for(lambda: mark.exists() and mark.read_text())
        busy = int(mark.read_text())
        os.kill(next(p for p in pids if p != busy), signal.SIGKILL)  # its replacement's init fails
        assert _wait_for(lambda: "broken" in repr(pool))
        os.kill(busy, signal.SIGKILL)
        error = running.exception(timeout=10)
        assert isinstance(error, BrokenPool) and isinstance(error.__cause__, WorkerCrashed)
    finally:
        pool.shutdown()  # returns: nothing waits for a worker that will never come


def test_workers_that_die_while_starting_break_the_pool_naming_the_exit_code() -> None:
    pool = Pool(1, initializer=os._exit, initargs=(7,))
    error = pool.submit(tasks.inc, 1).exception(timeout=30)
    assert isinstance(error, BrokenPool)
    assert "died while starting" in str(error) and "exit code 7" in str(error)
    assert pool.restarts < 10
    pool.shutdown()


# ---- item 10: what does not fit in a frame fails its task, at the sender ----------------------
def test_an_argument_too_big_for_a_frame_fails_its_task_at_submit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_pool, "MAX_PAYLOAD", 1 << 20)
    with Pool(1) as pool:
        error = pool.submit(len, b"x" * (2 << 20)).exception(timeout=30)
        assert isinstance(error, SerializationError) and "frame limit" in str(error)
        assert pool.submit(len, b"x" * 1000).result(timeout=30) == 1000
        assert pool.restarts == 0


def test_a_result_too_big_for_a_frame_fails_its_task_in_the_worker() -> None:
    with Pool(1, initializer=tasks.set_worker_payload_limit, initargs=(1 << 20,)) as pool:
        error = pool.submit(tasks.big_bytes, 2 << 20).exception(timeout=30)
        assert isinstance(error, SerializationError) and "frame limit" in str(error)
        assert pool.submit(tasks.big_bytes, 10).result(timeout=30) == b"y" * 10
        assert pool.restarts == 0


# ---- item 11: the manager never blocks on one worker ------------------------------------------
@pytest.mark.timeout(60)
def test_terminate_returns_while_a_busy_workers_socket_is_full(tmp_path: Path) -> None:
    pytest.importorskip("numpy")
    import numpy as np

    mark = tmp_path / "busy"
    pool = Pool(1)
    _warm_for_batches(pool)
    slow = pool.submit(tasks.mark_then_sleep, str(mark), 600, None)
    assert _wait_for(mark.exists)
    queued = [pool.submit(len, b"m" * 100_000) for _ in range(60)]  # more than its socket holds
    big = pool.submit(tasks.array_sum, np.ones(1 << 18))  # 2 MiB: a frame with a segment's fd
    assert _wait_for(lambda: _sent_ahead(pool, big))  # all written, or waiting in its outbox
    done = threading.Thread(target=pool.terminate)
    done.start()
    done.join(20)  # a manager blocked on the worker would wait for its 600 s task
    assert not done.is_alive()
    assert all(f.done() for f in [slow, big, *queued])


# ---- item 12 (and issue 10's item 12): prompt results, innocent tasks, running() -------------
def test_finished_results_arrive_while_the_next_task_runs(tmp_path: Path) -> None:
    release = tmp_path / "release"
    with Pool(1) as pool:
        for _ in range(100):
            pool.submit(tasks.inc, 1)
        pool.submit(tasks.inc, 1).result(timeout=30)
        tiny = [pool.submit(tasks.inc, i) for i in range(30)]
        slow = pool.submit(tasks.wait_for_file, str(release))
        try:
            # The slow task runs until the file exists: the tiny results must not wait for it.
            assert [f.result(timeout=15) for f in tiny] == list(range(1, 31))
            assert not slow.done()
        finally:
            release.touch()
        assert slow.result(timeout=30) is True


def test_running_is_true_while_the_task_runs_and_cancel_still_stops_it(tmp_path: Path) -> None:
    mark = tmp_path / "running"
    with Pool(1) as pool:
        pool.submit(tasks.inc, 1).result(timeout=30)
        future = pool.submit(tasks.mark_then_hang, str(mark))
        waiting = pool.submit(tasks.inc, 1)
        assert _wait_for(mark.exists)
        assert _wait_for(future.running)
        assert not waiting.running()
        pid = int(mark.read_text())
        assert future.cancel() and future.cancelled() and not future.running()
        assert gone(pid, within=10)
        assert waiting.result(timeout=30) == 2


# ---- item 14: retries count runs, not dispatches ----------------------------------------------
def test_a_task_sent_to_a_worker_that_died_before_it_started_keeps_its_retry(tmp_path: Path) -> None:
    """A and T go to the worker together; A is killed (T never started); then T is killed on its
    first run. T crashed once: with retries=1 it runs again."""
    log = tmp_path / "runs"
    with Pool(1, retries=1) as pool:
        for _ in range(100):
            pool.submit(tasks.inc, 1)
        pool.submit(tasks.inc, 1).result(timeout=30)
        a = pool.submit(tasks.log_then_sleep, str(log), "A", 0.5)
        t = pool.submit(tasks.log_then_sleep, str(log), "T", 0.5)
        for name in ("A", "T"):
            assert _wait_for(lambda name=name: tasks.started_runs(str(log), name) == 1)
            os.kill(tasks.started_pids(str(log), name)[-1], signal.SIGKILL)
        assert a.result(timeout=30) == "A" and t.result(timeout=30) == "T"


# ---- item 15: shortages fail one task, or wait; the pool lives on -----------------------------
def test_no_shared_memory_for_an_argument_fails_that_task_only(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("numpy")
    import numpy as np

    def no_space(size: int) -> int:
        raise OSError(28, "No space left on device")

    with Pool(1) as pool:
        pool.submit(tasks.inc, 1).result(timeout=30)
        monkeypatch.setattr(_shm, "create_segment", no_space)
        error = pool.submit(tasks.array_sum, np.ones(1 << 18)).exception(timeout=30)
        assert isinstance(error, SerializationError) and "No space left on device" in str(error)
        monkeypatch.undo()
        assert pool.submit(tasks.inc, 1).result(timeout=30) == 2
        assert pool.submit(tasks.array_sum, np.ones(1 << 18)).result(timeout=30) == (float(1 << 18), True)


def test_a_worker_that_cannot_be_started_for_a_while_is_started_later(monkeypatch: pytest.MonkeyPatch) -> None:
    real_fork = _pool_proc.fork
    failures = {"left": 0}

    def short_of_processes(*args: Any, **kwargs: Any) -> Any:
        if failures["left"] > 0:
            failures["left"] -= 1
            raise BlockingIOError(11, "Resource temporarily unavailable")
        return real_fork(*args, **kwargs)

    monkeypatch.setattr(_pool_proc, "fork", short_of_processes)
    with Pool(1) as pool:
        (pid,) = _ready_pids(pool, 1)
        failures["left"] = 3  # its replacement fails three times (EAGAIN), then starts
        os.kill(pid, signal.SIGKILL)
        assert pool.submit(tasks.inc, 1).result(timeout=30) == 2
        assert failures["left"] == 0 and "broken" not in repr(pool)


def test_running_out_of_fds_for_results_fails_tasks_not_workers() -> None:
    """Held big results keep an fd each; at the limit, a result that cannot be taken in fails
    its task with an error that says so (not a worker "crash"), and the pool works afterwards."""
    result = _run_script("""
        import gc, resource
        import forkio, pool_tasks as tasks
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        kept, errors = [], []
        with forkio.Pool(2) as pool:
            for i in range(150):
                try:
                    kept.append(pool.submit(tasks.big_buffer, 2 << 20).result(timeout=30))
                except Exception as exc:
                    errors.append(exc)
                    if len(errors) == 5:
                        break
            kinds = {type(e).__name__ for e in errors}
            text = " ".join(map(str, errors))
            print("kinds", sorted(kinds), "open files" in text or "file descriptors" in text or not errors)
            kept.clear()
            gc.collect()
            print("after", pool.submit(tasks.inc, 1).result(timeout=30), pool.restarts)
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert "WorkerCrashed" not in lines["kinds"] and lines["kinds"].endswith("True")
    assert lines["after"] == "2 0"


# ---- item 26: a cancelled task sent ahead does not stay "assigned" -----------------------------
def test_cancelling_a_task_sent_ahead_leaves_the_worker_free(tmp_path: Path) -> None:
    mark = tmp_path / "first"
    with Pool(1) as pool:
        _warm_for_batches(pool)
        first = pool.submit(tasks.mark_then_sleep, str(mark), 0.3, "first")
        second = pool.submit(tasks.sleep_then, 0.3, "second")
        assert _wait_for(mark.exists)
        assert _wait_for(lambda: _sent_ahead(pool, second))  # the case that matters: the worker holds it
        assert second.cancel()
        assert first.result(timeout=30) == "first"
        assert pool.submit(pow, 2, 3).result(timeout=10) == 8


def test_shutdown_cancel_futures_returns_with_a_backlog_sent_ahead(tmp_path: Path) -> None:
    mark, gate = tmp_path / "first", tmp_path / "gate"
    pool = Pool(1)
    try:
        _warm_for_batches(pool)
        # The first task runs until the gate opens, so the second cannot start before the
        # shutdown has cancelled it, however slow the machine.
        futures = [pool.submit(tasks.mark_then_wait, str(mark), str(gate), i) for i in range(2)]
        assert _wait_for(mark.exists, 30)
        assert _wait_for(lambda: all(_sent_ahead(pool, f) for f in futures[1:]), 30)
        finished = threading.Thread(target=pool.shutdown, kwargs={"cancel_futures": True})
        finished.start()
        assert _wait_for(lambda: all(f.cancelled() for f in futures[1:]), 30)
        gate.touch()
        finished.join(20)
        assert not finished.is_alive()  # seen before the clean-up below ends it anyway
        assert futures[0].result(timeout=1) == 0 and all(f.cancelled() for f in futures[1:])
    finally:
        pool.terminate()  # nothing left behind, whatever failed (a no-op once it is shut down)


# ---- item 27: a BaseException from user code in the pool's thread fails one future -------------
def test_system_exit_in_result_unpickling_fails_that_task_only() -> None:
    with Pool(1) as pool:
        error = pool.submit(tasks.exit_when_unpickled).exception(timeout=30)
        assert isinstance(error, SerializationError) and isinstance(error.__cause__, SystemExit)
        assert pool.submit(pow, 2, 3).result(timeout=30) == 8


def test_system_exit_in_a_done_callback_does_not_stop_the_pool() -> None:
    with Pool(1) as pool:
        future = pool.submit(tasks.sleep_then, 0.2, 1)
        called = threading.Event()

        def leave(_: Any) -> None:
            called.set()
            sys.exit(0)

        future.add_done_callback(leave)
        future.add_done_callback(lambda _: called.set())
        assert future.result(timeout=30) == 1 and called.wait(10)
        assert pool.submit(pow, 2, 3).result(timeout=30) == 8


class _ExitWhenPickled:
    def __reduce__(self) -> Any:
        sys.exit(0)


def test_system_exit_while_pickling_an_argument_fails_its_future() -> None:
    with Pool(1) as pool:
        future = pool.submit(id, _ExitWhenPickled())  # does not raise
        assert isinstance(future.exception(timeout=30), SerializationError)
        assert pool.submit(pow, 2, 3).result(timeout=30) == 8


# ---- item 28: pending tasks at interpreter exit; a dropped pool ----------------------------------
@pytest.mark.parametrize("ending", ["", "pool.shutdown(wait=False)"])
def test_tasks_submitted_at_the_end_of_a_script_run_before_it_exits(ending: str) -> None:
    result = _run_script(f"""
        import forkio, pool_tasks as tasks
        pool = forkio.Pool(2)
        pool.submit(tasks.sleep_then_print, 0.5, "apple")
        {ending}
    """)
    assert result.returncode == 0 and "apple" in result.stdout
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr


def test_a_dropped_pool_lets_its_workers_go() -> None:
    pool = Pool(2)
    pool.submit(tasks.inc, 1).result(timeout=30)
    pids = _ready_pids(pool, 2)
    manager = pool._manager
    del pool
    gc.collect()
    assert all(gone(pid, within=10) for pid in pids)
    manager.join(10)
    assert not manager.is_alive()


def test_a_dropped_pool_finishes_its_tasks_first(tmp_path: Path) -> None:
    out = tmp_path / "out"
    pool = Pool(1)
    pool.submit(tasks.sleep_then_write, 0.3, str(out))
    del pool  # as shutdown(wait=False): the task still runs
    gc.collect()
    assert _wait_for(out.exists, 30)


# ---- the scheduler's side of these rules, without processes ------------------------------------
from forkio._pool_sched import (  # noqa: E402
    CRASH_LOOP_LIMIT,
    MAX_BATCH_BYTES,
    Break,
    Dispatch,
    Failure,
    Kill,
    Resolve,
    Retire,
    Scheduler,
    SkipTask,
    Spawn,
    Task,
    Worker,
)


def _sched(size: int = 1, *, avg: float | None = 1e-5) -> tuple[Scheduler, list[Worker]]:
    sched = Scheduler(size)
    workers = [Worker(i) for i in range(size)]
    for w in workers:
        sched.add_worker(w)
        sched.worker_ready(w)
    sched.avg_seconds = avg
    return sched, workers


def test_sched_cancelling_a_task_that_already_ran_stops_nothing() -> None:
    """Tasks 0 and 1 ran (results not in yet), 2 runs: cancelling 1 must not kill the worker."""
    sched, (w0,) = _sched()
    ts = [Task(i, b"") for i in range(4)]
    for t in ts:
        sched.submit(t)
    sched.dispatch(0.0)
    ts[1].cancelled = True
    assert sched.cancel(ts[1], lambda w: 3) == []
    ts[2].cancelled = True
    assert sched.cancel(ts[2], lambda w: 3) == [Kill(w0)]
    ts[3].cancelled = True
    assert sched.cancel(ts[3], lambda w: 3) == [SkipTask(w0, ts[3])]
    actions = sched.task_finished(w0, 0, True, "zero", 1e-5)
    assert [(a.task, a.value) for a in actions if isinstance(a, Resolve)] == [(ts[0], "zero")]
    assert sched.task_finished(w0, 1, True, "one", 1e-5) == []  # cancelled: its result is dropped


def test_sched_a_skip_report_frees_the_worker() -> None:
    sched, (w0,) = _sched(avg=1.0)  # slow tasks: one in hand at a time
    first, second, third = Task(1, b""), Task(2, b""), Task(3, b"")
    for t in (first, second):
        sched.submit(t)
    w0.assigned.extend([first, second])  # sent ahead, as with fast tasks before
    sched.queue.clear()
    second.cancelled = True
    sched.task_finished(w0, 1, True, None, 1.0)
    sched.submit(third)
    assert sched.dispatch(0.0) == []  # it still holds the cancelled one
    sched.task_skipped(w0, 2)
    assert sched.dispatch(0.0) == [Dispatch(w0, [third])]


def test_sched_retries_count_runs_not_sends() -> None:
    """T was sent with A; A's worker died while A ran: T never started, so it keeps its retry."""
    sched, (w0,) = _sched()
    a, t = Task(1, b"", retries=1), Task(2, b"", retries=1)
    sched.submit(a)
    sched.submit(t)
    sched.dispatch(0.0)
    sched.worker_died(w0, Failure("crashed", w0, -9), started=1)
    assert (a.attempts, t.attempts) == (1, 0) and set(sched.queue) == {a, t}
    w1 = Worker(1)
    sched.add_worker(w1)
    sched.worker_ready(w1)
    sched.queue = type(sched.queue)([t, a])
    sched.dispatch(1.0)
    actions = sched.worker_died(w1, Failure("crashed", w1, -9), started=1)  # T's first run
    assert not [x for x in actions if isinstance(x, Resolve)] and t.attempts == 1 and t in sched.queue


def test_sched_workers_dying_before_ready_back_off_then_break() -> None:
    sched = Scheduler(1)
    actions: list[Any] = []
    for n in range(1, CRASH_LOOP_LIMIT + 1):
        w = Worker(n)
        sched.add_worker(w)
        actions = sched.worker_died(w, Failure("start", w, 7), now=10.0)
        if n < CRASH_LOOP_LIMIT:
            assert actions == [] and sched.spawn_at is not None and sched.spawn_at > 10.0
            assert sched.tick(sched.spawn_at) == [Spawn(1)]
    assert [type(a) for a in actions] == [Break] and actions[0].reason.detail == 7


def test_sched_a_worker_that_gets_ready_resets_the_crash_count() -> None:
    sched = Scheduler(1)
    for n in range(1, 2 * CRASH_LOOP_LIMIT):
        w = Worker(n)
        sched.add_worker(w)
        if n % 2 == 0:
            sched.worker_ready(w)
        actions = sched.worker_died(w, Failure("start" if n % 2 else "crashed", w, 7), now=float(n))
        assert not [a for a in actions if isinstance(a, Break)]


def test_sched_transient_spawn_failures_are_retried_with_back_off() -> None:
    sched, _ = _sched()
    delays = []
    for _ in range(6):
        assert sched.spawn_failed(BlockingIOError(11, "EAGAIN"), 0.0, transient=True) == []
        assert sched.spawn_at is not None
        delays.append(sched.spawn_at)
        assert sched.tick(sched.spawn_at) == [Spawn(1)]
    assert delays == sorted(delays) and delays[0] < delays[-1]
    assert [type(a) for a in sched.spawn_failed(FileNotFoundError("python"), 0.0, transient=False)] == [Break]


def test_sched_a_broken_pool_resolves_what_a_dying_worker_held() -> None:
    sched, (w0,) = _sched()
    running, behind, queued = Task(1, b"", retries=1), Task(2, b""), Task(3, b"")
    for t in (running, behind):
        sched.submit(t)
    sched.dispatch(0.0)
    sched.avg_seconds = 1.0
    sched.submit(queued)
    broke = sched.break_pool()
    assert [a.task for a in broke if isinstance(a, Resolve)] == [queued]
    actions = sched.worker_died(w0, Failure("crashed", w0, -9), started=1)
    resolved = {a.task.id: a.value.kind for a in actions if isinstance(a, Resolve)}
    assert resolved == {1: "broken", 2: "broken"} and not [a for a in actions if isinstance(a, Spawn)]
    assert not sched.busy


def test_sched_a_batch_stays_under_the_byte_cap() -> None:
    sched, (w0,) = _sched()
    big = [Task(i, b"x" * (MAX_BATCH_BYTES // 2)) for i in range(3)]
    for t in big:
        sched.submit(t)
    assert sched.dispatch(0.0) == [Dispatch(w0, big[:2])]


def test_sched_an_unsent_task_fails_alone_and_the_worker_goes_on() -> None:
    sched, (w0,) = _sched()
    a, b = Task(1, b""), Task(2, b"")
    sched.submit(a)
    sched.submit(b)
    sched.dispatch(0.0)
    error = OSError(24, "Too many open files")
    assert sched.unsent(w0, a, error) == [Resolve(a, False, error)]
    assert list(w0.assigned) == [b]
    actions = sched.task_finished(w0, 2, True, "b", 1e-5)
    assert [a.task for a in actions if isinstance(a, Resolve)] == [b]
    assert Retire not in [type(a) for a in actions]


def test_a_reported_message_that_will_not_unpickle_fails_nothing() -> None:
    received: list[Any] = []
    with Pool(1) as pool:
        done = pool.options(on_message=received.append).submit(tasks.report_unloadable)
        assert done.result(timeout=30) == "done" and received == []
        assert pool.restarts == 0 and pool.submit(pow, 2, 3).result(timeout=30) == 8


def test_shutdown_cancel_futures_keeps_results_of_tasks_that_already_ran() -> None:
    """``_begun`` names the running task and those before it whose results are on the way."""
    _, (w0,) = _sched()
    ts = [Task(i, b"") for i in range(4)]
    w0.assigned.extend(ts)

    class FakeProc:
        state = w0

        @staticmethod
        def started() -> int:
            return 2

    assert Pool._begun(FakeProc()) == ts[:2]  # type: ignore[arg-type]


def test_sched_a_ready_worker_whose_channel_closed_first_is_no_start_failure() -> None:
    """A killed worker's socket often reports EOF before its pidfd: it was ready all the same."""
    sched, (w0,) = _sched()
    w0.ready = False  # what the I/O layer does when it finds the channel closed
    assert sched.worker_died(w0, Failure("crashed", w0, -9), now=1.0) == [Spawn(1)]
    assert sched.start_failures == 0 and sched.spawn_at is None


def test_killing_ready_workers_again_and_again_never_breaks_the_pool() -> None:
    with Pool(1) as pool:
        for _ in range(CRASH_LOOP_LIMIT + 2):
            (pid,) = _ready_pids(pool, 1)
            os.kill(pid, signal.SIGKILL)
            assert gone(pid, within=10)
            assert pool.submit(tasks.inc, 1).result(timeout=30) == 2
        assert "broken" not in repr(pool)


def test_a_worker_dying_while_unpickling_its_first_task_says_so_and_charges_that_task() -> None:
    """Each worker ready, each dying while it unpickles its first task's arguments: WorkerCrashed says it
    died running the task (not 'before it was ready'), the death is one of the task's runs, and more of
    them in a row than the crash-loop limit do not break the pool."""
    with Pool(1) as pool:
        for _ in range(CRASH_LOOP_LIMIT + 1):  # a fresh worker each time
            error = pool.submit(tasks.inc, tasks.DieOnUnpickle()).exception(timeout=30)
            assert isinstance(error, WorkerCrashed) and error.exit_code == 7, error
            assert "while running the task" in str(error) and "ready" not in str(error), error
        error = pool.options(retries=2).submit(tasks.inc, tasks.DieOnUnpickle()).exception(timeout=30)
        assert isinstance(error, WorkerCrashed) and str(error).endswith("while running the task (run 3 of 3)")
        assert pickle.loads(pickle.dumps(error)).detail == error.detail
        assert pool.submit(tasks.inc, 1).result(timeout=30) == 2
        assert pool.restarts == CRASH_LOOP_LIMIT + 4


@pytest.mark.parametrize("kind", ["shared memory", "in the frame"])
def test_a_task_frame_the_worker_cannot_take_in_fails_that_task_only(kind: str) -> None:
    """A task whose big argument the worker cannot take in (its address space is limited: no room to
    map its segment, or to read its frame) fails with SerializationError, after one worker; the task
    behind it runs. (It went round fresh workers forever.)"""
    with Pool(1, initializer=tasks.limit_address_space, initargs=(64 << 20,)) as pool:
        assert pool.submit(tasks.inc, 1).result(timeout=30) == 2
        data = bytes(192 << 20)  # (under the frame limit, 256 MB)
        big = pool.submit(len, pickle.PickleBuffer(data) if kind == "shared memory" else data)
        del data
        after = pool.submit(tasks.inc, 2)
        error = big.exception(timeout=30)
        assert isinstance(error, SerializationError) and "worker cannot take in" in str(error), error
        assert after.result(timeout=30) == 3
        assert pool.restarts == 1
