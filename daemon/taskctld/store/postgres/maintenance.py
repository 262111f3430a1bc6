"""Retention, space and health of the PostgreSQL store."""

from __future__ import annotations

from collections.abc import Sequence

from taskctld.store.postgres.tasks import PgTasks


class PgMaintenance(PgTasks):
    """`Maintenance` on PostgreSQL."""

    def prunable(self, cutoff: int, keep: int, limit: int) -> list[tuple[int, str, str, int]]:
        """Finished tasks to remove: ended before `cutoff`, or beyond the newest `keep`.
        (id, queue, state, attempts), at most `limit`."""
        return [
            tuple(row)
            for row in self._x(
                "SELECT id, queue, state, attempts FROM tasks WHERE id IN ("
                "  SELECT id FROM tasks WHERE finished_at IS NOT NULL AND finished_at < %s"
                "  UNION SELECT id FROM (SELECT id FROM tasks WHERE finished_at IS NOT NULL"
                "                        ORDER BY finished_at DESC OFFSET %s) AS older"
                ") LIMIT %s",
                (cutoff, keep, limit),
            )
        ]

    def remove_tasks(self, ids: Sequence[int]) -> None:
        """Delete tasks and what hangs on them (attempts, dependency rows)."""
        self._require_transaction()
        ids = list(ids)
        self._x("DELETE FROM attempts WHERE task_id = ANY(%s::int8[])", (ids,))
        self._x("DELETE FROM output WHERE task_id = ANY(%s::int8[])", (ids,))
        self._x("DELETE FROM output_done WHERE task_id = ANY(%s::int8[])", (ids,))
        self._x(
            "DELETE FROM deps WHERE task_id = ANY(%s::int8[]) OR dep_id = ANY(%s::int8[])",
            (ids, ids),
        )
        self._x("DELETE FROM tasks WHERE id = ANY(%s::int8[])", (ids,))

    def prune_history(self, cutoff: int) -> int:
        """Events and cron fire records older than `cutoff` (keeping the newest event, so that
        `last_event_id` never goes back, and each schedule's newest fire, which guards its
        last due time), and environments no task uses. Returns events removed."""
        self._require_transaction()
        removed = self._x(
            "DELETE FROM events WHERE at < %s AND id < (SELECT max(id) FROM events)", (cutoff,)
        ).rowcount
        self._x(
            "DELETE FROM fires WHERE due_at < %s AND due_at < "
            "(SELECT max(f.due_at) FROM fires f WHERE f.schedule_id = fires.schedule_id)",
            (cutoff,),
        )
        # An environment that a submit is inserting again (its row locked by the upsert) is
        # passed over: that submit's task will use it.
        self._x(
            "DELETE FROM envs WHERE id IN (SELECT e.id FROM envs e WHERE NOT EXISTS "
            "(SELECT 1 FROM tasks t WHERE t.env_id = e.id) FOR UPDATE SKIP LOCKED)"
        )
        self._env_cache.clear()
        return removed

    def compact(self) -> None:
        """Nothing to do by hand: autovacuum gives dead rows' space back for reuse."""

    def check_writable(self) -> None:
        """Raise TaskctlError unless a write transaction can commit (the server up, reachable,
        not read-only, with room)."""
        with self.transaction():
            self._x(
                "INSERT INTO meta (key, value) VALUES (%s, %s) "
                "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                (f"last_write_check {self.node}", self.node),
            )

    def describe(self) -> str:
        return self.where
