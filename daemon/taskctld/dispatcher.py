"""The dispatcher: the daemon's main loop. Each turn is one short transaction that

  1. applies what supervisors reported (an attempt started, an attempt ended -> next state),
  2. promotes scheduled tasks whose time has come,
  3. claims queued tasks for the free slots,

and then, after the commit, hands the claimed attempts to the runner. Batching all three in one
commit is what keeps `synchronous=FULL` from capping throughput at a commit per state change.
The loop sleeps until something wakes it: a report, a commit that queued a task, or the timer of
the next scheduled task. It never polls.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from taskctl.api import Backoff, Outcome, TaskState
from taskctl.errors import TaskctlError
from taskctl.units import now_ms
from taskctld import policy
from taskctld.runner import Ended, Report, Runner, Started
from taskctld.store import AttemptEnd, EventRow, Store, TaskRow

if TYPE_CHECKING:
    from taskctld.scheduler import Scheduler

log = logging.getLogger("taskctld.dispatcher")
T = TypeVar("T")

RETRY_AFTER_STORE_ERROR = 1.0
PROMOTE_BATCH = 1000  # scheduled tasks made queued per turn at most (see store.promote_due)
# The due timer runs on the monotonic clock, which stops while the machine is suspended: look at
# the wall clock at least this often (seconds), so a schedule is not late by the time asleep.
WALL_CLOCK_CHECK = 60.0
STARTED_LATENCY = 0.05  # seconds: how late a start may be written when nothing else is


@dataclass
class Limits:
    concurrency: int
    queue_limits: dict[str, int] = field(default_factory=dict)
    paused: set[str] = field(default_factory=set)


class Dispatcher:
    def __init__(
        self,
        store: Store,
        runner: Runner,
        limits: Limits,
        *,
        clock: Callable[[], int] = now_ms,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.store = store
        self.runner = runner
        self.limits = limits
        self.scheduler: Scheduler | None = None
        self.on_attempt_end: list[Callable[[AttemptEnd], None]] = []  # after the commit
        self.clock = clock
        self.jitter = jitter
        self.reports: list[Report] = []
        self.running: dict[str, int] = {}
        self.ready_queues: set[str] = set()
        self.accepting = True
        self.last_cycle_at = 0
        self._wake = asyncio.Event()
        self._due_timer: asyncio.TimerHandle | None = None
        self._started_timer: asyncio.TimerHandle | None = None
        self._ended: list[AttemptEnd] = []
        self._due_at: int | None = None
        self._time_dirty = True  # look for due work on the first turn
        self._claimed: dict[tuple[int, int], TaskRow] = {}  # running attempts, as claimed
        self._stale = False  # counts could not be reloaded after a rollback
        store.on_commit(self.note_events)

    # -- inputs ---------------------------------------------------------------------------------

    def report(self, report: Report) -> None:
        """A supervisor's news. An end wakes the loop now (a slot is free); a start only
        within STARTED_LATENCY, so that its pid reaches the store without costing a commit of
        its own when tasks are short."""
        self.reports.append(report)
        if isinstance(report, Ended):
            self._wake.set()
        elif self._started_timer is None:
            loop = asyncio.get_running_loop()
            self._started_timer = loop.call_later(STARTED_LATENCY, self._started_due)

    def _started_due(self) -> None:
        self._started_timer = None
        self._wake.set()

    def note_events(self, events: list[EventRow]) -> None:
        """After any commit: queued tasks wake the loop; scheduled ones may need an earlier timer."""
        for event in events:
            if event.to_state is TaskState.QUEUED:
                self.ready_queues.add(event.queue)
                self._wake.set()
            elif event.to_state is TaskState.SCHEDULED:
                self._time_dirty = True
                self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def load(self) -> None:
        """Initial in-memory view: running counts, queues with queued tasks, queue settings."""
        self.running = self.store.running_by_queue()
        self.ready_queues = self.store.ready_queues()
        self.load_queues()

    def _reload_after_rollback(self) -> None:
        """In-memory counts changed inside a transaction that rolled back: take them from the
        store again (reads work even when writes fail, on a full disk say)."""
        self._claimed.clear()
        try:
            self.running = self.store.running_by_queue()
            self.ready_queues = self.store.ready_queues()
        except Exception as e:  # the next turn tries again (stale counts only claim less)
            self._stale = True
            log.error("cannot reload the dispatcher's counts: %r", e)
        else:
            self._stale = False

    def load_queues(self) -> None:
        """Queue limits and pauses, after a change; a resumed queue may start tasks now."""
        queues = self.store.list_queues()
        self.limits.queue_limits = {
            q.name: q.concurrency for q in queues if q.concurrency is not None
        }
        self.limits.paused = {q.name for q in queues if q.paused}
        self._wake.set()

    # -- the loop -------------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(0)  # whatever woke us, everything else on the loop gets a turn
            try:
                self.cycle()
            except TaskctlError as e:
                log.error("dispatch failed, retrying in %.0fs: %s", RETRY_AFTER_STORE_ERROR, e)
                await asyncio.sleep(RETRY_AFTER_STORE_ERROR)
                self._wake.set()
            except Exception:
                # A bug must not stop dispatching for good: log it, back off, go on.
                log.exception("dispatch cycle failed; retrying in %.0fs", RETRY_AFTER_STORE_ERROR)
                await asyncio.sleep(RETRY_AFTER_STORE_ERROR)
                self._wake.set()

    def cycle(self, work: Callable[[int], T] | None = None) -> T | None:
        """One turn: apply reports, promote due tasks, claim; then start what was claimed.

        `work` runs in the same transaction (a submit, say), so that a task submitted while a
        slot is free is inserted and claimed with one commit; its result is returned."""
        if self._stale:
            self._reload_after_rollback()
        now = self.clock()
        reports, self.reports = self.reports, []
        # Time-driven work (cron fires, due scheduled tasks) only when something may be due:
        # the timer fired, or a change could have made something due earlier.
        timed = self._time_dirty
        self._time_dirty = False
        result = None
        try:
            with self.store.transaction():
                ended = self._apply(reports, now)
                if work is not None:
                    result = work(now)
                if timed and self.scheduler is not None:
                    self.scheduler.fire_due(now)
                if timed and self.store.promote_due(now) >= PROMOTE_BATCH:
                    self._time_dirty = True  # more are due than one turn promotes
                    self._wake.set()
                claimed = self._claim(now)
        except BaseException:
            self.reports[:0] = reports  # nothing was applied: keep them for the next turn
            self._ended.clear()
            self._time_dirty = self._time_dirty or timed
            self._reload_after_rollback()
            raise
        self.last_cycle_at = now
        self.runner.committed()
        ended_now, self._ended = self._ended, []
        for end in ended_now:
            for observer in self.on_attempt_end:
                observer(end)
        for task_id, attempt in ended:
            self.runner.forget(task_id, attempt)
        for task in claimed:
            self.runner.start(task, self.store.env_of(task.env_id))
        if timed:
            self._arm_due_timer()
        return result

    def times_changed(self) -> None:
        """A schedule was added, paused or resumed: the next due time may be different."""
        self._time_dirty = True
        self._wake.set()

    def _apply(self, reports: list[Report], now: int) -> list[tuple[int, int]]:
        ended: list[tuple[int, int]] = []
        for report in reports:
            if isinstance(report, Started):
                self.store.mark_started(
                    report.task_id, report.attempt, pid=report.pid, started_at=report.started_at
                )
            else:
                self._apply_end(report, now)
                ended.append((report.end.task_id, report.end.attempt))
        return ended

    def _apply_end(self, report: Ended, now: int) -> None:
        end = report.end
        self.store.end_attempt(end)
        self._ended.append(end)
        # The row as claimed is still right for the policy (running tasks do not change but
        # through here); the fenced move below refuses anything stale.
        task = self._claimed.pop((end.task_id, end.attempt), None) or self.store.get_task(
            end.task_id
        )
        if task is None or task.state is not TaskState.RUNNING or task.attempts != end.attempt:
            return
        decision = self.decide(task, end.outcome, end.exit_code, counts=report.counts)
        reason = (
            end.cause
            if end.cause and decision.state is not TaskState.SUCCEEDED
            else decision.reason
        )
        fields: dict[str, object] = {}
        if decision.state is TaskState.SCHEDULED:
            fields["run_at"] = now + int(decision.delay * 1000)
        elif decision.state is TaskState.QUEUED:
            fields["tries"] = task.tries - (0 if decision.counts else 1)
        else:
            fields["finished_at"] = now
        if self.store.move(
            task.id, TaskState.RUNNING, decision.state, now, reason=reason,
            attempt=end.attempt, exit_code=end.exit_code, fence=end.attempt, queue=task.queue,
            **fields,
        ):  # fmt: skip
            self.running[task.queue] = max(0, self.running.get(task.queue, 0) - 1)

    def decide(
        self, task: TaskRow, outcome: Outcome, exit_code: int | None, *, counts: bool
    ) -> policy.Decision:
        if not counts:
            return policy.Decision(TaskState.QUEUED, reason="interrupted", counts=False)
        rules = policy.RetryPolicy(
            retries=task.retries,
            backoff=Backoff(task.backoff),
            retry_delay=task.retry_delay,
            max_delay=task.max_delay,
            retry_on=frozenset(task.retry_on) if task.retry_on is not None else None,
            no_retry_on=frozenset(task.no_retry_on or ()),
        )
        return policy.decide(rules, task.tries, outcome, exit_code, self.jitter())

    def _claim(self, now: int) -> list[TaskRow]:
        if not self.accepting or not self.runner.ready():
            return []  # no supervisor to hand attempts to: claim when one is back
        free = self.limits.concurrency - sum(self.running.values())
        if free <= 0 or not self.ready_queues:
            return []
        slots = {}
        for queue in self.ready_queues - self.limits.paused:
            limit = self.limits.queue_limits.get(queue)
            slots[queue] = free if limit is None else min(free, limit - self.running.get(queue, 0))
        claim = self.store.claim(slots, free, now)
        self.ready_queues -= claim.exhausted
        for task in claim.tasks:
            self.running[task.queue] = self.running.get(task.queue, 0) + 1
            self._claimed[(task.id, task.attempts)] = task
        return claim.tasks

    # -- scheduled tasks ------------------------------------------------------------------------

    def _arm_due_timer(self) -> None:
        """Sleep until the next scheduled task or cron due time (never a polling loop)."""
        candidates = [
            t for t in (self.store.next_due(), self.store.next_schedule_due()) if t is not None
        ]
        due = min(candidates) if candidates else None
        if due is None or (self._due_at is not None and self._due_at <= due and self._due_timer):
            return
        if self._due_timer is not None:
            self._due_timer.cancel()
        loop = asyncio.get_running_loop()
        delay = min(max(0.0, (due - self.clock()) / 1000), WALL_CLOCK_CHECK)
        self._due_at = due
        self._due_timer = loop.call_later(delay, self._due)

    def _due(self) -> None:
        self._due_timer = None
        self._due_at = None
        self._time_dirty = True
        self._wake.set()

    def running_count(self) -> int:
        return sum(self.running.values())
