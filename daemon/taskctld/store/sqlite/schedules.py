"""Cron schedules, file triggers and their fires in SQLite. A fire's key (schedule, due time)
is the table's primary key: that is what makes a due time fire once."""

from __future__ import annotations

import sqlite3

from taskctl.errors import Conflict
from taskctld.store import FireRow, NewSchedule, ScheduleRow
from taskctld.store.sqlite.base import SqliteBase, marks
from taskctld.store.sqlite.rows import schedule_rows


class SqliteSchedules(SqliteBase):
    """`ScheduleStore` on SQLite."""

    def add_schedule(self, schedule: NewSchedule, now: int) -> ScheduleRow:
        """Insert a schedule; a missing name becomes `cron-ID` or `trigger-ID`. Raises
        Conflict when the name is taken."""
        self._require_transaction()
        name = schedule.name or f"{schedule.kind}-{self._sequence('schedules') + 1}"
        try:
            cur = self.conn.execute(
                "INSERT INTO schedules (name, kind, spec, tz, overlap, catch_up, template, next_due, "
                "last_due, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    name, schedule.kind, schedule.spec, schedule.tz, schedule.overlap,
                    schedule.catch_up, schedule.template, schedule.next_due, now, now, now,
                ),
            )  # fmt: skip
        except sqlite3.IntegrityError:
            raise Conflict(f"a schedule named {name!r} exists already") from None
        found = self.get_schedule_by_id(cur.lastrowid or 0)
        assert found is not None
        return found

    def get_schedule(self, name: str) -> ScheduleRow | None:
        rows = schedule_rows(self.conn.execute("SELECT * FROM schedules WHERE name = ?", (name,)))
        return next(rows, None)

    def get_schedule_by_id(self, schedule_id: int) -> ScheduleRow | None:
        rows = schedule_rows(
            self.conn.execute("SELECT * FROM schedules WHERE id = ?", (schedule_id,))
        )
        return next(rows, None)

    def list_schedules(self, kind: str | None = None) -> list[ScheduleRow]:
        if kind is None:
            return list(schedule_rows(self.conn.execute("SELECT * FROM schedules ORDER BY id")))
        return list(
            schedule_rows(
                self.conn.execute("SELECT * FROM schedules WHERE kind = ? ORDER BY id", (kind,))
            )
        )

    def update_schedule(self, schedule_id: int, **fields: object) -> None:
        self._require_transaction()
        names = sorted(fields)
        self.conn.execute(
            f"UPDATE schedules SET {', '.join(f'{n} = ?' for n in names)} WHERE id = ?",
            [*(fields[n] for n in names), schedule_id],
        )

    def delete_schedule(self, schedule_id: int) -> None:
        """The schedule and its fire records go; the tasks it created stay."""
        self._require_transaction()
        self.conn.execute("DELETE FROM fires WHERE schedule_id = ?", (schedule_id,))
        self.conn.execute("DELETE FROM schedules WHERE id = ?", (schedule_id,))

    def due_schedules(self, now: int) -> list[ScheduleRow]:
        return list(
            schedule_rows(
                self.conn.execute(
                    "SELECT * FROM schedules WHERE kind = 'cron' AND paused = 0 AND next_due <= ? ORDER BY next_due",
                    (now,),
                )
            )
        )

    def next_schedule_due(self) -> int | None:
        row = self.conn.execute(
            "SELECT min(next_due) FROM schedules WHERE kind = 'cron' AND paused = 0"
        ).fetchone()
        return row[0] if row else None

    def fire_exists(self, schedule_id: int, due_at: int) -> bool:
        found = self.conn.execute(
            "SELECT 1 FROM fires WHERE schedule_id = ? AND due_at = ?", (schedule_id, due_at)
        )
        return found.fetchone() is not None

    def record_fire(
        self, schedule_id: int, due_at: int, now: int, task_id: int | None, outcome: str
    ) -> None:
        """Record a fire; a due time that has one already keeps it (this changes nothing)."""
        self._require_transaction()
        self.conn.execute(
            "INSERT OR IGNORE INTO fires (schedule_id, due_at, fired_at, task_id, outcome) "
            "VALUES (?, ?, ?, ?, ?)",
            (schedule_id, due_at, now, task_id, outcome),
        )

    def claim_fire(self, schedule_id: int, due_at: int, now: int) -> bool:
        """Take a due time for this transaction: its fire row, with no task yet (the
        (schedule, due time) primary key makes it once). False, changing nothing, when it was
        taken already."""
        self._require_transaction()
        return self.conn.execute(
            "INSERT OR IGNORE INTO fires (schedule_id, due_at, fired_at, task_id, outcome) "
            "VALUES (?, ?, ?, NULL, 'claimed')",
            (schedule_id, due_at, now),
        ).rowcount == 1  # fmt: skip

    def set_fire_task(
        self, schedule_id: int, due_at: int, task_id: int | None, outcome: str
    ) -> None:
        """What a claimed fire came to: its task (None when skipped) and outcome."""
        self._require_transaction()
        self.conn.execute(
            "UPDATE fires SET task_id = ?, outcome = ? WHERE schedule_id = ? AND due_at = ?",
            (task_id, outcome, schedule_id, due_at),
        )

    def fires_of(self, schedule_id: int, limit: int) -> list[FireRow]:
        cur = self.conn.execute(
            "SELECT f.due_at, f.fired_at, f.task_id, f.outcome, t.state, t.exit_code FROM fires f "
            "LEFT JOIN tasks t ON t.id = f.task_id WHERE f.schedule_id = ? ORDER BY f.due_at DESC LIMIT ?",
            (schedule_id, limit),
        )
        return [FireRow(*row) for row in cur]

    def latest_task_of(self, schedule_id: int) -> tuple[int, str] | None:
        row = self.conn.execute(
            "SELECT id, state FROM tasks WHERE schedule_id = ? ORDER BY id DESC LIMIT 1",
            (schedule_id,),
        ).fetchone()
        return (int(row[0]), str(row[1])) if row else None

    def schedule_names(self, ids: set[int]) -> dict[int, str]:
        if not ids:
            return {}
        return dict(
            self.conn.execute(
                f"SELECT id, name FROM schedules WHERE id IN ({marks(len(ids))})", sorted(ids)
            ).fetchall()
        )
