"""Rows of the PostgreSQL store as the dataclasses of `taskctld.store`, and the WHERE of a
task filter."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import psycopg

from taskctl.api import Outcome, TaskState
from taskctld.store import AttemptRow, QueueRow, ScheduleRow, TaskFilter, TaskRow
from taskctld.store.common import env_digest
from taskctld.store.postgres.schema import TASK_JSON


def rows_from_json(param: str, columns: str) -> str:
    """A FROM item spreading parameter `param`, a JSON array of rows (each an array, as
    `json.dumps` writes a list of tuples), into `columns` ("name type, ..."), in order, and
    `ord`, each row's place in the array from 1. Why not `unnest` of one array per column:
    psycopg dumps a list element by element in Python (about 15 us an array), and one JSON
    text is cheaper to send than ten arrays."""
    fields = ", ".join(
        f"(r.value->>{i})::{kind} AS {name}"
        for i, (name, kind) in enumerate(column.split() for column in columns.split(","))
    )
    return (
        f"(SELECT {fields}, r.ord "
        f"FROM json_array_elements(%({param})s::json) WITH ORDINALITY AS r(value, ord))"
    )


def _dicts(cur: psycopg.Cursor[Any]) -> Iterator[dict[str, Any]]:
    names = [d.name for d in cur.description or ()]
    for values in cur:
        yield dict(zip(names, values, strict=True))


def task_rows(cur: psycopg.Cursor[Any]) -> Iterator[TaskRow]:
    for row in _dicts(cur):
        for name in TASK_JSON:
            if row[name] is not None:
                row[name] = json.loads(row[name])
        row["state"] = TaskState(row["state"])
        row["cwd"] = bytes(row["cwd"]).decode("utf-8", "surrogateescape")
        row.pop("updated_at")
        yield TaskRow(**row)


def queue_row(row: tuple[Any, ...]) -> QueueRow:
    name, concurrency, paused, defaults = row
    return QueueRow(name, concurrency, bool(paused), json.loads(defaults or "{}"))


def schedule_rows(cur: psycopg.Cursor[Any]) -> Iterator[ScheduleRow]:
    for row in _dicts(cur):
        yield ScheduleRow(**row)


def attempt_rows(cur: psycopg.Cursor[Any]) -> Iterator[AttemptRow]:
    for row in _dicts(cur):
        row.pop("stop_asked", None)  # a request to its node, not part of its record
        if row["outcome"] is not None:
            row["outcome"] = Outcome(row["outcome"])
        yield AttemptRow(**row)


def task_filter_sql(where: TaskFilter) -> tuple[str, list[object]]:
    """The WHERE clause (or "") and its parameters for `where`, its limit aside."""
    clauses: list[str] = []
    params: list[object] = []
    if where.states:
        clauses.append("state = ANY(%s)")
        params.append([s.value for s in where.states])
    if where.queue is not None:
        clauses.append("queue = %s")
        params.append(where.queue)
    for key, value in where.labels.items():
        clauses.append("(labels::jsonb ->> %s) = %s")
        params += [key, value]
    if where.before_id is not None:
        clauses.append("id < %s")
        params.append(where.before_id)
    sql = " WHERE " + " AND ".join(clauses) if clauses else ""
    return sql, params


class Environments:
    """The environments of many tasks, by content id: each distinct dict is hashed once (the
    tasks of a batch share one object). `data`: content id -> JSON, to insert."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}
        self._ids: dict[int, str] = {}

    def id_of(self, env: dict[str, str] | None) -> str | None:
        if env is None:
            return None
        found = self._ids.get(id(env))
        if found is None:
            found, self.data[found] = env_digest(env)
            self._ids[id(env)] = found
        return found


def path_in(path: str) -> bytes:
    """A path's bytes for a BYTEA column (undecodable bytes are lone surrogates in `path`)."""
    return path.encode("utf-8", "surrogateescape")
