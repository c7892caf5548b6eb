"""The pool's decisions, tested as a pure state machine: no processes involved."""

from __future__ import annotations

from forkio._pool_sched import (
    CRASH_LOOP_LIMIT,
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


def _pool(size: int = 2, *, ready: bool = True, **options: int) -> tuple[Scheduler, list[Worker]]:
    sched = Scheduler(size, **options)  # type: ignore[arg-type]
    workers = [Worker(i) for i in range(size)]
    for w in workers:
        sched.add_worker(w)
        if ready:
            sched.worker_ready(w)
    return sched, workers


def _submit(sched: Scheduler, *tasks: Task, now: float = 0.0) -> list[object]:
    for task in tasks:
        sched.submit(task)
    return sched.dispatch(now)  # type: ignore[return-value]


def test_one_task_goes_to_a_ready_worker() -> None:
    sched, (w0, _) = _pool()
    assert _submit(sched, task := Task(1, b"")) == [Dispatch(w0, [task])]


def test_a_burst_of_tasks_becomes_one_message_per_worker() -> None:
    sched, (w0, w1) = _pool()
    sched.avg_seconds = 1e-6
    actions = _submit(sched, *[Task(i, b"") for i in range(100)])
    assert [type(a) for a in actions] == [Dispatch, Dispatch]
    assert len(w0.assigned) == 50 and len(w1.assigned) == 50


def test_crash_fails_only_the_running_task_and_requeues_the_rest() -> None:
    """The first unanswered task sent to a dead worker was running; the others never started."""
    sched, (w0,) = _pool(1)
    sched.avg_seconds = 1e-5  # tiny tasks: batches of several
    tasks = [Task(i, b"") for i in range(4)]
    assert _submit(sched, *tasks) == [Dispatch(w0, tasks)]
    actions = sched.worker_died(w0, Failure("crashed", w0, -9))
    resolved = [a for a in actions if isinstance(a, Resolve)]
    assert [r.task for r in resolved] == [tasks[0]] and not resolved[0].ok
    assert list(sched.queue) == tasks[1:]
    assert Spawn(1) in actions


def test_retry_requeues_the_crashed_task_first() -> None:
    sched, (w0, w1) = _pool()
    task = Task(1, b"", retries=1)
    _submit(sched, task)
    actions = sched.worker_died(w0, Failure("crashed", w0, -9))
    assert not [a for a in actions if isinstance(a, Resolve)]
    assert sched.dispatch(1.0) == [Dispatch(w1, [task])] and task.attempts == 1
    actions = sched.worker_died(w1, Failure("crashed", w1, -9))
    assert [a.task for a in actions if isinstance(a, Resolve)] == [task]


def test_timeout_kills_the_worker_and_fails_with_timeout() -> None:
    sched, (w0, _) = _pool()
    _submit(sched, Task(1, b"", timeout=5.0), now=10.0)
    assert sched.next_deadline() == 15.0
    assert sched.tick(14.9) == []
    assert sched.tick(15.0) == [Kill(w0)]
    actions = sched.worker_died(w0, Failure("crashed", w0, -15))
    failure = next(a for a in actions if isinstance(a, Resolve)).value
    assert isinstance(failure, Failure) and failure.kind == "timeout"


def test_a_task_with_a_deadline_runs_alone() -> None:
    sched, (_, w1) = _pool()
    sched.avg_seconds = 1e-5
    timed = Task(9, b"", timeout=1.0)
    _submit(sched, *[Task(i, b"") for i in range(3)], timed)
    assert list(sched.queue) == [timed]  # both workers have plain tasks in hand: it waits
    for head in list(w1.assigned):
        sched.task_finished(w1, head.id, True, None, 1e-5)
    assert sched.dispatch(3.0) == [Dispatch(w1, [timed])] and timed.deadline == 4.0


def test_cancel_queued_running_and_sent() -> None:
    sched, (w0,) = _pool(1)
    sched.avg_seconds = 1e-5
    running, sent = Task(1, b""), Task(2, b"")
    _submit(sched, running, sent)
    assert list(w0.assigned) == [running, sent]
    sched.avg_seconds = 1.0  # slow now: nothing more is sent to a worker with tasks in hand
    queued = Task(3, b"")
    _submit(sched, queued)
    for task in (queued, sent, running):
        task.cancelled = True
    assert sched.cancel(queued) == [] and queued not in sched.queue
    assert sched.cancel(sent) == [SkipTask(w0, sent)]
    assert sched.cancel(running) == [Kill(w0)]
    actions = sched.worker_died(w0, Failure("crashed", w0, -15))
    assert not [a for a in actions if isinstance(a, Resolve)]  # cancelled tasks are not failed


def test_recycle_after_max_tasks() -> None:
    sched, (w0,) = _pool(1, max_tasks_per_worker=2)
    tasks = [Task(i, b"") for i in range(3)]
    _submit(sched, *tasks)
    assert list(w0.assigned) == [tasks[0]]
    sched.task_finished(w0, 0, True, None, 0.1)
    sched.dispatch(1.0)
    actions = sched.task_finished(w0, 1, True, None, 0.1)
    assert Retire(w0) in actions and Spawn(1) in actions
    assert list(sched.queue) == [tasks[2]]


def test_recycle_on_memory() -> None:
    sched, (w0,) = _pool(1, max_memory_per_worker=100)
    _submit(sched, Task(1, b""))
    sched.memory_report(w0, 500)
    actions = sched.task_finished(w0, 1, True, None, 0.1)
    assert Retire(w0) in actions and Spawn(1) in actions


def test_batches_split_fairly_even_while_workers_start() -> None:
    """The first worker up takes its share, not everything."""
    sched, (w0, w1) = _pool(ready=False)
    sched.avg_seconds = 1e-6
    for i in range(100):
        sched.submit(Task(i, b""))
    sched.worker_ready(w0)
    sched.dispatch(0.0)
    sched.worker_ready(w1)
    sched.dispatch(0.0)
    assert len(w0.assigned) == 50 and len(w1.assigned) == 50


def test_slow_tasks_go_one_at_a_time() -> None:
    sched, (w0, w1) = _pool()
    sched.avg_seconds = 0.5
    _submit(sched, *[Task(i, b"") for i in range(10)])
    assert len(w0.assigned) == 1 and len(w1.assigned) == 1


def test_close_retires_idle_workers_only_when_nothing_is_left() -> None:
    sched, (w0, w1) = _pool()
    _submit(sched, Task(1, b""))
    assert sched.close() == [Retire(w1)]
    actions = sched.task_finished(w0, 1, True, None, 0.1)
    assert Retire(w0) in actions or Retire(w0) in sched.dispatch(1.0)


def test_the_worker_count_names_the_running_task_even_with_results_unsent() -> None:
    """Tasks 0 and 1 finished but their results died with the worker; task 2 was running."""
    sched, (w0,) = _pool(1)
    sched.avg_seconds = 1e-5
    tasks = [Task(i, b"") for i in range(5)]
    _submit(sched, *tasks)
    actions = sched.worker_died(w0, Failure("crashed", w0, -9), started=3)
    assert [a.task for a in actions if isinstance(a, Resolve)] == [tasks[2]]
    assert list(sched.queue) == [tasks[0], tasks[1], tasks[3], tasks[4]]


def test_a_worker_that_died_between_tasks_fails_none() -> None:
    sched, (w0,) = _pool(1)
    sched.avg_seconds = 1e-5
    tasks = [Task(i, b"") for i in range(2)]
    _submit(sched, *tasks)
    sched.task_finished(w0, 0, True, None, 1e-5)
    actions = sched.worker_died(w0, Failure("crashed", w0, -9), started=1)
    assert not [a for a in actions if isinstance(a, Resolve)]
    assert list(sched.queue) == [tasks[1]]


def test_skipped_cancelled_tasks_do_not_stall_results() -> None:
    """A cancelled task the worker skipped sends no result; the next result still lands."""
    sched, (w0,) = _pool(1)
    sched.avg_seconds = 1e-5
    tasks = [Task(i, b"") for i in range(3)]
    _submit(sched, *tasks)
    tasks[1].cancelled = True
    sched.cancel(tasks[1])
    sched.task_finished(w0, 0, True, "a", 1e-5)
    actions = sched.task_finished(w0, 2, True, "c", 1e-5)
    assert [(a.task, a.value) for a in actions if isinstance(a, Resolve)] == [(tasks[2], "c")]
    assert w0.consumed == 3


def test_a_spare_worker_takes_no_work_until_one_dies() -> None:
    sched = Scheduler(1)
    w0, spare = Worker(0), Worker(1)
    for w in (w0, spare):
        sched.add_worker(w)
        sched.worker_ready(w)
    sched.avg_seconds = 0.5
    first, second = Task(1, b""), Task(2, b"")
    assert _submit(sched, first, second) == [Dispatch(w0, [first])]
    assert not spare.assigned
    sched.worker_died(w0, Failure("crashed", w0, -9), started=1)
    assert sched.dispatch(1.0) == [Dispatch(spare, [second])]


def test_a_ready_worker_dying_in_its_first_task_charges_that_task_not_the_start() -> None:
    """Fresh workers, each ready, each dying in its first task (unpickling its arguments, say): the
    failure names that task and counts as one of its runs, and deaths like these never break the pool."""
    sched, (w0,) = _pool(1)
    task = Task(1, b"", retries=1)
    _submit(sched, task)
    worker, resolved = w0, []
    for n in range(1, 2 + CRASH_LOOP_LIMIT):
        actions = sched.worker_died(worker, Failure("crashed", worker, 7), started=1)
        assert Spawn(1) in actions and not any(isinstance(a, Break) for a in actions)
        resolved += [a for a in actions if isinstance(a, Resolve)]
        worker = Worker(n)
        sched.add_worker(worker)
        sched.worker_ready(worker)
        if not sched.queue:
            sched.submit(Task(100 + n, b""))
        sched.dispatch(float(n))
    first = resolved[0].value
    assert first.task is task and first.kind == "crashed" and task.attempts == 2  # its two runs
    assert len(resolved) == CRASH_LOOP_LIMIT and not sched.broken and sched.start_failures == 0


def test_a_frame_the_worker_cannot_take_in_fails_its_first_task_only() -> None:
    """The worker says how many tasks it took in before the frame it could not read: that names the
    frame's task among those still in hand (results already taken off the front)."""
    sched, (w0,) = _pool(1)
    sched.avg_seconds = 1e-5
    tasks = [Task(i, b"") for i in range(4)]
    _submit(sched, *tasks)
    sched.task_finished(w0, 0, True, None, 1e-5)
    error = ValueError("no memory for its segment")
    assert sched.unreadable(w0, 2, error) == [Resolve(tasks[2], False, error)]
    assert list(w0.assigned) == [tasks[1], tasks[3]]
    assert sched.unreadable(w0, 9, error) == []  # not a task it holds: nothing to fail
