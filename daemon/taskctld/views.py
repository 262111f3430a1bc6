"""Rows to wire objects: the JSON shapes of `taskctl.api`, built as plain dicts.

Built by hand rather than through the pydantic models because `list` and batch submits return
thousands of tasks; the OpenAPI document still declares the models, and the schema tests check
that these dicts match them.
"""

from __future__ import annotations

from typing import Any

from taskctl.units import ms_to_rfc3339
from taskctl.wire import to_wire
from taskctld.store import AttemptRow, EventRow, TaskRow


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
