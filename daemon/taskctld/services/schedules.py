"""Schedules: cron schedules and file triggers, added whole or not at all, paused, resumed,
removed. Firing is the scheduler's, inside the dispatcher's turn; this keeps the file
watchers (`Triggers`) in step with what is stored."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from taskctl.api import ScheduleSpec
from taskctl.errors import InvalidRequest, NotFound
from taskctl.units import ms_to_rfc3339, now_ms
from taskctld import scheduler
from taskctld.dispatcher import Dispatcher
from taskctld.scheduler import Scheduler, Triggers
from taskctld.services.resolve import Resolver
from taskctld.store import NewSchedule, ScheduleRow, Store
from taskctld.views import schedule_view


def fire_on_burst(dispatcher: Dispatcher, fires: Scheduler) -> Callable[[int, list[str]], None]:
    """What a file trigger's burst of changes does: fire its schedule in a dispatcher turn."""

    def fire(schedule_id: int, changed: list[str]) -> None:
        dispatcher.cycle(lambda now: fires.fire_trigger(schedule_id, changed, now))

    return fire


@dataclass
class ScheduleService:
    store: Store
    dispatcher: Dispatcher
    triggers: Triggers
    resolver: Resolver
    clock: Callable[[], int] = now_ms
    node: str | None = None  # on a cluster: this node, which watches the triggers added here

    def arm_triggers(self) -> None:
        """Watch every active trigger of this node (at start-up: triggers persist)."""
        for schedule in self.store.list_schedules("trigger"):
            if not schedule.paused:
                self._arm(schedule)

    def _arm(self, row: ScheduleRow) -> None:
        """Watch a trigger if it is this node's: a path is one machine's, so on a cluster a
        trigger is watched by the node it was added on (its tasks run there too)."""
        if scheduler.TriggerSpec.parse(row.spec).node == self.node:
            self.triggers.arm(row)

    def add(self, spec: ScheduleSpec) -> ScheduleRow:
        """Validate everything (expression, zone, paths, the task), then store it. Nothing is
        created when anything is wrong."""
        now = self.clock()
        t = spec.task
        if t.after or t.after_any or t.key or t.delay or t.run_at:
            raise InvalidRequest(
                "a schedule's task cannot have dependencies, an idempotency key, a delay or a "
                "start time (the schedule decides when it runs)"
            )
        self.resolver.resolve(spec.task, now)  # the task must be valid today
        new = _cron(spec, now) if spec.kind == "cron" else _trigger(spec, self.node)
        row = self.dispatcher.cycle(lambda now: self.store.add_schedule(new, now))
        assert row is not None
        self.dispatcher.times_changed()
        if row.kind == "trigger":
            self._arm(row)
        return row

    def get(self, name: str) -> ScheduleRow:
        found = self.store.get_schedule(name)
        if found is None:
            raise NotFound(f"no schedule named {name!r}")
        return found

    def of_kind(self, kind: str | None) -> list[ScheduleRow]:
        """Every schedule, or those of one kind (`cron` or `trigger`)."""
        return self.store.list_schedules(kind)

    def remove(self, name: str) -> None:
        row = self.get(name)
        self.triggers.disarm(row.id)
        self.dispatcher.cycle(lambda now: self.store.delete_schedule(row.id))

    def pause(self, name: str, paused: bool) -> ScheduleRow:
        """Pause or resume. A resumed cron schedule does not catch up on the time it spent
        paused: it continues from now."""
        row = self.get(name)

        def change(now: int) -> None:
            fields: dict[str, object] = {"paused": int(paused), "updated_at": now}
            if not paused and row.kind == "cron":
                fields["last_due"] = now
                fields["next_due"] = next(
                    scheduler.times_after(row.spec, row.tz or "UTC", now), None
                )
            self.store.update_schedule(row.id, **fields)

        self.dispatcher.cycle(change)
        self.dispatcher.times_changed()
        row = self.get(name)
        if row.kind == "trigger":
            if paused:
                self.triggers.disarm(row.id)
            else:
                self._arm(row)
        return row

    def next_fires(self, name: str, n: int, after: int | None) -> list[str]:
        row = self.get(name)
        if row.kind != "cron":
            raise InvalidRequest(f"{name!r} is a file trigger: it has no fire times")
        start = self.clock() if after is None else after
        times = scheduler.next_times(row.spec, row.tz or "UTC", start, n)
        return [ms_to_rfc3339(int(t.timestamp() * 1000)) or "" for t in times]

    def view(self, row: ScheduleRow, *, runs: int = 0) -> dict[str, Any]:
        """The schedule as the API shows it; with `runs`, its last `runs` fires."""
        return schedule_view(
            row,
            problem=self.triggers.failures.get(row.id),
            fires=self.store.fires_of(row.id, runs) if runs else None,
        )


def _cron(spec: ScheduleSpec, now: int) -> NewSchedule:
    if not spec.cron:
        raise InvalidRequest("a cron schedule needs a cron expression")
    expr = scheduler.normalize_cron(spec.cron)
    tz = spec.tz or scheduler.local_zone_name()
    scheduler.zone(tz)
    due = next(scheduler.times_after(expr, tz, now), None)
    template = spec.task.model_dump_json(exclude_none=True)
    return NewSchedule(spec.name, "cron", expr, tz, spec.overlap, spec.catch_up, template, due)


def _trigger(spec: ScheduleSpec, node: str | None) -> NewSchedule:
    """A file trigger; on a cluster it belongs to `node` (where the paths are), and so do its
    tasks unless they name another node."""
    paths = [_existing_path(p) for p in spec.paths]
    if not paths:
        raise InvalidRequest("a trigger needs at least one path to watch")
    watch = {"paths": paths, "glob": spec.glob, "recursive": spec.recursive}
    detail = json.dumps({**watch, "debounce": spec.debounce, **({"node": node} if node else {})})
    task = (
        spec.task if spec.task.node or node is None else spec.task.model_copy(update={"node": node})
    )
    template = task.model_dump_json(exclude_none=True)
    return NewSchedule(spec.name, "trigger", detail, None, spec.overlap, spec.catch_up, template)


def _existing_path(path: str) -> str:
    if not os.path.isabs(path):
        raise InvalidRequest(f"path {path!r} must be absolute")
    if not os.path.exists(path):
        raise InvalidRequest(f"path {path!r} does not exist")
    return os.path.normpath(path)
