"""Health: `/healthz`, `/readyz`, `/metrics` and `/v1/summary`."""

from __future__ import annotations

from fastapi.responses import Response

from taskctl.api import Health, Summary
from taskctld.http.routing import V1, Routes, get, json_response
from taskctld.services.health import HealthService

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


class HealthRoutes(Routes):
    tags = ["health"]

    def __init__(self, health: HealthService) -> None:
        self.health = health

    @get("/healthz", response_model=Health)
    async def healthz(self) -> Response:
        """The daemon is alive; also says its version."""
        return json_response(self.health.health())

    @get("/readyz", response_model=Health, responses={503: {"model": Health}})
    async def readyz(self) -> Response:
        """Ready: the store is writable."""
        health = self.health.health()
        return json_response(health, 200 if health["status"] == "ok" else 503)

    @get("/metrics", responses={200: {"content": {"text/plain": {}}}})
    async def metrics(self) -> Response:
        """Prometheus text exposition."""
        return Response(self.health.exposition(), media_type=PROMETHEUS_TEXT)

    @get(f"{V1}/summary", response_model=Summary)
    async def summary(self) -> Response:
        return json_response(self.health.summary())
