"""The event feed (`GET /v1/events`, `taskctl watch`): committed state changes in order, as
NDJSON. The backlog comes from the events table, then (with `follow`) live events from the
hub as they are committed, each batch of events in one chunk. A subscriber that fell behind
catches up from the table, so nothing is lost or repeated."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from taskctl.errors import TooMany
from taskctld.events import EventHub
from taskctld.services.streams import Streams
from taskctld.store import EventRow, Store
from taskctld.views import event_view

MAX_WATCHERS = 64  # concurrent followed feeds
BACKLOG_PAGE = 1000  # events read from the table at a time
CATCH_UP = 100_000  # events read at most when a subscriber overflowed

Wanted = Callable[[EventRow], bool]


@dataclass
class EventFeed:
    store: Store
    hub: EventHub
    streams: Streams

    def lines(
        self, after: int | None, follow: bool, task: int | None, queue: str | None, limit: int
    ) -> AsyncIterator[bytes]:
        """The feed after event id `after` (0: from the oldest kept; None: from now on), of
        one task or queue if given, at most `limit` events of the backlog. With `follow`, it
        stays open until the daemon stops. Raises TooMany (before anything is sent) when
        MAX_WATCHERS follow already."""
        start = self.store.last_event_id() if after is None else after
        if follow and self.streams.watchers >= MAX_WATCHERS:
            raise TooMany(f"{MAX_WATCHERS} watchers are connected already; try again later")

        def wanted(e: EventRow) -> bool:
            return (task is None or e.task_id == task) and (queue is None or e.queue == queue)

        return self._counted(start, follow, limit, wanted)

    async def _counted(
        self, last: int, follow: bool, limit: int, wanted: Wanted
    ) -> AsyncIterator[bytes]:
        self.streams.watchers += follow
        try:
            async for chunk in self._chunks(last, follow, limit, wanted):
                yield chunk
        finally:
            self.streams.watchers -= follow

    async def _chunks(
        self, last: int, follow: bool, limit: int, wanted: Wanted
    ) -> AsyncIterator[bytes]:
        sent = 0
        with self.hub.subscribe() as sub:
            while sent < limit or follow:
                backlog = self.store.events_after(last, BACKLOG_PAGE)
                if not backlog:
                    break
                last = backlog[-1].id
                chunk = [e for e in backlog if wanted(e)][: None if follow else limit - sent]
                sent += len(chunk)
                if chunk:
                    yield _ndjson(chunk)
            if not follow:
                return
            while not sub.closed:  # until the daemon stops: then `watch` goes on with the next
                taken = [await sub.queue.get()]
                while not sub.queue.empty():
                    taken.append(sub.queue.get_nowait())
                batch = [e for e in taken if e is not None]
                if sub.overflow:
                    sub.overflow = False
                    batch = self.store.events_after(last, CATCH_UP)
                fresh = [e for e in batch if e.id > last]
                if fresh:
                    last = fresh[-1].id
                    chunk = [e for e in fresh if wanted(e)]
                    if chunk:
                        yield _ndjson(chunk)


def _ndjson(events: list[EventRow]) -> bytes:
    return b"".join(_line(event_view(e)) for e in events)


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"
