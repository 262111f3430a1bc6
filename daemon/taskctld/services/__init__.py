"""The daemon's use cases, one service per resource. The HTTP routers call these and nothing
below them; the dispatcher and runner do the work behind them. Each service is given what it
needs by the composition root (`taskctld.app`); none builds another or reaches through one.

Every method either completes or raises a `TaskctlError` having changed nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from taskctld.services.daemon import DaemonService
from taskctld.services.feed import EventFeed
from taskctld.services.health import HealthService
from taskctld.services.logs import LogService
from taskctld.services.nodes import NodeService
from taskctld.services.queues import QueueService
from taskctld.services.retention import RetentionService
from taskctld.services.schedules import ScheduleService
from taskctld.services.submit import SubmitService
from taskctld.services.tasks import TaskService


@dataclass(frozen=True)
class Services:
    """Everything the HTTP layer may call."""

    tasks: TaskService
    submissions: SubmitService
    logs: LogService
    retention: RetentionService
    feed: EventFeed
    schedules: ScheduleService
    queues: QueueService
    health: HealthService
    daemon: DaemonService
    nodes: NodeService
