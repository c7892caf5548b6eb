"""Per-task options and streaming over a ``Pool``: ``options()``, ``map``, ``stream``, asyncio faces.

Streams cut their input into chunks (one task each), sized from how long items take, so that
tiny functions are not drowned in per-task overhead while slow ones still spread over every
worker. Input is read lazily with a bounded number of chunks in flight. A chunk that fails as
a whole (its worker crashed or it timed out) is split and its items retried one by one, so
only the item at fault fails.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._errors import TaskTimeout, WaitTimeout, WorkerCrashed
from ._progress import ProgressBar

if TYPE_CHECKING:
    from ._pool import Pool, TaskFuture

TARGET_CHUNK_SECONDS = 0.005
MAX_CHUNK = 8192
CHUNKS_IN_FLIGHT_PER_WORKER = 3


@dataclass
class TaskResult:
    """The outcome of one input in ``Pool.stream``: its index, the input, and a value or an error."""

    index: int
    input: Any
    value: Any = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def result(self) -> Any:
        """The value, or raise the error."""
        if self.error is not None:
            raise self.error
        return self.value


def run_chunk(fn: Callable[..., Any], items: list[Any], star: bool) -> tuple[list[tuple[bool, Any]], float]:
    """In a worker: run ``fn`` on each item, catching each item's exception on its own."""
    from ._pool_worker import encode_error

    started = time.perf_counter()
    out: list[tuple[bool, Any]] = []
    for item in items:
        try:
            out.append((True, fn(*item) if star else fn(item)))
        except Exception as exc:
            out.append((False, encode_error(exc)))
    return out, time.perf_counter() - started


class _Stream:
    """What the sync and asyncio streams share: chunking, splitting, ordering. No waiting."""

    def __init__(self, options: TaskOptions, fn: Callable[..., Any], iterable: Iterable[Any], *,
                 star: bool, ordered: bool, chunksize: int | None) -> None:
        self.options = options
        self.fn = fn
        self.star = star
        self.ordered = ordered
        self.fixed_chunk = chunksize
        if chunksize is not None and chunksize < 1:
            raise ValueError("chunksize must be at least 1")
        if options.timeout is not None:
            self.fixed_chunk = 1  # a per-item timeout needs one item per task
        self.total = len(iterable) if hasattr(iterable, "__len__") else None  # type: ignore[arg-type]
        self.items = enumerate(iterable)
        self.exhausted = False
        self.in_flight: dict[Future[Any], list[tuple[int, Any]]] = {}
        self.retry: list[tuple[int, Any]] = []  # items of failed chunks, to run one by one
        self.per_item: float | None = None
        self.window = options.pool.workers * CHUNKS_IN_FLIGHT_PER_WORKER
        self.ready: dict[int, TaskResult] = {}
        self.next_index = 0

    def _chunk_size(self) -> int:
        if self.fixed_chunk is not None:
            return self.fixed_chunk
        if self.per_item is None:
            return 1
        size = MAX_CHUNK if self.per_item <= 0 else int(TARGET_CHUNK_SECONDS / self.per_item)
        if self.total is not None:  # leave enough chunks to keep every worker busy to the end
            size = min(size, max(1, self.total // (self.options.pool.workers * 4)))
        return max(1, min(size, MAX_CHUNK))

    def fill(self, on_done: Callable[[Future[Any]], None]) -> None:
        """Submit chunks until the window is full or the input runs out."""
        while len(self.in_flight) < self.window:
            if self.retry:
                chunk = [self.retry.pop(0)]
            elif not self.exhausted:
                chunk = list(itertools.islice(self.items, self._chunk_size()))
                if not chunk:
                    self.exhausted = True
                    continue
            else:
                return
            future = self.options._submit_raw(run_chunk, (self.fn, [item for _, item in chunk], self.star))
            self.in_flight[future] = chunk
            future.add_done_callback(on_done)

    @property
    def finished(self) -> bool:
        return self.exhausted and not self.in_flight and not self.retry

    def complete(self, future: Future[Any]) -> list[TaskResult]:
        """A chunk finished: its results, in the order they may be handed out."""
        chunk = self.in_flight.pop(future)
        error = future.exception()
        results: list[TaskResult] = []
        if error is None:
            outcomes, seconds = future.result()
            per_item = seconds / len(chunk)
            self.per_item = per_item if self.per_item is None else 0.7 * self.per_item + 0.3 * per_item
            from ._pool import _decode_error

            for (index, item), (ok, value) in zip(chunk, outcomes, strict=True):
                results.append(TaskResult(index, item, value) if ok else TaskResult(index, item, None,
                                                                                    _decode_error(value)))
        elif len(chunk) > 1 and isinstance(error, WorkerCrashed | TaskTimeout):
            self.retry.extend(chunk)  # find the one item at fault
        else:
            results = [TaskResult(index, item, None, error) for index, item in chunk]
        if not self.ordered:
            return results
        for result in results:
            self.ready[result.index] = result
        released = []
        while self.next_index in self.ready:
            released.append(self.ready.pop(self.next_index))
            self.next_index += 1
        return released

    def cancel(self) -> None:
        for future in list(self.in_flight):
            future.cancel()


class TaskOptions:
    """A pool with per-task options; made by ``Pool.options()``. Has the pool's task methods."""

    def __init__(self, pool: Pool, timeout: float | None, retries: int,
                 on_message: Callable[[Any], None] | None) -> None:
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be positive")
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.pool = pool
        self.timeout = timeout
        self.retries = retries
        self.on_message = on_message

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskFuture:
        """``Pool.submit`` with these options."""
        return self._submit_raw(fn, args, kwargs)

    def _submit_raw(self, fn: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any] | None = None) -> TaskFuture:
        return self.pool._submit(fn, args, kwargs or {}, self.timeout, self.retries, self.on_message)

    async def run(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """asyncio: await the task; cancelling the await stops it (its worker is replaced)."""
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    def stream(self, fn: Callable[..., Any], iterable: Iterable[Any], *, ordered: bool = False,
               chunksize: int | None = None, progress: bool = False, star: bool = False,
               deadline: float | None = None) -> Iterator[TaskResult]:
        """One ``TaskResult`` per input, lazily; errors are returned, not raised.

        ``deadline`` (a ``time.monotonic()`` value) bounds the whole iteration: past it,
        ``WaitTimeout`` is raised and the tasks still in flight are cancelled.
        """
        state = _Stream(self, fn, iterable, star=star, ordered=ordered, chunksize=chunksize)
        done: queue.SimpleQueue[Future[Any]] = queue.SimpleQueue()
        bar = ProgressBar(state.total) if progress else None
        try:
            while True:
                state.fill(done.put)
                if state.finished:
                    return
                try:
                    finished = done.get(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    raise WaitTimeout("results not ready before the deadline") from None
                for result in state.complete(finished):
                    if bar is not None:
                        bar.update(1, failed=not result.ok)
                    yield result
        finally:
            state.cancel()
            if bar is not None:
                bar.close()

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int | None = None, progress: bool = False) -> Iterator[Any]:
        """Results in input order; raises the first failed item's error when it is reached."""
        deadline = None if timeout is None else time.monotonic() + timeout
        inputs = zip(*iterables, strict=False) if len(iterables) > 1 else iterables[0]
        results = self.stream(fn, inputs, ordered=True, chunksize=chunksize, progress=progress,
                              star=len(iterables) > 1, deadline=deadline)
        return (r.result() for r in results)

    def imap_unordered(self, fn: Callable[..., Any], iterable: Iterable[Any], *,
                       chunksize: int | None = None, progress: bool = False) -> Iterator[Any]:
        """Results as they complete; raises at the first failed item."""
        return (r.result() for r in self.stream(fn, iterable, chunksize=chunksize, progress=progress))

    async def astream(self, fn: Callable[..., Any], iterable: Iterable[Any], *, ordered: bool = False,
                      chunksize: int | None = None) -> AsyncIterator[TaskResult]:
        """asyncio ``stream``: ``async for result in pool.astream(fn, items)``."""
        state = _Stream(self, fn, iterable, star=False, ordered=ordered, chunksize=chunksize)
        loop = asyncio.get_running_loop()
        done: asyncio.Queue[Future[Any]] = asyncio.Queue()

        def on_done(future: Future[Any]) -> None:
            loop.call_soon_threadsafe(done.put_nowait, future)

        try:
            while True:
                state.fill(on_done)
                if state.finished:
                    return
                for result in state.complete(await done.get()):
                    yield result
        finally:
            state.cancel()

