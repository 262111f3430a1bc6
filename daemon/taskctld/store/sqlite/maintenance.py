"""Retention, space and health of the SQLite store."""

from __future__ import annotations

import os
from collections.abc import Sequence

from taskctld.store.sqlite.base import chunks, marks
from taskctld.store.sqlite.tasks import SqliteTasks


class SqliteMaintenance(SqliteTasks):
    """`Maintenance` on SQLite."""

    def prunable(self, cutoff: int, keep: int, limit: int) -> list[tuple[int, str, str, int]]:
        """Finished tasks to remove: ended before `cutoff`, or beyond the newest `keep`.
        (id, queue, state, attempts), at most `limit`. Waiting tasks never depend on a
        finished one (dependencies settle when they end), so nothing waits on these."""
        return self.conn.execute(
            "SELECT id, queue, state, attempts FROM tasks WHERE id IN ("
            "  SELECT id FROM tasks WHERE finished_at IS NOT NULL AND finished_at < ?"
            "  UNION SELECT id FROM (SELECT id FROM tasks WHERE finished_at IS NOT NULL"
            "                        ORDER BY finished_at DESC LIMIT -1 OFFSET ?)"
            ") LIMIT ?",
            (cutoff, keep, limit),
        ).fetchall()

    def remove_tasks(self, ids: Sequence[int]) -> None:
        """Delete tasks and what hangs on them (attempts, dependency rows)."""
        self._require_transaction()
        for chunk in chunks(ids):
            ids_in = marks(len(chunk))
            self.conn.execute(f"DELETE FROM attempts WHERE task_id IN ({ids_in})", chunk)
            self.conn.execute(
                f"DELETE FROM deps WHERE task_id IN ({ids_in}) OR dep_id IN ({ids_in})",
                [*chunk, *chunk],
            )
            self.conn.execute(f"DELETE FROM tasks WHERE id IN ({ids_in})", chunk)

    def prune_history(self, cutoff: int) -> int:
        """Events and cron fire records older than `cutoff` (keeping each schedule's newest fire,
        which guards its last due time), and environments no task uses. Returns events removed."""
        self._require_transaction()
        removed = self.conn.execute("DELETE FROM events WHERE at < ?", (cutoff,)).rowcount
        self.conn.execute(
            "DELETE FROM fires WHERE due_at < ? AND due_at < "
            "(SELECT max(f.due_at) FROM fires f WHERE f.schedule_id = fires.schedule_id)",
            (cutoff,),
        )
        self.conn.execute(
            "DELETE FROM envs WHERE id NOT IN (SELECT env_id FROM tasks WHERE env_id IS NOT NULL)"
        )
        self._env_cache.clear()
        return removed

    def compact(self) -> None:
        """Give freed pages back to the file system and keep the WAL small (outside any
        transaction)."""
        self.conn.execute("PRAGMA incremental_vacuum")
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def check_writable(self) -> None:
        """Raise StorageFull or TaskctlError unless a write transaction can commit."""
        with self.transaction():
            self.conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('last_write_check', ?)",
                (str(os.getpid()),),
            )

    def describe(self) -> str:
        return "sqlite"
