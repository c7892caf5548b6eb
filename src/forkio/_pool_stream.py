"""Per-task options and streaming over a ``Pool``: ``options()``, ``map``, ``stream``, asyncio faces.

Streams cut their input into chunks (one task each), sized from how long items take (or, for
an input with a length, dispatched whole when the stream is made, from a fixed schedule), so
that tiny functions are not drowned in per-task overhead while slow ones still spread over
every worker. The sync faces start the work when called, as ``Executor.map`` does; any input
without a length is read a bounded number of chunks ahead. A chunk that fails as
a whole (its worker crashed or it timed out) is split and its items retried one by one, so
only the item at fault fails.

An input that is not a sequence (a generator, a file, a pipe) is read by a thread of its own,
so that what was already read is dispatched, and its results delivered, while the input waits
for more. An input that raises is treated as ended there: every item read before the error
runs and its result is delivered, then the input's error is raised.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sized
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._check import check_count, check_timeout
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
    An item that raises ``SystemExit`` or ``KeyboardInterrupt`` fails alone, as it would as a
    task of its own; each item runs exactly once.
    """
    from ._pool_worker import encode_error

    started = time.perf_counter()
    errors: dict[int, bytes] = {}
    values: list[Any] = []
    remaining = iter(items)
    while True:
        # extend() keeps what it got before an item raised, and the shared iterator resumes
        # after that item: a failure costs one exception, never a rerun of the items before it.
        try:
            values.extend(itertools.starmap(fn, remaining) if star else map(fn, remaining))
        except BaseException as exc:
            errors[len(values)] = encode_error(exc)
            values.append(None)
            continue
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

    # Both hand-outs pop what they yield, so that nothing here keeps a result the consumer has
    # dropped alive (CPython bpo-14406): a generator suspended at ``yield x`` would hold ``x``.
    def results(self) -> Iterator[TaskResult]:
        items, values, errors = self.items, self.values, self.errors
        items.reverse()
        values.reverse()
        for pos in range(len(values)):
            yield TaskResult(self.start + pos, items.pop(), values.pop(), errors.pop(pos, None))

    def take_values(self) -> tuple[Iterator[Any], BaseException | None]:
        """The values in order up to the first failed item, and that item's error (or None)."""
        values, errors = self.values, self.errors
        first = min(errors) if errors else None
        values.reverse()  # popped one by one, in C: no frame of ours holds a value handed out
        return map(values.pop, itertools.repeat(-1, len(values) if first is None else first)), (
            None if first is None else errors[first])


class _Sequence:
    """Inputs that know their length (lists, ranges...): read where the chunks are cut."""

    def __init__(self, iterable: Iterable[Any]) -> None:
        self._items = iter(iterable)
        self.exhausted = False
        self.error: BaseException | None = None

    def take(self, n: int, partial: bool) -> list[Any]:
        items: list[Any] = []
        try:
            items.extend(itertools.islice(self._items, n))  # keeps what was read before an error
        except Exception as exc:  # an input that fails midway ends there (see the module docstring)
            self.error = exc
        if len(items) < n:
            self.exhausted = True
        return items

    def close(self) -> None:
        pass


class _ReadAhead:
    """Any other input (generators, files, pipes): read by a thread, a bounded distance ahead.

    ``wake`` is called (from the reading thread) once items the consumer waits for have
    arrived, and when the input ends. Items pass through a deque without a lock (one thread
    appends, one pops); the lock is only for the rare moments one side waits for the other.
    """

    def __init__(self, iterable: Iterable[Any], wake: Callable[[], None]) -> None:
        self._buffer: deque[Any] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._limit = 1  # read ahead until the buffer holds this many
        self._want = 0  # the consumer waits until the buffer holds this many (0: it is not waiting)
        self._attention = 1  # the reader looks up at this many: min(limit, want); 0 once stopped
        self._space_wanted = False  # the reader waits for the consumer to take some
        self._ended = False
        self._stopped = False
        self.error: BaseException | None = None
        self._wake = wake
        threading.Thread(target=self._read, args=(iter(iterable),), name="forkio-stream-input",
                         daemon=True).start()

    def _read(self, items: Iterator[Any]) -> None:
        buffer = self._buffer
        append = buffer.append
        try:
            for item in items:
                append(item)
                if len(buffer) >= self._attention and not self._attend():
                    return
        except BaseException as exc:  # raised to the consumer once the items before it are done
            self.error = exc
        with self._cond:
            self._ended = True
            if self._stopped:
                return
        self._wake()

    def _attend(self) -> bool:
        """A threshold is reached: wake the consumer, wait for room; False once stopped."""
        buffer, cond = self._buffer, self._cond
        with cond:
            wanted = 0 < self._want <= len(buffer)
            if wanted:
                self._want = 0
        if wanted:
            # Before waiting for room (the consumer may be what frees it), and without the lock:
            # before the consumer iterates, the wake takes items itself (see _Stream).
            self._wake()
        with cond:
            # Flag first, then look: a consumer that took items before seeing the flag has
            # made the room this check sees (see take()).
            while not self._stopped:
                self._space_wanted = True
                if len(buffer) < self._limit:
                    break
                cond.wait()
            self._space_wanted = False
            self._attention = 0 if self._stopped else min(self._limit, self._want or self._limit)
            return not self._stopped

    def set_limit(self, limit: int) -> None:
        if limit != self._limit:
            with self._cond:
                self._limit = limit
                self._attention = 0 if self._stopped else min(limit, self._want or limit)
                self._cond.notify()

    @property
    def exhausted(self) -> bool:
        return self._ended and not self._buffer

    def take(self, n: int, partial: bool) -> list[Any]:
        """Up to ``n`` items: ``n`` if read already; fewer with ``partial`` or at the end; else none
        (and the consumer is woken when there are)."""
        buffer = self._buffer
        while True:
            if len(buffer) >= n or (buffer and (partial or self._ended)):
                items = list(map(deque.popleft, itertools.repeat(buffer, min(n, len(buffer)))))
                if self._space_wanted:
                    with self._cond:
                        self._cond.notify()
                return items
            with self._cond:
                if self._ended:
                    if not buffer:
                        return []
                    continue
                want = 1 if partial else n
                if len(buffer) >= want:
                    continue  # arrived meanwhile
                self._want = want
                self._attention = min(self._limit, want)
                return []

    def close(self) -> None:
        with self._cond:
            self._stopped = True
            self._attention = 0
            self._buffer.clear()
            self._cond.notify()


class _Stream:
    """What the sync and asyncio streams share: chunking, splitting, ordering. No waiting.

    ``notify`` receives each finished task's future, and None when more input has been read.

    With ``eager`` (the sync faces), work starts when the stream is made, as ``Executor.map``'s
    does: an input that knows its length is dispatched whole at once (so ``shutdown()`` waits
    for all of it, iterated or not); any other input is dispatched as the reading thread reads
    it, up to one window of chunks, until the consumer takes over (``drive``). Nothing started
    is cancelled unless the consumer, having started, stops early.
    """

    def __init__(self, options: TaskOptions, fn: Callable[..., Any], iterable: Iterable[Any], *,
                 star: bool, ordered: bool, chunksize: int | None, notify: Callable[[Future[Any] | None], None],
                 total: int | None = None, eager: bool = False) -> None:
        self.options = options
        self.fn = fn
        self.star = star
        self.ordered = ordered
        self.fixed_chunk = None if chunksize is None else check_count("chunksize", chunksize, 1)
        if options.timeout is not None and not getattr(options.pool, "times_chunk_items", False):
            self.fixed_chunk = 1  # a per-item timeout needs one item per task (a Dask pool splits chunks itself)
        self.total = _length(iterable) if total is None else total
        self.on_done: Callable[[Future[Any]], None] = notify
        # Until the consumer drives, the reading thread fills (under the lock) as it reads.
        self.driven = not eager
        self.lock = threading.Lock()
        # Set once the reading thread has dispatched what it may before the consumer comes (a
        # window, or the whole input if shorter): shutdown(wait=True) waits for that, as it waits
        # for what was submitted.
        self.settled = threading.Event()
        self.input: _Sequence | _ReadAhead
        if self.total is not None or not eager:
            self.settled.set()
        if self.total is not None:
            self.input = _Sequence(iterable)
        else:
            # The reading thread holds the stream weakly: a stream dropped unread is let go, and
            # its reader stopped, while what it started runs on; until its first window is
            # dispatched, the pool holds it (see settle()).
            ref = weakref.ref(self)
            self.input = _ReadAhead(iterable, lambda: _input_read(ref, notify))
            weakref.finalize(self, self.input.close)
        self.taken = 0  # inputs read so far
        # Each future is a whole chunk (position None) or one item of a chunk being retried alone.
        self.in_flight: dict[Future[Any], tuple[_Chunk, int | None]] = {}
        self.per_item: float | None = None
        # A known-length input is dispatched whole (chunk sizes below); any other, a window ahead.
        self.window = sys.maxsize if self.total is not None else options.pool.workers * CHUNKS_IN_FLIGHT_PER_WORKER
        self.chunks = 0
        self.ready: dict[int, _Chunk] = {}
        self.next_seq = 0
        if eager:
            if not self.settled.is_set():
                options.pool._streams.add(self)
            try:
                with self.lock:
                    self.prefill()
            except BaseException:
                self.cancel()
                raise

    def prefill(self) -> None:
        """Before the consumer comes (under ``lock``): dispatch what has been read."""
        try:
            self.fill()
        finally:
            if self.input.exhausted or len(self.in_flight) + len(self.ready) >= self.window:
                self.settle()

    def drive(self) -> None:
        """The consumer starts iterating: from now on it alone fills the stream."""
        with self.lock:  # waits for a fill under way in the reading thread
            self.driven = True
        self.settle()

    def settle(self) -> None:
        """What may be dispatched before the consumer comes has been: let go of the pool."""
        self.settled.set()
        self.options.pool._streams.discard(self)

    def _chunk_size(self) -> int:
        if self.fixed_chunk is not None:
            return self.fixed_chunk
        workers = self.options.pool.workers
        if self.total is not None:
            # Dispatched whole before any item is timed: chunks of one size, four per worker
            # (fewer items each when tiny items would make them huge). Equal chunks, because the
            # pool may hand queued tasks out by count, half to each worker, before it knows how
            # long they take: unequal ones would leave one worker with most of the items.
            return max(1, min(MAX_CHUNK, self.total // (workers * 4)))
        if self.per_item is None:
            return 1
        size = MAX_CHUNK if self.per_item <= 0 else int(TARGET_CHUNK_SECONDS / self.per_item)
        return max(1, min(size, MAX_CHUNK))

    def fill(self) -> None:
        """Submit chunks until the window is full or no more input is ready."""
        source = self.input
        workers = self.options.pool.workers
        # Chunks finished but held for order count too: a slow first chunk must not let the
        # others pile up (and the input be read) without bound.
        while len(self.in_flight) + len(self.ready) < self.window:
            size = self._chunk_size()
            if isinstance(source, _ReadAhead):
                source.set_limit(size * self.window)
            # A short chunk goes out only while a worker would otherwise idle: a slow input
            # must not hold back what has been read, a fast one still fills whole chunks.
            items = source.take(size, partial=len(self.in_flight) < workers)
            if not items:
                return
            chunk = _Chunk(self.chunks, self.taken, items)
            self.chunks += 1
            self.taken += len(items)
            self._submit(chunk, None, items)

    def _submit(self, chunk: _Chunk, pos: int | None, items: list[Any]) -> None:
        future = self.options._submit_raw(run_chunk, (self.fn, items, self.star))
        self.in_flight[future] = (chunk, pos)
        future.add_done_callback(self.on_done)

    def finished(self) -> bool:
        """Every input was read and every result handed out: raise the input's error, if any."""
        if not (self.input.exhausted and not self.in_flight):
            return False
        error = self.input.error
        if error is not None:
            self.input.error = None
            raise error
        return True

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
        self.settle()
        self.input.close()
        for future in list(self.in_flight):
            future.cancel()


def _quietly(notify: Callable[[Future[Any] | None], None], item: None) -> None:
    try:
        notify(item)
    except RuntimeError:  # an asyncio stream whose loop has closed: nobody is waiting any more
        pass


def _input_read(ref: weakref.ref[_Stream], notify: Callable[[Future[Any] | None], None]) -> None:
    """In the reading thread: items arrived (or the input ended). Before the consumer iterates,
    dispatch them here; after, tell the consumer."""
    state = ref()
    if state is not None and not state.driven:
        with state.lock:
            if not state.driven:
                try:
                    state.prefill()
                except Exception:  # (the pool shut down): the consumer, if it comes, meets it in fill()
                    state.settle()
                return
    _quietly(notify, None)


class TaskOptions:
    """A pool with per-task options; made by ``Pool.options()``. Has the pool's task methods."""

    def __init__(self, pool: Pool, timeout: float | None, retries: int,
                 on_message: Callable[[Any], None] | None) -> None:
        self.pool = pool
        self.timeout = check_timeout("timeout", timeout)
        self.retries = check_count("retries", retries, 0)
        if on_message is not None and not callable(on_message):
            raise TypeError(f"on_message must be callable, not {type(on_message).__name__}")
        self.on_message = on_message

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskFuture:
        """``Pool.submit`` with these options."""
        return self.pool._submit(fn, args, kwargs, self.timeout, self.retries, self.on_message)

    def _submit_raw(self, fn: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any] | None = None) -> TaskFuture:
        return self.pool._submit(fn, args, kwargs or {}, self.timeout, self.retries, self.on_message)

    async def run(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """asyncio: await the task; cancelling the await stops it (its worker is replaced)."""
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    def stream(self, fn: Callable[..., Any], iterable: Iterable[Any], *, ordered: bool = False,
               chunksize: int | None = None, progress: bool = False, star: bool = False,
               deadline: float | None = None) -> Iterator[TaskResult]:
        """One ``TaskResult`` per input, lazily; the items' errors are returned, not raised.

        If the input itself raises, the results of every item read before that are yielded
        first, then the input's error is raised. ``deadline`` (a ``time.monotonic()`` value)
        bounds the whole iteration: past it, ``WaitTimeout`` is raised and the tasks still in
        flight are cancelled.
        """
        return self._stream(fn, iterable, ordered=ordered, chunksize=chunksize, progress=progress, star=star,
                            deadline=deadline, total=_length(iterable))

    def _stream(self, fn: Callable[..., Any], iterable: Iterable[Any], *, ordered: bool, chunksize: int | None,
                progress: bool, star: bool, deadline: float | None, total: int | None) -> Iterator[TaskResult]:
        return _results(self._chunks(fn, iterable, ordered=ordered, chunksize=chunksize, star=star,
                                     deadline=deadline, total=total), progress, total)

    def _chunks(self, fn: Callable[..., Any], iterable: Iterable[Any], *, ordered: bool, chunksize: int | None,
                star: bool, deadline: float | None, total: int | None = None) -> Iterator[_Chunk]:
        """Start the work now (as ``Executor.map`` does); the chunks, as they complete, once iterated."""
        done: queue.SimpleQueue[Future[Any] | None] = queue.SimpleQueue()
        state = _Stream(self, fn, iterable, star=star, ordered=ordered, chunksize=chunksize, notify=done.put,
                        total=total, eager=True)
        return _drive(state, done, deadline)

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int | None = None, progress: bool = False) -> Iterator[Any]:
        """Results in input order; raises the first failed item's error when it is reached.

        The work starts now, as with ``Executor.map``: an input with a length is dispatched whole
        (``shutdown()`` waits for it, iterated or not); any other is read and dispatched a
        bounded window ahead (only that window runs if the iterator is never iterated). Closing
        the iterator midway cancels what is still pending. If an input raises, the results of
        the items read before that come first, then its error.
        """
        if not iterables:
            raise TypeError("map() needs at least one iterable")
        timeout = check_timeout("timeout", timeout, positive=False)  # 0 or less: only what is ready
        deadline = None if timeout is None else time.monotonic() + timeout
        star = len(iterables) > 1
        inputs = zip(*iterables, strict=False) if star else iterables[0]
        lengths = [_length(iterable) for iterable in iterables]
        total = None if None in lengths else min(lengths)  # type: ignore[type-var]
        if progress:
            return map(TaskResult.result, self._stream(fn, inputs, ordered=True, chunksize=chunksize, progress=True,
                                                       star=star, deadline=deadline, total=total))
        return _values(self._chunks(fn, inputs, ordered=True, chunksize=chunksize, star=star, deadline=deadline,
                                    total=total))

    def imap_unordered(self, fn: Callable[..., Any], iterable: Iterable[Any], *,
                       chunksize: int | None = None, progress: bool = False) -> Iterator[Any]:
        """Results as they complete; raises at the first failed item."""
        return map(TaskResult.result, self.stream(fn, iterable, chunksize=chunksize, progress=progress))

    async def astream(self, fn: Callable[..., Any], iterable: Iterable[Any], *, ordered: bool = False,
                      chunksize: int | None = None) -> AsyncIterator[TaskResult]:
        """asyncio ``stream``: ``async for result in pool.astream(fn, items)``."""
        loop = asyncio.get_running_loop()
        done: asyncio.Queue[Future[Any] | None] = asyncio.Queue()

        def notify(future: Future[Any] | None) -> None:
            loop.call_soon_threadsafe(done.put_nowait, future)

        state = _Stream(self, fn, iterable, star=False, ordered=ordered, chunksize=chunksize, notify=notify)
        try:
            while True:
                state.fill()
                if state.finished():
                    return
                finished = await done.get()
                if finished is None:
                    continue
                chunks = state.complete(finished)
                del finished
                for chunk in chunks:
                    for result in chunk.results():
                        yield result
                        del result
        finally:
            state.cancel()


def _drive(state: _Stream, done: queue.SimpleQueue[Future[Any] | None], deadline: float | None) -> Iterator[_Chunk]:
    """The sync consumer: complete chunks in the order they may be handed out. Closing it once
    started (or dropping it) cancels what is in flight; one never started cancels nothing."""
    state.drive()
    try:
        while True:
            state.fill()
            if state.finished():
                return
            try:
                finished = done.get(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise WaitTimeout("results not ready before the deadline") from None
            if finished is None:
                continue  # more input was read
            chunks = state.complete(finished)
            del finished  # its result holds the values being handed out
            yield from chunks
    finally:
        state.cancel()


def _results(chunks: Iterator[_Chunk], progress: bool, total: int | None) -> Iterator[TaskResult]:
    """One ``TaskResult`` per input of the chunks, with a progress bar (out of ``total``) if asked."""
    bar = ProgressBar(total) if progress else None

    def counted(result: TaskResult) -> TaskResult:
        bar.update(1, failed=not result.ok)  # type: ignore[union-attr]
        return result

    try:
        for chunk in chunks:
            # map(), not a loop variable: this frame must not hold the result it yielded.
            yield from (chunk.results() if bar is None else map(counted, chunk.results()))
    finally:
        chunks.close()  # type: ignore[attr-defined]
        if bar is not None:
            bar.close()


def _values(chunks: Iterator[_Chunk]) -> Iterator[Any]:
    """Whole chunks' values in order (no per-item objects); closing it cancels what is in flight."""
    try:
        for chunk in chunks:
            values, error = chunk.take_values()
            yield from values
            if error is not None:
                raise error
    finally:
        chunks.close()  # type: ignore[attr-defined]


def _length(iterable: Iterable[Any]) -> int | None:
    """How many inputs there are, when the input knows (for chunk sizes and the progress bar)."""
    return len(iterable) if isinstance(iterable, Sized) else None
