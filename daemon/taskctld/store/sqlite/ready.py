"""What is ready to run or due, read from the partial indexes of queued and scheduled tasks, so
that the cost does not grow with the number of finished tasks."""

from __future__ import annotations

from collections.abc import Collection

from taskctld.store import Candidate, TaskRow
from taskctld.store.sqlite.tasks import SqliteTasks


class SqliteReady(SqliteTasks):
    """`ReadyStore` on SQLite."""

    def claim_candidates(
        self, queue: str, want: int, held: Collection[int]
    ) -> tuple[list[Candidate], bool]:
        """Up to `want` + 1 queued tasks of `queue` in claim order (priority, highest first;
        then run_at; then id), tasks in `held` passed over; and whether they are every queued
        task of `queue` but the held ones."""
        rows = self.conn.execute(
            "SELECT id, priority, run_at FROM tasks WHERE state = 'queued' AND queue = ? "
            "ORDER BY priority DESC, run_at, id LIMIT ?",
            (queue, want + 1 + len(held)),
        ).fetchall()
        found = [Candidate(*row) for row in rows if row[0] not in held]
        complete = len(rows) <= want + len(held) and len(found) <= want + 1
        return found[: want + 1], complete

    def peek_ready(self, queue: str, limit: int, held: Collection[int]) -> list[TaskRow]:
        """The next `limit` queued tasks of `queue` in claim order, held ones passed over."""
        found, _ = self.claim_candidates(queue, limit, held)
        return self.get_tasks([c.id for c in found[:limit]])

    def ready_queues(self) -> set[str]:
        """Queues that have queued tasks (read once at start; the dispatcher tracks it after)."""
        return {
            q
            for (q,) in self.conn.execute("SELECT DISTINCT queue FROM tasks WHERE state = 'queued'")
        }

    def running_by_queue(self) -> dict[str, int]:
        rows = self.conn.execute(
            "SELECT queue, count(*) FROM tasks WHERE state = 'running' GROUP BY queue"
        ).fetchall()
        return {queue: n for queue, n in rows}

    def oldest_queued(self) -> dict[str, int]:
        """Per queue, the run_at (ms) of its oldest queued task."""
        return dict(
            self.conn.execute(
                "SELECT queue, min(run_at) FROM tasks WHERE state = 'queued' GROUP BY queue"
            ).fetchall()
        )

    def due_ids(self, now: int, limit: int) -> list[int]:
        """Scheduled tasks whose run_at has come (at or before `now`), earliest first."""
        return [
            i
            for (i,) in self.conn.execute(
                "SELECT id FROM tasks WHERE state = 'scheduled' AND run_at <= ? "
                "ORDER BY run_at LIMIT ?",
                (now, limit),
            )
        ]

    def count_due(self, before: int) -> int:
        """Scheduled tasks (delayed, or waiting out a retry's backoff) due before `before`."""
        return self.conn.execute(
            "SELECT count(*) FROM tasks WHERE state = 'scheduled' AND run_at < ?", (before,)
        ).fetchone()[0]

    def next_due(self) -> int | None:
        row = self.conn.execute(
            "SELECT min(run_at) FROM tasks WHERE state = 'scheduled'"
        ).fetchone()
        return row[0] if row else None
