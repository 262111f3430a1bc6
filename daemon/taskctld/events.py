"""Committed events, pushed to whoever listens: `watch` streams and waiters for a final state
(`EventHub`), and waiters for the end of one attempt (`AttemptEnds`).

The store calls `publish` after each commit with the events that transaction appended, so a
listener never sees a change that could still roll back. Streams get a bounded queue each: a
listener that falls too far behind is told so (`overflow`) and resumes from the events table.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

from taskctl.api import FINAL_STATES
from taskctl.errors import Unavailable
from taskctld.store import AttemptEnd, EventRow, EventSpan

STREAM_QUEUE = 10_000


@dataclass(eq=False)  # compared and hashed by identity: it lives in a set
class Subscription:
    queue: asyncio.Queue[EventRow | None] = field(
        default_factory=lambda: asyncio.Queue(STREAM_QUEUE)
    )
    overflow: bool = False
    closed: bool = False  # the daemon is stopping: end the stream (a None wakes it)


class EventHub:
    def __init__(self) -> None:
        self.subscriptions: set[Subscription] = set()
        self.final_waiters: dict[int, list[asyncio.Future[None]]] = {}
        self.change_waiters: dict[int, list[asyncio.Future[None]]] = {}
        self.closed = False

    def close(self) -> None:
        """The daemon is stopping: streams end and waiters get `Unavailable`, so that no client
        holds the stop and each one goes on with the next daemon (`watch` and `wait` do)."""
        self.closed = True
        for sub in self.subscriptions:
            sub.closed = True
            with suppress(asyncio.QueueFull):  # if full, it sees `closed` after its next batch
                sub.queue.put_nowait(None)
        for waiters in (self.final_waiters, self.change_waiters):
            for pending in waiters.values():
                for fut in pending:
                    if not fut.done():
                        fut.set_exception(_stopping())
            waiters.clear()

    def publish(self, events: list[EventRow]) -> None:
        for sub in self.subscriptions:
            for event in events:
                try:
                    sub.queue.put_nowait(event)
                except asyncio.QueueFull:
                    sub.overflow = True
                    break
        for event in events:
            self._resolve(self.change_waiters, event.task_id)
            if event.to_state in FINAL_STATES:
                self._resolve(self.final_waiters, event.task_id)

    def publish_span(self, span: EventSpan) -> None:
        """A published batch: streams read its events from the table, as after an overflow
        (its tasks are new: nobody waits on them yet)."""
        for sub in self.subscriptions:
            sub.overflow = True
            with suppress(asyncio.QueueFull):  # wakes the stream; if full, it wakes anyway
                sub.queue.put_nowait(None)

    @staticmethod
    def _resolve(waiters: dict[int, list[asyncio.Future[None]]], task_id: int) -> None:
        for fut in waiters.pop(task_id, ()):
            if not fut.done():
                fut.set_result(None)

    @contextmanager
    def subscribe(self) -> Iterator[Subscription]:
        sub = Subscription()
        self.subscriptions.add(sub)
        try:
            yield sub
        finally:
            self.subscriptions.discard(sub)

    async def wait_final(self, task_id: int, timeout: float | None) -> None:
        """Return when the task reaches a final state, or after `timeout` seconds. The caller
        checks the state first and after: this only waits for the next final event."""
        await self._wait(self.final_waiters, task_id, timeout)

    async def wait_change(self, task_id: int, timeout: float | None) -> None:
        """Return at the task's next state change, or after `timeout` seconds."""
        await self._wait(self.change_waiters, task_id, timeout)

    async def _wait(
        self, waiters: dict[int, list[asyncio.Future[None]]], task_id: int, timeout: float | None
    ) -> None:
        if self.closed:
            raise _stopping()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters.setdefault(task_id, []).append(fut)
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            pass
        finally:
            pending = waiters.get(task_id)
            if pending and fut in pending:
                pending.remove(fut)
                if not pending:
                    del waiters[task_id]


class AttemptEnds:
    """Waiters for the end of one attempt, told by the dispatcher once the end is committed
    (`note`, one of its `on_attempt_end` observers). A cancel of a held task that started
    anyway waits here for that stray attempt to end."""

    def __init__(self) -> None:
        self._waiting: dict[tuple[int, int], asyncio.Event] = {}

    def note(self, end: AttemptEnd) -> None:
        ended = self._waiting.get((end.task_id, end.attempt))
        if ended is not None:
            ended.set()

    async def wait(self, task_id: int, attempt: int, timeout: float) -> bool:
        """True once attempt `attempt` of the task has ended, False after `timeout` seconds.
        The waiter is in place before this first yields, so the caller may check that the
        attempt is open and then call this without missing its end."""
        ended = self._waiting[(task_id, attempt)] = asyncio.Event()
        try:
            await asyncio.wait_for(ended.wait(), timeout)
        except TimeoutError:
            return False
        finally:
            self._waiting.pop((task_id, attempt), None)
        return True


def _stopping() -> Unavailable:
    return Unavailable("taskctld is stopping; ask again once it is back")
