"""The dispatcher through its public interface: a real store in a temporary file, a scripted
runner in place of the supervisor (`conftest.ScriptedRunner`), a clock the test moves, and the
supervisor's reports given by hand. Each turn is `cycle()`; no loop, no processes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from taskctl.api import Outcome, TaskState
from taskctld.dispatcher import Dispatcher, Limits
from taskctld.lifecycle import Lifecycle
from taskctld.runner import Ended, Started
from taskctld.store import AttemptEnd, NewTask, TaskRow
from taskctld.store.sqlite import SqliteStore

from conftest import ScriptedRunner

T0 = 1_000_000


class Rig:
    """A dispatcher wired as app.py wires it, minus the supervisor."""

    def __init__(self, path: Path, concurrency: int) -> None:
        self.store = SqliteStore(path, durability="normal")
        self.runner = ScriptedRunner()
        self.now = T0
        self.dispatcher = Dispatcher(
            self.store,
            self.runner,
            Limits(concurrency),
            lifecycle=Lifecycle(self.store, jitter=lambda: 0.0),
            clock=lambda: self.now,
        )
        self.ended: list[AttemptEnd] = []
        self.dispatcher.on_attempt_end.append(self.ended.append)

    def submit(self, n: int = 1, **fields: object) -> list[int]:
        tasks = [NewTask(command=["true"], cwd="/", **fields) for _ in range(n)]  # type: ignore[arg-type]
        return self.dispatcher.cycle(lambda now: self.dispatcher.lifecycle.submit(tasks, now)) or []

    def set_queue(self, name: str, **fields: object) -> None:
        with self.store.transaction():
            self.store.set_queue(name, self.now, **fields)
        self.dispatcher.load_queues()

    def task(self, task_id: int) -> TaskRow:
        task = self.store.get_task(task_id)
        assert task is not None
        return task

    def end(
        self, task_id: int, outcome: Outcome, exit_code: int | None = None, **kw: object
    ) -> None:
        attempt = self.task(task_id).attempts
        end = AttemptEnd(task_id, attempt, outcome, self.now, exit_code=exit_code)
        self.dispatcher.report(Ended(end, **kw))  # type: ignore[arg-type]
        self.dispatcher.cycle()


def _run(scenario: Callable[[Rig], None], tmp_path: Path, concurrency: int = 1) -> Rig:
    """Run `scenario` on a loop (reports and due timers want one), the dispatcher loaded."""
    rig = Rig(tmp_path / "t.db", concurrency)

    async def main() -> None:
        rig.dispatcher.load()
        scenario(rig)

    asyncio.run(main())
    return rig


def test_claims_stay_within_the_global_and_the_queue_limits(tmp_path: Path) -> None:
    def scenario(rig: Rig) -> None:
        rig.set_queue("io", concurrency=1)
        io = rig.submit(3, queue="io")
        plain = rig.submit(5)
        started = rig.runner.started()
        assert len(started) == 3 and rig.dispatcher.running_count() == 3
        assert sum(task_id in io for task_id in started) == 1  # io's limit
        assert {rig.task(t).state for t in started} == {TaskState.RUNNING}
        rig.dispatcher.cycle()
        assert len(rig.runner.started()) == 3  # nothing more while every slot is taken
        first_plain = next(t for t in started if t in plain)
        rig.end(first_plain, Outcome.EXITED, 0)
        assert len(rig.runner.started()) == 4 and rig.runner.started()[-1] in plain
        assert rig.dispatcher.running_count() == 3

    _run(scenario, tmp_path, concurrency=3)


def test_higher_priority_first_then_in_order_of_submission(tmp_path: Path) -> None:
    def scenario(rig: Rig) -> None:
        rig.runner.up = False  # nothing is claimed until all are in
        low = rig.submit(2, priority=-1)
        normal = rig.submit(2)
        high = rig.submit(1, priority=5)
        assert rig.runner.started() == []
        rig.runner.up = True
        for _ in range(5):
            rig.dispatcher.cycle()
            (running,) = [t for t in rig.runner.started() if rig.task(t).state is TaskState.RUNNING]
            rig.end(running, Outcome.EXITED, 0)
        assert rig.runner.started() == [*high, *normal, *low]

    _run(scenario, tmp_path)


def test_a_start_report_and_an_end_report_are_applied(tmp_path: Path) -> None:
    def scenario(rig: Rig) -> None:
        (task_id,) = rig.submit()
        assert rig.runner.started() == [task_id]
        rig.dispatcher.report(Started(task_id, 1, pid=4242, started_at=T0 + 5))
        rig.dispatcher.cycle()
        (attempt,) = rig.store.attempts_of([task_id])[task_id]
        assert (attempt.pid, attempt.started_at, attempt.outcome) == (4242, T0 + 5, None)
        rig.now = T0 + 100
        rig.end(task_id, Outcome.EXITED, 0)
        task = rig.task(task_id)
        assert (task.state, task.exit_code, task.finished_at) == (TaskState.SUCCEEDED, 0, T0 + 100)
        (attempt,) = rig.store.attempts_of([task_id])[task_id]
        assert (attempt.outcome, attempt.exit_code) == (Outcome.EXITED, 0)
        assert [(e.task_id, e.attempt) for e in rig.ended] == [(task_id, 1)]
        assert rig.dispatcher.running_count() == 0

    _run(scenario, tmp_path)


def test_a_lost_attempt_is_retried_after_its_delay_then_fails(tmp_path: Path) -> None:
    def scenario(rig: Rig) -> None:
        (task_id,) = rig.submit(retries=1, retry_delay=2.0)
        rig.end(task_id, Outcome.LOST)
        task = rig.task(task_id)
        assert (task.state, task.run_at, task.tries) == (TaskState.SCHEDULED, T0 + 2000, 1)
        assert rig.dispatcher.running_count() == 0
        rig.now = T0 + 1999
        rig.dispatcher.times_changed()
        rig.dispatcher.cycle()
        assert rig.runner.started() == [task_id]  # not yet due
        rig.now = T0 + 2000
        rig.dispatcher.times_changed()
        rig.dispatcher.cycle()  # promotes it; its commit wakes the loop for the claim
        assert rig.task(task_id).state is TaskState.QUEUED
        rig.dispatcher.cycle()
        assert rig.runner.started() == [task_id, task_id] and rig.task(task_id).attempts == 2
        rig.end(task_id, Outcome.LOST)
        task = rig.task(task_id)
        assert (task.state, task.tries) == (TaskState.FAILED, 2)

    _run(scenario, tmp_path)


def test_an_attempt_that_never_ran_is_queued_again_without_counting(tmp_path: Path) -> None:
    def scenario(rig: Rig) -> None:
        (task_id,) = rig.submit(retries=0)
        rig.runner.up = False  # no supervisor: it stays queued after the end
        rig.end(task_id, Outcome.INTERRUPTED, counts=False)
        task = rig.task(task_id)
        assert (task.state, task.tries, task.reason) == (TaskState.QUEUED, 0, "interrupted")
        rig.runner.up = True
        rig.dispatcher.cycle()
        assert rig.runner.started() == [task_id, task_id]

    _run(scenario, tmp_path)


def test_a_paused_queue_starts_nothing_until_resumed(tmp_path: Path) -> None:
    def scenario(rig: Rig) -> None:
        rig.set_queue("default", paused=True)
        ids = rig.submit(2)
        rig.dispatcher.cycle()
        assert rig.runner.started() == [] and rig.dispatcher.running_count() == 0
        assert {rig.task(t).state for t in ids} == {TaskState.QUEUED}
        rig.set_queue("default", paused=False)
        rig.dispatcher.cycle()
        assert rig.runner.started() == ids

    _run(scenario, tmp_path, concurrency=2)


def test_nothing_is_claimed_without_a_supervisor(tmp_path: Path) -> None:
    def scenario(rig: Rig) -> None:
        rig.runner.up = False
        (task_id,) = rig.submit()
        assert rig.runner.started() == [] and rig.task(task_id).state is TaskState.QUEUED

    _run(scenario, tmp_path)
