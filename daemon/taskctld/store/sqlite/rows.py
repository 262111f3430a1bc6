"""Rows of the SQLite store as the dataclasses of `taskctld.store`, and the WHERE of a task
filter."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from typing import Any

from taskctl.api import Outcome, TaskState
from taskctld.store import AttemptRow, QueueRow, ScheduleRow, TaskFilter, TaskRow
from taskctld.store.sqlite.base import marks
from taskctld.store.sqlite.schema import TASK_JSON


def task_rows(cur: sqlite3.Cursor) -> Iterator[TaskRow]:
    names = [d[0] for d in cur.description]
    for values in cur:
        row = dict(zip(names, values, strict=True))
        for name in TASK_JSON:
            if row[name] is not None:
                row[name] = json.loads(row[name])
        row["state"] = TaskState(row["state"])
        row["shell"] = bool(row["shell"])
        if isinstance(row["cwd"], bytes):
            row["cwd"] = row["cwd"].decode("utf-8", "surrogateescape")
        row.pop("updated_at")
        yield TaskRow(**row)


def queue_row(row: tuple[Any, ...]) -> QueueRow:
    name, concurrency, paused, defaults = row
    return QueueRow(name, concurrency, bool(paused), json.loads(defaults or "{}"))


def schedule_rows(cur: sqlite3.Cursor) -> Iterator[ScheduleRow]:
    names = [d[0] for d in cur.description]
    for values in cur:
        row = dict(zip(names, values, strict=True))
        row["paused"] = bool(row["paused"])
        yield ScheduleRow(**row)


def attempt_rows(cur: sqlite3.Cursor) -> Iterator[AttemptRow]:
    names = [d[0] for d in cur.description]
    for values in cur:
        row = dict(zip(names, values, strict=True))
        if row["outcome"] is not None:
            row["outcome"] = Outcome(row["outcome"])
        yield AttemptRow(**row)


def task_filter_sql(where: TaskFilter) -> tuple[str, list[object]]:
    """The WHERE clause (or "") and its parameters for `where`, its limit aside."""
    clauses: list[str] = []
    params: list[object] = []
    if where.states:
        clauses.append(f"state IN ({marks(len(where.states))})")
        params += [s.value for s in where.states]
    if where.queue is not None:
        clauses.append("queue = ?")
        params.append(where.queue)
    for key, value in where.labels.items():
        clauses.append("json_extract(labels, ?) = ?")
        params += [f'$."{key}"', value]
    if where.before_id is not None:
        clauses.append("id < ?")
        params.append(where.before_id)
    sql = " WHERE " + " AND ".join(clauses) if clauses else ""
    return sql, params
