"""forkio.Pool against real processes: crashes, hangs and bad data fail one task, never the pool."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from concurrent.futures import CancelledError
from functools import partial
from pathlib import Path

import pytest

import forkio
import pool_tasks as tasks
from forkio import Pool, SerializationError, TaskTimeout, WorkerCrashed
from forkio._pool_stream import CHUNKS_IN_FLIGHT_PER_WORKER
from helpers import gone, wait_until


@pytest.fixture
def pool() -> Pool:
    with Pool(2) as p:
        yield p  # type: ignore[misc]


def test_submit_and_map(pool: Pool) -> None:
    assert pool.submit(tasks.inc, 1).result(timeout=30) == 2
    assert pool.submit(tasks.add, 2, b=3).result(timeout=30) == 5
    assert list(pool.map(tasks.inc, range(100))) == list(range(1, 101))
    assert list(pool.map(tasks.add, range(5), range(5))) == [0, 2, 4, 6, 8]


def test_task_exception_keeps_its_type_and_remote_traceback(pool: Pool) -> None:
    with pytest.raises(KeyError) as info:
        pool.submit(tasks.fail, "nope").result(timeout=30)
    assert "pool_tasks.py" in str(info.value.__cause__)
    assert "raise KeyError" in str(info.value.__cause__)


def test_unpicklable_exception_arrives_as_remote_error(pool: Pool) -> None:
    with pytest.raises(forkio.RemoteError) as info:
        pool.submit(tasks.fail_unpicklably, "locked").result(timeout=30)
    assert "Unpicklable" in info.value.type_name and "locked" in str(info.value)
    assert "fail_unpicklably" in info.value.traceback


def test_exception_that_will_not_unpickle_arrives_as_remote_error(pool: Pool) -> None:
    with pytest.raises(forkio.RemoteError) as info:
        pool.submit(tasks.fail_with_http_error).result(timeout=30)
    assert info.value.type_name == "urllib.error.HTTPError" and "500" in str(info.value)
    assert "fail_with_http_error" in info.value.traceback


def test_unpicklable_argument_fails_that_task_only(pool: Pool) -> None:
    import threading

    bad = pool.submit(tasks.inc, threading.Lock())
    good = pool.submit(tasks.inc, 1)
    with pytest.raises(SerializationError, match="cannot send task"):
        bad.result(timeout=30)
    assert good.result(timeout=30) == 2


def test_unpicklable_result_fails_that_task_only(pool: Pool) -> None:
    with pytest.raises(SerializationError, match="cannot send the task's result back"):
        pool.submit(tasks.return_unpicklable).result(timeout=30)
    assert pool.submit(tasks.inc, 1).result(timeout=30) == 2


@pytest.mark.parametrize("how,expect", [("kill", "SIGKILL"), ("segv", "SIGSEGV"), ("exit", None)])
def test_worker_death_fails_only_its_task(pool: Pool, how: str, expect: str | None) -> None:
    """SIGKILL, segfault or os._exit: that task fails with WorkerCrashed; all others complete."""
    others = [pool.submit(tasks.sleep_then, 0.01, i) for i in range(20)]
    doomed = pool.submit(tasks.die, how)
    with pytest.raises(WorkerCrashed) as info:
        doomed.result(timeout=30)
    assert info.value.signal_code == expect
    if expect is None:
        assert info.value.exit_code == 13
    if expect == "SIGKILL":
        assert "out of memory?" in str(info.value)
    assert [f.result(timeout=30) for f in others] == list(range(20))
    assert pool.submit(tasks.inc, 1).result(timeout=30) == 2


def test_a_crash_inside_map_fails_one_item(pool: Pool) -> None:
    """Items run in chunks; a chunk whose worker dies is retried item by item to find the culprit."""
    list(pool.map(tasks.inc, range(1000)))  # tiny tasks seen: chunks of several items from now on
    results = list(pool.stream(partial(tasks.die_if, bad=17), range(50), ordered=True))
    assert [r.index for r in results] == list(range(50))
    failed = [r for r in results if not r.ok]
    assert [r.input for r in failed] == [17] and isinstance(failed[0].error, WorkerCrashed)
    assert all(r.value == r.input * 2 for r in results if r.ok)


def test_timeout_really_stops_the_task(pool: Pool, tmp_path: Path) -> None:
    marker = tmp_path / "pid"
    started = time.monotonic()
    with pytest.raises(TaskTimeout):
        pool.options(timeout=0.5).submit(tasks.mark_then_hang, str(marker)).result(timeout=30)
    assert time.monotonic() - started < 10
    pid = int(marker.read_text())
    deadline = time.monotonic() + 5
    while not gone(pid):
        assert time.monotonic() < deadline, "the hung worker was not stopped"
        time.sleep(0.02)
    assert pool.submit(tasks.inc, 1).result(timeout=30) == 2


def test_timeout_error_is_a_timeout_error(pool: Pool) -> None:
    with pytest.raises(TimeoutError):
        pool.options(timeout=0.2).submit(tasks.sleep_then, 60).result(timeout=30)


def test_pool_wide_timeout_and_hang_in_stream() -> None:
    with Pool(2, task_timeout=1.0) as pool:
        results = list(pool.stream(partial(tasks.hang_if, bad=3), range(8), ordered=True))
    assert [r.ok for r in results] == [i != 3 for i in range(8)]
    assert isinstance(results[3].error, TaskTimeout)


def test_retries_rerun_a_crashed_task(pool: Pool, tmp_path: Path) -> None:
    counter = tmp_path / "count"
    assert pool.options(retries=2).submit(tasks.flaky, str(counter), 2).result(timeout=30) == "ok after 2 failures"
    with pytest.raises(WorkerCrashed):
        pool.options(retries=1).submit(tasks.flaky, str(tmp_path / "c2"), 5).result(timeout=30)


def test_cancel_a_running_task_stops_its_worker(pool: Pool, tmp_path: Path) -> None:
    marker = tmp_path / "pid"
    future = pool.submit(tasks.mark_then_hang, str(marker))
    deadline = time.monotonic() + 20
    while not marker.exists() or not marker.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    pid = int(marker.read_text())
    assert future.cancel()
    with pytest.raises(CancelledError):
        future.result(timeout=1)
    while not gone(pid):
        assert time.monotonic() < deadline, "the cancelled task's worker was not stopped"
        time.sleep(0.02)
    assert pool.submit(tasks.inc, 1).result(timeout=30) == 2


def test_asyncio_run_and_cancel(tmp_path: Path) -> None:
    async def main() -> None:
        with Pool(2) as pool:
            assert await pool.run(tasks.add, 1, 2) == 3
            marker = tmp_path / "pid"
            task = asyncio.ensure_future(pool.run(tasks.mark_then_hang, str(marker)))
            while not marker.exists() or not marker.read_text():
                await asyncio.sleep(0.01)
            pid = int(marker.read_text())
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            for _ in range(500):
                if gone(pid):
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("cancelling the await did not stop the task")
            got = [r.value async for r in pool.astream(tasks.inc, range(20), ordered=True)]
            assert got == list(range(1, 21))
            loop = asyncio.get_running_loop()
            assert await loop.run_in_executor(pool, tasks.inc, 41) == 42

    asyncio.run(main())


def test_progress_and_messages_reach_the_caller(pool: Pool) -> None:
    seen: list[object] = []
    options = pool.options(on_progress=lambda done, total: seen.append((done, total)),
                           on_message=seen.append)
    assert options.submit(tasks.with_progress, 3).result(timeout=30) == "done"
    assert seen == [(1, 3), (2, 3), (3, 3), {"note": "almost done"}]


def test_recycle_after_max_tasks() -> None:
    with Pool(1, max_tasks_per_worker=3) as pool:
        pids = [pool.submit(tasks.pid_of).result(timeout=30) for _ in range(7)]
    assert pids[0] == pids[1] == pids[2] != pids[3]
    assert len(set(pids)) == 3


def test_recycle_on_memory() -> None:
    with Pool(1, max_memory_per_worker=150 * 1024 * 1024) as pool:
        first = pool.submit(tasks.grow_memory, 200).result(timeout=30)
        second = pool.submit(tasks.pid_of).result(timeout=30)
    assert first != second


def test_initializer_runs_in_each_worker() -> None:
    with Pool(2, initializer=tasks.init_worker, initargs=("hello",)) as pool:
        assert set(pool.map(tasks.initialized, range(10))) == {"hello"}


def test_failing_initializer_breaks_the_pool_clearly() -> None:
    pool = Pool(1, initializer=tasks.bad_init)
    future = pool.submit(tasks.inc, 1)
    with pytest.raises(RuntimeError, match="initializer failed on purpose"):
        future.result(timeout=30)
    with pytest.raises(forkio.PoolClosed):
        pool.submit(tasks.inc, 1)
    pool.shutdown()


def test_lazy_input_for_endless_generator(pool: Pool) -> None:
    """map over an endless generator consumes only a bounded window ahead."""
    consumed = 0

    def endless():  # type: ignore[no-untyped-def]
        nonlocal consumed
        while True:
            consumed += 1
            yield consumed

    results = pool.map(tasks.inc, endless())
    first = [next(results) for _ in range(1000)]
    assert first == list(range(2, 1002))
    assert consumed < 1000 + 200_000
    results.close()  # type: ignore[attr-defined]


def test_ordered_map_behind_a_slow_first_item_reads_a_bounded_window(pool: Pool, tmp_path: Path) -> None:
    """map() in order: while item 1 runs, finished later chunks are held, but no more than the window."""
    consumed = 0
    gate, done = tmp_path / "gate", tmp_path / "done"
    done.mkdir()

    def endless():  # type: ignore[no-untyped-def]
        nonlocal consumed
        while True:
            consumed += 1
            yield consumed

    results = pool.map(partial(tasks.hold_first, gate=str(gate), done_dir=str(done)), endless(),
                       chunksize=1)
    first = threading.Thread(target=lambda: next(results), daemon=True)  # the consumer waits for item 1
    first.start()
    window = pool.workers * CHUNKS_IN_FLIGHT_PER_WORKER
    assert wait_until(lambda: len(list(done.iterdir())) >= window - 1, 30)
    time.sleep(0.5)  # a bounded look: with no bound, hundreds more items would finish meanwhile
    assert len(list(done.iterdir())) == window - 1
    assert consumed <= 2 * window + 1  # the chunks in flight or held, and the read-ahead buffer
    gate.touch()
    first.join(30)
    assert next(results) == 2
    results.close()  # type: ignore[attr-defined]


def test_lambdas_work_with_cloudpickle(pool: Pool) -> None:
    offset = 10
    assert pool.submit(lambda x: x + offset, 1).result(timeout=30) == 11


def test_shutdown_with_cancel_futures(tmp_path: Path) -> None:
    """Tasks not started yet are cancelled, even those already sent to a worker; the running one finishes."""
    pool = Pool(1)
    marker = tmp_path / "started"
    running = pool.submit(tasks.mark_then_sleep, str(marker), 0.5, "finished")
    queued = [pool.submit(tasks.sleep_then, 5) for _ in range(5)]
    while not marker.exists():
        time.sleep(0.01)
    pool.shutdown(wait=True, cancel_futures=True)
    assert running.result(timeout=1) == "finished"
    assert all(f.cancelled() for f in queued)
    with pytest.raises(forkio.PoolClosed):
        pool.submit(tasks.inc, 1)


def test_terminate_kills_workers_and_fails_nothing_silently() -> None:
    pool = Pool(2)
    hung = pool.submit(tasks.sleep_then, 600)
    assert pool.submit(tasks.inc, 1).result(timeout=30) == 2
    pool.terminate()
    assert hung.cancelled() or hung.exception(timeout=1) is not None


def test_stats_report_workers(pool: Pool) -> None:
    list(pool.map(tasks.inc, range(50)))
    stats = pool.stats()
    assert len(stats) == 2
    assert all(row["pid"] and row["rss"] and row["rss"] > 1_000_000 for row in stats)
    assert sum(row["tasks_done"] for row in stats) >= 1


def test_no_worker_outlives_a_killed_parent(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import forkio, pool_tasks\n"
        "pool = forkio.Pool(2)\n"
        "print(pool.submit(pool_tasks.pid_of).result(timeout=30), flush=True)\n"
        "print(pool.submit(pool_tasks.pid_of).result(timeout=30), flush=True)\n"
        "time.sleep(600)\n")
    import subprocess
    import sys

    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    pids = {int(parent.stdout.readline()), int(parent.stdout.readline())}
    parent.stdout.close()
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 3
    for pid in pids:
        while not gone(pid):
            assert time.monotonic() < deadline, f"worker {pid} outlived its parent"
            time.sleep(0.02)


def test_sigint_to_workers_is_ignored(pool: Pool) -> None:
    """Ctrl-C reaches every process in the group; workers leave it to the pool."""
    pid = pool.submit(tasks.pid_of).result(timeout=30)
    os.kill(pid, signal.SIGINT)
    assert pool.submit(tasks.sleep_then, 0.1, "alive").result(timeout=30) == "alive"


def test_map_timeout_bounds_the_whole_iteration(pool: Pool) -> None:
    """Like Executor.map: results not ready `timeout` seconds after the call raise TimeoutError."""
    results = pool.map(tasks.sleep_then, [0.0, 30.0], timeout=0.5)
    with pytest.raises(TimeoutError):
        list(results)


def test_submit_right_after_an_idle_worker_is_killed() -> None:
    """Tasks sent to a worker whose death is not yet seen go back to the queue; none hangs."""
    for _ in range(10):
        with Pool(2) as pool:
            pids: set[int] = set()
            while len(pids) < 2:
                pids |= {f.result(timeout=30) for f in [pool.submit(tasks.sleep_then, 0.02, None) and
                                                        pool.submit(tasks.pid_of) for _ in range(4)]}
            os.kill(next(iter(pids)), signal.SIGKILL)
            futures = [pool.submit(tasks.pid_of) for _ in range(4)]
            assert all(isinstance(f.result(timeout=30), int) for f in futures)


def test_ctrl_c_in_a_pool_run_stops_cleanly(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the whole group, as a terminal sends it) during map: the caller gets
    KeyboardInterrupt, the pool kills its workers, nothing hangs and nothing is left behind."""
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(
        "import sys, os\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import forkio, pool_tasks\n"
        "try:\n"
        "    with forkio.Pool(2) as pool:\n"
        "        print(' '.join(str(p) for p in {pool.submit(pool_tasks.pid_of).result() for _ in range(20)}),"
        " flush=True)\n"
        "        for _ in pool.map(pool_tasks.sleep_then, [0.5] * 100):\n"
        "            pass\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', flush=True)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    assert proc.stdout is not None
    pids = [int(p) for p in proc.stdout.readline().split()]
    time.sleep(0.3)  # let the map get going
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert "interrupted" in out and proc.returncode == 0, err
    assert "Traceback" not in err
    for pid in pids:
        assert gone(pid, within=3.0), f"worker {pid} outlived the interrupted pool"


def test_a_task_cannot_write_on_the_pools_channel(pool: Pool) -> None:
    """forkio.parent inside a task refuses, with a hint; the pool's protocol stays intact."""
    with pytest.raises(forkio.ChannelClosed, match=r"forkio\.report"):
        pool.submit(tasks.use_parent_directly).result(timeout=30)
    assert pool.submit(tasks.inc, 1).result(timeout=30) == 2


def test_big_array_arguments_travel_through_shared_memory(pool: Pool) -> None:
    """A 32 MB array argument reaches the worker intact, as a view (not a copy in the pickle)."""
    import numpy as np

    arr = np.arange(4 << 20, dtype=np.float64)
    total, is_view = pool.submit(tasks.array_sum, arr).result(timeout=60)
    assert total == float(arr.sum()) and is_view
    small = np.arange(10.0)
    assert pool.submit(tasks.array_sum, small).result(timeout=30) == (45.0, False)  # small: in the pickle
    # many in flight at once, each with its own segment or a reused one
    futures = [pool.submit(tasks.array_sum, arr * i) for i in range(6)]
    assert [f.result(timeout=60)[0] for f in futures] == [float((arr * i).sum()) for i in range(6)]


def test_big_array_results_travel_through_shared_memory(pool: Pool) -> None:
    """A 32 MB array returned by a task arrives intact, backed by shared memory; small ones inline."""
    import numpy as np

    big = pool.submit(tasks.make_array, 4 << 20).result(timeout=60)
    assert np.array_equal(big, np.arange(4 << 20, dtype=np.float64)) and not tasks.in_band(big)
    assert tasks.in_band(pool.submit(tasks.make_array, 10).result(timeout=30))
    arrays = list(pool.map(tasks.make_array, [2 << 20] * 4))  # map's chunks too
    assert all(np.array_equal(a, np.arange(2 << 20, dtype=np.float64)) for a in arrays)


def test_spare_worker_stands_in_when_one_dies() -> None:
    """With spare_workers=1 the next task after a death runs on the spare, already started."""
    with Pool(1, spare_workers=1) as pool:
        deadline = time.monotonic() + 30
        while len([r for r in pool.stats() if r["ready"]]) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        pids = {row["pid"] for row in pool.stats()}
        busy = {pool.submit(tasks.pid_of).result(timeout=30) for _ in range(10)}
        assert len(busy) == 1  # only one worker takes work
        (spare,) = pids - busy
        os.kill(busy.pop(), signal.SIGKILL)
        assert pool.submit(tasks.pid_of).result(timeout=30) == spare


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fast", [True, False], ids=["own-condition", "Future.__init__"])
def test_futures_are_real_futures_with_a_working_condition(pool: Pool, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch, fast: bool) -> None:
    """The futures build their condition themselves (a cheaper one) where this Python's Future
    agrees, else through Future.__init__: either way every waiting API works."""
    import threading
    from concurrent.futures import FIRST_COMPLETED, Future, as_completed, wait

    import forkio._pool

    if fast and not forkio._pool._FAST_FUTURE:
        pytest.skip("this Python's Future differs: the pool uses Future.__init__")
    monkeypatch.setattr(forkio._pool, "_FAST_FUTURE", fast)

    gate = tmp_path / "gate"
    slow = pool.submit(tasks.wait_for_file, str(gate))
    assert isinstance(slow, Future)
    assert isinstance(slow._condition, threading.Condition)  # type: ignore[attr-defined]
    # A thread blocked in result() before the result exists is woken by it (notify through the condition).
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(slow.result(timeout=30)))
    waiter.start()
    done, not_done = wait([slow], timeout=0.05, return_when=FIRST_COMPLETED)
    assert not done and not_done == {slow}
    callbacks: list[object] = []
    slow.add_done_callback(lambda f: callbacks.append(f.result()))
    gate.write_text("go")
    waiter.join(30)
    assert got == [True] and callbacks == [True]
    many = [pool.submit(tasks.inc, i) for i in range(200)]
    assert sorted(f.result() for f in as_completed(many, timeout=30)) == list(range(1, 201))
    assert not wait(many, timeout=30).not_done
