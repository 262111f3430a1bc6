"""Attempt rows in PostgreSQL: opened by a claim (or a start found later) with this node's
name, ended once. What a node recovers or counts as its own is its own attempts only."""

from __future__ import annotations

import json
from collections.abc import Sequence

from taskctl.api import TaskState
from taskctld.store import AttemptEnd, AttemptRow, AttemptStart
from taskctld.store.postgres.base import PgBase
from taskctld.store.postgres.rows import attempt_rows, rows_from_json

# As in `move_many` (tasks.py), `task_id = ANY(ids)` lets the planner use the primary key.
_STARTS = rows_from_json("starts", "task_id int8, number int4, pid int4, started_at int8")
_MARK_STARTED = (
    f"UPDATE attempts a SET pid = u.pid, started_at = u.started_at FROM {_STARTS} AS u "
    "WHERE a.task_id = ANY(%(ids)s::int8[]) AND a.task_id = u.task_id AND a.number = u.number"
)
_ENDS = rows_from_json(
    "ends",
    "task_id int8, number int4, outcome text, exit_code int4, signal int4, error text, "
    "ended_at int8, max_rss int8, cpu_user float8, cpu_system float8",
)
_END = (
    "UPDATE attempts a SET outcome = u.outcome, exit_code = u.exit_code, signal = u.signal, "
    "error = u.error, ended_at = u.ended_at, max_rss = u.max_rss, cpu_user = u.cpu_user, "
    f"cpu_system = u.cpu_system FROM {_ENDS} AS u "
    "WHERE a.task_id = ANY(%(ids)s::int8[]) AND a.task_id = u.task_id AND a.number = u.number "
    "AND a.outcome IS NULL RETURNING a.task_id, a.number"
)


class PgAttempts(PgBase):
    """`AttemptStore` on PostgreSQL."""

    def open_attempt(
        self, task_id: int, number: int, started_at: int, pid: int | None = None
    ) -> None:
        """The row of attempt `number` of a task, run by this node, open until `end_attempt`."""
        self._require_transaction()
        self._x(
            "INSERT INTO attempts (task_id, number, started_at, pid, node) "
            "VALUES (%s, %s, %s, %s, %s)",
            (task_id, number, started_at, pid, self.node),
        )

    def note_attempt(self, task_id: int, number: int, state: TaskState) -> bool:
        """Count attempt `number` on a task that stays in `state`, if it is in `state` with
        `number` - 1 attempts; False (nothing changed) if not."""
        self._require_transaction()
        return self._x(
            "UPDATE tasks SET attempts = %s WHERE id = %s AND state = %s AND attempts = %s",
            (number, task_id, state.value, number - 1),
        ).rowcount == 1  # fmt: skip

    def mark_started(self, task_id: int, attempt: int, **fields: object) -> None:
        self._require_transaction()
        names = sorted(fields)
        self._x(
            f"UPDATE attempts SET {', '.join(f'{n} = %s' for n in names)} "
            "WHERE task_id = %s AND number = %s",
            [*(fields[n] for n in names), task_id, attempt],
        )

    def mark_started_many(self, starts: Sequence[AttemptStart]) -> None:
        """`mark_started` of each (its pid and exact start time), in one statement."""
        self._require_transaction()
        if len(starts) == 1:  # `mark_started`'s statement, cheaper than spreading rows
            (s,) = starts
            self.mark_started(s.task_id, s.attempt, pid=s.pid, started_at=s.started_at)
        elif starts:
            ids = [s.task_id for s in starts]
            self._x(_MARK_STARTED, {"starts": json.dumps(starts), "ids": ids})

    def end_attempts(self, ends: Sequence[AttemptEnd]) -> set[tuple[int, int]]:
        """`end_attempt` of each, in one statement; returns the (task id, attempt) of those
        that were news (the attempt was open: of one attempt ended twice, the first counts)."""
        self._require_transaction()
        first: dict[tuple[int, int], AttemptEnd] = {}
        for end in ends:
            first.setdefault((end.task_id, end.attempt), end)
        if len(first) == 1:  # `end_attempt`'s statement, cheaper than spreading rows
            ((key, end),) = first.items()
            return {key} if self.end_attempt(end) else set()
        if not first:
            return set()
        rows = [
            (e.task_id, e.attempt, e.outcome.value, e.exit_code, e.signal, e.error, e.ended_at,
             e.max_rss, e.cpu_user, e.cpu_system)
            for e in first.values()
        ]  # fmt: skip
        params = {"ends": json.dumps(rows), "ids": [key[0] for key in first]}
        return {(task_id, n) for task_id, n in self._x(_END, params)}

    def end_attempt(self, end: AttemptEnd) -> bool:
        """Write how the attempt ended (only the first report counts); False when there is no
        such open attempt (already ended: by a node that rescued it, say)."""
        self._require_transaction()
        return self._x(
            "UPDATE attempts SET outcome = %s, exit_code = %s, signal = %s, error = %s, "
            "ended_at = %s, max_rss = %s, cpu_user = %s, cpu_system = %s "
            "WHERE task_id = %s AND number = %s AND outcome IS NULL",
            (
                end.outcome.value, end.exit_code, end.signal, end.error, end.ended_at,
                end.max_rss, end.cpu_user, end.cpu_system, end.task_id, end.attempt,
            ),
        ).rowcount == 1  # fmt: skip

    def attempts_of(self, ids: Sequence[int]) -> dict[int, list[AttemptRow]]:
        found: dict[int, list[AttemptRow]] = {i: [] for i in ids}
        cur = self._x(
            "SELECT * FROM attempts WHERE task_id = ANY(%s::int8[]) ORDER BY task_id, number",
            (list(ids),),
        )
        for row in attempt_rows(cur):
            found[row.task_id].append(row)
        return found

    def open_attempts(self) -> list[AttemptRow]:
        """This node's attempts with no outcome yet: what it ran when it last stopped."""
        return list(
            attempt_rows(
                self._x("SELECT * FROM attempts WHERE outcome IS NULL AND node = %s", (self.node,))
            )
        )

    def stray_attempts(self) -> list[tuple[int, int, str]]:
        """This node's open attempts of tasks no longer running them: task id, attempt, queue."""
        return [
            tuple(row)
            for row in self._x(
                "SELECT a.task_id, a.number, t.queue FROM attempts a "
                "JOIN tasks t ON t.id = a.task_id WHERE a.outcome IS NULL AND a.node = %s "
                "AND NOT (t.state = 'running' AND t.attempts = a.number)",
                (self.node,),
            )
        ]

    def node_of(self, task_id: int) -> str | None:
        """The node that runs the task's open attempt (None when none is open)."""
        row = self._x(
            "SELECT node FROM attempts WHERE task_id = %s AND outcome IS NULL "
            "ORDER BY number DESC LIMIT 1",
            (task_id,),
        ).fetchone()
        return row[0] if row else None

    def count_attempt_outcomes(self) -> dict[str, int]:
        return dict(
            self._x(
                "SELECT outcome, count(*) FROM attempts WHERE outcome IS NOT NULL GROUP BY outcome"
            ).fetchall()
        )
