"""Holding ahead: when every slot of a queue is taken, more of its tasks wait, and its tasks have
been short lately (HOLD_BELOW), the next ones are handed to the supervisor *held*, each to start
in the slot of a running attempt of the same queue the moment that ends (up to HOLD_AHEAD per
slot). The supervisor then starts the next task without waiting for the dispatcher's loop and its
commit, which is what short tasks are limited by, and ends whose slot passed on need no commit at
once: they are applied in batches (the dispatcher's PASSED_LATENCY). A held task stays `queued`
in the store (so `list` tells the truth) until the supervisor reports its start; the start
report claims it, fenced on its attempt number. Cancelling it, pausing or changing its queue, or
stopping the daemon takes held tasks back; the supervisor answers whether it had started (a
cancel that crossed the start stops it and records the attempt it ran). Only short tasks are
held, so a task submitted later with a higher priority waits at most HOLD_AHEAD short tasks per
slot more than otherwise.

Holding ahead is a switch (`Dispatcher(hold_ahead=False)`): a held task is still `queued` in
the store, which is only safe while this daemon is the store's only claimer. Off, `HoldAhead` is
never made and nothing is ever handed to the launcher held.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass

from taskctl.api import TaskState
from taskctld.dispatcher.slots import Slots
from taskctld.launcher import Key, Launcher, Released, Unheld
from taskctld.store import EventRow, Store, TaskRow

HOLD_AHEAD = 16  # tasks held per running slot at most (each waits for the one before it)
HOLD_BELOW = 50  # ms: hold ahead in a queue only while its attempts take less than this
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


class HoldAhead:
    """Owns every hold: which tasks are held and after which attempt, the lines they form per
    slot, the take-backs in flight and who waits on them. `on_back(queue)` is told when a held
    task of `queue` comes back to be claimed."""

    def __init__(
        self, store: Store, launcher: Launcher, slots: Slots, on_back: Callable[[str], None]
    ) -> None:
        self.store = store
        self.launcher = launcher
        self.slots = slots
        self.on_back = on_back
        self._held: dict[int, Held] = {}  # by task id
        self._next_of: dict[Key, Key] = {}  # attempt -> the held attempt that follows it
        self._no_hold_after: set[Key] = set()  # attempts the supervisor would not hold after
        self._taking_back: dict[int, int] = {}  # task id -> hold token of an unhold in flight
        self._settled: dict[int, asyncio.Future[bool]] = {}  # task id -> how its hold ended
        self._answered: list[Unheld] = []  # take-backs answered this turn: settled at commit
        self._tokens = itertools.count(1)

    # -- what is held ---------------------------------------------------------------------------

    def held(self) -> Collection[int]:
        """The ids of held tasks (claims pass over them)."""
        return self._held

    def count(self) -> int:
        return len(self._held)

    def runs_short(self, key: Key | None) -> bool:
        """Whether fewer than REFILL_BELOW held attempts wait in line after `key` (then the
        line is topped up at once, so that it never runs dry)."""
        depth = 0
        while key is not None and (key := self._next_of.get(key)) is not None:
            depth += 1
        return depth < REFILL_BELOW

    # -- choosing, in the turn's transaction; handing over, after its commit --------------------

    def pick(self, queue: str, allowed: int) -> list[Held]:
        """Hold the next queued tasks of `queue`, the only queue with work, which may take
        `allowed` slots: each after the last attempt in line for one of its running slots (at
        most HOLD_AHEAD per slot); only while its tasks are short (HOLD_BELOW) and it runs
        within `allowed`."""
        if (
            self.slots.takes(queue, HOLD_BELOW) >= HOLD_BELOW
            or self.slots.taken_in(queue) > allowed
        ):
            return []
        lines: list[tuple[int, Key]] = []  # (held so far, last key) per running slot
        for key in self.slots.claimed_in(queue):
            if not self.launcher.runs_on_current(key):
                continue
            depth, last = 0, key
            while (following := self._next_of.get(last)) is not None:
                depth, last = depth + 1, following
            if depth < HOLD_AHEAD and last not in self._no_hold_after:
                lines.append((depth, last))
        lines = lines[:allowed]
        want = sum(HOLD_AHEAD - depth for depth, _ in lines)
        held = []
        for task in self.store.peek_ready(queue, want, self._held) if lines else []:
            depth, after = min(lines)
            lines.remove((depth, after))
            item = Held(task, after, next(self._tokens))
            self._held[task.id] = item
            self._next_of[after] = item.key
            held.append(item)
            if depth + 1 < HOLD_AHEAD:
                lines.append((depth + 1, item.key))
        return held

    def hand_over(self, picked: Iterable[Held]) -> None:
        """Give the launcher what `pick` chose, once its turn committed."""
        for item in picked:
            if self._held.get(item.task.id) is not item:
                continue  # taken back by this very commit (another queue's task came, say)
            env = self.store.env_of(item.task.env_id)
            if not self.launcher.hold(item.task, env, item.after, item.token):
                self._drop(item.task.id)

    # -- taking back ----------------------------------------------------------------------------

    def note_events(self, events: Sequence[EventRow]) -> None:
        """After a commit: a held task that left `queued` other than by starting (cancelled)
        is taken back; so is every held task when another queue has queued work (slots go by
        priority again)."""
        holding = {held.task.queue for held in self._held.values()}
        if not holding:
            return
        for event in events:
            if event.to_state not in (TaskState.QUEUED, TaskState.RUNNING):
                self._unhold(event.task_id)
            elif event.to_state is TaskState.QUEUED and event.queue not in holding:
                self.unhold_all()
                return

    def note_queued(self, queues: set[str]) -> None:
        """Tasks were queued in `queues` (a published batch): as `note_events`."""
        if self._held and queues - {held.task.queue for held in self._held.values()}:
            self.unhold_all()

    def unhold_all(self) -> None:
        for task_id in list(self._held):
            self._unhold(task_id)
        self._next_of.clear()

    def settled(self, task_id: int) -> asyncio.Future[bool] | None:
        """If the task is held, or being taken back: done once its supervisor has answered
        the take-back (a cancel committing next makes one), after which it cannot start.
        True: it never started; False: it may have (its start was reported before)."""
        if task_id not in self._held and task_id not in self._taking_back:
            return None
        settled = self._settled.get(task_id)
        if settled is None or settled.done():
            settled = self._settled[task_id] = asyncio.get_running_loop().create_future()
        return settled

    def _unhold(self, task_id: int) -> None:
        """Take a held task back. The supervisor gives back what was held after it; if it
        started meanwhile, its start report says so (before its answer) and claims it, or,
        cancelled, stops it."""
        held = self._drop(task_id)
        if held is not None:
            self._taking_back[task_id] = held.token
            self.launcher.unhold(held.key, held.token)

    def _drop(
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
            self.on_back(held.task.queue)
        return held

    # -- what the reports say about holds (in the turn's transaction) ----------------------------

    def started(self, key: Key) -> TaskRow | None:
        """Attempt `key` started without a claim: if it was held, it is no longer, and this is
        its row as it was queued (unchanged since: any change would have taken it back)."""
        held = self._drop(*key, started=True)
        return None if held is None else held.task

    def released(self, report: Released) -> Key | None:
        """A held attempt came back unstarted: its key, if it is the hold we have."""
        held = self._held.get(report.task_id)
        if held is None or held.attempt != report.attempt or report.token not in (None, held.token):
            return None  # about a hold taken back already (and maybe made again since)
        self._drop(report.task_id)
        if report.token is not None:
            self._no_hold_after.add(held.after)  # the supervisor would only refuse again
        return held.key

    def answered(self, report: Unheld) -> None:
        """A take-back was answered: settled once this turn commits."""
        self._answered.append(report)

    def slot_ended(self, key: Key) -> None:
        """Attempt `key` ended: nothing waits in line after it any more."""
        self._no_hold_after.discard(key)
        self._next_of.pop(key, None)

    def committed(self) -> None:
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

    def rolled_back(self) -> None:
        """The turn rolled back: its answers come again with its reports."""
        self._answered.clear()
