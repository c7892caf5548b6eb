"""``forkio.Pool(cluster=...)`` on a real Dask LocalCluster: the local pool's API and promises, on Dask.

One LocalCluster for the module (2 worker processes, 1 thread each); a fresh pool per test, so
each test shows that closing the pool leaves no forkio process on the Dask workers.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

distributed = pytest.importorskip("distributed")

import dask_tasks  # noqa: E402
import forkio  # noqa: E402
import pool_tasks as tasks  # noqa: E402
from forkio import Pool, RemoteError, TaskTimeout, WorkerCrashed  # noqa: E402
from test_pool_api import BAD_OPTIONS  # noqa: E402

pytestmark = pytest.mark.timeout(60)


def _forkio_children() -> list[int]:
    """Run on a Dask worker: its child processes (forkio children and zygotes)."""
    return [p.pid for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]


def _wait_for_pid(path: Path) -> int:
    """The pid a task wrote to ``path`` once it started (bounded wait)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            return int(path.read_text())
        except (FileNotFoundError, ValueError):  # not there yet, or created but not yet written
            time.sleep(0.01)
    raise AssertionError(f"the task never started: no pid in {path}")


def _executing(dask_worker: Any) -> int:
    return int(dask_worker.state.executing_count)


def _assert_dask_threads_free(client: Any) -> None:
    """No Dask thread is still busy with a task of a closed pool (bounded wait)."""
    deadline = time.monotonic() + 10
    while any(client.run(_executing).values()):
        assert time.monotonic() < deadline, f"Dask threads still busy: {client.run(_executing)}"
        time.sleep(0.02)


def _worker_pids(client: Any) -> dict[str, int]:
    return dict(client.run(os.getpid))


@pytest.fixture(scope="module")
def client(keep_processes: set[int]) -> Iterator[Any]:
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=":0", host="127.0.0.1")
    client = distributed.Client(cluster, set_as_default=False)
    pids: set[int] = set()

    def keep() -> None:  # the Dask worker processes live for the module (a lost one is restarted)
        keep_processes.difference_update(pids)
        pids.clear()
        pids.update(_worker_pids(client).values())
        keep_processes.update(pids)

    keep()
    client.keep_worker_pids = keep
    try:
        yield client
    finally:
        client.close()
        cluster.close()
        for pid in pids:
            try:
                psutil.Process(pid).wait(10)
            except psutil.NoSuchProcess:
                pass
        keep_processes.difference_update(pids)


@pytest.fixture
def pool(client: Any) -> Iterator[Pool]:
    before = _worker_pids(client)
    pool = Pool(cluster=client)
    try:
        yield pool
    finally:
        pool.shutdown()
    assert all(not children for children in client.run(_forkio_children).values()), "forkio left on the workers"
    _assert_dask_threads_free(client)
    if not getattr(pool, "_lost_on_purpose", False):
        assert _worker_pids(client) == before, "a Dask worker was replaced"


def test_the_pool_on_a_cluster_is_a_pool(pool: Pool) -> None:
    assert isinstance(pool, Pool) and pool.workers == 2


def test_results_and_order(pool: Pool) -> None:
    assert pool.submit(tasks.add, 2, b=3).result(timeout=30) == 5
    assert list(pool.map(tasks.inc, range(200))) == list(range(1, 201))
    assert list(pool.map(tasks.add, range(5), range(5))) == [0, 2, 4, 6, 8]
    assert sorted(pool.imap_unordered(tasks.inc, range(50))) == list(range(1, 51))
    results = list(pool.stream(tasks.inc, range(6), ordered=True))
    assert [r.value for r in results] == list(range(1, 7)) and all(r.ok for r in results)
    assert asyncio.run(pool.run(tasks.inc, 41)) == 42

    async def collect() -> list[int]:
        return sorted([result.value async for result in pool.astream(tasks.inc, range(5))])

    assert asyncio.run(collect()) == [1, 2, 3, 4, 5]


def test_tiny_tasks_are_batched(pool: Pool) -> None:
    assert sum(pool.map(tasks.inc, range(5000))) == sum(range(1, 5001))
    assert next(pool._wires) < 200  # type: ignore[attr-defined]  # Dask tasks used: far fewer than inputs


@pytest.mark.parametrize("how,signal_code,exit_code", [("kill", "SIGKILL", None), ("segv", "SIGSEGV", None),
                                                      ("exit", None, 13)])
def test_a_crash_fails_its_task_only_and_the_dask_worker_lives(pool: Pool, how: str, signal_code: str | None,
                                                               exit_code: int | None) -> None:
    others = [pool.submit(tasks.sleep_then, 0.01, i) for i in range(6)]
    with pytest.raises(WorkerCrashed) as info:
        pool.submit(tasks.die, how).result(timeout=30)
    assert (info.value.signal_code, info.value.exit_code) == (signal_code, exit_code)
    assert [f.result(timeout=30) for f in others] == list(range(6))


def test_map_with_a_per_item_timeout_batches_and_times_each_item(pool: Pool) -> None:
    """Chunks of items with a timeout: one Dask task each, yet each item timed (and failed) alone."""
    results = list(pool.options(timeout=2).stream(functools.partial(tasks.hang_if, bad=7), range(40), ordered=True))
    assert [r.value for r in results if r.ok] == [i for i in range(40) if i != 7]
    assert isinstance(results[7].error, TaskTimeout)
    assert next(pool._wires) < 40  # type: ignore[attr-defined]  # fewer Dask tasks than items


def test_a_task_past_its_timeout_is_stopped(pool: Pool) -> None:
    started = time.monotonic()
    with pytest.raises(TaskTimeout):
        pool.options(timeout=0.5).submit(tasks.sleep_then, 30).result(timeout=30)
    assert time.monotonic() - started < 20
    assert pool.submit(tasks.inc, 1).result(timeout=30) == 2


def test_unpicklable_result_and_exceptions(pool: Pool) -> None:
    with pytest.raises(forkio.SerializationError, match="cannot send the task's result back"):
        pool.submit(tasks.return_unpicklable).result(timeout=30)
    with pytest.raises(RemoteError) as info:
        pool.submit(tasks.fail_with_http_error).result(timeout=30)
    assert info.value.type_name == "urllib.error.HTTPError" and "fail_with_http_error" in info.value.traceback
    with pytest.raises(RemoteError) as info:
        pool.submit(tasks.fail_unpicklably, "locked").result(timeout=30)
    assert "Unpicklable" in info.value.type_name
    with pytest.raises(KeyError) as raised:
        pool.submit(tasks.fail, "nope").result(timeout=30)
    assert "raise KeyError" in str(raised.value.__cause__)


def test_unpicklable_argument_fails_that_task_only(pool: Pool) -> None:
    bad = pool.submit(tasks.inc, threading.Lock())
    good = pool.submit(tasks.inc, 1)
    with pytest.raises(forkio.SerializationError, match="cannot send task"):
        bad.result(timeout=30)
    assert good.result(timeout=30) == 2


def test_retries_run_a_crashed_task_again(pool: Pool, tmp_path: Path) -> None:
    counter = str(tmp_path / "count")
    assert pool.options(retries=2).submit(tasks.flaky, counter, 2).result(timeout=30) == "ok after 2 failures"
    with pytest.raises(WorkerCrashed):  # and none unless asked
        pool.submit(tasks.flaky, str(tmp_path / "other"), 1).result(timeout=30)


def test_progress_and_messages_arrive_while_the_task_runs(pool: Pool, tmp_path: Path) -> None:
    flag = tmp_path / "arrived"
    messages: list[Any] = []
    progress: list[tuple[float, float | None]] = []

    def on_message(message: Any) -> None:
        messages.append(message)
        flag.touch()

    view = pool.options(on_message=on_message, on_progress=lambda done, total: progress.append((done, total)))
    assert view.submit(dask_tasks.report_and_wait, str(flag)).result(timeout=30) == "message arrived while running"
    assert messages == [{"hello": "from the task"}] and progress == [(1, 2)]


def test_cancel_stops_a_running_task(pool: Pool, tmp_path: Path) -> None:
    mark = tmp_path / "pid"
    future = pool.submit(tasks.mark_then_hang, str(mark))
    child = psutil.Process(_wait_for_pid(mark))
    assert future.cancel() and future.cancelled()
    child.wait(10)  # the forkio child running it is stopped (raises TimeoutExpired otherwise)
    assert pool.submit(tasks.inc, 1).result(timeout=30) == 2


@pytest.mark.filterwarnings("ignore:Sending large graph")  # Dask's advice to scatter: shown below
def test_numpy_arrays_in_and_out(pool: Pool, client: Any) -> None:
    np = pytest.importorskip("numpy")
    big = np.arange(2_000_000, dtype=np.float64)
    total, _ = pool.submit(tasks.array_sum, big).result(timeout=30)
    assert total == float(big.sum())
    scattered = client.scatter(big)  # as with Dask: once on the cluster, then passed by reference
    assert pool.submit(tasks.array_sum, scattered).result(timeout=30)[0] == float(big.sum())
    del scattered
    back = pool.submit(tasks.make_array, 1_000_000).result(timeout=30)
    assert isinstance(back, np.ndarray) and back[-1] == 999_999


def test_stats_names_the_dask_worker(pool: Pool) -> None:
    list(pool.map(tasks.inc, range(20), chunksize=1))
    rows = pool.stats()
    assert rows and all(row["dask_worker"].startswith("tcp://") and row["pid"] for row in rows)


def test_shutdown_cancel_futures_cancels_queued_and_finishes_running(client: Any, tmp_path: Path) -> None:
    pool = Pool(cluster=client)
    marks = [tmp_path / f"m{i}" for i in range(2)]
    running = [pool.submit(tasks.mark_then_sleep, str(m), 1.0, i) for i, m in enumerate(marks)]
    for m in marks:
        _wait_for_pid(m)
    queued = [pool.submit(tasks.sleep_then, 5, i) for i in range(6)]
    pool.shutdown(cancel_futures=True)
    assert [f.result(timeout=30) for f in running] == [0, 1]
    assert all(f.cancelled() for f in queued)
    with pytest.raises(forkio.PoolClosed):
        pool.submit(tasks.inc, 1)
    assert all(not children for children in client.run(_forkio_children).values())
    _assert_dask_threads_free(client)


def test_terminate_stops_what_runs_and_leaves_nothing(client: Any, tmp_path: Path) -> None:
    pool = Pool(cluster=client)
    mark = tmp_path / "pid"
    future = pool.submit(tasks.mark_then_hang, str(mark))
    _wait_for_pid(mark)
    pool.terminate()
    assert future.cancelled()
    assert all(not children for children in client.run(_forkio_children).values())
    _assert_dask_threads_free(client)


def _kill_the_dask_worker_of(client: Any, mark: Path) -> None:
    """SIGKILL the Dask worker whose forkio child wrote its pid to ``mark`` (the child's ancestor)."""
    ancestors = {p.pid for p in psutil.Process(_wait_for_pid(mark)).parents()}
    (victim,) = set(_worker_pids(client).values()) & ancestors
    os.kill(victim, signal.SIGKILL)


def test_a_lost_dask_worker_fails_only_its_task_with_a_typed_error(pool: Pool, client: Any, tmp_path: Path) -> None:
    pool._lost_on_purpose = True  # type: ignore[attr-defined]
    doomed = pool.submit(dask_tasks.hang_first_time, str(tmp_path / "doomed"))
    _wait_for_pid(tmp_path / "doomed")
    bystander = pool.submit(tasks.mark_then_sleep, str(tmp_path / "bystander"), 1.5, "bystander")
    try:
        _wait_for_pid(tmp_path / "bystander")  # running on the other Dask worker
        _kill_the_dask_worker_of(client, tmp_path / "doomed")
        with pytest.raises(forkio.WorkerLost) as info:
            doomed.result(timeout=30)
        assert isinstance(info.value, WorkerCrashed) and info.value.address.startswith("tcp://")
        assert bystander.result(timeout=30) == "bystander"
        # With retries, the task runs again (on the other worker, or on the one the nanny restarts).
        retried = pool.options(retries=1).submit(dask_tasks.hang_first_time, str(tmp_path / "retried"))
        _kill_the_dask_worker_of(client, tmp_path / "retried")
        assert retried.result(timeout=30) == "second attempt"
    finally:
        client.wait_for_workers(2, timeout=30)
        client.keep_worker_pids()  # the nannies started new ones: those live on for the module


def test_cli_map_on_the_cluster(client: Any) -> None:
    cli_tasks = Path(__file__).parent / "cli_tasks.py"
    proc = subprocess.run([sys.executable, "-m", "forkio", "map", f"{cli_tasks}:shout", "a", "boom", "die", "hang",
                           "b", "--cluster", client.scheduler.address, "--ordered", "--timeout", "2"],
                          capture_output=True, text=True, timeout=60)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 1, proc.stderr
    assert [line.split('"ok": ')[1][:4] for line in lines] == ["true", "fals", "fals", "fals", "true"]
    assert '"kind": "exception"' in lines[1] and '"kind": "crashed"' in lines[2] and '"kind": "timeout"' in lines[3]
    assert '"result": "B"' in lines[4]


def test_a_pool_never_shut_down_lets_its_forkio_children_go_at_exit(client: Any) -> None:
    code = ("import forkio, pool_tasks\n"
            f"pool = forkio.Pool(cluster={client.scheduler.address!r})\n"
            "print(pool.submit(pool_tasks.inc, 1).result(timeout=30))\n")  # and exit without shutdown()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "2", out.stderr
    assert all(not children for children in client.run(_forkio_children).values())
    _assert_dask_threads_free(client)


def test_without_cluster_nothing_of_dask_is_imported() -> None:
    code = ("import sys, forkio, pool_tasks\n"
            "with forkio.Pool(1) as p: assert p.submit(pool_tasks.inc, 1).result() == 2\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_cluster_without_distributed_says_what_to_install() -> None:
    code = ("import sys; sys.modules['distributed'] = None\n"
            "import forkio\n"
            "try:\n    forkio.Pool(cluster='tcp://127.0.0.1:1')\n"
            "except ImportError as e:\n    print(type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "DaskNotInstalled Pool(cluster=...) needs Dask distributed: " \
                                 "pip install 'forkio[dask]'", out.stderr


@pytest.mark.parametrize("args,without_dask,message", [
    (["-j", "2"], False, "-j/--workers does not go with --cluster"),
    ([], True, "needs Dask distributed: pip install 'forkio[dask]'"),
])
def test_cli_cluster_usage_errors_are_one_line(args: list[str], without_dask: bool, message: str) -> None:
    cli_tasks = Path(__file__).parent / "cli_tasks.py"
    # Without Dask: distributed cannot be imported (a None entry in sys.modules).
    code = ("import sys; sys.modules['distributed'] = None\n" if without_dask else "") + \
        "import sys; from forkio.__main__ import main; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-c", code, "map", f"{cli_tasks}:shout", "a",
                           "--cluster", "tcp://127.0.0.1:1", *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, \
        proc.stderr


LOCAL_ONLY = {"workers", "max_workers", "max_tasks_per_child", "mp_context"}  # a Dask pool refuses them anyway


@pytest.mark.parametrize("kwargs,error", [(k, e) for k, e in BAD_OPTIONS if not LOCAL_ONLY & k.keys()])
def test_bad_options_are_refused_as_the_local_pool_refuses_them(kwargs: dict[str, Any], error: type[Exception]) -> None:
    """The local pool's checks, at the call: before connecting (nothing listens at this address)."""
    with pytest.raises(error):
        Pool(cluster="tcp://127.0.0.1:1", **kwargs)
