"""`/v1/queues`: limits, defaults, pause and resume."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path as PathParam
from fastapi.responses import Response

from taskctl.api import QUEUE_NAME_PATTERN, QueueInfo, QueueSettings
from taskctld.http.routing import ERRORS, V1, Routes, get, json_response, post, put
from taskctld.services.queues import QueueService


class QueueRoutes(Routes):
    tags = ["queues"]

    def __init__(self, queues: QueueService) -> None:
        self.queues = queues

    @get(f"{V1}/queues", response_model=list[QueueInfo])
    async def list_queues(self) -> Response:
        """Queues with their limit, defaults and task counts by state."""
        return json_response(self.queues.queues())

    @put(f"{V1}/queues/{{name}}", response_model=QueueInfo, responses=ERRORS)
    async def set_queue(
        self, name: Annotated[str, PathParam(pattern=QUEUE_NAME_PATTERN)], settings: QueueSettings
    ) -> Response:
        """Create or change a queue; fields left out keep their value."""
        return json_response(self.queues.view(self.queues.set_queue(name, settings)))

    @post(f"{V1}/queues/{{name}}/pause", response_model=QueueInfo, responses=ERRORS)
    async def pause_queue(self, name: str) -> Response:
        """Nothing new starts from the queue; running tasks finish."""
        return json_response(self.queues.view(self.queues.pause_queue(name, True)))

    @post(f"{V1}/queues/{{name}}/resume", response_model=QueueInfo, responses=ERRORS)
    async def resume_queue(self, name: str) -> Response:
        return json_response(self.queues.view(self.queues.pause_queue(name, False)))
