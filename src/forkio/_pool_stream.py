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
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sized
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


def run_chunk(fn: Callable[..., Any], items: list[Any], star: bool) -> tuple[list[Any], dict[int, bytes], float]:
    """In a worker: run ``fn`` on each item; each item's exception is caught on its own.

    Returns the values (None where an item failed), the failures by position, and the time taken.
    """
    from ._pool_worker import encode_error

    started = time.perf_counter()
    errors: dict[int, bytes] = {}
    if star:
        values = []
        for pos, item in enumerate(items):
            try:
                values.append(fn(*item))
            except Exception as exc:
                values.append(None)
                errors[pos] = encode_error(exc)
    else:
        try:
            values = [fn(item) for item in items]  # the fast path: nothing fails
        except Exception:
            values = []
            for pos, item in enumerate(items):
                try:
                    values.append(fn(item))
                except Exception as exc:
                    values.append(None)
                    errors[pos] = encode_error(exc)
    return values, errors, time.perf_counter() - started


class _Chunk:
    """Consecutive inputs run as one task; complete once every item has a value or an error."""

    __slots__ = ("errors", "items", "missing", "seq", "start", "values")

    def __init__(self, seq: int, start: int, items: list[Any]) -> None:
        self.seq = seq
        self.start = start  # input index of items[0]
        self.items = items
        self.values: list[Any] = []
        self.errors: dict[int, BaseException] = {}
        self.missing = len(items)

    def results(self) -> Iterator[TaskResult]:
        errors = self.errors
        for pos, (item, value) in enumerate(zip(self.items, self.values, strict=True)):
            yield TaskResult(self.start + pos, item, value, errors.get(pos))

    def raise_or_values(self) -> list[Any]:
        """The values, raising the first item's error instead if there is one."""
        if self.errors:
            raise self.errors[min(self.errors)]
        return self.values


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
        self.total = _length(iterable)
        self.items = iter(iterable)
        self.taken = 0  # inputs read so far
        self.exhausted = False
        # Each future is a whole chunk (position None) or one item of a chunk being retried alone.
        self.in_flight: dict[Future[Any], tuple[_Chunk, int | None]] = {}
        self.per_item: float | None = None
        self.window = options.pool.workers * CHUNKS_IN_FLIGHT_PER_WORKER
        self.chunks = 0
        self.ready: dict[int, _Chunk] = {}
        self.next_seq = 0
        self.on_done: Callable[[Future[Any]], None] = lambda future: None

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
        self.on_done = on_done
        while len(self.in_flight) < self.window and not self.exhausted:
            items = list(itertools.islice(self.items, self._chunk_size()))
            if not items:
                self.exhausted = True
                return
            chunk = _Chunk(self.chunks, self.taken, items)
            self.chunks += 1
            self.taken += len(items)
            self._submit(chunk, None, items)

    def _submit(self, chunk: _Chunk, pos: int | None, items: list[Any]) -> None:
        future = self.options._submit_raw(run_chunk, (self.fn, items, self.star))
        self.in_flight[future] = (chunk, pos)
        future.add_done_callback(self.on_done)

    @property
    def finished(self) -> bool:
        return self.exhausted and not self.in_flight

    def complete(self, future: Future[Any]) -> list[_Chunk]:
        """A task finished: the chunks now complete, in the order they may be handed out."""
        chunk, pos = self.in_flight.pop(future)
        error = future.exception()
        if error is None:
            values, errors, seconds = future.result()
            per_item = seconds / len(values)
            self.per_item = per_item if self.per_item is None else 0.7 * self.per_item + 0.3 * per_item
            from ._pool import _decode_error

            decoded = {p: _decode_error(e) for p, e in errors.items()}
            if pos is None:
                chunk.values, chunk.missing = values, 0
                chunk.errors.update(decoded)
            else:
                chunk.values[pos] = values[0]
                if 0 in decoded:
                    chunk.errors[pos] = decoded[0]
                chunk.missing -= 1
        elif pos is None and len(chunk.items) > 1 and isinstance(error, WorkerCrashed | TaskTimeout):
            chunk.values = [None] * len(chunk.items)  # find the one item at fault: each alone
            for p, item in enumerate(chunk.items):
                self._submit(chunk, p, [item])
            return []
        else:
            if pos is None:
                chunk.values = [None] * len(chunk.items)
                chunk.errors.update(dict.fromkeys(range(len(chunk.items)), error))
                chunk.missing = 0
            else:
                chunk.errors[pos] = error
                chunk.missing -= 1
        if chunk.missing:
            return []
        if not self.ordered:
            return [chunk]
        self.ready[chunk.seq] = chunk
        released = []
        while self.next_seq in self.ready:
            released.append(self.ready.pop(self.next_seq))
            self.next_seq += 1
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
        bar = ProgressBar(_length(iterable)) if progress else None
        try:
            for chunk in self._chunks(fn, iterable, ordered=ordered, chunksize=chunksize, star=star,
                                      deadline=deadline):
                for result in chunk.results():
                    if bar is not None:
                        bar.update(1, failed=not result.ok)
                    yield result
        finally:
            if bar is not None:
                bar.close()

    def _chunks(self, fn: Callable[..., Any], iterable: Iterable[Any], *, ordered: bool, chunksize: int | None,
                star: bool, deadline: float | None) -> Iterator[_Chunk]:
        state = _Stream(self, fn, iterable, star=star, ordered=ordered, chunksize=chunksize)
        done: queue.SimpleQueue[Future[Any]] = queue.SimpleQueue()
        try:
            while True:
                state.fill(done.put)
                if state.finished:
                    return
                try:
                    finished = done.get(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    raise WaitTimeout("results not ready before the deadline") from None
                yield from state.complete(finished)
        finally:
            state.cancel()

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int | None = None, progress: bool = False) -> Iterator[Any]:
        """Results in input order; raises the first failed item's error when it is reached."""
        deadline = None if timeout is None else time.monotonic() + timeout
        star = len(iterables) > 1
        inputs = zip(*iterables, strict=False) if star else iterables[0]
        if progress:
            return (r.result() for r in self.stream(fn, inputs, ordered=True, chunksize=chunksize, progress=True,
                                                    star=star, deadline=deadline))
        return _values(self._chunks(fn, inputs, ordered=True, chunksize=chunksize, star=star, deadline=deadline))

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
                for chunk in state.complete(await done.get()):
                    for result in chunk.results():
                        yield result
        finally:
            state.cancel()


def _values(chunks: Iterator[_Chunk]) -> Iterator[Any]:
    """Whole chunks' values in order (no per-item objects); closing it cancels what is in flight."""
    try:
        for chunk in chunks:
            yield from chunk.raise_or_values()
    finally:
        chunks.close()  # type: ignore[attr-defined]


def _length(iterable: Iterable[Any]) -> int | None:
    """How many inputs there are, when the input knows (for chunk sizes and the progress bar)."""
    return len(iterable) if isinstance(iterable, Sized) else None
