"""`/v1/events`: the event feed, as NDJSON (`taskctl watch`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Query
from fastapi.responses import Response

from taskctld.http.routing import MAX_ID, V1, NDJSONResponse, Routes, get
from taskctld.services.feed import EventFeed

NDJSON_EVENTS = {
    200: {"content": {"application/x-ndjson": {"schema": {"$ref": "#/components/schemas/Event"}}}}
}


class EventRoutes(Routes):
    tags = ["events"]

    def __init__(self, feed: EventFeed) -> None:
        self.feed = feed

    @get(f"{V1}/events", response_class=NDJSONResponse, responses=NDJSON_EVENTS)
    async def events(
        self,
        after: Annotated[int | None, Query(ge=0, le=MAX_ID)] = None,
        follow: bool = False,
        task: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
        queue: str | None = None,
        limit: Annotated[int, Query(ge=1, le=100_000)] = 10_000,
    ) -> Response:
        """State changes in order, as NDJSON. `after` resumes after a given event id (0: from
        the oldest kept); without it, only events from now on. With `follow`, the stream stays
        open and pushes each new event as it is committed."""
        return NDJSONResponse(self.feed.lines(after, follow, task, queue, limit))
