"""Queues: their limits, defaults and pause, and their task counts by state (kept by
`Metrics`, so listing costs O(queues), not a table scan)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from taskctl.api import QueueSettings
from taskctl.errors import NotFound
from taskctld.dispatcher import Dispatcher
from taskctld.metrics import Metrics
from taskctld.store import QueueRow, Store
from taskctld.views import queue_view


@dataclass
class QueueService:
    store: Store
    dispatcher: Dispatcher
    metrics: Metrics
    announce: Callable[[], None] = lambda: None  # tells other nodes (a cluster's) of a change

    def queues(self) -> list[dict[str, Any]]:
        counts = self.metrics.state_counts()
        return [queue_view(q, counts.get(q.name, {})) for q in self.store.list_queues()]

    def view(self, q: QueueRow) -> dict[str, Any]:
        return queue_view(q, self.metrics.state_counts().get(q.name, {}))

    def set_queue(self, name: str, settings: QueueSettings) -> QueueRow:
        """Create or change a queue: its concurrency limit (null: only the global one) and the
        defaults of its tasks. Fields left out of the request keep their value."""
        existing = self.store.get_queue(name)
        given = settings.model_dump(exclude_unset=True)
        fields: dict[str, object] = {}
        if "concurrency" in given:
            fields["concurrency"] = given.pop("concurrency")
        if given:
            defaults = dict(existing.defaults if existing else {})
            defaults.update({k: (v.value if hasattr(v, "value") else v) for k, v in given.items()})
            if given.get("timeout") == 0:  # a timeout of 0 is none: clear the default
                defaults["timeout"] = None
            fields["defaults"] = {k: v for k, v in defaults.items() if v is not None}
        row = self.dispatcher.cycle(lambda now: self.store.set_queue(name, now, **fields))
        assert row is not None
        self.dispatcher.load_queues()
        self.announce()
        return row

    def pause_queue(self, name: str, paused: bool) -> QueueRow:
        """Pause: nothing new starts from it (running tasks finish). Resume: it starts again."""
        if self.store.get_queue(name) is None:
            raise NotFound(f"no queue named {name!r}")
        row = self.dispatcher.cycle(lambda now: self.store.set_queue(name, now, paused=paused))
        assert row is not None
        self.dispatcher.load_queues()
        self.announce()
        return row
