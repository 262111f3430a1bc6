"""Attempt rows in SQLite: opened by a claim (or a start found later), ended once."""

from __future__ import annotations

from collections.abc import Sequence

from taskctl.api import TaskState
from taskctld.store import AttemptEnd, AttemptRow, AttemptStart
from taskctld.store.sqlite.base import SqliteBase, chunks, marks
from taskctld.store.sqlite.rows import attempt_rows


class SqliteAttempts(SqliteBase):
    """`AttemptStore` on SQLite."""

    def open_attempt(
        self, task_id: int, number: int, started_at: int, pid: int | None = None
    ) -> None:
        """The row of attempt `number` of a task, open (no outcome) until `end_attempt`."""
        self._require_transaction()
        self.conn.execute(
            "INSERT INTO attempts (task_id, number, started_at, pid) VALUES (?, ?, ?, ?)",
            (task_id, number, started_at, pid),
        )

    def note_attempt(self, task_id: int, number: int, state: TaskState) -> bool:
        """Count attempt `number` on a task that stays in `state` (its state is not changed),
        if it is in `state` with `number` - 1 attempts; False (nothing changed) if not."""
        self._require_transaction()
        return self.conn.execute(
            "UPDATE tasks SET attempts = ? WHERE id = ? AND state = ? AND attempts = ?",
            (number, task_id, state.value, number - 1),
        ).rowcount == 1  # fmt: skip

    def mark_started(self, task_id: int, attempt: int, **fields: object) -> None:
        """Record what the supervisor reported at start (pid, exact start time)."""
        self._require_transaction()
        names = sorted(fields)
        self.conn.execute(
            f"UPDATE attempts SET {', '.join(f'{n} = ?' for n in names)} "
            "WHERE task_id = ? AND number = ?",
            [*(fields[n] for n in names), task_id, attempt],
        )

    def mark_started_many(self, starts: Sequence[AttemptStart]) -> None:
        """`mark_started` of each (its pid and exact start time), in one `executemany`."""
        self._require_transaction()
        self.conn.executemany(
            "UPDATE attempts SET pid = ?, started_at = ? WHERE task_id = ? AND number = ?",
            [(s.pid, s.started_at, s.task_id, s.attempt) for s in starts],
        )

    def end_attempts(self, ends: Sequence[AttemptEnd]) -> set[tuple[int, int]]:
        """`end_attempt` of each, in order; returns the (task id, attempt) of those that were
        news (the attempt was open: of one attempt ended twice, the first counts)."""
        return {(end.task_id, end.attempt) for end in ends if self.end_attempt(end)}

    def end_attempt(self, end: AttemptEnd) -> bool:
        """Write how the attempt ended (only the first report of an attempt counts); False when
        there is no such open attempt (already ended, or never claimed)."""
        self._require_transaction()
        return self.conn.execute(
            "UPDATE attempts SET outcome = ?, exit_code = ?, signal = ?, error = ?, ended_at = ?, "
            "max_rss = ?, cpu_user = ?, cpu_system = ? "
            "WHERE task_id = ? AND number = ? AND outcome IS NULL",
            (
                end.outcome.value, end.exit_code, end.signal, end.error, end.ended_at,
                end.max_rss, end.cpu_user, end.cpu_system, end.task_id, end.attempt,
            ),
        ).rowcount == 1  # fmt: skip

    def attempts_of(self, ids: Sequence[int]) -> dict[int, list[AttemptRow]]:
        found: dict[int, list[AttemptRow]] = {i: [] for i in ids}
        for chunk in chunks(ids):
            cur = self.conn.execute(
                f"SELECT * FROM attempts WHERE task_id IN ({marks(len(chunk))}) "
                "ORDER BY task_id, number",
                chunk,
            )
            for row in attempt_rows(cur):
                found[row.task_id].append(row)
        return found

    def open_attempts(self) -> list[AttemptRow]:
        """Attempts with no outcome yet: what was running when the last daemon stopped."""
        return list(attempt_rows(self.conn.execute("SELECT * FROM attempts WHERE outcome IS NULL")))

    def stray_attempts(self) -> list[tuple[int, int, str]]:
        """Open attempts of tasks no longer running them (a cancel crossed a held start): task
        id, attempt and queue. Each still holds a slot of its queue until it ends."""
        return self.conn.execute(
            "SELECT a.task_id, a.number, t.queue FROM attempts a JOIN tasks t ON t.id = a.task_id "
            "WHERE a.outcome IS NULL AND NOT (t.state = 'running' AND t.attempts = a.number)"
        ).fetchall()

    def node_of(self, task_id: int) -> str | None:
        """One node runs everything here: no node is named."""
        return None

    def count_attempt_outcomes(self) -> dict[str, int]:
        return dict(
            self.conn.execute(
                "SELECT outcome, count(*) FROM attempts WHERE outcome IS NOT NULL GROUP BY outcome"
            ).fetchall()
        )
