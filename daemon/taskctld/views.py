"""Rows to wire objects: the JSON shapes of `taskctl.api`, built as plain dicts.

Built by hand rather than through the pydantic models because `list` and batch submits return
thousands of tasks; the OpenAPI document still declares the models, and the schema tests check
that these dicts match them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from taskctl import DEFAULT_QUEUE
from taskctl.api import TaskSpec
from taskctl.units import ms_to_rfc3339
from taskctl.wire import to_wire
from taskctld.store import AttemptRow, EventRow, FireRow, QueueRow, ScheduleRow, TaskRow


def attempt_view(a: AttemptRow) -> dict[str, Any]:
    return {
        "number": a.number,
        "outcome": a.outcome.value if a.outcome else None,
        "exit_code": a.exit_code,
        "signal": a.signal,
        "error": a.error,
        "started_at": ms_to_rfc3339(a.started_at),
        "ended_at": ms_to_rfc3339(a.ended_at),
        "pid": a.pid,
        "max_rss": a.max_rss,
        "cpu_user": a.cpu_user,
        "cpu_system": a.cpu_system,
        "node": a.node,
    }


def task_view(
    t: TaskRow,
    attempts: list[AttemptRow],
    *,
    deps: tuple[list[int], list[int]] = ([], []),
    schedule: str | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The API's Task. `env` is included only when the caller asked to see it (show_env)."""
    view: dict[str, Any] = {
        "id": t.id,
        "name": t.name,
        "state": t.state.value,
        "reason": t.reason,
        "queue": t.queue,
        "node": t.node,
        "priority": t.priority,
        "command": [to_wire(arg) for arg in t.command],
        "shell": t.shell,
        "cwd": to_wire(t.cwd),
        "labels": t.labels,
        "created_at": ms_to_rfc3339(t.created_at),
        "run_at": ms_to_rfc3339(t.run_at),
        "started_at": ms_to_rfc3339(t.started_at),
        "finished_at": ms_to_rfc3339(t.finished_at),
        "exit_code": t.exit_code,
        "attempts": [attempt_view(a) for a in attempts],
        "retries": t.retries,
        "backoff": t.backoff,
        "retry_delay": t.retry_delay,
        "max_delay": t.max_delay,
        "retry_on": t.retry_on,
        "no_retry_on": t.no_retry_on,
        "timeout": t.timeout,
        "kill_grace": t.kill_grace,
        "memory_limit": t.memory_limit,
        "key": t.key,
        "after": deps[0],
        "after_any": deps[1],
        "schedule": schedule,
        "due_at": ms_to_rfc3339(t.due_at),
    }
    if env is not None:
        view["env"] = {k: to_wire(v) for k, v in env.items()}
    return view


def event_view(e: EventRow) -> dict[str, Any]:
    return {
        "id": e.id,
        "at": ms_to_rfc3339(e.at),
        "task_id": e.task_id,
        "queue": e.queue,
        "from_state": e.from_state.value if e.from_state else None,
        "to_state": e.to_state.value,
        "attempt": e.attempt,
        "exit_code": e.exit_code,
        "reason": e.reason,
    }


def queue_view(q: QueueRow, counts: dict[str, int]) -> dict[str, Any]:
    """The API's QueueInfo; `counts`: its tasks by state (states with none left out)."""
    return {
        "name": q.name,
        "concurrency": q.concurrency,
        "paused": q.paused,
        "defaults": q.defaults,
        "counts": counts,
    }


def schedule_view(
    row: ScheduleRow, *, problem: str | None = None, fires: Sequence[FireRow] | None = None
) -> dict[str, Any]:
    """The API's Schedule. `problem`: why its trigger is not watching; `fires`: its recent
    runs, newest first (left out when None)."""
    template = json.loads(row.template)
    view: dict[str, Any] = {
        "name": row.name,
        "kind": row.kind,
        "overlap": row.overlap,
        "catch_up": row.catch_up,
        "paused": row.paused,
        "command": [to_wire(arg) for arg in template["command"]],
        "shell": template.get("shell", False),
        "queue": template.get("queue", DEFAULT_QUEUE),
        "options": _template_options(template),
        "created_at": ms_to_rfc3339(row.created_at),
    }
    if problem is not None:
        view["problem"] = problem
    if row.kind == "cron":
        due = None if row.paused else row.next_due
        view.update(cron=row.spec, tz=row.tz or "UTC", next_due=ms_to_rfc3339(due))
    else:
        view.update(json.loads(row.spec))
    if fires is not None:
        view["runs"] = [
            {
                "due_at": ms_to_rfc3339(f.due_at), "fired_at": ms_to_rfc3339(f.fired_at),
                "task_id": f.task_id, "outcome": f.outcome, "state": f.task_state, "exit_code": f.exit_code,
            }
            for f in fires
        ]  # fmt: skip
    return view


_SHOWN_APART = {"command", "shell", "queue", "env"}  # env: it may hold secrets


def _template_options(template: dict[str, Any]) -> dict[str, Any]:
    """The submit options a schedule's tasks get, where they differ from the defaults."""
    fields = TaskSpec.model_fields
    return {
        k: to_wire(v) if k == "cwd" and isinstance(v, str) else v
        for k, v in template.items()
        if k not in _SHOWN_APART
        and k in fields
        and v != fields[k].get_default(call_default_factory=True)
    }
