"""The dispatcher through its public interface: a real store in a temporary file, a scripted
runner in place of the supervisor (`conftest.ScriptedRunner`), a clock the test moves, and the
supervisor's reports given by hand. Each turn is `cycle()`; no loop, no processes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from clocks import ManualClock

from taskctl.api import Outcome, TaskState
from taskctl.errors import StorageFull
from taskctl.units import now_ms
from taskctld.clock import SYSTEM_CLOCK
from taskctld.dispatcher import Dispatcher, Limits
from taskctld.launcher import Ended, Key, Released, Started, Unheld
from taskctld.lifecycle import Lifecycle
from taskctld.store import AttemptEnd, NewTask, TaskRow
from taskctld.store.sqlite import SqliteStore

from conftest import ScriptedRunner

T0 = 1_000_000


class TokenRunner(ScriptedRunner):
    """A scripted runner that also keeps the token of each hold and of each take-back, as a
    supervisor would, to answer with."""

    def __init__(self) -> None:
        super().__init__()
        self.held_with: dict[int, int] = {}  # task id -> token of its latest hold
        self.taken_back_with: dict[Key, int] = {}  # attempt -> token of its take-back

    def hold(self, task: TaskRow, env: object, after: Key, token: int) -> bool:
        self.held_with[task.id] = token
        return super().hold(task, env, after, token)

    def unhold(self, key: Key, token: int) -> None:
        self.taken_back_with[key] = token
        super().unhold(key, token)

    def held(self) -> list[object]:
        """The task ids handed over held, in order."""
        return [asked[1] for asked in self.asked if asked[0] == "hold"]


class Rig:
    """A dispatcher wired as app.py wires it, minus the supervisor."""

    def __init__(self, path: Path, concurrency: int, hold_ahead: bool = True) -> None:
        self.store = SqliteStore(path, durability="normal")
        self.runner = TokenRunner()
        self.clock = ManualClock(T0)
        self.dispatcher = Dispatcher(
            self.store,
            self.runner,
            Limits(concurrency),
            lifecycle=Lifecycle(self.store, jitter=lambda: 0.0),
            clock=self.clock,
            hold_ahead=hold_ahead,
        )
        self.ended: list[AttemptEnd] = []
        self.dispatcher.on_attempt_end.append(self.ended.append)

    @property
    def now(self) -> int:
        return self.clock.now()

    @now.setter
    def now(self, when: int) -> None:
        """Set the clock (its wake-ups due by then are called, as the loop would)."""
        self.clock.set(when)

    def short(self) -> None:
        """Run one task of the default queue for 5 ms: its tasks have been short lately, which
        is when the dispatcher holds ahead in it. What the runner was asked, and the end, are
        then forgotten."""
        (task_id,) = self.submit()
        end = AttemptEnd(task_id, 1, Outcome.EXITED, self.now + 5, exit_code=0, started_at=self.now)
        self.dispatcher.report(Ended(end))
        self.dispatcher.cycle()
        assert self.dispatcher.running_count() == 0
        self.runner.asked.clear()
        self.ended.clear()

    def cancel(self, task_id: int) -> bool:
        """Cancel a queued task in a turn, as `taskctl cancel` does."""

        def cancel(now: int) -> bool:
            return self.store.move(
                task_id, TaskState.QUEUED, TaskState.CANCELLED, now, finished_at=now
            )

        return bool(self.dispatcher.cycle(cancel))

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


def _run(
    scenario: Callable[[Rig], None], tmp_path: Path, concurrency: int = 1, hold_ahead: bool = True
) -> Rig:
    """Run `scenario` on a loop (reports and due timers want one), the dispatcher loaded."""
    rig = Rig(tmp_path / "t.db", concurrency, hold_ahead)

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


def test_a_turn_applies_many_starts_and_ends_together_each_once(tmp_path: Path) -> None:
    """The starts and ends of one turn are written a batch at a time: a start and the end of
    the same attempt (the start first), an end heard twice (applied once), a start alone;
    each end frees its slot once and reaches the observers once."""

    def scenario(rig: Rig) -> None:
        a, b, c = rig.submit(3)
        assert rig.runner.started() == [a, b, c] and rig.dispatcher.running_count() == 3
        rig.now = T0 + 100
        end_b = AttemptEnd(b, 1, Outcome.EXITED, T0 + 90, exit_code=1, started_at=T0 + 20)
        for report in [
            Started(a, 1, pid=11, started_at=T0 + 10),
            Started(b, 1, pid=12, started_at=T0 + 20),
            Ended(AttemptEnd(a, 1, Outcome.EXITED, T0 + 80, exit_code=0, started_at=T0 + 10)),
            Ended(end_b),
            Ended(end_b),
            Started(c, 1, pid=13, started_at=T0 + 30),
        ]:
            rig.dispatcher.report(report)
        rig.dispatcher.cycle()
        assert [(rig.task(i).state, rig.task(i).exit_code) for i in (a, b, c)] == [
            (TaskState.SUCCEEDED, 0), (TaskState.FAILED, 1), (TaskState.RUNNING, None),
        ]  # fmt: skip
        attempts = rig.store.attempts_of([a, b, c])
        assert [(x.pid, x.started_at, x.outcome) for i in (a, b, c) for x in attempts[i]] == [
            (11, T0 + 10, Outcome.EXITED), (12, T0 + 20, Outcome.EXITED), (13, T0 + 30, None),
        ]  # fmt: skip
        assert [(e.task_id, e.attempt) for e in rig.ended] == [(a, 1), (b, 1)]
        assert rig.dispatcher.running_count() == 1

    _run(scenario, tmp_path, concurrency=3, hold_ahead=False)


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


# -- holding ahead ----------------------------------------------------------------------------


@pytest.mark.parametrize("hold_ahead", [True, False], ids=["on", "off"])
def test_with_holding_ahead_off_nothing_is_held_and_tasks_still_run_in_order(
    tmp_path: Path, hold_ahead: bool
) -> None:
    """The same short tasks, one slot: on, the next ones are handed over held; off (a store
    other daemons claim from), never, and each is claimed and started in its turn."""

    def scenario(rig: Rig) -> None:
        rig.short()
        ids = rig.submit(4)
        if hold_ahead:  # the control: these tasks would be held
            assert rig.runner.held() == ids[1:] and rig.dispatcher.held_count() == 3
            return
        assert rig.runner.started() == ids[:1]
        for task_id in ids:
            assert rig.dispatcher.hold_settled(task_id) is None
            rig.end(task_id, Outcome.EXITED, 0)
        assert rig.runner.started() == ids
        assert rig.runner.held() == [] and rig.dispatcher.held_count() == 0
        assert {asked[0] for asked in rig.runner.asked} == {"start"}  # no hold, no unhold
        assert {rig.task(t).state for t in ids} == {TaskState.SUCCEEDED}
        assert rig.dispatcher.running_count() == 0

    _run(scenario, tmp_path, hold_ahead=hold_ahead)


def test_a_held_follower_inherits_the_slot_of_the_attempt_before_it(tmp_path: Path) -> None:
    """An end whose slot passed on to a held attempt frees nothing: the follower's start
    claims it in that slot, and the count never goes over the limit."""

    def scenario(rig: Rig) -> None:
        rig.short()
        first, second, third = rig.submit(3)
        assert rig.runner.started() == [first] and rig.runner.held() == [second, third]
        for before, task_id, still_held in ((first, second, 1), (second, third, 0)):
            end = AttemptEnd(before, 1, Outcome.EXITED, rig.now, exit_code=0)
            rig.dispatcher.report(Ended(end, next=(task_id, 1)))
            rig.dispatcher.cycle()
            assert rig.dispatcher.running_count() == 1  # passed on, not freed
            assert rig.task(task_id).state is TaskState.QUEUED  # until its start is heard
            rig.dispatcher.report(Started(task_id, 1, pid=4000 + task_id, started_at=rig.now))
            rig.dispatcher.cycle()
            assert rig.task(task_id).state is TaskState.RUNNING
            assert rig.dispatcher.running_count() == 1
            assert rig.dispatcher.held_count() == still_held
        rig.end(third, Outcome.EXITED, 0)
        assert rig.dispatcher.running_count() == 0
        assert rig.runner.started() == [first]  # the others started in passed-on slots
        assert {rig.task(t).state for t in (first, second, third)} == {TaskState.SUCCEEDED}

    _run(scenario, tmp_path)


def test_a_follower_whose_start_is_refused_keeps_the_slot_until_it_ends(tmp_path: Path) -> None:
    """The follower's task was cancelled as its supervisor started it in the passed-on slot:
    its start is refused (and stopped), yet it runs until its end comes, so the slot stays
    taken; a task submitted meanwhile waits for that end."""

    def scenario(rig: Rig) -> None:
        rig.short()
        first, follower = rig.submit(2)
        assert rig.cancel(follower)
        token = rig.runner.taken_back_with[(follower, 1)]
        end = AttemptEnd(first, 1, Outcome.EXITED, rig.now, exit_code=0)
        rig.dispatcher.report(Ended(end, next=(follower, 1)))
        rig.dispatcher.report(Started(follower, 1, pid=4242, started_at=rig.now))
        rig.dispatcher.report(Unheld(follower, 1, taken=False, token=token))
        rig.dispatcher.cycle()
        assert rig.runner.asked[-1] == ("stop", follower, 1, "cancel")
        assert rig.dispatcher.running_count() == 1
        (waiting,) = rig.submit()
        assert waiting not in rig.runner.started()  # the slot is still the follower's
        cancelled = AttemptEnd(follower, 1, Outcome.CANCELLED, rig.now, signal=15)
        rig.dispatcher.report(Ended(cancelled))
        rig.dispatcher.cycle()
        assert rig.runner.started()[-1] == waiting and rig.dispatcher.running_count() == 1
        assert rig.task(follower).state is TaskState.CANCELLED

    _run(scenario, tmp_path)


def test_a_follower_given_back_unstarted_frees_the_slot_it_inherited(tmp_path: Path) -> None:
    """The slot passed on, but the held attempt never started (its supervisor gave it back):
    the slot is free, and the task is claimed again."""

    def scenario(rig: Rig) -> None:
        rig.short()
        first, follower = rig.submit(2)
        end = AttemptEnd(first, 1, Outcome.EXITED, rig.now, exit_code=0)
        rig.dispatcher.report(Ended(end, next=(follower, 1)))
        rig.dispatcher.cycle()
        assert rig.dispatcher.running_count() == 1
        rig.dispatcher.report(Released(follower, 1))  # as when its supervisor dies
        rig.dispatcher.cycle()  # frees the slot; the task is queued again
        rig.dispatcher.cycle()
        assert rig.runner.started() == [first, follower]
        assert rig.dispatcher.running_count() == 1 and rig.dispatcher.held_count() == 0
        assert rig.task(follower).state is TaskState.RUNNING

    _run(scenario, tmp_path)


def test_a_held_task_that_starts_as_it_is_cancelled_is_stopped_and_on_the_record(
    tmp_path: Path,
) -> None:
    """The cancel commits while its supervisor is already starting the held task (the two
    cross on the wire): the task stays cancelled, the start is stopped, and the attempt it
    ran is recorded with how it ended. The cancel hears that it had started."""
    answers: list[asyncio.Future[bool]] = []
    ids: list[int] = []

    def scenario(rig: Rig) -> None:
        rig.short()  # its tasks have been short: hold ahead
        running, held = ids[:] = rig.submit(2)
        assert rig.runner.asked == [("start", running), ("hold", held, (running, 1))]
        answer = rig.dispatcher.hold_settled(held)
        assert answer is not None
        answers.append(answer)
        token = rig.runner.held_with[held]
        assert rig.cancel(held)
        assert rig.runner.asked[-1] == ("unhold", held, 1)
        end = AttemptEnd(running, 1, Outcome.EXITED, rig.now, exit_code=0)
        rig.dispatcher.report(Ended(end, next=(held, 1)))  # its slot passed on to the held one
        rig.dispatcher.report(Started(held, 1, pid=4242, started_at=rig.now))
        rig.dispatcher.report(Unheld(held, 1, taken=True, token=token - 1))  # an earlier hold's
        rig.dispatcher.report(Unheld(held, 1, taken=False, token=token))

        def store_fails(now: int) -> None:
            raise StorageFull("disk full")

        with pytest.raises(StorageFull):  # the turn that applies them rolls back...
            rig.dispatcher.cycle(store_fails)
        assert not answer.done()  # ...so the cancel must not go and look yet
        rig.dispatcher.cycle()
        assert answer.done() and rig.runner.asked[-1] == ("stop", held, 1, "cancel")
        rig.dispatcher.report(Ended(AttemptEnd(held, 1, Outcome.CANCELLED, rig.now, signal=15)))
        rig.dispatcher.cycle()
        assert rig.dispatcher.running_count() == 0  # the slot it took is free again

    rig = _run(scenario, tmp_path)
    (answer,) = answers
    assert answer.result() is False  # it had started
    running, held = ids
    task = rig.task(held)
    (attempt,) = rig.store.attempts_of([held])[held]
    assert task.state is TaskState.CANCELLED
    assert (attempt.pid, attempt.outcome, attempt.signal) == (4242, Outcome.CANCELLED, 15)
    assert [(e.task_id, e.attempt) for e in rig.ended] == [(running, 1), (held, 1)]


def test_a_held_spawn_that_fails_as_it_is_cancelled_passes_its_slot_on(tmp_path: Path) -> None:
    """The crossing again, but the held command could not start: no `started`, only its end,
    and the supervisor started the next one in line in that slot. The slot is counted once."""

    def scenario(rig: Rig) -> None:
        rig.short()
        running, held, later = rig.submit(3)
        assert [a[:2] for a in rig.runner.asked] == [
            ("start", running),
            ("hold", held),
            ("hold", later),
        ]
        assert rig.cancel(held)
        token = rig.runner.taken_back_with[(held, 1)]
        end = AttemptEnd(running, 1, Outcome.EXITED, now_ms(), exit_code=0)
        rig.dispatcher.report(Ended(end, next=(held, 1)))
        failed = AttemptEnd(held, 1, Outcome.SPAWN_ERROR, now_ms(), error="no such program")
        rig.dispatcher.report(Ended(failed, counts=False, next=(later, 1)))
        rig.dispatcher.report(Started(later, 1, pid=4343, started_at=rig.now))
        rig.dispatcher.report(Unheld(held, 1, taken=False, token=token))
        rig.dispatcher.cycle()
        assert rig.dispatcher.running_count() == 1  # `later`, in the slot passed on twice
        assert rig.dispatcher.hold_settled(held) is None  # its take-back is over
        assert rig.dispatcher.hold_settled(later) is None  # it started: not held any more
        tasks = {t.id: t.state for t in rig.store.get_tasks([held, later])}
        assert tasks == {held: TaskState.CANCELLED, later: TaskState.RUNNING}

    _run(scenario, tmp_path)


# -- slots after a restart ----------------------------------------------------------------------


def _submit(store: SqliteStore, n: int = 1, **kw: object) -> list[int]:
    with store.transaction():
        tasks = [NewTask(command=["true"], cwd="/", **kw) for _ in range(n)]  # type: ignore[arg-type]
        return Lifecycle(store).submit(tasks, now=1000)


def test_a_stray_attempt_keeps_its_slot_across_a_restart(tmp_path: Path) -> None:
    """A start that crossed a cancel is still being stopped when the daemon restarts: the new
    daemon counts its slot until its end arrives, so the queue never runs one too many."""
    store = SqliteStore(tmp_path / "t.db", durability="normal")
    (stray,) = _submit(store, 1)
    with store.transaction():
        now = now_ms()
        store.move(stray, TaskState.QUEUED, TaskState.CANCELLED, now, finished_at=now)
        Lifecycle(store).record_stray_start(stray, 1, pid=4242, started_at=now)
    (waiting,) = _submit(store, 1)
    runner = ScriptedRunner()

    async def scenario() -> None:
        dispatcher = Dispatcher(store, runner, Limits(concurrency=1), lifecycle=Lifecycle(store))
        dispatcher.load()  # the next daemon
        dispatcher.cycle()
        assert runner.asked == [] and dispatcher.running_count() == 1
        dispatcher.report(Ended(AttemptEnd(stray, 1, Outcome.CANCELLED, now_ms(), signal=15)))
        dispatcher.cycle()
        assert runner.asked == [("start", waiting)] and dispatcher.running_count() == 1

    asyncio.run(scenario())
    (attempt,) = store.attempts_of([stray])[stray]
    assert (attempt.outcome, attempt.signal) == (Outcome.CANCELLED, 15)


def test_a_stray_start_first_heard_of_after_a_restart_keeps_its_slot(tmp_path: Path) -> None:
    """The same, but the old daemon died before it heard of the start: the new one learns of
    it from the supervisor it adopts, and counts its slot from then until its end."""
    store = SqliteStore(tmp_path / "t.db", durability="normal")
    (stray,) = _submit(store, 1)
    with store.transaction():
        now = now_ms()
        store.move(stray, TaskState.QUEUED, TaskState.CANCELLED, now, finished_at=now)
    (waiting,) = _submit(store, 1)
    runner = ScriptedRunner()

    async def scenario() -> None:
        dispatcher = Dispatcher(store, runner, Limits(concurrency=1), lifecycle=Lifecycle(store))
        dispatcher.report(Started(stray, 1, pid=4242, started_at=now_ms()))  # from `hello`
        dispatcher.load()
        dispatcher.cycle()
        dispatcher.report(Started(stray, 1, pid=4242, started_at=now_ms()))  # said again
        dispatcher.cycle()
        assert (
            runner.asked[0] == ("stop", stray, 1, "cancel")
            and ("start", waiting) not in runner.asked
        )
        assert dispatcher.running_count() == 1
        dispatcher.report(Ended(AttemptEnd(stray, 1, Outcome.CANCELLED, now_ms(), signal=15)))
        dispatcher.cycle()
        assert runner.asked[-1] == ("start", waiting) and dispatcher.running_count() == 1

    asyncio.run(scenario())


# -- the due timer ------------------------------------------------------------------------------


def test_the_due_timer_looks_at_the_wall_clock_at_least_once_a_minute() -> None:
    """Timers run on the monotonic clock, which stops while the machine is suspended: a task
    due in an hour must not wait an hour of monotonic time, whatever the hour spent asleep."""

    async def armed_delay() -> float:
        handle = SYSTEM_CLOCK.call_at(now_ms() + 3_600_000, lambda: None)
        assert isinstance(handle, asyncio.TimerHandle)
        handle.cancel()
        return handle.when() - asyncio.get_running_loop().time()

    delay = asyncio.run(armed_delay())
    assert 0 < delay <= 60


def test_a_task_due_later_is_claimed_when_its_timer_fires(tmp_path: Path) -> None:
    """The dispatcher arms its due timer from the store after a timed turn, and the timer's
    wake-up promotes and claims the task: no polling."""
    rig = Rig(tmp_path / "t.db", 1)

    async def main() -> None:
        rig.dispatcher.load()
        rig.now = now_ms()
        (task_id,) = rig.submit(run_at=rig.now + 200)
        assert rig.task(task_id).state is TaskState.SCHEDULED
        runs = asyncio.get_running_loop().create_task(rig.dispatcher.run())
        try:
            for _ in range(1000):  # 10 s at most
                await asyncio.sleep(0.01)
                rig.now = now_ms()
                if rig.runner.started():
                    break
        finally:
            runs.cancel()
        assert rig.runner.started() == [task_id]

    asyncio.run(main())
