"""The pool's decisions, tested as a pure state machine: no processes involved."""

from __future__ import annotations

from forkio._pool_sched import Dispatch, Failure, Kill, Resolve, Retire, Scheduler, SkipTask, Spawn, Task, Worker


def _ready_pool(size: int = 2, **options: int) -> tuple[Scheduler, list[Worker]]:
    sched = Scheduler(size, **options)  # type: ignore[arg-type]
    workers = [Worker(i) for i in range(size)]
    for w in workers:
        sched.add_worker(w)
        sched.worker_ready(w, 0.0)
    return sched, workers


def test_one_task_goes_to_a_ready_worker() -> None:
    sched, (w0, _) = _ready_pool()
    actions = sched.submit(Task(1, b""), 0.0)
    assert len(actions) == 1 and isinstance(actions[0], Dispatch) and actions[0].worker is w0


def test_crash_fails_only_the_running_task_and_requeues_the_rest() -> None:
    """The first unanswered task sent to a dead worker was running; the others never started."""
    sched = Scheduler(1)
    w0 = Worker(0)
    sched.add_worker(w0)
    sched.worker_ready(w0, 0.0)
    sched.avg_seconds = 0.00001  # tiny tasks: batches of several
    tasks = [Task(i, b"") for i in range(4)]
    w0.ready = False
    for t in tasks:
        sched.submit(t, 0.0)
    actions = sched.worker_ready(w0, 0.0)
    assert isinstance(actions[0], Dispatch) and actions[0].tasks == tasks
    actions = sched.worker_died(w0, Failure("crashed", w0, -9), 1.0)
    resolved = [a for a in actions if isinstance(a, Resolve)]
    assert [r.task for r in resolved] == [tasks[0]] and not resolved[0].ok
    assert list(sched.queue) == tasks[1:]
    assert any(isinstance(a, Spawn) for a in actions)


def test_retry_requeues_the_crashed_task_first() -> None:
    sched, (w0, _) = _ready_pool()
    task = Task(1, b"", retries=1)
    sched.submit(task, 0.0)
    actions = sched.worker_died(w0, Failure("crashed", w0, -9), 1.0)
    assert not [a for a in actions if isinstance(a, Resolve)]
    dispatched = [a for a in actions if isinstance(a, Dispatch)]
    assert dispatched and dispatched[0].tasks == [task] and task.attempts == 2
    w1 = dispatched[0].worker
    actions = sched.worker_died(w1, Failure("crashed", w1, -9), 2.0)
    assert [a.task for a in actions if isinstance(a, Resolve)] == [task]


def test_timeout_kills_the_worker_and_fails_with_timeout() -> None:
    sched, (w0, _) = _ready_pool()
    task = Task(1, b"", timeout=5.0)
    sched.submit(task, 10.0)
    assert sched.next_deadline() == 15.0
    assert sched.tick(14.9) == []
    actions = sched.tick(15.0)
    assert actions == [Kill(w0)]
    actions = sched.worker_died(w0, Failure("crashed", w0, -15), 15.1)
    failure = next(a for a in actions if isinstance(a, Resolve)).value
    assert isinstance(failure, Failure) and failure.kind == "timeout"


def test_a_task_with_a_deadline_runs_alone() -> None:
    sched, (w0, w1) = _ready_pool()
    sched.avg_seconds = 0.00001
    plain = [Task(i, b"") for i in range(3)]
    timed = Task(9, b"", timeout=1.0)
    for w in (w0, w1):
        w.ready = False
    for t in [*plain, timed]:
        sched.submit(t, 0.0)
    sched.worker_ready(w0, 0.0)
    sched.worker_ready(w1, 0.0)
    assert list(sched.queue) == [timed]  # both workers have plain tasks in hand: it waits
    head = w1.assigned[0]
    actions = sched.task_finished(w1, head.id, True, None, 0.00001, 3.0)
    dispatched = [a for a in actions if isinstance(a, Dispatch)]
    assert dispatched == [Dispatch(w1, [timed])] and timed.deadline == 4.0


def test_cancel_queued_running_and_sent() -> None:
    sched, (w0,) = _ready_pool(1)
    sched.avg_seconds = 0.00001
    running, sent = Task(1, b""), Task(2, b"")
    w0.ready = False
    sched.submit(running, 0.0)
    sched.submit(sent, 0.0)
    sched.worker_ready(w0, 0.0)
    assert list(w0.assigned) == [running, sent]
    sched.avg_seconds = 1.0  # slow now: nothing more is sent to a worker with tasks in hand
    queued = Task(3, b"")
    sched.submit(queued, 0.0)
    assert sched.cancel(queued) == [] and queued not in sched.queue
    assert sched.cancel(sent) == [SkipTask(w0, sent)]
    assert sched.cancel(running) == [Kill(w0)]
    actions = sched.worker_died(w0, Failure("crashed", w0, -15), 1.0)
    assert not [a for a in actions if isinstance(a, Resolve)]  # cancelled tasks are not failed


def test_recycle_after_max_tasks() -> None:
    sched, (w0,) = _ready_pool(1, max_tasks_per_worker=2)
    tasks = [Task(i, b"") for i in range(3)]
    for t in tasks:
        sched.submit(t, 0.0)
    assert list(w0.assigned) == [tasks[0]]
    sched.task_finished(w0, 0, True, None, 0.1, 1.0)
    actions = sched.task_finished(w0, 1, True, None, 0.1, 1.0)
    assert Retire(w0) in actions and Spawn(1) in actions
    assert list(sched.queue) == [tasks[2]]


def test_recycle_on_memory() -> None:
    sched, (w0,) = _ready_pool(1, max_memory_per_worker=100)
    sched.submit(Task(1, b""), 0.0)
    sched.memory_report(w0, 500)
    actions = sched.task_finished(w0, 1, True, None, 0.1, 1.0)
    assert Retire(w0) in actions and Spawn(1) in actions


def test_batches_grow_for_tiny_tasks_but_split_fairly() -> None:
    sched, (w0, w1) = _ready_pool()
    sched.avg_seconds = 1e-6
    for w in (w0, w1):
        w.ready = False
    for i in range(100):
        sched.submit(Task(i, b""), 0.0)
    sched.worker_ready(w0, 0.0)
    sched.worker_ready(w1, 0.0)
    assert 40 <= len(w0.assigned) <= 60 and 40 <= len(w1.assigned) <= 60


def test_slow_tasks_go_one_at_a_time() -> None:
    sched, (w0, w1) = _ready_pool()
    sched.avg_seconds = 0.5
    for i in range(10):
        sched.submit(Task(i, b""), 0.0)
    assert len(w0.assigned) == 1 and len(w1.assigned) == 1


def test_close_retires_idle_workers_only_when_nothing_is_left() -> None:
    sched, (w0, w1) = _ready_pool()
    sched.submit(Task(1, b""), 0.0)
    actions = sched.close()
    assert actions == [Retire(w1)]
    actions = sched.task_finished(w0, 1, True, None, 0.1, 1.0)
    assert Retire(w0) in actions
