"""The caller's side of the Dask backend: ``DaskPool``, a ``forkio.Pool`` whose tasks run on a Dask cluster.

Each forkio task (one ``submit``, or one chunk of ``map`` / ``stream`` inputs, chunked by the
local pool's own streaming code) is one Dask task running ``_worker.run_task``. Callers submit
to Dask directly (``client.submit`` does not wait for the scheduler); one *pump* thread per pool
does everything else, so neither the caller nor Dask's event loop ever waits on the other:

- results: finished Dask futures are gathered in bulk (one ``client.gather`` for all that are
  ready), so a busy pool pays Dask's fetch round trip per batch, not per task;
- ``progress()`` / ``report()``: Dask events (``Worker.log_event`` -> ``Client.subscribe_topic``),
  the documented, maintained way for workers to reach a client while a task runs (``Pub``/``Sub``
  is marked experimental); the pump calls the task's handler, never Dask's event loop;
- cancels: ``client.cancel`` for what Dask has not started, and ``client.run`` on every worker
  to stop a forkio task that is already running (or skip it if it arrives later);
- a lost Dask worker: the scheduler's ``remove-worker`` event names the tasks it held; each is
  failed with ``WorkerLost`` or, while its ``retries`` last, submitted again as a new Dask task
  (Dask's own re-run is cancelled: retries are forkio's to decide).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import pickle
import queue
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from distributed import Client, KilledWorker

from .._check import check_pool_options
from .._errors import SerializationError
from .._pool import Pool, PoolClosed, TaskFuture, _decode_error
from ._errors import WorkerLost
from ._worker import MESSAGES_TOPIC, ForkioPlugin, cancel_tasks, close_pool, refuse_new, run_task, stats

GATHER_EVERY = 0.005  # seconds: while results stream in, fetch them at most this often (in bulk)


class _Record:
    """One forkio task on the caller's side; ``wire`` and ``dask`` change when it is submitted again."""

    __slots__ = ("args", "dask", "fn", "future", "kwargs", "on_message", "retries", "timeout", "wire")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                 timeout: float | None, retries: int, on_message: Callable[[Any], None] | None) -> None:
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.timeout = timeout
        self.retries = retries
        self.on_message = on_message
        self.future: DaskTaskFuture | None = None
        self.wire = 0
        self.dask: Any = None  # a distributed.Future (Dask is typed only in part: Any here)


class DaskTaskFuture(TaskFuture):
    """The future of a task on a Dask cluster; ``cancel()`` also stops it where it runs."""

    def __init__(self, pool: DaskPool, record: _Record) -> None:
        Future.__init__(self)
        self._pool = pool
        self._task = None
        self._record: _Record | None = record

    def cancel(self) -> bool:
        record, pool = self._record, self._pool
        if not Future.cancel(self):
            return False
        if record is not None and pool is not None:
            pool._post(("cancel", record))
        return True


class _Hub:
    """Per Dask client: the event subscriptions every pool on it shares (Dask allows one handler a topic)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.pools: dict[str, DaskPool] = {}
        # Someone else's handler of the scheduler's "all" topic keeps receiving its events.
        previous = getattr(client, "_event_handlers", {}).get("all")
        # unsubscribe_topic() leaves the handler in place: an earlier hub's is no one's to chain to.
        self.previous = None if isinstance(getattr(previous, "__self__", None), _Hub) else previous
        client.subscribe_topic(MESSAGES_TOPIC, self._on_message)
        client.subscribe_topic("all", self._on_all)

    def _on_message(self, event: tuple[float, Any]) -> None:
        key, wire, payload = event[1]
        pool = self.pools.get(key)
        if pool is not None:
            pool._post(("message", wire, payload))

    def _on_all(self, event: tuple[float, Any]) -> Any:
        message = event[1]
        if isinstance(message, dict) and message.get("action") == "remove-worker" and not message.get("expected"):
            keys = set(message.get("processing-tasks") or ())
            for pool in list(self.pools.values()):
                pool._post(("lost", message.get("worker", "?"), keys))
        return self.previous(event) if self.previous is not None else None

    def leave(self, key: str) -> None:
        self.pools.pop(key, None)
        if self.pools:
            return
        _hubs.pop(self.client, None)
        try:
            self.client.unsubscribe_topic(MESSAGES_TOPIC)
            if self.previous is not None:
                self.client.subscribe_topic("all", self.previous)
            else:
                self.client.unsubscribe_topic("all")
        except Exception:  # the client is closing already: nothing to unsubscribe from
            pass


_hubs: weakref.WeakKeyDictionary[Any, _Hub] = weakref.WeakKeyDictionary()
_hubs_lock = threading.Lock()
_open_pools: set[DaskPool] = set()


@atexit.register
def _shut_down_open_pools() -> None:
    """At exit, as concurrent.futures does: pending tasks finish, and a pool nobody shut down still
    lets its forkio children on the Dask workers go (it runs before Dask closes its clients)."""
    for pool in list(_open_pools):
        with contextlib.suppress(Exception):
            pool.shutdown(wait=True)


class DaskPool(Pool):
    """``forkio.Pool(cluster=...)``: the pool's API and promises, with tasks run on a Dask cluster.

    ``cluster`` is a scheduler address (``"tcp://host:8786"``; the pool opens and closes its own
    client), a ``distributed.Client`` (left open), or anything ``Client()`` accepts (a
    ``LocalCluster``). The Dask workers' threads are the pool's workers; ``preload``,
    ``initializer``, ``max_tasks_per_worker``, ``max_memory_per_worker`` and ``spare_workers``
    apply to the forkio children on each Dask worker.
    """

    times_chunk_items = True  # map/stream chunks keep per-item timeouts: each item is timed on the worker

    def __init__(self, workers: int | None = None, *, cluster: Any = None, preload: tuple[str, ...] = (),
                 initializer: Callable[..., Any] | None = None, initargs: tuple[Any, ...] = (),
                 task_timeout: float | None = None, retries: int = 0,
                 max_tasks_per_worker: int | None = None, max_memory_per_worker: int | None = None,
                 spare_workers: int = 0) -> None:
        if workers is not None:
            raise ValueError("with cluster=, the Dask workers' threads are the pool's workers: leave workers out")
        # The local pools check these when they start; checked here too, so bad input fails at once.
        options = check_pool_options(
            task_timeout=task_timeout, retries=retries, spare_workers=spare_workers,
            max_tasks_per_worker=max_tasks_per_worker, max_memory_per_worker=max_memory_per_worker,
            initializer=initializer, initargs=initargs, preload=preload)
        self.task_timeout = options.task_timeout
        self.retries = options.retries
        # What each Dask worker's local pool is made with (the timeout and retries stay here).
        self._settings: dict[str, Any] = options._asdict()
        del self._settings["task_timeout"], self._settings["retries"]
        self._owns_client = not isinstance(cluster, Client)
        self.client: Any = (Client(cluster, set_as_default=False)  # type: ignore[no-untyped-call]
                            if self._owns_client else cluster)
        self.key = uuid.uuid4().hex[:12]
        self.workers = max(1, sum(self.client.nthreads().values()))
        self.restarts = 0
        self._wires = itertools.count(1)
        self._live: dict[int, _Record] = {}  # by wire id, until resolved
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._closed = False
        self._broken = None
        self._lock = threading.Lock()
        self._last_gather = 0.0
        self._streams: set[Any] = set()  # (see Pool._streams)
        self.client.register_plugin(ForkioPlugin(), name="forkio")
        with _hubs_lock:
            hub = _hubs.get(self.client)
            if hub is None:
                hub = _hubs[self.client] = _Hub(self.client)
            hub.pools[self.key] = self
        self._hub = hub
        self._manager = threading.Thread(target=self._pump, name=f"forkio-dask-{self.key}", daemon=True)
        self._manager.start()
        _open_pools.add(self)

    # ---- the caller's side ------------------------------------------------------------------
    def _submit(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                timeout: float | None, retries: int, on_message: Callable[[Any], None] | None) -> TaskFuture:
        record = _Record(fn, args, kwargs, timeout, retries, on_message)
        future = record.future = DaskTaskFuture(self, record)
        with self._lock:
            # Under the lock shutdown() takes: a task is either known before the pump is told to
            # close, and settled, or refused here. None is left behind.
            if self._closed:
                raise PoolClosed("cannot submit to a pool that is shut down")
            self._launch(record)
        return future

    def _launch(self, record: _Record) -> None:
        """Hand the task to Dask as a new Dask task (first time, or again after its worker was lost)."""
        wire = record.wire = next(self._wires)
        self._live[wire] = record
        try:
            # retries=0: Dask never re-runs a task by itself; forkio's retries happen in the local pool.
            dask = self.client.submit(run_task, self.key, self._settings, wire, record.fn, record.args,
                                      record.kwargs, record.timeout, record.retries,
                                      key=f"forkio-{self.key}-{wire}", pure=False, retries=0)
        except Exception as exc:
            self._live.pop(wire, None)
            error = SerializationError(f"cannot send task {getattr(record.fn, '__name__', record.fn)!r} "
                                       f"to the Dask cluster: {exc}")
            error.__cause__ = exc
            self._settle(record, False, error)
            return
        record.dask = dask
        dask.add_done_callback(lambda finished, record=record: self._post(("done", record, finished)))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking tasks; finish (or, with ``cancel_futures``, cancel) queued ones; stop the forkio children."""
        if wait and not cancel_futures:
            self._wait_for_streams()
        with self._lock:
            if not self._closed:
                self._closed = True
                self._post(("close", cancel_futures))
        if wait and threading.current_thread() is not self._manager:
            self._manager.join()

    def terminate(self) -> None:
        """Stop now: cancel every task, running ones included; the Dask workers' forkio children go."""
        with self._lock:
            self._closed = True
            self._post(("terminate",))
        if threading.current_thread() is not self._manager:
            self._manager.join()

    def stats(self) -> list[dict[str, Any]]:
        """Per forkio child on each Dask worker: the local pool's row, with ``dask_worker`` its address."""
        rows: list[dict[str, Any]] = []
        for address, local_rows in self.client.run(stats, self.key).items():
            rows.extend({**row, "dask_worker": address} for row in local_rows)
        return rows

    def __repr__(self) -> str:
        state = "shut down" if self._closed else "running"
        return f"<forkio.Pool cluster={self.client.scheduler.address} workers={self.workers} {state} " \
               f"in_flight={len(self._live)}>"

    def _post(self, command: tuple[Any, ...]) -> None:
        self._commands.put(command)

    # ---- the pump thread ------------------------------------------------------------------------
    def _pump(self) -> None:
        closing: bool | None = None  # None: open; False: draining; True: terminate
        try:
            while True:
                commands = self._take_commands()
                done, cancels = [], []
                for command in commands:
                    kind = command[0]
                    if kind == "done":
                        done.append((command[1], command[2]))
                    elif kind == "cancel":
                        cancels.append(command[1])
                    elif kind == "message":
                        self._deliver(command[1], command[2])
                    elif kind == "lost":
                        self._on_lost(command[1], command[2], cancels)
                    elif kind == "close":
                        closing = closing or False
                        if command[1]:
                            self._cancel_queued(cancels)
                    elif kind == "terminate":
                        closing = True
                        cancels.extend(self._live.values())
                self._cancel(cancels)
                self._finish(done)
                if closing is not None and (closing or not self._live):
                    break
        finally:
            self._closed = True
            for record in list(self._live.values()):
                self._settle(record, None, None)
            self._teardown(bool(closing))
            _open_pools.discard(self)

    def _take_commands(self) -> list[tuple[Any, ...]]:
        """What there is to do: all that is queued (results fetched, cancels sent, in bulk). While
        results keep coming, wait up to ``GATHER_EVERY`` since the last fetch, to fetch more at once:
        each fetch is a round trip through the scheduler, and plain Dask users fetch in bulk too."""
        commands = [self._commands.get()]
        until = self._last_gather + GATHER_EVERY
        while True:
            try:
                commands.append(self._commands.get_nowait())
                continue
            except queue.Empty:
                pass
            wait = until - time.monotonic()
            if wait <= 0 or not any(c[0] == "done" for c in commands):
                return commands
            try:
                commands.append(self._commands.get(timeout=wait))
            except queue.Empty:
                return commands

    def _finish(self, done: list[tuple[_Record, Any]]) -> None:
        """Dask futures that finished: fetch the results of all of them at once, settle their tasks."""
        ready: list[tuple[_Record, Any]] = []
        for record, dask in done:
            if record.dask is not dask:
                continue  # a superseded attempt (its worker was lost; it was submitted again)
            if dask.status == "finished":
                ready.append((record, dask))
            elif dask.status == "error":
                error = dask.exception()
                if isinstance(error, KilledWorker):  # Dask gave up on it before forkio heard of the loss
                    self._lost(record, str(error.last_worker.address) if error.last_worker else "?", [])
                else:
                    self._settle(record, False, error)
            else:  # cancelled in Dask: by us, or by someone else's client.cancel
                self._settle(record, None, None)
        if not ready:
            return
        self._last_gather = time.monotonic()
        try:
            outcomes = self.client.gather([dask for _, dask in ready])
        except Exception:
            outcomes = None  # one of them would not unpickle here: fetch them one by one
        for i, (record, dask) in enumerate(ready):
            if outcomes is not None:
                outcome = outcomes[i]
            else:
                try:
                    outcome = dask.result()
                except Exception as exc:
                    error = SerializationError(f"cannot unpickle the task's result in the caller: {exc!r}")
                    error.__cause__ = exc
                    self._settle(record, False, error)
                    continue
            kind = outcome[0]
            if kind == "ok":
                self._settle(record, True, outcome[1])
            elif kind == "raised":
                self._settle(record, False, _decode_error(outcome[1]))
            elif kind == "error":
                self._settle(record, False, outcome[1])
            else:
                self._settle(record, None, None)

    def _settle(self, record: _Record, ok: bool | None, value: Any) -> None:
        """Resolve the task's future (``ok=None``: cancel it) and forget the task."""
        self._live.pop(record.wire, None)
        record.dask = None
        record.args = record.kwargs = ()  # type: ignore[assignment]
        future = record.future
        if future is None:
            return
        record.future = future._record = None
        try:
            if ok is None:
                Future.cancel(future)
            elif ok:
                future.set_result(value)
            else:
                future.set_exception(value)
        except Exception:  # InvalidStateError: the caller cancelled it meanwhile
            pass

    def _deliver(self, wire: int, payload: bytes) -> None:
        record = self._live.get(wire)
        if record is None or record.on_message is None:
            return
        try:
            record.on_message(pickle.loads(payload))
        except Exception:  # a callback's bug must not stop the pool
            import traceback

            traceback.print_exc()

    def _cancel(self, records: list[_Record]) -> None:
        """Cancel in Dask what has not started; stop, on every worker, what has."""
        if not records:
            return
        wires = [r.wire for r in records]
        dasks = [r.dask for r in records if r.dask is not None]
        for record in records:
            self._settle(record, None, None)
        # In the background: a broadcast may wait (up to Dask's connect timeout) on a worker that just died.
        if dasks:
            self._background(self.client.cancel(dasks, asynchronous=True))
        self._background(self.client.run(cancel_tasks, self.key, wires, asynchronous=True))

    def _background(self, coroutine: Any) -> None:
        async def run() -> None:
            with contextlib.suppress(Exception):  # the cluster is going away: its tasks go with it
                await coroutine

        asyncio.run_coroutine_threadsafe(run(), self.client.loop.asyncio_loop)

    def _cancel_queued(self, cancels: list[_Record]) -> None:
        """``shutdown(cancel_futures=True)``: every worker refuses new tasks; what is not running is cancelled."""
        try:
            running = {wire for wires in self.client.run(refuse_new, self.key).values() for wire in wires}
        except Exception:
            running = set()
        cancels.extend(r for wire, r in self._live.items() if wire not in running)

    def _on_lost(self, address: str, keys: set[str], resubmitted: list[_Record]) -> None:
        prefix = f"forkio-{self.key}-"
        for key in keys:
            if isinstance(key, str) and key.startswith(prefix):
                record = self._live.get(int(key[len(prefix):]))
                if record is not None:
                    self._lost(record, address, resubmitted)

    def _lost(self, record: _Record, address: str, stale: list[_Record]) -> None:
        """The Dask worker holding ``record`` is gone: fail it, or submit it again while retries last."""
        old = _Record(record.fn, (), {}, None, 0, None)
        old.wire, old.dask = record.wire, record.dask
        self._live.pop(record.wire, None)
        stale.append(old)  # Dask would run it again by itself: stop that attempt
        self.restarts += 1
        if record.retries > 0 and not self._closed:
            record.retries -= 1
            self._launch(record)
        else:
            self._settle(record, False, WorkerLost(address))

    def _teardown(self, terminate: bool) -> None:
        try:
            self.client.run(close_pool, self.key, terminate)
        except Exception:  # the cluster is gone already, and its workers with it
            pass
        with _hubs_lock:
            self._hub.leave(self.key)
        if self._owns_client:
            self.client.close()
