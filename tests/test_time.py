"""Time as the subject, on a clock the test moves: backoff, delays and cron through the
dispatcher's own loop (`Dispatcher.run`) and due timer (`Clock.call_at`), a real store, the
scheduler, and a scripted runner in place of the supervisor. A day of schedules runs in about a
second, and every start is checked to the millisecond: not one earlier than due, and at the
wake-up the daemon asked for."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

from clocks import ManualClock

from taskctl.api import Outcome, TaskState
from taskctld.dispatcher import Dispatcher, Limits
from taskctld.lifecycle import Lifecycle
from taskctld.runner import Ended
from taskctld.scheduler import Scheduler
from taskctld.store import AttemptEnd, NewSchedule, NewTask, TaskFilter, TaskRow
from taskctld.store.sqlite import SqliteStore

from conftest import ScriptedRunner

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
SECOND = 1000
MINUTE = 60 * SECOND
SETTLE_HOPS = 20  # event-loop hops that the dispatcher's loop takes a few turns in


class Daemon:
    """The daemon's time-driven parts wired as app.py wires them, on a manual clock."""

    def __init__(self, path: Path, concurrency: int) -> None:
        self.clock = ManualClock(T0)
        self.store = SqliteStore(path, durability="normal")
        self.runner = ScriptedRunner()
        self.lifecycle = lifecycle = Lifecycle(self.store, jitter=lambda: 0.0)
        self.scheduler = Scheduler(self.store, _build, path.parent / "changes", lifecycle=lifecycle)
        self.dispatcher = Dispatcher(
            self.store,
            self.runner,
            Limits(concurrency),
            lifecycle=lifecycle,
            clock=self.clock,
            scheduler=self.scheduler,
        )
        self.starts: list[tuple[int, int]] = []  # (task id, clock) of each start asked for

    async def settle(self) -> None:
        """Let the dispatcher's loop take every turn that something asked for (each is a few
        hops of the event loop; nothing here waits on real time), then note what started."""
        for _ in range(SETTLE_HOPS):
            await asyncio.sleep(0)
        self.starts += [(t, self.clock.now()) for t in self.runner.started()[len(self.starts) :]]  # type: ignore[misc]

    async def run_until(self, when: int) -> None:
        """Move the clock to `when`, one wake-up at a time, as time would pass."""
        await self.settle()
        while (wake := self.clock.next_wake()) is not None and wake <= when:
            self.clock.set(wake)
            await self.settle()
        self.clock.set(when)
        await self.settle()

    async def submit(self, **fields: object) -> int:
        task = NewTask(command=["true"], cwd="/", **fields)  # type: ignore[arg-type]
        (task_id,) = self.dispatcher.cycle(lambda now: self.lifecycle.submit([task], now)) or []
        await self.settle()
        return task_id

    async def end(self, task_id: int, exit_code: int) -> None:
        attempt = self.task(task_id).attempts
        end = AttemptEnd(task_id, attempt, Outcome.EXITED, self.clock.now(), exit_code=exit_code)
        self.dispatcher.report(Ended(end))
        await self.settle()

    def task(self, task_id: int) -> TaskRow:
        task = self.store.get_task(task_id)
        assert task is not None
        return task


def _build(template: dict[str, object], now: int) -> NewTask:
    return NewTask(command=template["command"], cwd=str(template["cwd"]))  # type: ignore[arg-type]


def _on_loop(
    path: Path, scenario: Callable[[Daemon], Awaitable[None]], concurrency: int = 4
) -> None:
    async def main() -> None:
        daemon = Daemon(path, concurrency)
        daemon.dispatcher.load()
        loop = asyncio.create_task(daemon.dispatcher.run())
        try:
            await scenario(daemon)
        finally:
            loop.cancel()

    asyncio.run(main())


def test_a_failed_attempt_starts_again_when_its_backoff_is_over(tmp_path: Path) -> None:
    async def scenario(d: Daemon) -> None:
        task_id = await d.submit(
            retries=3, retry_delay=10.0, backoff="exponential", max_delay=3600.0
        )
        gaps = []
        for _ in range(3):
            failed_at = d.clock.now()
            await d.end(task_id, 1)
            assert d.task(task_id).state is TaskState.SCHEDULED
            due = d.task(task_id).run_at
            assert d.clock.next_wake() == due  # the daemon sleeps until then, not less
            await d.run_until(due - 1)
            assert d.task(task_id).state is TaskState.SCHEDULED  # not a millisecond early
            await d.run_until(due)
            assert d.task(task_id).state is TaskState.RUNNING
            gaps.append(d.starts[-1][1] - failed_at)
        # equal jitter with the random part 0: half of 10 s, 20 s, 40 s
        assert gaps == [5 * SECOND, 10 * SECOND, 20 * SECOND]
        await d.end(task_id, 1)
        assert d.task(task_id).state is TaskState.FAILED and d.task(task_id).attempts == 4

    _on_loop(tmp_path / "t.db", scenario)


def test_a_fixed_backoff_of_an_hour_takes_an_hour(tmp_path: Path) -> None:
    async def scenario(d: Daemon) -> None:
        task_id = await d.submit(retries=1, retry_delay=3600.0)
        await d.end(task_id, 2)
        await d.run_until(T0 + 3600 * SECOND - 1)
        assert [t for t, _ in d.starts] == [task_id]
        await d.run_until(T0 + 3601 * SECOND)
        assert d.starts == [(task_id, T0), (task_id, T0 + 3600 * SECOND)]
        await d.end(task_id, 0)
        assert d.task(task_id).state is TaskState.SUCCEEDED

    _on_loop(tmp_path / "t.db", scenario)


def test_a_delayed_task_is_queued_when_its_time_comes(tmp_path: Path) -> None:
    async def scenario(d: Daemon) -> None:
        later = await d.submit(run_at=T0 + 90 * MINUTE)
        sooner = await d.submit(run_at=T0 + 30 * MINUTE)
        assert d.task(later).state is d.task(sooner).state is TaskState.SCHEDULED
        await d.run_until(T0 + 3 * 3600 * SECOND)
        assert d.starts == [(sooner, T0 + 30 * MINUTE), (later, T0 + 90 * MINUTE)]

    _on_loop(tmp_path / "t.db", scenario)


def test_a_cron_schedule_fires_each_due_time_once_through_a_day(tmp_path: Path) -> None:
    async def scenario(d: Daemon) -> None:
        template = json.dumps({"command": ["true"], "cwd": "/"})
        with d.store.transaction():
            d.store.add_schedule(
                NewSchedule("five", "cron", "*/5 * * * *", "UTC", "allow", "none", template, T0),
                T0 - 1,
            )
        d.dispatcher.times_changed()
        await d.run_until(T0 + 24 * 3600 * SECOND)
        tasks = sorted(d.store.list_tasks(TaskFilter(limit=1000)), key=lambda t: t.id)
        expected = [T0 + i * 5 * MINUTE for i in range(24 * 12 + 1)]
        assert [t.due_at for t in tasks] == expected
        assert [at for _, at in d.starts] == expected  # each started at its due time, not later
        assert d.scheduler.last_tick == T0 + 24 * 3600 * SECOND

    _on_loop(tmp_path / "t.db", scenario, concurrency=1000)
