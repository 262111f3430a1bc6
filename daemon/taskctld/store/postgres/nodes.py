"""The nodes sharing the database (`NodeStore`): a row each, a heartbeat on the database's
clock, and the rescue of a node whose heartbeat lapsed.

A node's lease is its heartbeat: it holds while `heartbeat_at` is within `lease_ms` of the
database's now. Only the database's clock is read, so nodes' clocks may disagree. A rescue is
conditional (`take_lost` marks the node lost only if it is still lapsed), so of two nodes
rescuing the same one, one gets its attempts and the other nothing; a node that beats again
in time is never taken."""

from __future__ import annotations

import json

from taskctl.api import FINAL_STATES, TaskState
from taskctld.store import AttemptRow, Dependent, NodeRow
from taskctld.store.postgres.base import PgBase
from taskctld.store.postgres.rows import attempt_rows
from taskctld.store.postgres.schema import NOW_MS

SETTABLE = ("up", "draining")  # what `set_node_state` may set (lost is a rescue's to say)


class PgNodes(PgBase):
    """`NodeStore` on PostgreSQL."""

    def join(self, name: str, version: str, slots: int, queues: list[str] | None) -> None:
        """This node starts: its row made or renewed, up (a drained node stays draining, also
        after it was lost meanwhile), heartbeat and start time now."""
        self._x(
            "INSERT INTO nodes (name, version, state, started_at, heartbeat_at, slots, queues) "
            f"VALUES (%s, %s, 'up', {NOW_MS}, {NOW_MS}, %s, %s) "
            "ON CONFLICT (name) DO UPDATE SET version = EXCLUDED.version, "
            "state = CASE WHEN nodes.drained THEN 'draining' ELSE 'up' END, "
            "started_at = EXCLUDED.started_at, heartbeat_at = EXCLUDED.heartbeat_at, "
            "slots = EXCLUDED.slots, queues = EXCLUDED.queues",
            (name, version, slots, None if queues is None else json.dumps(queues)),
        )

    def beat(self) -> bool:
        """Renew this node's heartbeat. False when its row is lost (another node rescued it:
        its attempts were ended, and it must stop their trees) or missing (never joined)."""
        row = self._x(
            f"UPDATE nodes SET heartbeat_at = CASE WHEN state = 'lost' THEN heartbeat_at "
            f"ELSE {NOW_MS} END WHERE name = %s RETURNING state <> 'lost'",
            (self.node,),
        ).fetchone()
        return bool(row and row[0])

    def nodes(self) -> list[NodeRow]:
        rows = self._x(
            "SELECT n.name, n.version, n.state, n.started_at, n.heartbeat_at, "
            f"{NOW_MS} - n.heartbeat_at, n.slots, n.queues, "
            "(SELECT count(*) FROM attempts a WHERE a.node = n.name AND a.outcome IS NULL) "
            "FROM nodes n ORDER BY n.name"
        )
        return [
            NodeRow(name, version, state, started, beat, age, slots,
                    None if queues is None else json.loads(queues), running)
            for name, version, state, started, beat, age, slots, queues, running in rows
        ]  # fmt: skip

    def set_node_state(self, name: str, state: str) -> bool:
        """Drain a node (it claims nothing more) or put it back up. False when there is no
        such node, or it is lost (it joins again to be up). ValueError for another state."""
        if state not in SETTABLE:
            raise ValueError(f"a node can be set {' or '.join(SETTABLE)}, not {state!r}")
        return self._x(
            "UPDATE nodes SET state = %s, drained = %s WHERE name = %s AND state <> 'lost'",
            (state, state == "draining", name),
        ).rowcount == 1  # fmt: skip

    def lapsed(self) -> list[str]:
        """Other nodes, up or draining, whose heartbeat is older than the lease."""
        return [
            name
            for (name,) in self._x(
                "SELECT name FROM nodes WHERE state IN ('up', 'draining') AND name <> %s "
                f"AND heartbeat_at < {NOW_MS} - %s ORDER BY name",
                (self.node, self.lease_ms),
            )
        ]

    def unsettled(self, limit: int) -> list[Dependent]:
        """Waiting tasks that should not wait any more: every dependency final, or one they
        needed to succeed failed or was cancelled. Two nodes ending a task's dependencies at
        once, or a submit racing the end of its dependency, each see the other's change as not
        yet committed, and neither settles it; a sweep finds them."""
        final = [s.value for s in FINAL_STATES]
        failing = [TaskState.FAILED.value, TaskState.CANCELLED.value]
        cur = self._x(
            "SELECT w.id, w.queue, w.run_at FROM tasks w WHERE w.state = %s AND ("
            "  NOT EXISTS (SELECT 1 FROM deps d JOIN tasks t ON t.id = d.dep_id"
            "              WHERE d.task_id = w.id AND t.state <> ALL(%s))"
            "  OR EXISTS (SELECT 1 FROM deps d JOIN tasks t ON t.id = d.dep_id"
            "             WHERE d.task_id = w.id AND NOT d.any_end AND t.state = ANY(%s))"
            ") ORDER BY w.id LIMIT %s",
            (TaskState.WAITING.value, final, failing, limit),
        )
        return [Dependent(int(i), q, int(r)) for i, q, r in cur]

    def asked_stops(self, name: str) -> list[tuple[int, int]]:
        """The open attempts of node `name` that another node asked it to stop (a cancel)."""
        cur = self._x(
            "SELECT task_id, number FROM attempts "
            "WHERE node = %s AND ended_at IS NULL AND stop_asked ORDER BY task_id",
            (name,),
        )
        return [(int(t), int(n)) for t, n in cur]

    def take_lost(self, name: str) -> list[AttemptRow]:
        """In the caller's transaction: mark node `name` lost if its heartbeat still lapsed,
        and return its open attempts, for the caller to end each as lost. Empty when another
        node took it first, or it beat again."""
        self._require_transaction()
        cur = self._x(
            "WITH taken AS ("
            "  UPDATE nodes SET state = 'lost' WHERE name = %s AND state IN ('up', 'draining') "
            f"  AND heartbeat_at < {NOW_MS} - %s RETURNING name"
            ") SELECT a.* FROM attempts a JOIN taken ON a.node = taken.name "
            "WHERE a.outcome IS NULL ORDER BY a.task_id, a.number",
            (name, self.lease_ms),
        )
        return list(attempt_rows(cur))
