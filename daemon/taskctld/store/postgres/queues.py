"""Queue rows in PostgreSQL: made on first use, changed by `queue set`."""

from __future__ import annotations

from taskctld.store import QueueRow
from taskctld.store.common import dump
from taskctld.store.postgres.base import PgBase
from taskctld.store.postgres.rows import queue_row


class PgQueues(PgBase):
    """`QueueStore` on PostgreSQL."""

    def ensure_queues(self, names: set[str], now: int) -> None:
        """Queues are created on first use."""
        self._x(
            "INSERT INTO queues (name, created_at) SELECT unnest(%s::text[]), %s "
            "ON CONFLICT DO NOTHING",
            (sorted(names), now),
        )

    def list_queues(self) -> list[QueueRow]:
        return [
            queue_row(r)
            for r in self._x("SELECT name, concurrency, paused, defaults FROM queues ORDER BY name")
        ]

    def get_queue(self, name: str) -> QueueRow | None:
        row = self._x(
            "SELECT name, concurrency, paused, defaults FROM queues WHERE name = %s", (name,)
        ).fetchone()
        return queue_row(row) if row else None

    def set_queue(self, name: str, now: int, **fields: object) -> QueueRow:
        """Create or change a queue: `concurrency`, `paused`, `defaults` (a dict)."""
        self._require_transaction()
        self.ensure_queues({name}, now)
        if "defaults" in fields:
            fields["defaults"] = dump(fields["defaults"])
        if "paused" in fields:
            fields["paused"] = bool(fields["paused"])
        names = sorted(fields)
        if names:
            self._x(
                f"UPDATE queues SET {', '.join(f'{n} = %s' for n in names)} WHERE name = %s",
                [*(fields[n] for n in names), name],
            )
        found = self.get_queue(name)
        assert found is not None
        return found
