"""The pool's decisions, as a pure state machine: no processes, no sockets, no clocks.

The pool's I/O thread reports what happened (a task was submitted, a worker became ready,
results arrived, a worker died, time passed, a task was cancelled), then asks
``dispatch`` what to send, and carries out the actions returned. Every rule about which
task goes where, what a death means, when a task has timed out, when to retry and when
to recycle a worker lives here, and is tested without starting a process.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# How long a batch sent to one worker should keep it busy: long enough to amortise the
# round trip, short enough that the last tasks still spread over every worker.
TARGET_BATCH_SECONDS = 0.002
MAX_BATCH = 512
# A batch's payloads together stay under this, so that one frame never nears the worker's
# frame limit however many big tasks are queued (a task alone may still be bigger).
MAX_BATCH_BYTES = 64 * 1024 * 1024
# Workers that die before they are ready, this many in a row, mean they cannot start at all
# (an initializer or an import that crashes): the pool breaks instead of respawning forever.
CRASH_LOOP_LIMIT = 3
# Back-off between attempts to start a worker after a failure: doubling from the first to the last.
RESPAWN_DELAY = 0.05
RESPAWN_DELAY_MAX = 2.0
# How long transient spawn failures (EAGAIN, EMFILE...) may go on, with no worker alive, before
# the pool gives up and breaks: long enough for a passing shortage, not forever.
SPAWN_GIVE_UP = 60.0


@dataclass(eq=False, slots=True)
class Task:
    """One call to run. ``payload`` is the pickled ``(fn, args, kwargs)``."""

    id: int
    payload: bytes
    timeout: float | None = None
    retries: int = 0
    on_message: Callable[[Any], None] | None = None
    future: Any = None
    attempts: int = 0  # how many times it started running in a worker that then died
    cancelled: bool = False
    deadline: float | None = None
    buffers: list[Any] | None = None  # big argument buffers, sent apart through shared memory


@dataclass(eq=False)
class Worker:
    """The scheduler's view of one worker process."""

    id: int
    ready: bool = False  # takes tasks now (False again once its channel is found closed)
    started: bool = False  # it was ready once: a death after that is not a failure to start
    assigned: deque[Task] = field(default_factory=deque)
    tasks_done: int = 0
    consumed: int = 0  # tasks it has taken off its queue, as far as we know (results + skips)
    failures: int = 0
    retiring: bool = False
    stopping: str | None = None  # why we are killing it: "timeout" or "cancel"
    rss: int | None = None
    pid: int | None = None


# ---- actions: what the I/O layer must do ------------------------------------------------
@dataclass
class Dispatch:
    worker: Worker
    tasks: list[Task]


@dataclass
class Resolve:
    task: Task
    ok: bool
    value: Any  # the result, or the exception to raise in the caller


@dataclass
class Kill:
    worker: Worker


@dataclass
class Retire:
    worker: Worker  # ask it to exit once it is idle


@dataclass
class Spawn:
    count: int


@dataclass
class SkipTask:
    worker: Worker
    task: Task


@dataclass
class Break:
    reason: Any  # a Failure (workers die while starting) or the exception that stops every start


Action = Dispatch | Resolve | Kill | Retire | Spawn | SkipTask | Break


class Failure:
    """Why a task failed without an exception of its own: built into errors by the I/O layer."""

    def __init__(self, kind: str, worker: Worker | None, detail: Any = None, task: Task | None = None) -> None:
        self.kind = kind  # "crashed", "timeout", "broken" (no worker left to retry it) or "start" (crash loop)
        self.worker = worker
        self.detail = detail
        self.task = task  # the task the worker had started when it died (its error says so)


class Scheduler:
    """Assigns tasks to workers and decides what every event means."""

    def __init__(self, size: int, *, max_tasks_per_worker: int | None = None,
                 max_memory_per_worker: int | None = None) -> None:
        self.size = size
        self.max_tasks = max_tasks_per_worker
        self.max_memory = max_memory_per_worker
        self.queue: deque[Task] = deque()
        self.workers: dict[int, Worker] = {}
        self.avg_seconds: float | None = None  # moving average of a task's run time
        self.closing = False
        self.broken = False  # no worker will ever start again: what cannot run now fails
        self.start_failures = 0  # workers in a row that died before they were ready
        self.spawn_failures = 0  # attempts in a row to start one that failed (EAGAIN...)
        self.failing_since: float | None = None  # when the current run of spawn failures began
        self.owed = 0  # workers to start once ``spawn_at`` comes (back-off after a failure)
        self.spawn_at: float | None = None

    # ---- events ---------------------------------------------------------------------------
    def add_worker(self, worker: Worker) -> None:
        self.workers[worker.id] = worker

    def submit(self, task: Task) -> None:
        self.queue.append(task)

    def worker_ready(self, worker: Worker) -> None:
        worker.ready = worker.started = True
        self.start_failures = 0

    def spawned(self) -> None:
        """A worker process was started (it is not ready yet)."""
        self.spawn_failures = 0
        self.failing_since = None

    def spawn_failed(self, error: BaseException, now: float, *, transient: bool) -> list[Action]:
        """Starting a worker failed. A passing shortage (``transient``) is retried with back-off;
        anything else, or a shortage that outlasts ``SPAWN_GIVE_UP`` with no worker left, breaks."""
        self.spawn_failures += 1
        if self.failing_since is None:
            self.failing_since = now
        alive = any(w.started for w in self.workers.values())
        if not transient or (not alive and now - self.failing_since > SPAWN_GIVE_UP):
            return [Break(error)]
        return self._respawn_later(now, self.spawn_failures)

    def _respawn_later(self, now: float, failures: int) -> list[Action]:
        if self.broken:
            return []
        if failures <= 0:
            return [Spawn(1)]
        self.owed += 1
        delay = min(RESPAWN_DELAY * 2 ** (failures - 1), RESPAWN_DELAY_MAX)
        if self.spawn_at is None or now + delay < self.spawn_at:
            self.spawn_at = now + delay
        return []

    def task_finished(self, worker: Worker, task_id: int, ok: bool, value: Any, seconds: float) -> list[Action]:
        actions: list[Action] = []
        assigned = worker.assigned
        if assigned and assigned[0].id == task_id:  # the usual case, first
            task = assigned.popleft()
            worker.consumed += 1
        else:
            taken = self._take(worker, task_id)
            if taken is None:
                return actions  # a result for a task we already gave up on
            task = taken
        worker.tasks_done += 1
        if not ok:
            worker.failures += 1
        self.avg_seconds = seconds if self.avg_seconds is None else 0.8 * self.avg_seconds + 0.2 * seconds
        if not task.cancelled:
            actions.append(Resolve(task, ok, value))
        if not worker.retiring and self._worn_out(worker):
            worker.retiring = True
        if worker.retiring:
            actions.extend(self._retire_if_done(worker))
        return actions

    def task_skipped(self, worker: Worker, task_id: int) -> list[Action]:
        """The worker skipped a task cancelled before it started: it has nothing more in hand for it."""
        if self._take(worker, task_id) is None:
            return []
        return self._retire_if_done(worker)

    def unsent(self, worker: Worker, task: Task, error: BaseException) -> list[Action]:
        """A task dispatched to ``worker`` could not be written to it (no shared memory for its
        buffers, no fd): it never reached the worker, so it fails alone and the worker goes on."""
        try:
            worker.assigned.remove(task)
        except ValueError:
            return []
        if task.deadline is not None:
            task.deadline = None
        return [] if task.cancelled else [Resolve(task, False, error)]

    def unreadable(self, worker: Worker, received: int, error: BaseException) -> list[Action]:
        """``worker`` could not take in a tasks frame after ``received`` tasks in all: the first task
        of that frame fails with ``error`` (a frame that cannot be read in one worker will not be in
        the next: it would go round the workers forever). The worker exits; its death requeues the
        rest."""
        at = received - worker.consumed  # its results and skips took the first ``consumed`` off
        if not 0 <= at < len(worker.assigned):
            return []
        return self.unsent(worker, worker.assigned[at], error)

    def _take(self, worker: Worker, task_id: int) -> Task | None:
        """Take ``task_id`` off the front of what ``worker`` has in hand, with the cancelled tasks
        it skipped before it (their skips may arrive after a result, from older workers)."""
        assigned = worker.assigned
        while assigned and assigned[0].id != task_id and assigned[0].cancelled:
            assigned.popleft()  # the worker skipped it: cancelled before it started
            worker.consumed += 1
        if not assigned or assigned[0].id != task_id:
            return None
        worker.consumed += 1
        return assigned.popleft()

    def _retire_if_done(self, worker: Worker) -> list[Action]:
        if worker.retiring and not worker.assigned and worker.id in self.workers:
            del self.workers[worker.id]
            return [Retire(worker), Spawn(1)]
        return []

    def memory_report(self, worker: Worker, rss: int | None) -> None:
        worker.rss = rss

    def worker_died(self, worker: Worker, failure: Failure, started: int | None = None,
                    now: float = 0.0) -> list[Action]:
        """A worker exited: fail or retry the task it was running, requeue the rest, replace it.

        ``started`` is how many tasks the worker had begun in all (it counts them in shared
        memory as it goes), which says exactly which one was running, even when the results
        of the ones before it died unsent. Those ran, but their results are lost: they run
        again. Without the count, the first unanswered task is taken as the one running.
        A task's retries count the runs it started, not the times it was sent.
        """
        actions: list[Action] = []
        self.workers.pop(worker.id, None)
        assigned = list(worker.assigned)
        worker.assigned.clear()
        running_at = 0 if started is None else started - worker.consumed - 1
        if 0 <= running_at < len(assigned):
            running = assigned.pop(running_at)
            running.attempts += 1
            if worker.stopping == "timeout":
                failure = Failure("timeout", worker, running.timeout)
            elif failure.kind in ("crashed", "start"):
                # It died in this task (its arguments' unpickling included), ready or not: say so.
                failure = Failure("crashed", worker, failure.detail, running)
            if running.cancelled:
                pass
            elif running.attempts > running.retries:
                actions.append(Resolve(running, False, failure))
            elif self.broken:  # it may run again, but no worker will ever start to run it
                actions.append(Resolve(running, False, Failure("broken", worker, failure)))
            else:
                self.queue.appendleft(running)
        rest = [t for t in assigned if not t.cancelled]
        if self.broken:
            actions.extend(Resolve(t, False, Failure("broken", worker)) for t in rest)
            return actions
        # The others never started, or finished with their results lost: back to the front, in order.
        self.queue.extendleft(reversed(rest))
        if self.closing and not self.queue:
            return actions
        if not worker.started:
            # It died before it was ready: a start that crashes. Retry (later, and later), but a
            # few in a row mean no worker can start: break, saying why, rather than loop forever.
            self.start_failures += 1
            if self.start_failures >= CRASH_LOOP_LIMIT:
                return [*actions, Break(failure)]
            return actions + self._respawn_later(now, self.start_failures)
        actions.append(Spawn(1))
        return actions

    def break_pool(self) -> list[Action]:
        """No worker can start any more: fail what waits in the queue, let idle workers go.
        Busy workers finish what they hold; a task whose worker dies after this fails."""
        self.broken = True
        self.closing = True
        self.owed = 0
        self.spawn_at = None
        actions: list[Action] = [Resolve(t, False, Failure("broken", None)) for t in self.queue if not t.cancelled]
        self.queue.clear()
        return actions + self._retire_idle()

    def terminate(self) -> None:
        """Every worker is being killed and every task cancelled: nothing queued, held or owed."""
        self.closing = True
        self.owed = 0
        self.spawn_at = None
        self.queue.clear()
        for worker in self.workers.values():
            worker.assigned.clear()

    def cancel(self, task: Task, started: Callable[[Worker], int | None] | None = None) -> list[Action]:
        """The caller cancelled ``task`` (``task.cancelled`` is set): drop it if queued, skip it if
        sent, stop it if running, and leave it be if it already ran (its result is dropped).

        ``started(worker)`` is how many tasks the worker has begun (its shared counter), which
        tells the running one; without it, the first unanswered task is taken as running.
        """
        if task in self.queue:
            self.queue.remove(task)
            return []
        for worker in self.workers.values():
            if task in worker.assigned:
                index = worker.assigned.index(task)
                count = started(worker) if started is not None else None
                running_at = 0 if count is None else count - worker.consumed - 1
                if index < running_at:
                    return []  # finished, its result on the way: nothing to stop
                if index == running_at:
                    if worker.stopping is None:
                        worker.stopping = "cancel"
                        return [Kill(worker)]
                    return []
                return [SkipTask(worker, task)]
        return []

    def tick(self, now: float) -> list[Action]:
        """Time passed: stop the workers whose running task is past its deadline, start the
        workers whose back-off is over."""
        actions: list[Action] = []
        if self.spawn_at is not None and now >= self.spawn_at:
            actions.append(Spawn(self.owed))
            self.owed = 0
            self.spawn_at = None
        for worker in self.workers.values():
            if worker.assigned and worker.stopping is None:
                head = worker.assigned[0]
                if head.deadline is not None and now >= head.deadline:
                    worker.stopping = "timeout"
                    actions.append(Kill(worker))
        return actions

    def next_deadline(self) -> float | None:
        deadlines = [w.assigned[0].deadline for w in self.workers.values()
                     if w.assigned and w.assigned[0].deadline is not None and w.stopping is None]
        if self.spawn_at is not None:
            deadlines.append(self.spawn_at)
        return min(deadlines) if deadlines else None

    def close(self) -> list[Action]:
        """No more submissions: retire workers as they go idle."""
        self.closing = True
        return self._retire_idle()

    @property
    def busy(self) -> bool:
        return bool(self.queue) or any(w.assigned for w in self.workers.values()) or self.owed > 0

    # ---- policy ---------------------------------------------------------------------------
    def _worn_out(self, worker: Worker) -> bool:
        if self.max_tasks is not None and worker.tasks_done + len(worker.assigned) >= self.max_tasks:
            return True
        return self.max_memory is not None and worker.rss is not None and worker.rss > self.max_memory

    def _batch_size(self) -> int:
        """How many tasks to hand one worker at once, from how long tasks have been taking."""
        if self.avg_seconds is None:
            return 1
        wanted = MAX_BATCH if self.avg_seconds <= 0 else int(TARGET_BATCH_SECONDS / self.avg_seconds)
        # Split what is queued and in hand evenly over every worker, counting those still
        # starting, so the first worker up does not take everything and none idles at the tail.
        alive = [w for w in self.workers.values() if not w.retiring]
        in_hand = sum(len(w.assigned) for w in alive)
        fair_share = math.ceil((len(self.queue) + in_hand) / (min(len(alive), self.size) or 1))
        return max(1, min(wanted, MAX_BATCH, fair_share))

    def dispatch(self, now: float) -> list[Action]:
        """Hand queued tasks to workers with room. Called once per round of events, so that a
        burst of submissions or results becomes one batch per worker, not one message per task."""
        actions: list[Action] = []
        if not self.queue:
            return actions + self._retire_idle() if self.closing else actions
        batch_size = self._batch_size()
        usable = [w for w in self.workers.values() if w.ready and not w.retiring and not w.stopping]
        # Only the oldest ``size`` take work: any beyond are spares, ready to stand in the moment
        # one of those dies or is being stopped.
        for worker in usable[:self.size]:
            if not self.queue:
                break
            room = batch_size - len(worker.assigned)
            if self.max_tasks is not None:
                room = min(room, self.max_tasks - worker.tasks_done - len(worker.assigned))
            sent: list[Task] = []
            size = 0
            while room > 0 and self.queue:
                task = self.queue[0]
                if task.timeout is not None and (worker.assigned or sent):
                    break  # a task with a deadline runs alone, so its clock starts when it starts
                size += len(task.payload)
                if size > MAX_BATCH_BYTES and sent:
                    break
                self.queue.popleft()
                if task.timeout is not None:
                    task.deadline = now + task.timeout
                sent.append(task)
                room -= 1
                if task.timeout is not None:
                    break
            if sent:
                worker.assigned.extend(sent)
                actions.append(Dispatch(worker, sent))
        if self.closing:
            actions.extend(self._retire_idle())
        return actions

    def _retire_idle(self) -> list[Action]:
        if self.queue:
            return []
        idle = [w for w in self.workers.values() if not w.assigned]
        for worker in idle:
            del self.workers[worker.id]
        return [Retire(w) for w in idle]
