"""The task lifecycle: every decision about a task's state, whatever the backend.

A new task's state, the settling of tasks that wait on others (and the cascade of a failure
down a chain of them), which queued tasks a claim takes and in which order, the end of an
attempt (outcome -> retry policy -> next state), cancel, retry, the promotion of due tasks and
a held start that crossed a cancel are decided here, and carried out through the store's
primitives inside the caller's transaction. The store keeps SQL; this keeps the rules.

After every move to a final state, the tasks waiting on that one are settled in the same
transaction (skipped at no cost while the store has never held a dependency).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import NamedTuple

from taskctl.api import FINAL_STATES, Backoff, Outcome, TaskState
from taskctld import policy
from taskctld.store import (
    AttemptEnd,
    Candidate,
    Claim,
    Dependent,
    EventSpan,
    InitialStates,
    Move,
    NewTask,
    StagedBatch,
    Store,
    TaskRow,
)

# A new task waits for its dependencies, else for its run_at, else it is ready. Given to a
# store as data for a staged batch, whose states it sets in one statement.
INITIAL = InitialStates(
    dependent=TaskState.WAITING, delayed=TaskState.SCHEDULED, ready=TaskState.QUEUED
)
FAILING = frozenset({TaskState.FAILED, TaskState.CANCELLED})  # what fails an `after` dependent
PROMOTE_AT_MOST = 1000  # scheduled tasks made queued by one `promote_due` (a turn's share)


def initial_state(task: NewTask, now: int) -> TaskState:
    """The state a new task starts in: `INITIAL`'s rule, task by task."""
    if task.after or task.after_any:
        return INITIAL.dependent
    return INITIAL.delayed if task.run_at and task.run_at > now else INITIAL.ready


class Ending(NamedTuple):
    """An attempt's end as `finish_many` takes it: the running task (as claimed), how its
    attempt ended, and whether that counts against its retry policy (False: never ran)."""

    task: TaskRow
    end: AttemptEnd
    counts: bool = True


def claim_order(candidate: Candidate) -> tuple[int, int, int]:
    """Highest priority first, then the earliest run_at (FIFO), then the lowest id."""
    return (-candidate.priority, candidate.run_at, candidate.id)


class Lifecycle:
    """The rules, over any `Store`. Each method runs inside the caller's transaction (the
    store refuses writes outside one); one that changes a given task returns False (or None)
    when another actor changed it first."""

    def __init__(self, store: Store, *, jitter: Callable[[], float] = random.random) -> None:
        self.store = store
        self.jitter = jitter

    # -- in ---------------------------------------------------------------------------------------

    def submit(self, tasks: Sequence[NewTask], now: int) -> list[int]:
        """Insert tasks, each in its initial state; returns their ids in order. A task with
        dependencies starts waiting and is settled at once: queued (or scheduled) if they are
        all met already, failed if one failed already. Raises InvalidRequest naming an unknown
        dependency (nothing is inserted)."""
        states = [initial_state(t, now) for t in tasks]
        ids = self.store.insert_tasks(tasks, states, now)
        waiting = [
            Dependent(task_id, t.queue, t.run_at or now)
            for task_id, t, state in zip(ids, tasks, states, strict=True)
            if state is INITIAL.dependent
        ]
        self._settle(waiting, now)
        return ids

    def publish_staged(self, staging: str, now: int, since: int) -> StagedBatch:
        """Publish a staged batch in the caller's transaction, each task in its initial state
        (`store.publish_staged` says what else), its waiting tasks settled as `submit` does."""
        batch = self.store.publish_staged(staging, now, since, INITIAL)
        self._settle(batch.dependent, now)
        return batch

    def publish_apart(self, staging: str, now: int, since: int) -> tuple[StagedBatch, EventSpan]:
        """Publish a staged batch without dependencies (nothing to settle) in a transaction of
        its own, from a thread; see `store.publish_apart`."""
        return self.store.publish_apart(staging, now, since, INITIAL)

    def promote_due(self, now: int) -> int:
        """Scheduled tasks whose time has come become queued, at most `PROMOTE_AT_MOST`;
        returns how many."""
        due = self.store.due_ids(now, PROMOTE_AT_MOST)
        return sum(self.store.move(i, TaskState.SCHEDULED, TaskState.QUEUED, now) for i in due)

    # -- dependencies -----------------------------------------------------------------------------

    def settle(self, waiting: Sequence[Dependent], now: int) -> None:
        """Settle these waiting tasks now (a sweep's: they should not be waiting any more)."""
        self._settle(waiting, now)

    def _settle(self, waiting: Iterable[Dependent], now: int) -> None:
        """Settle tasks that wait on others; those that fail release their own dependents."""
        failed = deque(task.id for task in waiting if self._settle_one(task, now))
        if failed:
            self._release(failed, now)

    def _after_final(self, task_id: int, now: int) -> None:
        """`task_id` just became final: settle every task waiting on it."""
        if self.store.any_dependencies():
            self._release(deque([task_id]), now)

    def _release(self, final: deque[int], now: int) -> None:
        """Settle the tasks waiting on each of `final`. A failure cascades (a dependent that
        fails releases its own), worked through as a queue, not by recursion, so that a chain
        of any length is fine."""
        while final:
            for dependent in self.store.dependents(final.popleft(), TaskState.WAITING):
                if self._settle_one(dependent, now):
                    final.append(dependent.id)

    def _settle_one(self, task: Dependent, now: int) -> bool:
        """Queue a waiting task whose dependencies are all final (schedule it if its run_at is
        ahead), fail it if one it needed to succeed failed or was cancelled, or leave it
        waiting. True when it failed."""
        deps = self.store.dependency_states(task.id)
        if any(not any_end and state in FAILING for state, any_end in deps):
            return self.store.move(
                task.id, TaskState.WAITING, TaskState.FAILED, now, reason="dependency_failed",
                queue=task.queue, finished_at=now,
            )  # fmt: skip
        if all(state in FINAL_STATES for state, _ in deps):
            if task.run_at > now:  # it also had a delay that has not passed yet
                self.store.move(
                    task.id, TaskState.WAITING, TaskState.SCHEDULED, now, queue=task.queue
                )
            else:  # ready now: it queues behind what was already waiting for a slot
                self.store.move(
                    task.id, TaskState.WAITING, TaskState.QUEUED, now, queue=task.queue, run_at=now
                )
        return False

    # -- claims -----------------------------------------------------------------------------------

    def claim(
        self, slots: dict[str, int], limit: int, now: int, held: Collection[int] = ()
    ) -> Claim:
        """Up to `limit` queued tasks become running, at most `slots[q]` from queue q, in
        `claim_order`, each as its next attempt. Tasks in `held` (handed to a supervisor
        ahead, still queued) are passed over. Also says which queues have nothing more
        queued (a queue that loses the global slots to others keeps its tasks)."""
        candidates: list[Candidate] = []
        last_of: dict[str, int] = {}  # queue -> id of its last queued task, if all were read
        for queue, free in slots.items():
            want = min(free, limit)
            if want > 0:
                found, complete = self.store.claim_candidates(queue, want, held)
                if complete:
                    last_of[queue] = found[-1].id if found else 0
                candidates += found[:want]
        if len(slots) > 1:
            candidates.sort(key=claim_order)
        chosen = [c.id for c in candidates[:limit]]
        taken = set(chosen)
        exhausted = {q for q, last in last_of.items() if last == 0 or last in taken}
        claimed = self.store.start_attempts(chosen, TaskState.QUEUED, TaskState.RUNNING, now)
        return Claim(claimed, exhausted)

    def claim_attempt(
        self, task_id: int, attempt: int, now: int, started_at: int, known: TaskRow | None = None
    ) -> TaskRow | None:
        """Claim one queued task as attempt `attempt`: a held attempt its supervisor started
        at `started_at`. None when the task is not queued at the attempt before (cancelled
        meanwhile, say), or was queued after that start (an old run that a journal kept is not
        this queueing's). `known`: the task as the caller knows it unchanged (else it is read)."""
        found = self.store.state_of(task_id)
        if found is None or found[0] is not TaskState.QUEUED or found[1] > started_at:
            return None
        task = known if known is not None else self.store.get_task(task_id)
        if task is None or not self._start(task, attempt, now):
            return None
        return task

    def _start(self, task: TaskRow, number: int, now: int) -> bool:
        """queued -> running as attempt `number` (fenced on the attempt before it), with its
        attempt row; `task` is updated to match."""
        if not self.store.move(
            task.id, TaskState.QUEUED, TaskState.RUNNING, now, attempt=number, queue=task.queue,
            fence=number - 1, attempts=number, tries=task.tries + 1,
            started_at=task.started_at or now,
        ):  # fmt: skip
            return False
        self.store.open_attempt(task.id, number, now)
        task.attempts, task.tries, task.state = number, task.tries + 1, TaskState.RUNNING
        return True

    def record_stray_start(self, task_id: int, attempt: int, pid: int, started_at: int) -> bool:
        """A held attempt started as its task was cancelled (the cancel and the start
        crossed): the task stays cancelled, and its history shows that this attempt ran.
        False when the task is not cancelled at the attempt before."""
        if not self.store.note_attempt(task_id, attempt, TaskState.CANCELLED):
            return False
        self.store.open_attempt(task_id, attempt, started_at, pid=pid)
        return True

    # -- the end of an attempt --------------------------------------------------------------------

    def finish(self, task: TaskRow, end: AttemptEnd, now: int, *, counts: bool) -> bool:
        """The attempt `end` of running `task` ended: its retry policy decides the next state.
        False when the task is no longer running that attempt (a stale report)."""
        return self.finish_many([Ending(task, end, counts)], now) == [True]

    def finish_many(self, endings: Sequence[Ending], now: int) -> list[bool]:
        """`finish` of each ending (tasks distinct), set-based: each decided by its task's retry
        policy, all moved in one `move_many`, then the dependents of those that became final
        settled (one look for any dependency at all). Says, in order, which moved (False: a
        stale report)."""
        moves = [self._next_move(e.task, e.end, now, e.counts) for e in endings]
        moved = self.store.move_many(moves, now)
        final = deque(m.task_id for m in moves if m.task_id in moved and m.new in FINAL_STATES)
        if final and self.store.any_dependencies():
            self._release(final, now)
        return [m.task_id in moved for m in moves]

    def _next_move(self, task: TaskRow, end: AttemptEnd, now: int, counts: bool) -> Move:
        """The move out of running that the retry policy decides for `end`, fenced on it."""
        decision = self.decide(task, end.outcome, end.exit_code, counts=counts)
        reason = (
            end.cause
            if end.cause and decision.state is not TaskState.SUCCEEDED
            else decision.reason
        )
        move = Move(
            task.id, TaskState.RUNNING, decision.state, queue=task.queue, reason=reason,
            attempt=end.attempt, exit_code=end.exit_code, fence=end.attempt,
        )  # fmt: skip
        if decision.state is TaskState.SCHEDULED:
            return move._replace(run_at=now + int(decision.delay * 1000))
        if decision.state is TaskState.QUEUED:
            return move._replace(tries=task.tries - (0 if decision.counts else 1))
        return move._replace(finished_at=now)

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

    # -- what users ask -----------------------------------------------------------------------------

    def cancel(self, task: TaskRow, now: int) -> bool:
        """A task that is not running (nor final) becomes cancelled. False when it changed
        state meanwhile."""
        if not self.store.move(
            task.id, task.state, TaskState.CANCELLED, now, reason="cancelled", finished_at=now
        ):
            return False
        self._after_final(task.id, now)
        return True

    def retry(self, task: TaskRow, now: int) -> bool:
        """A finished task is queued again as a new attempt, its retry policy afresh. False
        when it changed state meanwhile."""
        assert task.state in FINAL_STATES
        return self.store.move(
            task.id, task.state, TaskState.QUEUED, now, reason="retried",
            run_at=now, finished_at=None, tries=0,
        )  # fmt: skip
