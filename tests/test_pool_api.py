"""The pool's public face: option checks, ProcessPoolExecutor names, map/stream promises,
multiprocessing objects in workers."""

from __future__ import annotations

import gc
import math
import multiprocessing
import operator
import pickle
import subprocess
import sys
import textwrap
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import forkio
import pool_api_tasks as tasks
from forkio import Pool, SerializationError, TaskResult
from forkio._pool_stream import run_chunk
from helpers import wait_until


@pytest.fixture
def pool() -> Iterator[Pool]:
    with Pool(2) as p:
        yield p


# ---- item: an item that exits or raises KeyboardInterrupt fails alone -------------------------------
@pytest.mark.parametrize("how", ["raise", "exit", "keyboard"])
def test_an_item_that_exits_fails_alone_in_its_chunk(pool: Pool, how: str) -> None:
    """sys.exit() or KeyboardInterrupt in one item of a chunk fails that item, as an exception does."""
    results = list(pool.options().stream(tasks.misbehave_on, [(i, how) for i in range(40)], star=True,
                                         ordered=True, chunksize=10))
    failed = {r.index: type(r.error) for r in results if not r.ok}
    expected = {"raise": KeyError, "exit": SystemExit, "keyboard": KeyboardInterrupt}[how]
    assert failed == {13: expected}
    assert [r.value for r in results if r.ok] == [i for i in range(40) if i != 13]


def test_run_chunk_runs_each_item_once_and_catches_base_exceptions() -> None:
    """In the worker: a failing item neither reruns the items before it nor stops those after it."""
    calls: list[int] = []

    def fn(x: int) -> int:
        calls.append(x)
        if x in (2, 5):
            raise SystemExit(x) if x == 2 else KeyboardInterrupt
        return x * 10

    for star in (False, True):
        calls.clear()
        values, errors, _ = run_chunk(fn, [(x,) if star else x for x in range(7)], star)
        assert calls == list(range(7))
        assert values == [0, 10, None, 30, 40, None, 60]
        assert sorted(errors) == [2, 5]


# ---- item: what was read from a slow input is dispatched at once ------------------------------------
def _held_input(release: threading.Event, held: list[bool]) -> Iterator[int]:
    """Yields 1 and 2, then waits (bounded) until the consumer has seen their results."""
    yield 1
    yield 2
    held.append(release.wait(30))  # False: nobody released us, the results never came
    yield 3


@pytest.mark.timeout(90)
@pytest.mark.parametrize("face", ["map", "stream", "astream"])
def test_items_read_run_while_the_input_waits(pool: Pool, face: str) -> None:
    """Results of inputs already read arrive while the input is still waiting for more."""
    release, held = threading.Event(), []
    seen: list[int] = []

    def take(value: int) -> None:
        seen.append(value)
        if len(seen) == 2:
            release.set()

    inputs = _held_input(release, held)
    if face == "map":
        for value in pool.map(tasks.square, inputs):
            take(value)
    elif face == "stream":
        for result in pool.stream(tasks.square, inputs, ordered=True):
            take(result.value)
    else:
        import asyncio

        async def consume() -> None:
            async for result in pool.astream(tasks.square, inputs, ordered=True):
                take(result.value)

        asyncio.run(consume())
    assert seen == [1, 4, 9]
    assert held == [True], "the results of 1 and 2 came only after the input went on"


# ---- map starts its work at call time, as Executor.map does -----------------------------------------
@pytest.mark.timeout(90)
@pytest.mark.parametrize("face", ["map", "map-dropped", "map-progress", "imap_unordered", "stream",
                                  "generator-dropped"])
def test_map_never_iterated_still_runs_every_item(tmp_path: Path, face: str) -> None:
    """Code ported from ProcessPoolExecutor calls pool.map(write_file, files) for its side effects:
    every item runs, and shutdown(wait=True) waits for it, though the result is never iterated
    (nor kept). An input without a length: its first window (here the whole input) likewise."""
    paths = [str(tmp_path / f"{i}.out") for i in range(5 if face == "generator-dropped" else 200)]
    pool = Pool(2)  # (a window of 2 workers x 3 chunks)
    if face == "map-dropped":
        pool.map(tasks.touch, paths)
        gc.collect()
    elif face == "generator-dropped":
        pool.map(tasks.touch, (p for p in paths))  # then shutdown() at once: it waits for the reader
    else:
        kept = {"map": lambda: pool.map(tasks.touch, paths),
                "map-progress": lambda: pool.map(tasks.touch, paths, progress=True),
                "imap_unordered": lambda: pool.imap_unordered(tasks.touch, paths),
                "stream": lambda: pool.stream(tasks.touch, paths)}[face]()
    pool.shutdown(wait=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(Path(p).name for p in paths)
    if not face.endswith("dropped"):
        assert len(list(kept)) == 200  # and the results are there to iterate after the shutdown


def _await_files(paths: list[str]) -> bool:
    """Whether every path exists within 30 s (the workers make them)."""
    import os

    return wait_until(lambda: all(os.path.exists(p) for p in paths), 30)


@pytest.mark.timeout(90)
def test_map_over_a_generator_starts_at_call_time_and_a_dropped_one_lets_go(tmp_path: Path) -> None:
    """An input without a length is read and dispatched from the call on (a bounded window ahead);
    a map dropped unread keeps running what it started, stops reading, and holds neither its
    reading thread nor the pool."""
    pool = Pool(2)
    pool_ref = weakref.ref(pool)
    paths = [str(tmp_path / f"{i}.out") for i in range(3)]
    results = pool.map(tasks.touch, (p for p in paths))
    assert _await_files(paths), "nothing ran before the map was iterated"
    assert list(results) == paths

    read: list[int] = []

    def endless() -> Iterator[str]:
        i = 0
        while True:
            read.append(i)
            yield str(tmp_path / f"endless-{i}.out")
            i += 1

    pool.map(tasks.touch, endless())  # dropped at once
    gc.collect()
    assert _await_files([str(tmp_path / "endless-0.out")])
    for thread in threading.enumerate():
        if thread.name == "forkio-stream-input":
            thread.join(30)
            assert not thread.is_alive(), "a dropped map's reading thread is still waiting"
    assert len(read) < 10_000  # a bounded distance ahead, not the whole endless input
    pool.shutdown(wait=True)
    del pool, results
    gc.collect()
    assert pool_ref() is None, "something still holds the pool"


def test_a_map_closed_midway_cancels_what_it_started(tmp_path: Path) -> None:
    """As with Executor.map: a consumer that stops early (closes the iterator) cancels the rest."""
    with Pool(1) as pool:
        results = pool.map(tasks.touch, [str(tmp_path / f"{i}.out") for i in range(400)], chunksize=1)
        next(results)
        results.close()  # type: ignore[attr-defined]
    assert len(list(tmp_path.iterdir())) < 400


# ---- issue 10 item: an input that raises midway ------------------------------------------------------
def _failing_input(n: int) -> Iterator[int]:
    yield from range(n)
    raise LookupError("the input broke")


class _BrokenSequence:
    """Knows its length (read inline, not by a thread), but breaks while iterated."""

    def __len__(self) -> int:
        return 10

    def __iter__(self) -> Iterator[int]:
        return _failing_input(5)


@pytest.mark.parametrize("make", [lambda: _failing_input(25), _BrokenSequence], ids=["generator", "sequence"])
def test_an_input_that_raises_delivers_what_was_read_first(pool: Pool, make: Any) -> None:
    """map/stream over an input that raises: every earlier item's result first, then its error."""
    n = 25 if not isinstance(make(), _BrokenSequence) else 5
    got: list[int] = []
    with pytest.raises(LookupError, match="the input broke"):
        for value in pool.map(tasks.square, make()):
            got.append(value)
    assert got == [i * i for i in range(n)]
    results: list[TaskResult] = []
    with pytest.raises(LookupError, match="the input broke"):
        for result in pool.stream(tasks.square, make(), ordered=True):
            results.append(result)
    assert [r.value for r in results] == [i * i for i in range(n)]


def test_map_yields_the_values_before_a_failed_item_of_the_same_chunk(pool: Pool) -> None:
    """map raises an item's error at its turn: the items before it in its chunk come first."""
    got: list[int] = []
    with pytest.raises(KeyError):
        for value in pool.map(tasks.misbehave_on, range(30), ["raise"] * 30, chunksize=10):
            got.append(value)
    assert got == list(range(13))


# ---- item: map does not keep the results it yielded alive (bpo-14406) -------------------------------
@pytest.mark.parametrize("face", ["map", "map-progress", "stream", "imap_unordered"])
def test_yielded_results_are_not_kept_alive(pool: Pool, face: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A consumer that drops each result gets its memory back while the iteration goes on."""
    items = range(12)
    iterator: Iterator[Any] = {
        "map": lambda: pool.map(tasks.make_marker, items, chunksize=4),
        "map-progress": lambda: pool.map(tasks.make_marker, items, chunksize=4, progress=True),
        "stream": lambda: map(operator.attrgetter("value"), pool.stream(tasks.make_marker, items, chunksize=4)),
        "imap_unordered": lambda: pool.imap_unordered(tasks.make_marker, items, chunksize=4),
    }[face]()
    kept = seen = 0
    for obj in iterator:
        seen += 1
        ref = weakref.ref(obj)
        del obj
        gc.collect()
        kept += ref() is not None
    assert (seen, kept) == (12, 0)


# ---- item: every option checked up front; inf is no limit -------------------------------------------
BAD_OPTIONS = [
    ({"workers": 2.5}, TypeError),
    ({"workers": "2"}, TypeError),
    ({"workers": True}, TypeError),
    ({"workers": 0}, ValueError),
    ({"initializer": 42}, TypeError),
    ({"initargs": 5}, TypeError),
    ({"initargs": "ab"}, TypeError),
    ({"retries": -1}, ValueError),
    ({"retries": 1.5}, TypeError),
    ({"task_timeout": 0}, ValueError),
    ({"task_timeout": -3}, ValueError),
    ({"task_timeout": math.nan}, ValueError),
    ({"task_timeout": "5"}, TypeError),
    ({"max_tasks_per_worker": 0}, ValueError),
    ({"max_memory_per_worker": 1.5}, TypeError),
    ({"spare_workers": -1}, ValueError),
    ({"preload": "json"}, TypeError),
    ({"preload": ["no such module"]}, ValueError),
    ({"workers": 2, "max_workers": 3}, TypeError),
    ({"max_tasks_per_worker": 2, "max_tasks_per_child": 3}, TypeError),
    ({"mp_context": "spawn"}, TypeError),
    ({"mp_context": multiprocessing.get_context("fork")}, ValueError),
]


@pytest.mark.parametrize("kwargs,error", BAD_OPTIONS)
def test_bad_options_are_refused_by_the_constructor(kwargs: dict[str, Any], error: type[Exception]) -> None:
    """A bad option raises at Pool(), before any worker or thread starts."""
    threads = threading.active_count()
    with pytest.raises(error):
        Pool(**kwargs)
    assert threading.active_count() == threads


@pytest.mark.parametrize("kwargs,error", [
    ({"timeout": 0}, ValueError), ({"timeout": "1"}, TypeError), ({"retries": -1}, ValueError),
    ({"retries": None}, TypeError), ({"on_message": 3}, TypeError),
])
def test_bad_task_options_are_refused(pool: Pool, kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        pool.options(**kwargs)


def test_bad_chunksize_is_refused(pool: Pool) -> None:
    with pytest.raises(ValueError):
        list(pool.map(tasks.square, range(3), chunksize=0))
    with pytest.raises(TypeError):
        list(pool.map(tasks.square, range(3), chunksize=2.5))  # type: ignore[arg-type]


@pytest.mark.parametrize("timeout", [math.inf, 1e12])
def test_an_infinite_or_huge_timeout_means_no_limit(timeout: float) -> None:
    """task_timeout=inf is no limit; a huge finite one never overflows the manager's wait."""
    with Pool(1, task_timeout=timeout) as p:
        assert p.task_timeout == (None if math.isinf(timeout) else timeout)
        assert p.submit(tasks.square, 3).result(timeout=30) == 9
        assert list(p.options(timeout=timeout).map(tasks.square, [4, 5], timeout=math.inf)) == [16, 25]
        assert repr(p).count("running") == 1


# ---- item: ProcessPoolExecutor's names ---------------------------------------------------------------
def test_process_pool_executor_names_are_accepted() -> None:
    """max_workers= and max_tasks_per_child= act as workers= and max_tasks_per_worker=."""
    with Pool(max_workers=3, max_tasks_per_child=1, mp_context=multiprocessing.get_context("spawn")) as p:
        assert p.workers == 3
        pids = [p.submit(tasks.pid_of).result(timeout=30) for _ in range(4)]
        assert len(set(pids)) == 4  # a fresh worker for every task


def test_errors_name_the_option_as_it_was_given() -> None:
    with pytest.raises(ValueError, match=r"^max_workers must be greater than 0$"):
        Pool(max_workers=0)
    with pytest.raises(ValueError, match=r"^max_tasks_per_child must be greater than 0$"):
        Pool(max_tasks_per_child=0)
    with pytest.raises(ValueError, match=r"^workers must be greater than 0$"):
        Pool(0)


def test_cloudpickle_is_suggested_only_where_it_helps(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SerializationError hint names cloudpickle for lambdas and closures, not for a lock."""
    from forkio import _pool

    monkeypatch.setattr(_pool, "_has_cloudpickle", lambda: False)

    def local() -> None:
        pass

    for fn in (lambda: None, local):
        with pytest.raises((pickle.PicklingError, AttributeError)) as info:
            pickle.dumps(fn)
        assert "cloudpickle" in _pool._cloudpickle_hint(info.value)
    with pytest.raises(TypeError) as lock_info:
        pickle.dumps(threading.Lock())
    assert _pool._cloudpickle_hint(lock_info.value) == ""


def test_an_unpicklable_argument_error_has_no_cloudpickle_hint(pool: Pool) -> None:
    with pytest.raises(SerializationError) as info:
        pool.submit(tasks.square, threading.Lock()).result(timeout=30)
    assert "cloudpickle" not in str(info.value)


# ---- item: multiprocessing objects reach the workers -------------------------------------------------
_MP_SCRIPT = """
import sys

import forkio
import pool_api_tasks as tasks


def from_main(d):  # a function of __main__, run in a worker that has imported multiprocessing
    d["main"] = 1
    return True


if __name__ == "__main__":
    assert "multiprocessing" not in sys.modules
    with forkio.Pool(1) as pool:
        assert pool.submit(tasks.square, 3).result(timeout=30) == 9  # a worker started before any Manager
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        with ctx.Manager() as manager:
            d = manager.dict()
            assert pool.submit(tasks.set_item, d, "forkio", 42).result(timeout=30) == ["forkio"]
            assert pool.submit(from_main, d).result(timeout=30)
            assert dict(d) == {"forkio": 42, "main": 1}, dict(d)
    q = ctx.Queue()
    with forkio.Pool(2, initializer=tasks.keep, initargs=(q,), max_tasks_per_worker=1) as pool:
        for i in range(4):  # respawned workers get the queue too
            assert pool.submit(tasks.put_in_kept, i).result(timeout=30)
        assert sorted(q.get(timeout=30) for _ in range(4)) == [0, 1, 2, 3]
    q.close()
    q.join_thread()
    print("all good")
"""


@pytest.mark.timeout(120)
def test_manager_proxies_and_queues_reach_workers(tmp_path: Path) -> None:
    """A Manager proxy works as a task argument and a spawn-context Queue in initargs, as with
    ProcessPoolExecutor (fork-context ones: the tests below)."""
    script = tmp_path / "mp_objects.py"
    script.write_text(textwrap.dedent(_MP_SCRIPT))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "all good"


def _can_share_fork_semaphores() -> bool:
    """Whether this process may open its fork-context semaphores for workers (root, or
    CAP_CHECKPOINT_RESTORE: the kernel's rule for /proc/self/map_files)."""
    from forkio._pool_worker import _open_semaphore

    lock = multiprocessing.get_context("fork").Lock()
    try:
        fd, _ = _open_semaphore(lock._semlock.handle)  # type: ignore[attr-defined]
    except OSError:
        return False
    import os

    os.close(fd)
    return True


@pytest.mark.skipif(not _can_share_fork_semaphores(), reason="/proc/self/map_files needs CAP_CHECKPOINT_RESTORE")
@pytest.mark.timeout(90)
def test_fork_context_queue_and_locks_in_initargs_reach_workers() -> None:
    """A plain multiprocessing Queue, Lock, Event and Semaphore (the 'fork' context, Linux's default
    before 3.14) in initargs work in the workers as with ProcessPoolExecutor: the worker's put,
    set and release reach the caller, and the caller's lock blocks the worker until released."""
    ctx = multiprocessing.get_context("fork")
    queue, lock, event, semaphore = ctx.Queue(), ctx.Lock(), ctx.Event(), ctx.Semaphore(0)
    try:
        # One task per worker: the second task's worker (a new one) gets them too.
        with Pool(1, initializer=tasks.keep, initargs=((queue, lock, event, semaphore),),
                  max_tasks_per_worker=1) as p:
            assert lock.acquire(timeout=10)
            first = p.submit(tasks.use_kept_primitives, "from a worker")
            assert queue.get(timeout=30) == "from a worker"
            assert event.wait(30)
            assert semaphore.acquire(timeout=30)
            lock.release()  # the worker waits for it, and takes it
            assert first.result(timeout=30) is True
            assert not lock.acquire(block=False)  # the worker took the very same lock
            assert p.submit(tasks.release_kept_lock).result(timeout=30) is True
            assert lock.acquire(timeout=30)  # released by the second worker
            lock.release()
    finally:
        queue.close()
        queue.join_thread()


def test_fork_context_queue_refused_clearly_where_its_semaphore_cannot_be_shared(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Where this process may not open its semaphores for the workers (not root, not Linux), a
    fork-context Queue in initargs is refused at Pool() with what to use instead, leaking no fd."""
    import os

    from forkio import _pool_worker

    def refuse(handle: int) -> tuple[int, int]:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(_pool_worker, "_open_semaphore", refuse)
    queue = multiprocessing.get_context("fork").Queue()
    reader, writer = multiprocessing.get_context("spawn").Pipe(duplex=False)
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(SerializationError) as caught:  # a pipe's fd is taken before the queue's lock fails
        Pool(1, initializer=tasks.keep, initargs=(writer, queue))
    assert len(os.listdir("/proc/self/fd")) == before
    message = str(caught.value)
    assert "'fork' context" in message and "get_context('spawn')" in message and "Manager()" in message
    assert "Operation not permitted" in message
    reader.close()
    writer.close()
    queue.close()


def test_initializer_fds_are_closed_with_the_pool() -> None:
    """The pool's copies of a queue's fds go when the pool does."""
    import os

    ctx = multiprocessing.get_context("spawn")
    reader, writer = ctx.Pipe(duplex=False)
    with Pool(1) as warm:  # what stays for good (a zygote's socket) is there before counting
        warm.submit(tasks.square, 1).result(timeout=30)
    before = len(os.listdir("/proc/self/fd"))
    with Pool(1, initializer=tasks.keep, initargs=(writer,)) as p:
        assert len(p._init_fds) == 1
        assert p.submit(tasks.square, 2).result(timeout=30) == 4
    assert len(os.listdir("/proc/self/fd")) <= before
    reader.close()
    writer.close()
    assert forkio.Pool is Pool
