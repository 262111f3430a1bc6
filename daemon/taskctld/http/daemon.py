"""`/v1/daemon`: stop."""

from __future__ import annotations

import os

from fastapi.responses import Response

from taskctl.api import StopRequest
from taskctld.http.routing import V1, Routes, json_response, post
from taskctld.services.daemon import DaemonService


class DaemonRoutes(Routes):
    tags = ["daemon"]

    def __init__(self, daemon: DaemonService) -> None:
        self.daemon = daemon

    @post(f"{V1}/daemon/stop")
    async def stop(self, request: StopRequest) -> Response:
        """Stop the daemon. `leave` (default): running tasks go on and the next daemon adopts
        them. `drain`: start nothing new and exit once running tasks have finished (or after
        `timeout`). `kill`: end running tasks and queue them again, their attempt not counted."""
        self.daemon.request_stop(request.mode, request.timeout)
        return json_response({"stopping": True, "mode": request.mode, "pid": os.getpid()})
