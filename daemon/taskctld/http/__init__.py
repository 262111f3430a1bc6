"""The HTTP layer's routes: one router per resource, each handler a line or two that calls a
service. Routers never reach the store, the event hub or the metrics (tests/test_layers.py).
The app around them (errors, body checks, the socket) is `taskctld.server`."""

from __future__ import annotations

from fastapi import APIRouter

from taskctld.http.daemon import DaemonRoutes
from taskctld.http.events import EventRoutes
from taskctld.http.health import HealthRoutes
from taskctld.http.nodes import NodeRoutes
from taskctld.http.queues import QueueRoutes
from taskctld.http.schedules import ScheduleRoutes
from taskctld.http.tasks import TaskRoutes
from taskctld.services import Services


def routers(services: Services) -> list[APIRouter]:
    """Every route of the API, by resource."""
    s = services
    return [
        HealthRoutes(s.health).router(),
        TaskRoutes(s.tasks, s.submissions, s.logs, s.retention).router(),
        EventRoutes(s.feed).router(),
        ScheduleRoutes(s.schedules).router(),
        QueueRoutes(s.queues).router(),
        NodeRoutes(s.nodes).router(),
        DaemonRoutes(s.daemon).router(),
    ]
