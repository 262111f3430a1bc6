"""`/v1/schedules`: cron schedules and file triggers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Query
from fastapi.responses import Response

from taskctl.api import Moment, Schedule, ScheduleSpec
from taskctld.http.routing import ERRORS, V1, Routes, delete, get, json_response, post
from taskctld.services.schedules import ScheduleService


class ScheduleRoutes(Routes):
    tags = ["schedules"]

    def __init__(self, schedules: ScheduleService) -> None:
        self.schedules = schedules

    @post(f"{V1}/schedules", response_model=Schedule, status_code=201, responses=ERRORS)
    async def add_schedule(self, spec: ScheduleSpec) -> Response:
        """Create a cron schedule or a file trigger; refused whole if anything is invalid."""
        return json_response(self.schedules.view(self.schedules.add(spec)), 201)

    @get(f"{V1}/schedules", response_model=list[Schedule])
    async def list_schedules(
        self, kind: Annotated[str | None, Query(pattern="^(cron|trigger)$")] = None
    ) -> Response:
        return json_response([self.schedules.view(s) for s in self.schedules.of_kind(kind)])

    @get(f"{V1}/schedules/{{name}}", response_model=Schedule, responses=ERRORS)
    async def show_schedule(
        self, name: str, runs: Annotated[int, Query(ge=0, le=1000)] = 20
    ) -> Response:
        """A schedule with its recent fires (newest first)."""
        return json_response(self.schedules.view(self.schedules.get(name), runs=runs))

    @delete(f"{V1}/schedules/{{name}}", responses=ERRORS)
    async def remove_schedule(self, name: str) -> Response:
        """Remove a schedule; the tasks it created stay."""
        self.schedules.remove(name)
        return json_response({"removed": name})

    @post(f"{V1}/schedules/{{name}}/pause", response_model=Schedule, responses=ERRORS)
    async def pause_schedule(self, name: str) -> Response:
        return json_response(self.schedules.view(self.schedules.pause(name, True)))

    @post(f"{V1}/schedules/{{name}}/resume", response_model=Schedule, responses=ERRORS)
    async def resume_schedule(self, name: str) -> Response:
        """Resume from now: the time spent paused is not caught up."""
        return json_response(self.schedules.view(self.schedules.pause(name, False)))

    @get(f"{V1}/schedules/{{name}}/next", response_model=list[str], responses=ERRORS)
    async def next_fires(
        self,
        name: str,
        n: Annotated[int, Query(ge=1, le=1000)] = 5,
        after: Annotated[
            Moment | None, Query(description="from this moment (default: now)")
        ] = None,
    ) -> Response:
        """The next n fire times (RFC 3339 in UTC, as every time of the API; the schedule's
        zone decides which they are); fewer when the year 9999 ends first."""
        start = None if after is None else int(after.timestamp() * 1000)
        return json_response(self.schedules.next_fires(name, n, start))
