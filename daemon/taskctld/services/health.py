"""Is the daemon well, and what does it hold: `/healthz`, `/readyz`, `status` (summary) and
the Prometheus exposition at `/metrics`. Reads only; each failed check is a reason."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taskctl import API_VERSION, __version__
from taskctl.api import TaskState
from taskctl.errors import StorageFull, TaskctlError
from taskctl.paths import Paths
from taskctl.units import now_ms
from taskctld.config import Config
from taskctld.dispatcher import Dispatcher
from taskctld.metrics import Metrics
from taskctld.runner import Runner
from taskctld.scheduler import Scheduler, Triggers
from taskctld.services.queues import QueueService
from taskctld.services.streams import Streams
from taskctld.store import Store


@dataclass
class HealthService:
    store: Store
    dispatcher: Dispatcher
    runner: Runner
    scheduler: Scheduler
    triggers: Triggers
    metrics: Metrics
    queues: QueueService
    streams: Streams
    config: Config
    paths: Paths
    started_monotonic: float
    clock: Callable[[], int] = now_ms

    def health(self) -> dict[str, Any]:
        """Alive is not enough: the store must take a write, the state and log folders must
        take a file, and no cron schedule may be overdue. Each failed check is a reason."""
        reasons, writable, full = self._storage()
        reasons += self._processes()
        tick = self.scheduler.last_tick
        database = self.paths.database
        try:
            last_event = self.store.last_event_id()
        except TaskctlError:
            last_event = None  # the store is unreachable: a reason says so already
        return {
            "status": "unhealthy" if reasons else "ok",
            "reasons": reasons,
            "version": __version__,
            "api": API_VERSION,
            "pid": os.getpid(),
            "uptime": round(time.monotonic() - self.started_monotonic, 3),
            "store_writable": writable,
            "storage_full": full,
            "running": self.dispatcher.running_count(),
            "queued": self.metrics.total("queued"),
            "held": self.dispatcher.held_count(),
            "concurrency": self.config.concurrency,
            "hold": self.config.hold,
            "containment": self.runner.containment,
            "last_event_id": last_event,
            "store": self.store.describe(),
            "node": self.config.node if self.config.distributed else None,
            "streams": self.streams.total,
            "scheduler_heartbeat_age": round((self.clock() - tick) / 1000, 3) if tick else None,
            "database_size": None if self.config.distributed else _size(database),
            "wal_size": None
            if self.config.distributed
            else _size(database.with_name(database.name + "-wal")),
            "disk_free": shutil.disk_usage(self.paths.state).free,
            "disk_free_logs": shutil.disk_usage(self.paths.logs).free,
        }

    def _storage(self) -> tuple[list[str], bool, bool]:
        """What is wrong with the store and the folders; whether the store takes a write;
        whether a disk is full."""
        reasons = []
        writable = True
        full = False
        try:
            self.store.check_writable()
        except TaskctlError as e:
            writable = False
            full = isinstance(e, StorageFull)
            reasons.append(f"store not writable: {e.message}")
        for folder in (self.paths.state, self.paths.logs):
            error = _probe_folder(folder)
            if error is not None:
                full = full or error.errno in (errno.ENOSPC, errno.EDQUOT)
                reasons.append(f"{folder} is not writable: {error.strerror}")
        return reasons, writable, full

    def _processes(self) -> list[str]:
        """What is wrong with the supervisors, the file watchers and the timers."""
        reasons = []
        if self.runner.problem:
            reasons.append(self.runner.problem)
        if silent := self.runner.unanswered():
            reasons.append(silent)
        failing = self.triggers.failures
        names: dict[int, str] = {}
        with contextlib.suppress(TaskctlError):
            names = self.store.schedule_names(set(failing)) if failing else {}
        reasons += [f"trigger {names.get(i, i)}: {why}" for i, why in failing.items()]
        late: list[str] = []
        with contextlib.suppress(TaskctlError):  # an unreachable store is a reason already
            late = self.scheduler.overdue(self.clock())
        if late:
            reasons.append(f"scheduler behind: {', '.join(late)} past due")
        return reasons

    def summary(self) -> dict[str, Any]:
        counts = self.metrics.state_counts()
        states: dict[str, int] = {s.value: 0 for s in TaskState}
        for per_queue in counts.values():
            for state, n in per_queue.items():
                states[state] += n
        return {"health": self.health(), "states": states, "queues": self.queues.queues()}

    def exposition(self) -> bytes:
        """The Prometheus text exposition."""
        return self.metrics.exposition()


def _probe_folder(folder: Path) -> OSError | None:
    """Create and remove a small file: the only honest test of writability (permission
    bits do not tell the whole story: read-only mounts, full disks, root). The file goes
    whatever happens (on a full disk it is created, and only its write fails)."""
    probe = folder / f".health.{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"ok")
    except OSError as e:
        return e
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
