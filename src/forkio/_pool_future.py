"""What a pool's caller gets back: ``TaskFuture`` and the errors a task or the pool can raise.

``forkio._pool`` re-exports every name here, so pickles and code that name them there still work.
"""

from __future__ import annotations

import pickle
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import BrokenExecutor, Future, InvalidStateError
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, LOGGER, PENDING
from typing import TYPE_CHECKING, Any

from ._errors import ForkioError

if TYPE_CHECKING:
    from ._pool import Pool
    from ._pool_sched import Task


class PoolClosed(ForkioError, RuntimeError):
    """The pool is shut down and takes no more tasks."""


class BrokenPool(PoolClosed, BrokenExecutor):
    """The pool cannot start workers any more (a failing initializer, workers that die while
    starting): pending and later tasks fail with this error, which says why; its ``__cause__``
    is the original error. A ``concurrent.futures.BrokenExecutor``, as ``BrokenProcessPool`` is."""


class RemoteError(ForkioError):
    """A task raised an exception that could not be sent back as itself; carries its traceback text."""

    def __init__(self, type_name: str, message: str, traceback_text: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.traceback = traceback_text


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker, attached as ``__cause__``."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text}"""'


class _FutureCondition(threading.Condition):
    """``threading.Condition()`` (over an RLock, as every ``Future``'s), built for a future a task.

    The standard one binds five of its lock's methods to itself as it is made: that doubles the
    cost of a ``Future`` and makes five more objects for the cyclic GC to walk while the task is
    pending. Here the class reaches the lock instead; what the condition does is unchanged.
    """

    def __init__(self) -> None:  # deliberately not Condition.__init__ (see the class)
        self._lock = threading.RLock()
        self._waiters: deque[Any] = deque()

    def __enter__(self) -> bool:
        return self._lock.__enter__()

    def __exit__(self, *args: Any) -> None:
        self._lock.__exit__(*args)

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def _release_save(self) -> Any:
        return self._lock._release_save()  # type: ignore[attr-defined]

    def _acquire_restore(self, state: Any) -> None:
        self._lock._acquire_restore(state)  # type: ignore[attr-defined]

    def _is_owned(self) -> bool:
        return bool(self._lock._is_owned())  # type: ignore[attr-defined]


# What Future.__init__ sets (the same from 3.10 to 3.13). TaskFuture sets its state itself where
# this Python's Future agrees; elsewhere it leaves that to Future.__init__.
_FUTURE_FIELDS = {"_condition", "_state", "_result", "_exception", "_waiters", "_done_callbacks"}
_FAST_FUTURE = set(vars(Future())) == _FUTURE_FIELDS and hasattr(threading.RLock(), "_release_save")
_DONE = frozenset({CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED})
_CONDITIONS_MADE = threading.Lock()  # a future's condition is made once, and set_result sees it


class TaskFuture(Future[Any]):
    """A ``Future`` whose ``cancel()`` also stops a task that is already running.

    ``running()`` is True while a worker runs the task (from the moment it starts it until its
    result is in); the future stays cancellable then, which stops that worker.
    """

    # A pending task's future is, for the cyclic GC, one object: its condition (with its deque)
    # and its two lists are made when first used, by whoever waits or adds a callback, and most
    # tiny tasks finish before anyone does. A result set before that needs no condition to
    # notify: _CONDITIONS_MADE orders the two, so a waiter either finds the result or is notified.
    _cond: threading.Condition | None = None
    _waiters_list: list[Any] | None = None
    _callbacks_list: list[Callable[[Future[Any]], object]] | None = None

    def __init__(self, pool: Pool, task: Task) -> None:
        if _FAST_FUTURE:
            # Future.__init__, less its cost: one per submit(), on the caller's hot path.
            self._state = PENDING
            self._result = None
            self._exception = None
        else:
            super().__init__()
        self._pool: Pool | None = pool
        self._task: Task | None = task

    @property
    def _condition(self) -> threading.Condition:
        cond = self._cond
        if cond is None:
            with _CONDITIONS_MADE:
                cond = self._cond
                if cond is None:
                    cond = self._cond = _FutureCondition()
        return cond

    @_condition.setter
    def _condition(self, cond: threading.Condition) -> None:
        self._cond = cond

    @property
    def _waiters(self) -> list[Any]:
        # Used under the condition only (by wait(), as_completed() and set_result()).
        waiters = self._waiters_list
        if waiters is None:
            waiters = self._waiters_list = []
        return waiters

    @_waiters.setter
    def _waiters(self, waiters: list[Any]) -> None:
        self._waiters_list = waiters

    @property
    def _done_callbacks(self) -> list[Callable[[Future[Any]], object]]:
        callbacks = self._callbacks_list
        if callbacks is None:
            callbacks = self._callbacks_list = []
        return callbacks

    @_done_callbacks.setter
    def _done_callbacks(self, callbacks: list[Callable[[Future[Any]], object]]) -> None:
        self._callbacks_list = callbacks

    def _settle_unwatched(self, result: Any, exception: BaseException | None) -> bool:
        """Finish a future nobody has waited on yet, without making its condition; False if
        someone has (then the standard way notifies them)."""
        if self._cond is not None:
            return False
        with _CONDITIONS_MADE:
            if self._cond is not None:
                return False
            if self._state != PENDING:  # finished already (cancelling would have made the condition)
                finished = True
            else:
                finished = False
                self._result = result
                self._exception = exception
                self._state = FINISHED
        if finished:
            raise InvalidStateError(f"{self._state}: {self!r}")
        return True

    def set_result(self, result: Any) -> None:
        if not self._settle_unwatched(result, None):
            super().set_result(result)

    def set_exception(self, exception: BaseException | None) -> None:
        if not self._settle_unwatched(None, exception):
            super().set_exception(exception)

    def done(self) -> bool:
        return self._state in _DONE  # one attribute read: the lock Future takes adds nothing to it

    def result(self, timeout: float | None = None) -> Any:
        if self._state == FINISHED:  # final, so read without the condition (which it may not have)
            if self._exception is not None:
                try:
                    raise self._exception
                finally:
                    self = None  # type: ignore[assignment]  # as Future does: no cycle through the frame
            return self._result
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state == FINISHED:
            return self._exception
        return super().exception(timeout)

    def running(self) -> bool:
        task, pool = self._task, self._pool
        if task is None or pool is None or self.done():
            return False
        return pool._started(task)

    def _invoke_callbacks(self) -> None:
        # Callbacks run in the pool's thread: one that raises anything, SystemExit included,
        # is logged (as concurrent.futures logs an Exception) and must not stop the pool.
        for callback in self._callbacks_list or ():
            try:
                callback(self)
            except BaseException:
                LOGGER.exception("exception calling callback for %r", self)

    def cancel(self) -> bool:
        # Futures stay PENDING while their task runs, so the standard cancel() succeeds;
        # then the pool stops the worker running it, if any.
        task = self._task
        if not super().cancel():
            return False
        pool = self._pool
        if task is not None and pool is not None:
            task.cancelled = True  # seen by the manager without taking the future's lock
            pool._post(("cancel", task))
        return True


def _decode_error(payload: bytes) -> BaseException:
    """A task's exception as its own type, or as ``RemoteError`` if it will not unpickle here."""
    exc_bytes, name, message, tb_text = pickle.loads(payload)
    try:
        exc = pickle.loads(exc_bytes) if exc_bytes is not None else None
    except BaseException:  # e.g. urllib's HTTPError pickles, but does not unpickle
        exc = None
    if not isinstance(exc, BaseException):
        return RemoteError(name, message, tb_text)
    exc.__cause__ = RemoteTraceback(tb_text)
    return exc
