"""Retention: finished tasks (with their logs) and old events are removed once older than the
configured retention or beyond `keep_finished`; hourly, and on `taskctl prune`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from taskctl.paths import Paths
from taskctl.units import now_ms
from taskctld.config import Config
from taskctld.dispatcher import Dispatcher
from taskctld.metrics import Metrics
from taskctld.store import Store

PRUNE_BATCH = 2000  # tasks per transaction when pruning


@dataclass
class RetentionService:
    store: Store
    dispatcher: Dispatcher
    metrics: Metrics
    config: Config
    paths: Paths
    clock: Callable[[], int] = now_ms
    pruning: asyncio.Lock = field(init=False, default_factory=asyncio.Lock)

    async def prune(self, older_than: float | None = None) -> dict[str, int]:
        """Remove finished tasks (with their logs) ended more than `older_than` seconds ago
        (default: the configured retention) or beyond `keep_finished`, and older events. In
        short transactions, yielding between them, so the daemon keeps serving meanwhile; one
        prune at a time."""
        async with self.pruning:
            retention = self.config.retention if older_than is None else older_than
            cutoff = self.clock() - int(retention * 1000)
            removed = logs = 0
            while batch := self.store.prunable(cutoff, self.config.keep_finished, PRUNE_BATCH):
                ids = [row[0] for row in batch]
                self.dispatcher.cycle(lambda now, ids=ids: self.store.remove_tasks(ids))  # type: ignore[misc]
                for task_id, queue, state, attempts in batch:
                    self.metrics.on_removed(queue, state, 1)
                    logs += _remove_logs(self.paths.logs, task_id, attempts)
                removed += len(batch)
                await asyncio.sleep(0)
            events = self.dispatcher.cycle(lambda now: self.store.prune_history(cutoff)) or 0
            _remove_old_listings(self.paths.state / "changes", cutoff)
            self.store.compact()
            return {"tasks": removed, "log_files": logs, "events": events}


def _remove_old_listings(folder: Path, cutoff: int) -> None:
    """File triggers' changed-path listings, by age."""
    for listing in folder.glob("*.txt"):
        with contextlib.suppress(OSError):
            if listing.stat().st_mtime * 1000 < cutoff:
                listing.unlink()


def _remove_logs(folder: Path, task_id: int, attempts: int) -> int:
    removed = 0
    for number in range(1, attempts + 1):
        for suffix in ("out", "err"):
            with contextlib.suppress(FileNotFoundError):
                (folder / f"{task_id}.{number}.{suffix}").unlink()
                removed += 1
    return removed
