"""What is ready to run or due, read from the partial indexes of queued and scheduled tasks.

A claim's candidates are read `FOR UPDATE SKIP LOCKED` inside its transaction: rows another
node is claiming are passed over, and the rows read stay this claim's until its commit. A
queue with a concurrency limit is counted across every node under its row's lock, so that two
nodes cannot both fill the same free slots (a node that finds the row locked takes none this
time, and never waits for it)."""

from __future__ import annotations

from collections.abc import Collection

from taskctld.store import Candidate, TaskRow
from taskctld.store.postgres.tasks import PgTasks

_READY = (
    "FROM tasks "
    "WHERE state = 'queued' AND queue = %(queue)s AND (node IS NULL OR node = %(node)s) "
    "AND id <> ALL(%(held)s::int8[]) "
    "AND NOT EXISTS (SELECT 1 FROM nodes WHERE name = %(node)s AND state <> 'up') "
    "ORDER BY priority DESC, run_at, id LIMIT %(limit)s"
)
_CANDIDATES = "SELECT id, priority, run_at " + _READY
# The same with the queue's limit (NULL: none) read along, once (the subquery is constant).
_CLAIMABLE = (
    "SELECT id, priority, run_at, (SELECT concurrency FROM queues WHERE name = %(queue)s) " + _READY
)


class PgReady(PgTasks):
    """`ReadyStore` on PostgreSQL."""

    def claim_candidates(
        self, queue: str, want: int, held: Collection[int]
    ) -> tuple[list[Candidate], bool]:
        """Up to `want` + 1 queued tasks of `queue` in claim order (priority, highest first;
        then run_at; then id), tasks in `held`, pinned to another node or locked by another
        node's claim passed over; and whether they are every such task. Inside a transaction
        they are locked until its commit, and, for a queue with a limit, `want` is then capped
        by that limit less what runs in it on every node (none while another node claims
        from it: its row is locked). None when this node is not up. Tasks that a claim leaves
        queued are named in its commit's notice, so that a node that passed over them (they
        were locked) looks again.

        One statement for a queue without a limit (it reads the limit along with the
        candidates), three for one with a limit (then its row is locked and its running
        tasks counted, after the candidates were locked: they stay queued meanwhile)."""
        locking = self._in_transaction
        sql = _CLAIMABLE + (" FOR UPDATE OF tasks SKIP LOCKED" if locking else "")
        params = {"queue": queue, "node": self.node, "held": list(held), "limit": want + 1}
        rows = self._x(sql, params).fetchall()
        found = [Candidate(*row[:3]) for row in rows]
        if locking and rows and rows[0][3] is not None:
            free = self._free_in(queue)
            if free < want:  # the queue's limit: no more than `free`, and not said to be all
                if len(found) > free:
                    self.left_queued.add(queue)
                return found[: max(0, free)], False
        if locking and len(found) > want:  # the one past `want` stays queued, locked by us
            self.left_queued.add(queue)
        return found, len(found) <= want

    def _free_in(self, queue: str) -> int:
        """Free slots of `queue` across every node: its limit less its open attempts (none
        for a queue without a limit). Locks the queue's row until the commit, then counts in
        a statement of its own, which sees whatever committed while it waited."""
        limited = self._x(
            "SELECT concurrency FROM queues WHERE name = %s AND concurrency IS NOT NULL "
            "FOR UPDATE SKIP LOCKED",
            (queue,),
        ).fetchone()
        if limited is None:
            # Another node is claiming from it (its row is locked): none for us this time.
            # Never wait for that lock: a turn holding the events lock (a batch's publish)
            # would wait on a node that waits for the events lock at its commit.
            return 0
        (running,) = self._x(
            "SELECT count(*) FROM attempts a JOIN tasks t ON t.id = a.task_id "
            "WHERE a.outcome IS NULL AND t.queue = %s",
            (queue,),
        ).fetchone()  # type: ignore[misc]
        return max(0, int(limited[0]) - int(running))

    def peek_ready(self, queue: str, limit: int, held: Collection[int]) -> list[TaskRow]:
        """The next `limit` queued tasks of `queue` in claim order, held ones passed over
        (read, not locked)."""
        params = {"queue": queue, "node": self.node, "held": list(held), "limit": limit}
        return self.get_tasks([row[0] for row in self._x(_CANDIDATES, params)])

    def ready_queues(self) -> set[str]:
        """Queues that have queued tasks this node may run."""
        return {
            q
            for (q,) in self._x(
                "SELECT DISTINCT queue FROM tasks WHERE state = 'queued' "
                "AND (node IS NULL OR node = %s)",
                (self.node,),
            )
        }

    def running_by_queue(self) -> dict[str, int]:
        """Tasks running on this node, by queue (its slots)."""
        rows = self._x(
            "SELECT t.queue, count(*) FROM attempts a JOIN tasks t ON t.id = a.task_id "
            "WHERE a.outcome IS NULL AND a.node = %s AND t.state = 'running' "
            "AND t.attempts = a.number GROUP BY t.queue",
            (self.node,),
        )
        return {queue: n for queue, n in rows}

    def oldest_queued(self) -> dict[str, int]:
        return dict(
            self._x(
                "SELECT queue, min(run_at) FROM tasks WHERE state = 'queued' GROUP BY queue"
            ).fetchall()
        )

    def due_ids(self, now: int, limit: int) -> list[int]:
        """Scheduled tasks whose run_at has come, earliest first. Inside a transaction, those
        another node is promoting are passed over instead of waited for."""
        lock = " FOR UPDATE SKIP LOCKED" if self._in_transaction else ""
        return [
            i
            for (i,) in self._x(
                "SELECT id FROM tasks WHERE state = 'scheduled' AND run_at <= %s "
                "ORDER BY run_at LIMIT %s" + lock,
                (now, limit),
            )
        ]

    def count_due(self, before: int) -> int:
        return int(
            self._x(
                "SELECT count(*) FROM tasks WHERE state = 'scheduled' AND run_at < %s", (before,)
            ).fetchone()[0]  # type: ignore[index]
        )

    def next_due(self) -> int | None:
        row = self._x("SELECT min(run_at) FROM tasks WHERE state = 'scheduled'").fetchone()
        return row[0] if row else None
