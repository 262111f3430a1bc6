"""The dispatcher: the daemon's main loop. Each turn is one short transaction that

  1. applies what supervisors reported (an attempt started, an attempt ended -> next state),
  2. promotes scheduled tasks whose time has come,
  3. claims queued tasks for the free slots,

and then, after the commit, hands the claimed attempts to the runner. Batching all three in one
commit is what keeps `synchronous=FULL` from capping throughput at a commit per state change.
The loop sleeps until something wakes it: a report, a commit that queued a task, or the timer of
the next scheduled task. It never polls.

Holding ahead: when every slot of a queue is taken, more of its tasks wait, and its tasks have
been short lately (HOLD_BELOW), the next ones are handed to the supervisor *held*, each to start
in the slot of a running attempt of the same queue the moment that ends (up to HOLD_AHEAD per
slot). The supervisor then starts the next task without waiting for this loop and its commit,
which is what short tasks are limited by, and ends whose slot passed on need no commit at once:
they are applied in batches (PASSED_LATENCY). A held task stays `queued` in the store (so `list`
tells the truth) until the supervisor reports its start; the start report claims it, fenced on
its attempt number. Cancelling it, pausing or changing its queue, or stopping the daemon takes
held tasks back; the supervisor answers whether it had started (a cancel that crossed the start
stops it and records the attempt it ran). Only short tasks are held, so a task submitted later
with a higher priority waits at most HOLD_AHEAD short tasks per slot more than otherwise.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeVar

from taskctl.api import TaskState
from taskctl.errors import StorageFull, TaskctlError
from taskctl.units import now_ms
from taskctld.lifecycle import Lifecycle
from taskctld.runner import Ended, Key, Released, Report, Started, Unheld
from taskctld.store import AttemptEnd, EventRow, EventSpan, Store, TaskRow

if TYPE_CHECKING:
    from taskctld.reports import Reports
    from taskctld.scheduler import Scheduler

log = logging.getLogger("taskctld.dispatcher")
T = TypeVar("T")

RETRY_AFTER_STORE_ERROR = 1.0
RETRY_WHEN_FULL = 0.25  # seconds between turns while the state folder is out of space
PROMOTE_BATCH = 1000  # scheduled tasks made queued per turn at most (see store.promote_due)
# The due timer runs on the monotonic clock, which stops while the machine is suspended: look at
# the wall clock at least this often (seconds), so a schedule is not late by the time asleep.
WALL_CLOCK_CHECK = 60.0
STARTED_LATENCY = 0.05  # seconds: how late a start may be written when nothing else is
HOLD_AHEAD = 16  # tasks held per running slot at most (each waits for the one before it)
HOLD_BELOW = 50  # ms: hold ahead in a queue only while its attempts take less than this
PASSED_LATENCY = 0.005  # seconds: how late an end whose slot passed on may be applied
REFILL_BELOW = HOLD_AHEAD // 2  # held after a passed-on start: fewer, and its line is topped up now


@dataclass
class Held:
    """A queued task handed to the supervisor to start when attempt `after` ends."""

    task: TaskRow  # as it was queued: the attempt held is its next one
    after: Key
    token: int  # names this hold: a late answer about an earlier one is not about it

    @property
    def attempt(self) -> int:
        return self.task.attempts + 1

    @property
    def key(self) -> Key:
        return (self.task.id, self.attempt)


class Launcher(Protocol):
    """What the dispatcher asks of the runner (`runner.Runner`; a scripted fake in tests)."""

    def ready(self) -> bool: ...
    def start(self, task: TaskRow, env: dict[str, str] | None) -> None: ...
    def hold(self, task: TaskRow, env: dict[str, str] | None, after: Key, token: int) -> bool: ...
    def unhold(self, key: Key, token: int) -> None: ...
    def stop(self, task_id: int, attempt: int, kind: str) -> bool: ...
    def forget(self, task_id: int, attempt: int) -> None: ...
    def committed(self) -> None: ...
    def runs_on_current(self, key: Key) -> bool: ...


@dataclass
class Limits:
    concurrency: int
    queue_limits: dict[str, int] = field(default_factory=dict)
    paused: set[str] = field(default_factory=set)


class Dispatcher:
    def __init__(
        self,
        store: Store,
        runner: Launcher,
        limits: Limits,
        *,
        lifecycle: Lifecycle | None = None,
        clock: Callable[[], int] = now_ms,
        reports: Reports | None = None,
        scheduler: Scheduler | None = None,
        on_attempt_end: Sequence[Callable[[AttemptEnd], None]] = (),
        accepting: bool = True,
    ) -> None:
        self.store = store
        self.lifecycle = lifecycle or Lifecycle(store)
        self.runner = runner
        self.limits = limits
        self.scheduler = scheduler
        self.on_attempt_end = list(on_attempt_end)  # after the commit
        self.clock = clock
        self.reports: list[Report] = []
        self.running: dict[str, int] = {}
        self.ready_queues: set[str] = set()
        self.accepting = accepting
        self.last_cycle_at = 0
        self._wake = asyncio.Event()
        self._due_timer: asyncio.TimerHandle | None = None
        self._apply_timer: asyncio.TimerHandle | None = None
        self._ended: list[AttemptEnd] = []
        self._due_at: int | None = None
        self._time_dirty = True  # look for due work on the first turn
        self._claimed: dict[tuple[int, int], TaskRow] = {}  # running attempts, as claimed
        self._held: dict[int, Held] = {}  # by task id
        self._next_of: dict[Key, Key] = {}  # attempt -> the held attempt that follows it
        self._inherited: dict[Key, str] = {}  # started in a passed-on slot (queue), unclaimed
        self._took: dict[str, float] = {}  # queue -> how long its attempts take lately (ms)
        self._refused: dict[Key, str] = {}  # started once taken back: keeps its slot to its end
        self._no_hold_after: set[Key] = set()  # attempts the supervisor would not hold after
        self._taking_back: dict[int, int] = {}  # task id -> hold token of an unhold in flight
        self._settled: dict[int, asyncio.Future[bool]] = {}  # task id -> how its hold ended
        self._answered: list[Unheld] = []  # take-backs answered this turn: settled at commit
        self._tokens = itertools.count(1)
        self._stale = False  # counts could not be reloaded after a rollback
        self._full_since: float | None = None  # when turns began to fail for want of space
        store.on_commit(self.note_events, self.note_span)
        if reports is not None:
            reports.listen(self.report, self.wake)

    # -- inputs ---------------------------------------------------------------------------------

    def report(self, report: Report) -> None:
        """A supervisor's news. An end that frees a slot wakes the loop now; one whose slot
        passed on to a held task only within PASSED_LATENCY (unless fewer than REFILL_BELOW
        wait in that slot's line: then now, so the line never runs dry), and a start within
        STARTED_LATENCY, so that short tasks do not cost a commit each."""
        self.reports.append(report)
        if isinstance(report, Released | Unheld) or (
            isinstance(report, Ended) and report.next is None
        ):
            self._wake.set()
        elif isinstance(report, Ended) and self._held_after(report.next) < REFILL_BELOW:
            self._wake.set()  # the supervisor's line for this slot runs short: top it up now
        else:
            self._apply_within(PASSED_LATENCY if isinstance(report, Ended) else STARTED_LATENCY)

    def _held_after(self, key: Key | None) -> int:
        """How many held attempts wait in line after `key`."""
        depth = 0
        while key is not None and (key := self._next_of.get(key)) is not None:
            depth += 1
        return depth

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
        holding = {held.task.queue for held in self._held.values()}
        for event in events:
            if holding and event.to_state not in (TaskState.QUEUED, TaskState.RUNNING):
                self._unhold(event.task_id)
            elif holding and event.to_state is TaskState.QUEUED and event.queue not in holding:
                self.unhold_all()  # another queue wants slots: they go by priority again
                holding = set()
            if event.to_state is TaskState.QUEUED:
                self.ready_queues.add(event.queue)
                self._wake.set()
            elif event.to_state is TaskState.SCHEDULED:
                self._time_dirty = True
                self._wake.set()

    def note_span(self, span: EventSpan) -> None:
        """A published batch, as `note_events` takes its events (none of its tasks is held)."""
        queued = {queue for queue, state in span.created if state is TaskState.QUEUED}
        if self._held and queued - {held.task.queue for held in self._held.values()}:
            self.unhold_all()
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

    def wake(self) -> None:
        self._wake.set()

    def load(self) -> None:
        """Initial in-memory view: running counts, queues with queued tasks, queue settings."""
        self._count_running()
        self.ready_queues = self.store.ready_queues()
        self.load_queues()

    def _count_running(self) -> None:
        """Slots taken, from the store: running tasks, and stray attempts still being stopped
        (counted as refused starts, so that their ends free their slots)."""
        self.running = self.store.running_by_queue()
        for task_id, attempt, queue in self.store.stray_attempts():
            self._count_stray((task_id, attempt), queue)

    def _count_stray(self, key: Key, queue: str) -> None:
        """A stray attempt (its start crossed its task's cancel) takes a slot until it ends;
        counted as a refused start, whose end frees it."""
        self._refused[key] = queue
        self.running[queue] = self.running.get(queue, 0) + 1

    def _reload_after_rollback(self) -> None:
        """In-memory counts changed inside a transaction that rolled back: take them from the
        store again (reads work even when writes fail, on a full disk say)."""
        self._claimed.clear()
        self.unhold_all()
        self._inherited.clear()
        self._refused.clear()
        try:
            self._count_running()
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
        self.unhold_all()  # held tasks were chosen under the old limits
        self._wake.set()

    def stop_accepting(self) -> None:
        """Start nothing new (the daemon is stopping): held tasks are taken back too."""
        self.accepting = False
        self.unhold_all()

    def unhold_all(self) -> None:
        for task_id in list(self._held):
            self._unhold(task_id)
        self._next_of.clear()

    def hold_settled(self, task_id: int) -> asyncio.Future[bool] | None:
        """If the task is held, or being taken back: done once its supervisor has answered
        the take-back (a cancel committing next makes one), after which it cannot start.
        True: it never started; False: it may have (its start was reported before)."""
        if task_id not in self._held and task_id not in self._taking_back:
            return None
        settled = self._settled.get(task_id)
        if settled is None or settled.done():
            settled = self._settled[task_id] = asyncio.get_running_loop().create_future()
        return settled

    def _settle_answered(self) -> None:
        """After the commit that applied them (with any start reported before them): the
        take-backs answered are over, and whoever waits on them may look at the store."""
        answered, self._answered = self._answered, []
        for report in answered:
            if self._taking_back.get(report.task_id) != report.token:
                continue  # about an earlier take-back: the task was held again since
            del self._taking_back[report.task_id]
            settled = self._settled.pop(report.task_id, None)
            if settled is not None and not settled.done():
                settled.set_result(report.taken)

    def _unhold(self, task_id: int) -> None:
        """Take a held task back. The supervisor gives back what was held after it; if it
        started meanwhile, its start report says so (before its answer) and claims it, or,
        cancelled, stops it."""
        held = self._drop_held(task_id)
        if held is not None:
            self._taking_back[task_id] = held.token
            self.runner.unhold(held.key, held.token)

    def _drop_held(
        self, task_id: int, attempt: int | None = None, *, started: bool = False
    ) -> Held | None:
        """Forget a held task (of that attempt, when given): it started, or it came back and
        its queue has work again."""
        held = self._held.get(task_id)
        if held is None or attempt not in (None, held.attempt):
            return None
        del self._held[task_id]
        if self._next_of.get(held.after) == held.key:
            del self._next_of[held.after]
        if not started:
            self.ready_queues.add(held.task.queue)
            self._wake.set()
        return held

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
                    self._note_queued(
                        self.store.uncommitted_events(), self.store.uncommitted_spans()
                    )
                if timed and self.scheduler is not None:
                    self.scheduler.fire_due(now)
                if timed and self.lifecycle.promote_due(now) >= PROMOTE_BATCH:
                    self._time_dirty = True  # more are due than one turn promotes
                    self._wake.set()
                claimed = self._claim(now)
                held = self._hold_ahead()
        except BaseException:
            self.reports[:0] = reports  # nothing was applied: keep them for the next turn
            self._ended.clear()
            self._answered.clear()
            self._time_dirty = self._time_dirty or timed
            self._reload_after_rollback()
            raise
        self.last_cycle_at = now
        self.runner.committed()
        self._settle_answered()
        ended_now, self._ended = self._ended, []
        for end in ended_now:
            for observer in self.on_attempt_end:
                observer(end)
        for task_id, attempt in ended:
            self.runner.forget(task_id, attempt)
        for task in claimed:
            self.runner.start(task, self.store.env_of(task.env_id))
        for item in held:
            if self._held.get(item.task.id) is not item:
                continue  # taken back by this very commit (another queue's task came, say)
            env = self.store.env_of(item.task.env_id)
            if not self.runner.hold(item.task, env, item.after, item.token):
                self._drop_held(item.task.id)
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
                self._apply_started(report, now)
            elif isinstance(report, Released):
                self._apply_released(report)
            elif isinstance(report, Unheld):
                self._answered.append(report)
            else:
                self._apply_end(report, now)
                ended.append((report.end.task_id, report.end.attempt))
        return ended

    def _apply_released(self, report: Released) -> None:
        held = self._held.get(report.task_id)
        if held is None or held.attempt != report.attempt or report.token not in (None, held.token):
            return  # about a hold taken back already (and maybe made again since)
        self._drop_held(report.task_id)
        if report.token is not None:
            self._no_hold_after.add(held.after)  # the supervisor would only refuse again
        queue = self._inherited.pop(held.key, None)
        if queue is not None:  # it was to take a slot passed on: that slot is free
            self.running[queue] = max(0, self.running.get(queue, 0) - 1)

    def _apply_started(self, report: Started, now: int) -> None:
        key = (report.task_id, report.attempt)
        if key not in self._claimed:
            adopted = self._adopt(key, now, report.started_at)
            task = adopted or self.store.get_task(report.task_id)
            if task is None or task.state is not TaskState.RUNNING or task.attempts != key[1]:
                # A held task cancelled as it started: stop it, and keep on the record that
                # it ran (its end is written to this attempt as it comes).
                log.warning("task %d started as it was cancelled; stopping it", key[0])
                recorded = self.lifecycle.record_stray_start(
                    *key, pid=report.pid, started_at=report.started_at
                )
                self.runner.stop(*key, "cancel")
                if recorded and task is not None and key not in self._refused:
                    self._count_stray(key, task.queue)  # first heard of after a restart
                return
            if adopted is not None:
                self._claimed[key] = adopted
        self.store.mark_started(*key, pid=report.pid, started_at=report.started_at)

    def _adopt(self, key: Key, now: int, started_at: int) -> TaskRow | None:
        """Claim an attempt the supervisor started (or tried to) without a claim of ours: a
        held one, or one that started while no daemon listened. Its slot is counted unless
        it was passed on from the attempt before it. The caller keeps the row if it runs."""
        # Still held, it is as it was queued: any change to it since would have taken it back.
        held = self._drop_held(*key, started=True)
        inherited = self._inherited.pop(key, None)
        task = self.lifecycle.claim_attempt(
            *key, now, started_at, None if held is None else held.task
        )
        if task is None:
            if inherited is not None:  # it is being stopped: its slot is taken until it ends
                self._refused[key] = inherited
            return None
        if inherited is None:
            self.running[task.queue] = self.running.get(task.queue, 0) + 1
        return task

    def _apply_end(self, report: Ended, now: int) -> None:
        end = report.end
        key = (end.task_id, end.attempt)
        self._no_hold_after.discard(key)
        refused = self._refused.pop(key, None)
        task = None
        if refused is None:
            # The row as claimed is still right for the policy (running tasks do not change
            # but through here); the fenced move below refuses anything stale.
            task = self._claimed.pop(key, None)
            task = task or self._adopt(key, now, end.started_at or end.ended_at)
            refused = self._refused.pop(key, None)  # refused just now: it never said it started
        if refused is not None:  # a held start that was refused: its end and its slot
            self._next_of.pop(key, None)
            self._pass_or_free(refused, report.next)
            if self.store.end_attempt(end):
                self._ended.append(end)
            return
        news = self.store.end_attempt(end)  # a repeated or stale report is not
        if news:
            self._ended.append(end)
        self._next_of.pop(key, None)
        task = task or self.store.get_task(end.task_id)
        if task is None or task.state is not TaskState.RUNNING or task.attempts != end.attempt:
            return
        if news and end.started_at is not None:  # how long its queue's attempts take lately
            took = max(0, end.ended_at - end.started_at)
            before = self._took.get(task.queue)
            self._took[task.queue] = took if before is None else 0.8 * before + 0.2 * took
        if self.lifecycle.finish(task, end, now, counts=report.counts):
            self._pass_or_free(task.queue, report.next)

    def _pass_or_free(self, queue: str, following: Key | None) -> None:
        """An attempt of `queue` ended: its slot is free, or passed on to `following`."""
        if following is None:
            self.running[queue] = max(0, self.running.get(queue, 0) - 1)
        else:
            self._inherited[following] = queue  # the count stays

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
        claim = self.lifecycle.claim(slots, free, now, held=self._held)
        self.ready_queues -= claim.exhausted
        for task in claim.tasks:
            self.running[task.queue] = self.running.get(task.queue, 0) + 1
            self._claimed[(task.id, task.attempts)] = task
        return claim.tasks

    def _hold_ahead(self) -> list[Held]:
        """Hand the next queued tasks of a full queue to the supervisor, each after the last
        attempt in line for one of its running slots (see the module's docstring). Only when
        that queue is the only one with work (else slots go to claims, by priority), its
        tasks are short, and it runs within its limits."""
        queues = self.ready_queues - self.limits.paused
        if not self.accepting or not self.runner.ready() or len(queues) != 1:
            return []
        (queue,) = queues
        allowed = min(
            self.limits.queue_limits.get(queue, self.limits.concurrency), self.limits.concurrency
        )
        if self._took.get(queue, HOLD_BELOW) >= HOLD_BELOW or self.running.get(queue, 0) > allowed:
            return []
        slots: list[tuple[int, Key]] = []  # (held so far, last key) per running slot
        for key, task in self._claimed.items():
            if task.queue != queue or not self.runner.runs_on_current(key):
                continue
            depth, last = 0, key
            while (following := self._next_of.get(last)) is not None:
                depth, last = depth + 1, following
            if depth < HOLD_AHEAD and last not in self._no_hold_after:
                slots.append((depth, last))
        slots = slots[:allowed]
        want = sum(HOLD_AHEAD - depth for depth, _ in slots)
        held = []
        for task in self.store.peek_ready(queue, want, self._held) if slots else []:
            depth, after = min(slots)
            slots.remove((depth, after))
            item = Held(task, after, next(self._tokens))
            self._held[task.id] = item
            self._next_of[after] = item.key
            held.append(item)
            if depth + 1 < HOLD_AHEAD:
                slots.append((depth + 1, item.key))
        return held

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

    def held_count(self) -> int:
        return len(self._held)

    def running_count(self) -> int:
        return sum(self.running.values())
