"""The task lifecycle: every decision about a task's state, whatever the backend.

Submit (the initial state), claims, the end of an attempt (outcome -> retry policy -> next
state), cancel, retry and the promotion of due tasks are decided here and carried out through the
store's primitives, inside the caller's transaction. The store keeps SQL; this keeps the rules.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Sequence

from taskctl.api import FINAL_STATES, Backoff, Outcome, TaskState
from taskctld import policy
from taskctld.store import AttemptEnd, Claim, NewTask, Store, TaskRow


class Lifecycle:
    def __init__(self, store: Store, *, jitter: Callable[[], float] = random.random) -> None:
        self.store = store
        self.jitter = jitter

    # -- in ---------------------------------------------------------------------------------------

    def submit(self, tasks: Sequence[NewTask], now: int) -> list[int]:
        """Insert tasks, each in its initial state; returns their ids in order."""
        return self.store.submit(tasks, now)

    def promote_due(self, now: int) -> int:
        """Scheduled tasks whose time has come become queued; returns how many."""
        return self.store.promote_due(now)

    # -- claims -----------------------------------------------------------------------------------

    def claim(
        self, slots: dict[str, int], limit: int, now: int, held: Collection[int] = ()
    ) -> Claim:
        """Up to `limit` queued tasks become running, at most `slots[q]` from queue q."""
        return self.store.claim(slots, limit, now, held)

    def claim_attempt(
        self, task_id: int, attempt: int, now: int, started_at: int, known: TaskRow | None = None
    ) -> TaskRow | None:
        """Claim one queued task as attempt `attempt` that its supervisor already started."""
        return self.store.claim_attempt(task_id, attempt, now, started_at, known)

    def record_stray_start(self, task_id: int, attempt: int, pid: int, started_at: int) -> bool:
        """A held attempt started as its task was cancelled: it stays cancelled, with the
        attempt on its record."""
        return self.store.record_stray_start(task_id, attempt, pid, started_at)

    # -- the end of an attempt --------------------------------------------------------------------

    def finish(self, task: TaskRow, end: AttemptEnd, now: int, *, counts: bool) -> bool:
        """The attempt `end` of running `task` ended: its retry policy decides the next state.
        False when the task is no longer running that attempt (a stale report)."""
        decision = self.decide(task, end.outcome, end.exit_code, counts=counts)
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
        return self.store.move(
            task.id, TaskState.RUNNING, decision.state, now, reason=reason,
            attempt=end.attempt, exit_code=end.exit_code, fence=end.attempt, queue=task.queue,
            **fields,
        )  # fmt: skip

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
        return self.store.move(
            task.id, task.state, TaskState.CANCELLED, now, reason="cancelled", finished_at=now
        )

    def retry(self, task: TaskRow, now: int) -> bool:
        """A finished task is queued again as a new attempt, its retry policy afresh. False
        when it changed state meanwhile."""
        assert task.state in FINAL_STATES
        return self.store.move(
            task.id, task.state, TaskState.QUEUED, now, reason="retried",
            run_at=now, finished_at=None, tries=0,
        )  # fmt: skip
