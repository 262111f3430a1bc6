"""The dispatcher: the daemon's main loop. Each turn is one short transaction that

  1. applies what supervisors reported (an attempt started, an attempt ended -> next state),
  2. promotes scheduled tasks whose time has come,
  3. claims queued tasks for the free slots (and, with holding ahead on, picks tasks to hold),

and then, after the commit, hands the claimed attempts to the launcher. Batching all three in one
commit is what keeps `synchronous=FULL` from capping throughput at a commit per state change.
The loop sleeps until something wakes it: a report, a commit that queued a task, or the timer of
the next scheduled task. It never polls.

The turn is composed of parts with one owner each: `Slots` (slot accounting), `HoldAhead`
(holding ahead, see `holding.py`; made only when on), `ReportApplier` (reports -> store and
lifecycle calls) and `DueTimer` (the wake-up at the next due time). The dispatcher keeps the
turn, the wake-ups, and which queues have queued work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from taskctl.api import TaskState
from taskctl.errors import StorageFull, TaskctlError
from taskctld.clock import SYSTEM_CLOCK, Clock, Timer
from taskctld.dispatcher.applier import ReportApplier
from taskctld.dispatcher.holding import Held, HoldAhead
from taskctld.dispatcher.slots import Slots
from taskctld.launcher import Ended, Key, Launcher, Report, Started
from taskctld.lifecycle import PROMOTE_AT_MOST, Lifecycle
from taskctld.store import AttemptEnd, EventRow, EventSpan, Store, TaskRow

if TYPE_CHECKING:
    from taskctld.reports import Reports
    from taskctld.scheduler import Scheduler

log = logging.getLogger("taskctld.dispatcher")
T = TypeVar("T")

RETRY_AFTER_STORE_ERROR = 1.0
RETRY_WHEN_FULL = 0.25  # seconds between turns while the state folder is out of space
STARTED_LATENCY = 0.05  # seconds: how late a start may be written when nothing else is
PASSED_LATENCY = 0.005  # seconds: how late an end whose slot passed on may be applied


@dataclass
class Limits:
    """`concurrency`: this daemon's slots; `queue_limits`: each queue's concurrency (for the
    whole cluster on a shared store, where the store also counts the other nodes' attempts);
    `node_limits`: this node's own cap per queue; `served`: the only queues it takes work
    from (None: all)."""

    concurrency: int
    queue_limits: dict[str, int] = field(default_factory=dict)
    paused: set[str] = field(default_factory=set)
    node_limits: dict[str, int] = field(default_factory=dict)
    served: frozenset[str] | None = None

    def claimable(self, queues: set[str]) -> set[str]:
        """Of `queues`, those this node may take work from now."""
        open_queues = queues - self.paused
        return open_queues if self.served is None else open_queues & self.served


class DueTimer:
    """Calls `on_due` at the next due time given to `arm` (epoch ms), through the clock's
    wake-up (which comes early rather than late: `on_due` looks at the clock itself)."""

    def __init__(self, clock: Clock, on_due: Callable[[], None]) -> None:
        self.clock = clock
        self.on_due = on_due
        self._handle: Timer | None = None
        self._at: int | None = None

    def arm(self, due: int | None) -> None:
        """Wake at `due`, unless already armed for no later (None: nothing is due)."""
        if due is None or (self._at is not None and self._at <= due and self._handle):
            return
        if self._handle is not None:
            self._handle.cancel()
        self._at = due
        self._handle = self.clock.call_at(due, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._at = None
        self.on_due()


class Dispatcher:
    def __init__(
        self,
        store: Store,
        runner: Launcher,
        limits: Limits,
        *,
        lifecycle: Lifecycle,
        clock: Clock = SYSTEM_CLOCK,
        hold_ahead: bool = True,
        reports: Reports | None = None,
        scheduler: Scheduler | None = None,
        on_attempt_end: Sequence[Callable[[AttemptEnd], None]] = (),
        accepting: bool = True,
    ) -> None:
        """`hold_ahead` False: tasks are only ever claimed, never handed over held (for a
        store that other daemons claim from too: a held task is still `queued` there).
        `reports`: the runner's inbox, listened to from now on; `on_attempt_end`: told of
        each end after its commit; `accepting` False: hold every task (`config.hold`)."""
        self.store = store
        self.lifecycle = lifecycle
        self.runner = runner
        self.limits = limits
        self.scheduler = scheduler
        self.on_attempt_end = list(on_attempt_end)  # after the commit
        self.clock = clock
        self.reports: list[Report] = []
        self.ready_queues: set[str] = set()
        self.accepting = accepting
        self._slots = Slots()
        self._holds = HoldAhead(store, runner, self._slots, self._has_work) if hold_ahead else None
        self._applier = ReportApplier(store, self.lifecycle, runner, self._slots, self._holds)
        self._wake = asyncio.Event()
        self._due = DueTimer(clock, self.times_changed)
        self._apply_timer: asyncio.TimerHandle | None = None
        self._time_dirty = True  # look for due work on the first turn
        self._stale = False  # counts could not be reloaded after a rollback
        self._full_since: float | None = None  # when turns began to fail for want of space
        store.on_commit(self.note_events, self.note_span)
        if reports is not None:
            reports.listen(self.report, self.wake)

    # -- inputs ---------------------------------------------------------------------------------

    def report(self, report: Report) -> None:
        """A launcher's news. An end that frees a slot wakes the loop now; one whose slot
        passed on to a held task only within PASSED_LATENCY (unless that slot's line of held
        tasks runs short: then now, so the line never runs dry), and a start within
        STARTED_LATENCY, so that short tasks do not cost a commit each."""
        self.reports.append(report)
        if isinstance(report, Ended):
            if report.next is None or self._holds is None or self._holds.runs_short(report.next):
                self._wake.set()  # a slot is free, or its line of held tasks needs topping up
            else:
                self._apply_within(PASSED_LATENCY)
        elif isinstance(report, Started):
            self._apply_within(STARTED_LATENCY)
        else:
            self._wake.set()

    def _apply_within(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        timer = self._apply_timer
        if timer is not None and timer.when() <= loop.time() + seconds:
            return
        if timer is not None:
            timer.cancel()
        self._apply_timer = loop.call_later(seconds, self._apply_due)

    def _apply_due(self) -> None:
        self._apply_timer = None
        self._wake.set()

    def note_events(self, events: list[EventRow]) -> None:
        """After any commit: queued tasks wake the loop; scheduled ones may need an earlier timer;
        a held task that left `queued` other than by starting (cancelled) is taken back."""
        if self._holds is not None:
            self._holds.note_events(events)
        for event in events:
            if event.to_state is TaskState.QUEUED:
                self.ready_queues.add(event.queue)
                self._wake.set()
            elif event.to_state is TaskState.SCHEDULED:
                self._time_dirty = True
                self._wake.set()

    def note_span(self, span: EventSpan) -> None:
        """A published batch, as `note_events` takes its events (none of its tasks is held)."""
        queued = {queue for queue, state in span.created if state is TaskState.QUEUED}
        if self._holds is not None:
            self._holds.note_queued(queued)
        self.ready_queues |= queued
        if any(state is TaskState.SCHEDULED for _, state in span.created):
            self._time_dirty = True
        self._wake.set()

    def _note_queued(self, events: Sequence[EventRow], spans: Sequence[EventSpan]) -> None:
        """Queues that `work` gave tasks in this very transaction: claim for them in it too,
        instead of one commit for the submit and one more for the claim."""
        self.ready_queues.update(e.queue for e in events if e.to_state is TaskState.QUEUED)
        for span in spans:
            self.ready_queues.update(q for q, state in span.created if state is TaskState.QUEUED)

    def _has_work(self, queue: str) -> None:
        """A held task of `queue` came back: it is claimable again."""
        self.ready_queues.add(queue)
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def work_in(self, queues: list[str]) -> None:
        """Another node says these queues have queued tasks (new, or left by its claim)."""
        if queues:
            self.ready_queues.update(queues)
            self._wake.set()

    def slots_freed(self, queues: list[str]) -> None:
        """Another node ended attempts of `queues`: those with a limit of the whole cluster's
        may have a slot for us now."""
        limited = {q for q in queues if q in self.limits.queue_limits}
        if limited:
            self.ready_queues |= limited
            self._wake.set()

    def look_again(self) -> None:
        """Take the store's word for which queues have work, and look (on a shared store,
        where another node's claim that rolled back or a node resumed leaves no event here)."""
        self.ready_queues |= self.store.ready_queues()
        self._time_dirty = True
        self._wake.set()

    def times_changed(self) -> None:
        """A schedule was added, paused or resumed, or a due time came: look for due work."""
        self._time_dirty = True
        self._wake.set()

    def load(self) -> None:
        """Initial in-memory view: running counts, queues with queued tasks, queue settings."""
        self._slots.count(self.store.running_by_queue(), self.store.stray_attempts())
        self.ready_queues = self.store.ready_queues()
        self.load_queues()

    def _reload_after_rollback(self) -> None:
        """In-memory counts changed inside a transaction that rolled back: take them from the
        store again (reads work even when writes fail, on a full disk say)."""
        self._slots.forget()
        self._unhold_all()
        try:
            self._slots.count(self.store.running_by_queue(), self.store.stray_attempts())
            self.ready_queues = self.store.ready_queues()
        except Exception as e:  # the next turn tries again (stale counts only claim less)
            self._stale = True
            log.error("cannot reload the dispatcher's counts: %r", e)
        else:
            self._stale = False

    def load_queues(self) -> None:
        """Queue limits and pauses, after a change; a resumed queue may start tasks now."""
        queues = self.store.list_queues()
        limits = {q.name: q.concurrency for q in queues if q.concurrency is not None}
        for name, cap in self.limits.node_limits.items():
            limits[name] = min(cap, limits.get(name, cap))
        self.limits.queue_limits = limits
        self.limits.paused = {q.name for q in queues if q.paused}
        self._unhold_all()  # held tasks were chosen under the old limits
        self._wake.set()

    def stop_accepting(self) -> None:
        """Start nothing new (the daemon is stopping): held tasks are taken back too."""
        self.accepting = False
        self._unhold_all()

    def _unhold_all(self) -> None:
        if self._holds is not None:
            self._holds.unhold_all()

    def hold_settled(self, task_id: int) -> asyncio.Future[bool] | None:
        """If the task is held, or being taken back: done once its supervisor has answered
        the take-back (a cancel committing next makes one), after which it cannot start.
        True: it never started; False: it may have (its start was reported before)."""
        return self._holds.settled(task_id) if self._holds is not None else None

    def held_count(self) -> int:
        return self._holds.count() if self._holds is not None else 0

    def running_count(self) -> int:
        return self._slots.taken()

    # -- the loop -------------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(0)  # whatever woke us, everything else on the loop gets a turn
            try:
                self.cycle()
            except StorageFull as e:
                # The turn rolled back and kept its reports: try again soon, so that what
                # ended while the disk was full is recorded as soon as space returns.
                self._note_full(e)
                await asyncio.sleep(RETRY_WHEN_FULL)
                self._wake.set()
            except TaskctlError as e:
                log.error("dispatch failed, retrying in %.0fs: %s", RETRY_AFTER_STORE_ERROR, e)
                await asyncio.sleep(RETRY_AFTER_STORE_ERROR)
                self._wake.set()
            except Exception:
                # A bug must not stop dispatching for good: log it, back off, go on.
                log.exception("dispatch cycle failed; retrying in %.0fs", RETRY_AFTER_STORE_ERROR)
                await asyncio.sleep(RETRY_AFTER_STORE_ERROR)
                self._wake.set()
            else:
                self._note_space_back()

    def _note_full(self, error: StorageFull) -> None:
        """Log the first turn that found the disk full (not one line per retry: the log is
        on that disk too)."""
        if self._full_since is None:
            self._full_since = time.monotonic()
            log.error(
                "%s; %d report(s) kept, trying again every %.2fs",
                error.message, len(self.reports), RETRY_WHEN_FULL,
            )  # fmt: skip

    def _note_space_back(self) -> None:
        if self._full_since is not None:
            log.info(
                "space is back: recorded what waited %.1fs", time.monotonic() - self._full_since
            )
            self._full_since = None

    def cycle(self, work: Callable[[int], T] | None = None) -> T | None:
        """One turn: apply reports, promote due tasks, claim; then start what was claimed.

        `work` runs in the same transaction (a submit, say), so that a task submitted while a
        slot is free is inserted and claimed with one commit; its result is returned."""
        if self._stale:
            self._reload_after_rollback()
        now = self.clock.now()
        reports, self.reports = self.reports, []
        # Time-driven work (cron fires, due scheduled tasks) only when something may be due:
        # the timer fired, or a change could have made something due earlier.
        timed = self._time_dirty
        self._time_dirty = False
        result = None
        try:
            with self.store.transaction():
                ended = self._applier.apply(reports, now)
                if work is not None:
                    result = work(now)
                    self._note_queued(
                        self.store.uncommitted_events(), self.store.uncommitted_spans()
                    )
                if timed and self.scheduler is not None:
                    self.scheduler.fire_due(now)
                if timed and self.lifecycle.promote_due(now) >= PROMOTE_AT_MOST:
                    self._time_dirty = True  # more are due than one turn promotes
                    self._wake.set()
                claimed = self._claim(now)
                held = self._hold_ahead()
        except BaseException:
            self.reports[:0] = reports  # nothing was applied: keep them for the next turn
            self._applier.rolled_back()
            if self._holds is not None:
                self._holds.rolled_back()
            self._time_dirty = self._time_dirty or timed
            self._reload_after_rollback()
            raise
        self._after_commit(ended, claimed, held)
        if timed:
            self._due.arm(self._next_due())
        return result

    def _after_commit(self, ended: list[Key], claimed: list[TaskRow], held: list[Held]) -> None:
        """What a committed turn hands on: ends to observers (and acknowledged), claims to
        the launcher to start, holds to it to keep."""
        self.runner.committed()
        if self._holds is not None:
            self._holds.committed()
        for end in self._applier.take_ends():
            for observer in self.on_attempt_end:
                observer(end)
        for task_id, attempt in ended:
            self.runner.forget(task_id, attempt)
        for task in claimed:
            self.runner.start(task, self.store.env_of(task.env_id))
        if self._holds is not None:
            self._holds.hand_over(held)

    def _claim(self, now: int) -> list[TaskRow]:
        if not self.accepting or not self.runner.ready():
            return []  # no supervisor to hand attempts to: claim when one is back
        free = self._slots.free(self.limits.concurrency)
        if free <= 0 or not self.ready_queues:
            return []
        queues = self.limits.claimable(self.ready_queues)
        slots = self._slots.open_in(queues, free, self.limits.queue_limits)
        held = self._holds.held() if self._holds is not None else ()
        claim = self.lifecycle.claim(slots, free, now, held=held)
        self.ready_queues -= claim.exhausted
        for task in claim.tasks:
            self._slots.claimed(task)
        return claim.tasks

    def _hold_ahead(self) -> list[Held]:
        """With holding ahead on: hold the next tasks of the one queue with work, if it runs
        within its limits (else slots go to claims, by priority)."""
        if self._holds is None:
            return []
        queues = self.limits.claimable(self.ready_queues)
        if not self.accepting or not self.runner.ready() or len(queues) != 1:
            return []
        (queue,) = queues
        limits = self.limits
        allowed = min(limits.queue_limits.get(queue, limits.concurrency), limits.concurrency)
        return self._holds.pick(queue, allowed)

    def _next_due(self) -> int | None:
        """The next scheduled task's or cron schedule's due time (epoch ms), if any."""
        candidates = [
            t for t in (self.store.next_due(), self.store.next_schedule_due()) if t is not None
        ]
        return min(candidates) if candidates else None
