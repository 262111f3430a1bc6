"""Tasks once submitted: read them (one, a page of a filtered list), cancel, retry, and wait
for a change. Every method either completes or raises a `TaskctlError` having changed
nothing; state changes are the lifecycle's, made in a dispatcher turn."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from taskctl.api import FINAL_STATES, TaskState
from taskctl.errors import Conflict, InvalidRequest, NotFound
from taskctld.dispatcher import Dispatcher
from taskctld.events import AttemptEnds, EventHub
from taskctld.lifecycle import Lifecycle
from taskctld.store import Store, TaskFilter, TaskRow
from taskctld.views import task_view

log = logging.getLogger("taskctld.tasks")

UNHOLD_ANSWER_TIMEOUT = 5.0  # seconds a cancel waits to hear whether a held task had started


class Stopper(Protocol):
    """What a cancel asks of the runner."""

    def stop(self, task_id: int, attempt: int, kind: str) -> bool: ...


@dataclass
class TaskService:
    store: Store
    dispatcher: Dispatcher
    lifecycle: Lifecycle
    runner: Stopper
    hub: EventHub
    ends: AttemptEnds

    # -- reads ----------------------------------------------------------------------------------

    def task(self, task_id: int) -> TaskRow:
        task = self.store.get_task(task_id)
        if task is None:
            raise NotFound(f"no task {task_id}")
        return task

    def view(self, task_id: int, *, show_env: bool = False) -> dict[str, Any]:
        return self.views([self.task(task_id)], show_env=show_env)[0]

    def views_of(self, task_ids: list[int]) -> list[dict[str, Any]]:
        """The tasks of a batch just committed, in the order given."""
        return self.views(self.store.get_tasks(task_ids))

    def views(self, tasks: list[TaskRow], *, show_env: bool = False) -> list[dict[str, Any]]:
        ids = [t.id for t in tasks]
        attempts, deps = self.store.attempts_of(ids), self.store.deps_of(ids)
        names = self.store.schedule_names({t.schedule_id for t in tasks if t.schedule_id})
        return [
            task_view(
                t, attempts[t.id], deps=deps[t.id], schedule=names.get(t.schedule_id or 0),
                env=self._env_for_view(t) if show_env else None,
            )
            for t in tasks
        ]  # fmt: skip

    def _env_for_view(self, task: TaskRow) -> dict[str, str]:
        env = self.store.env_of(task.env_id)
        return dict(env) if env is not None else {}

    def page(
        self,
        states: Sequence[TaskState],
        queue: str | None,
        labels: Sequence[str],
        limit: int,
        before: int | None,
        *,
        show_env: bool = False,
    ) -> tuple[list[dict[str, Any]], int]:
        """Tasks, newest first, at most `limit` of them, and how many match in all (counted
        only when the page is full). `labels`: KEY=VALUE each, all of which a task has."""
        where = TaskFilter(
            states=states, queue=queue, labels=_parse_labels(labels), limit=limit, before_id=before
        )
        rows = self.store.list_tasks(where)
        views = self.views(rows, show_env=show_env)
        total = len(rows) if len(rows) < limit else self.store.count_tasks(where)
        return views, total

    def attempt_open(self, task_id: int, number: int) -> bool:
        """Whether attempt `number` of the task has not ended yet."""
        attempts = self.store.attempts_of([task_id])[task_id]
        return any(a.number == number and a.outcome is None for a in attempts)

    def attempt_node(self, task_id: int, number: int) -> str | None:
        """The node an attempt ran on (a cluster's; None on SQLite)."""
        attempts = self.store.attempts_of([task_id])[task_id]
        return next((a.node for a in attempts if a.number == number), None)

    # -- cancel and retry -----------------------------------------------------------------------

    async def cancel(self, task_id: int) -> TaskRow:
        """Cancel a task that is not final. A running one is stopped (its whole process tree,
        SIGTERM then SIGKILL after its grace) and this returns once it has ended."""
        task = self.task(task_id)
        if task.state in FINAL_STATES:
            raise Conflict(f"task {task_id} is already {task.state.value}")
        if task.state is TaskState.RUNNING:
            attempt, limit = task.attempts, task.kill_grace + 10
            # Its supervisor ignores the cancel if the command has exited already (its end is
            # on the way, and the retry policy may queue it again): either way, wait for this
            # attempt to end, then cancel the task in whatever state it is in then.
            self.runner.stop(task.id, attempt, "cancel")
            if not await self._attempt_ended(task_id, attempt, limit):
                raise Conflict(f"task {task_id} did not stop within {limit:.0f}s")
            task = self.task(task_id)
            return task if task.state in FINAL_STATES else await self.cancel(task_id)

        def cancel_now(now: int) -> bool:
            return self.lifecycle.cancel(task, now)

        held = self.dispatcher.hold_settled(task_id)  # held: it may start as we cancel
        if not self.dispatcher.cycle(cancel_now):  # it changed state meanwhile: try again
            return await self.cancel(task_id)
        if held is not None:
            await self._settle_held_cancel(task_id, task.attempts + 1, held)
        return self.task(task_id)

    async def _settle_held_cancel(
        self, task_id: int, attempt: int, held: asyncio.Future[bool]
    ) -> None:
        """A held task was cancelled: answer once its supervisor has said it cannot start any
        more, and, if it had started, once that attempt (stopped, on the record) has ended."""
        try:
            if await asyncio.wait_for(asyncio.shield(held), UNHOLD_ANSWER_TIMEOUT):
                return
        except TimeoutError:
            log.warning("no answer about held task %d; cancelled without it", task_id)
            return
        if self.attempt_open(task_id, attempt):  # no await since: its end cannot slip past
            limit = self.task(task_id).kill_grace + 10
            if not await self.ends.wait(task_id, attempt, limit):
                log.warning("task %d: its stray attempt did not end in time", task_id)

    async def _attempt_ended(self, task_id: int, attempt: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while (t := self.task(task_id)).state is TaskState.RUNNING and t.attempts == attempt:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await self.hub.wait_change(task_id, left)
        return True

    def retry(self, task_id: int) -> TaskRow:
        """Queue a finished task again as a new attempt. Its history stays; its retry policy
        starts afresh (the retries count from this attempt on)."""
        task = self.task(task_id)
        if task.state not in FINAL_STATES:
            raise Conflict(
                f"task {task_id} is {task.state.value}; only a finished task can be retried"
            )

        def requeue(now: int) -> bool:
            return self.lifecycle.retry(task, now)

        if not self.dispatcher.cycle(requeue):
            raise Conflict(f"task {task_id} changed state meanwhile; try again")
        return self.task(task_id)

    # -- waits ----------------------------------------------------------------------------------

    async def wait_started(self, task_id: int) -> TaskRow:
        """The task once it has an attempt, or once it is final without one."""
        while True:
            task = self.task(task_id)
            if task.attempts or task.state in FINAL_STATES:
                return task
            await self.hub.wait_change(task_id, 60)

    async def wait_final(self, task_id: int, timeout: float | None) -> TaskRow:
        """The task once it is final, or as it is when `timeout` seconds have passed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            task = self.task(task_id)
            if task.state in FINAL_STATES:
                return task
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return task
            await self.hub.wait_final(task_id, left)


def _parse_labels(raw: Sequence[str]) -> dict[str, str]:
    labels = {}
    for item in raw:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidRequest(f"label filter {item!r} must look like KEY=VALUE")
        labels[key] = value
    return labels
