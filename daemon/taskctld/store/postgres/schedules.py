"""Cron schedules, file triggers and their fires in PostgreSQL. A fire's key (schedule, due
time) is the table's primary key, taken with `ON CONFLICT DO NOTHING`: a due time fires once
across every node, and the node that loses the race is told so instead of failing."""

from __future__ import annotations

from taskctl.errors import Conflict
from taskctld.store import FireRow, NewSchedule, ScheduleRow
from taskctld.store.postgres.base import PgBase
from taskctld.store.postgres.rows import schedule_rows


class PgSchedules(PgBase):
    """`ScheduleStore` on PostgreSQL."""

    def add_schedule(self, schedule: NewSchedule, now: int) -> ScheduleRow:
        """Insert a schedule; a missing name becomes `cron-ID` or `trigger-ID`. Raises
        Conflict when the name is taken (the transaction stays usable)."""
        self._require_transaction()
        cur = self._x(
            "INSERT INTO schedules (id, name, kind, spec, tz, overlap, catch_up, template, "
            "next_due, last_due, created_at, updated_at) "
            "SELECT n.id, coalesce(%(name)s, %(kind)s || '-' || n.id), %(kind)s, %(spec)s, "
            "%(tz)s, %(overlap)s, %(catch_up)s, %(template)s, %(next_due)s, %(now)s, %(now)s, "
            "%(now)s FROM (SELECT nextval('schedules_id_seq') AS id) AS n "
            "ON CONFLICT (name) DO NOTHING RETURNING *",
            {
                "name": schedule.name, "kind": schedule.kind, "spec": schedule.spec,
                "tz": schedule.tz, "overlap": schedule.overlap, "catch_up": schedule.catch_up,
                "template": schedule.template, "next_due": schedule.next_due, "now": now,
            },
        )  # fmt: skip
        found = next(schedule_rows(cur), None)
        if found is None:
            raise Conflict(f"a schedule named {schedule.name!r} exists already")
        return found

    def get_schedule(self, name: str) -> ScheduleRow | None:
        return next(
            schedule_rows(self._x("SELECT * FROM schedules WHERE name = %s", (name,))), None
        )

    def get_schedule_by_id(self, schedule_id: int) -> ScheduleRow | None:
        cur = self._x("SELECT * FROM schedules WHERE id = %s", (schedule_id,))
        return next(schedule_rows(cur), None)

    def list_schedules(self, kind: str | None = None) -> list[ScheduleRow]:
        if kind is None:
            return list(schedule_rows(self._x("SELECT * FROM schedules ORDER BY id")))
        cur = self._x("SELECT * FROM schedules WHERE kind = %s ORDER BY id", (kind,))
        return list(schedule_rows(cur))

    def update_schedule(self, schedule_id: int, **fields: object) -> None:
        self._require_transaction()
        if "paused" in fields:
            fields["paused"] = bool(fields["paused"])
        names = sorted(fields)
        self._x(
            f"UPDATE schedules SET {', '.join(f'{n} = %s' for n in names)} WHERE id = %s",
            [*(fields[n] for n in names), schedule_id],
        )

    def delete_schedule(self, schedule_id: int) -> None:
        """The schedule and its fire records go; the tasks it created stay."""
        self._require_transaction()
        self._x("DELETE FROM fires WHERE schedule_id = %s", (schedule_id,))
        self._x("DELETE FROM schedules WHERE id = %s", (schedule_id,))

    def due_schedules(self, now: int) -> list[ScheduleRow]:
        cur = self._x(
            "SELECT * FROM schedules WHERE kind = 'cron' AND NOT paused AND next_due <= %s "
            "ORDER BY next_due",
            (now,),
        )
        return list(schedule_rows(cur))

    def next_schedule_due(self) -> int | None:
        row = self._x(
            "SELECT min(next_due) FROM schedules WHERE kind = 'cron' AND NOT paused"
        ).fetchone()
        return row[0] if row else None

    def fire_exists(self, schedule_id: int, due_at: int) -> bool:
        found = self._x(
            "SELECT 1 FROM fires WHERE schedule_id = %s AND due_at = %s", (schedule_id, due_at)
        )
        return found.fetchone() is not None

    def record_fire(
        self, schedule_id: int, due_at: int, now: int, task_id: int | None, outcome: str
    ) -> None:
        """Record a fire; a due time that has one already (on any node) keeps it."""
        self._require_transaction()
        self._x(
            "INSERT INTO fires (schedule_id, due_at, fired_at, task_id, outcome) "
            "VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            (schedule_id, due_at, now, task_id, outcome),
        )

    def claim_fire(self, schedule_id: int, due_at: int, now: int) -> bool:
        """Take a due time for this transaction: its fire row, with no task yet. False,
        changing nothing, when it was taken already; a claim another node has not committed
        yet is waited for (then False if it commits, True if it rolls back)."""
        self._require_transaction()
        return self._x(
            "INSERT INTO fires (schedule_id, due_at, fired_at, task_id, outcome) "
            "VALUES (%s, %s, %s, NULL, 'claimed') ON CONFLICT DO NOTHING",
            (schedule_id, due_at, now),
        ).rowcount == 1  # fmt: skip

    def set_fire_task(
        self, schedule_id: int, due_at: int, task_id: int | None, outcome: str
    ) -> None:
        """What a claimed fire came to: its task (None when skipped) and outcome."""
        self._require_transaction()
        self._x(
            "UPDATE fires SET task_id = %s, outcome = %s WHERE schedule_id = %s AND due_at = %s",
            (task_id, outcome, schedule_id, due_at),
        )

    def fires_of(self, schedule_id: int, limit: int) -> list[FireRow]:
        cur = self._x(
            "SELECT f.due_at, f.fired_at, f.task_id, f.outcome, t.state, t.exit_code FROM fires f "
            "LEFT JOIN tasks t ON t.id = f.task_id WHERE f.schedule_id = %s "
            "ORDER BY f.due_at DESC LIMIT %s",
            (schedule_id, limit),
        )
        return [FireRow(*row) for row in cur]

    def latest_task_of(self, schedule_id: int) -> tuple[int, str] | None:
        row = self._x(
            "SELECT id, state FROM tasks WHERE schedule_id = %s ORDER BY id DESC LIMIT 1",
            (schedule_id,),
        ).fetchone()
        return (int(row[0]), str(row[1])) if row else None

    def schedule_names(self, ids: set[int]) -> dict[int, str]:
        if not ids:
            return {}
        return dict(
            self._x(
                "SELECT id, name FROM schedules WHERE id = ANY(%s::int8[])", (sorted(ids),)
            ).fetchall()
        )
