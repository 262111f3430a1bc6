"""What the daemon counts, and its Prometheus exposition at `/metrics`.

Task counts by (queue, state) are read from the store once at start and then kept in step with
every committed event, so health, `status` and `/metrics` cost O(queues), not a table scan.
Totals of finished attempts by outcome also start from the store, so they survive restarts.
Labels are bounded: queue names, states and outcomes, never task ids.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from taskctl.api import Outcome, TaskState
from taskctl.units import now_ms
from taskctld.store import AttemptEnd, EventRow, EventSpan, Store

DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)
LATENESS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)


class Metrics(Collector):
    """`database`: the SQLite file, whose size is shown (None on PostgreSQL); `node`: on a
    cluster, this node's name, given as a `node` label to every sample (task counts are the
    cluster's on every node, attempt totals and durations this node's)."""

    def __init__(
        self,
        store: Store,
        database: Path | None,
        started: float,
        clock: Callable[[], int] = now_ms,
        node: str | None = None,
    ) -> None:
        self.store = store
        self.database = database
        self.node = node
        self.started = started  # monotonic, for the uptime
        self.clock = clock
        self.counts: dict[str, Counter[str]] = {}
        self.finished: Counter[str] = Counter()
        self.submitted = 0
        self.registry = CollectorRegistry(auto_describe=True)
        self.durations = Histogram(
            "taskctl_attempt_duration_seconds", "How long attempts ran, by outcome.", ["outcome"],
            buckets=DURATION_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.lateness = Histogram(
            "taskctl_cron_lateness_seconds", "How late cron fires happened after their due time.",
            buckets=LATENESS_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.registry.register(self)

    def load(self) -> None:
        """Start from what the store holds."""
        self.counts = {q: Counter(states) for q, states in self.store.count_by_state().items()}
        self.finished = Counter(self.store.count_attempt_outcomes())
        self.submitted = self.store.last_task_id()

    # -- kept in step -----------------------------------------------------------------------------

    def on_events(self, events: list[EventRow]) -> None:
        for e in events:
            per_queue = self.counts.setdefault(e.queue, Counter())
            if e.from_state is None:
                self.submitted += 1
            else:
                per_queue[e.from_state.value] -= 1
            per_queue[e.to_state.value] += 1

    def on_span(self, span: EventSpan) -> None:
        """A published batch: its tasks, counted in their initial states."""
        for (queue, state), n in span.created.items():
            self.counts.setdefault(queue, Counter())[state.value] += n
            self.submitted += n

    def on_removed(self, queue: str, state: str, n: int) -> None:
        """Tasks deleted by pruning."""
        self.counts.setdefault(queue, Counter())[state] -= n

    def on_attempt_end(self, end: AttemptEnd) -> None:
        self.finished[end.outcome.value] += 1
        if end.started_at is not None:
            self.durations.labels(end.outcome.value).observe(
                max(0.0, (end.ended_at - end.started_at) / 1000)
            )

    def on_fire(self, lateness_ms: int) -> None:
        self.lateness.observe(max(0.0, lateness_ms / 1000))

    # -- read -----------------------------------------------------------------------------------

    def state_counts(self) -> dict[str, dict[str, int]]:
        return {q: {s: n for s, n in c.items() if n} for q, c in self.counts.items()}

    def total(self, state: str) -> int:
        return sum(c[state] for c in self.counts.values())

    def exposition(self) -> bytes:
        if self.node is None:
            return generate_latest(self.registry)
        return generate_latest(NodeLabelled(self.registry, self.node))

    def collect(self) -> Iterator[Any]:
        tasks = GaugeMetricFamily(
            "taskctl_tasks", "Tasks in the store, by queue and state.", labels=["queue", "state"]
        )
        for queue, states in sorted(self.counts.items()):
            for state in TaskState:
                tasks.add_metric([queue, state.value], states[state.value])
        yield tasks
        yield CounterMetricFamily(
            "taskctl_tasks_submitted", "Tasks submitted.", value=self.submitted
        )
        finished = CounterMetricFamily(
            "taskctl_attempts_finished", "Attempts that ended, by outcome.", labels=["outcome"]
        )
        for outcome in Outcome:
            finished.add_metric([outcome.value], self.finished[outcome.value])
        yield finished
        running = GaugeMetricFamily(
            "taskctl_running", "Tasks running now.", value=self.total("running")
        )
        yield running
        depth = GaugeMetricFamily(
            "taskctl_queue_depth", "Queued tasks waiting for a slot.", labels=["queue"]
        )
        oldest = GaugeMetricFamily(
            "taskctl_queue_oldest_age_seconds", "Age of the oldest queued task.", labels=["queue"]
        )
        now = self.clock()
        ages = self.store.oldest_queued()
        for queue, states in sorted(self.counts.items()):
            depth.add_metric([queue], states["queued"])
            oldest.add_metric(
                [queue], max(0.0, (now - ages[queue]) / 1000) if queue in ages else 0.0
            )
        yield depth
        yield oldest
        if self.database is None:
            yield GaugeMetricFamily(
                "taskctl_uptime_seconds",
                "Seconds since the daemon started.",
                value=time.monotonic() - self.started,
            )
            return
        size = GaugeMetricFamily(
            "taskctl_store_bytes", "Size of the database files.", labels=["file"]
        )
        for name, path in (
            ("db", self.database),
            ("wal", self.database.with_name(self.database.name + "-wal")),
        ):
            size.add_metric([name], _size(path))
        yield size
        yield GaugeMetricFamily(
            "taskctl_uptime_seconds",
            "Seconds since the daemon started.",
            value=time.monotonic() - self.started,
        )


class NodeLabelled:
    """Every sample of `registry`, with `node` added to its labels (what `generate_latest`
    reads: anything with `collect`)."""

    def __init__(self, registry: CollectorRegistry, node: str) -> None:
        self.registry = registry
        self.node = node

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            labelled.samples = [
                s._replace(labels={"node": self.node, **s.labels}) for s in family.samples
            ]
            yield labelled


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0
