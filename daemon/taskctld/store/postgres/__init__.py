"""The PostgreSQL store: several daemons ("nodes"), one per host, share one database, each
with a `PostgresStore` of its own; nodes never talk to each other but through the database.

It keeps SQL and nothing else, like the SQLite store (`taskctld.store.sqlite`), whose SQL it
mostly translates, one part per role of the `Store` Protocol: `base` (connection,
transactions, the event log in commit order, NOTIFY), `tasks`, `ready` (claims with
`FOR UPDATE SKIP LOCKED`, queue limits over every node), `batches` (staged in an unlogged
table by COPY), `attempts` (each with its node), `queues`, `schedules`, `maintenance`, and
`nodes` (`NodeStore`: heartbeats, leases, rescue); `schema` has the migrations.

What differs from SQLite, and why:
- One psycopg connection in autocommit mode; `transaction()` sends BEGIN/COMMIT. A psycopg
  OperationalError becomes `TaskctlError("store unreachable: ...")` (`PgBase.error`), and a
  broken connection is replaced at the next transaction. Messages name the store by
  `redact(url)`, never with its password.
- Event ids are given at the commit, under one lock, so they are in commit order across
  nodes (`base`); each such commit sends a NOTIFY on `CHANNEL` (payload: `notice_of`).
- A node's attempts, slots and recovery are its own; its lease is its heartbeat (`nodes`).
"""

from __future__ import annotations

from taskctl.errors import TaskctlError
from taskctld.store.postgres.attempts import PgAttempts
from taskctld.store.postgres.base import CHANNEL, notice_of, redact
from taskctld.store.postgres.batches import PgBatches
from taskctld.store.postgres.maintenance import PgMaintenance
from taskctld.store.postgres.nodes import PgNodes
from taskctld.store.postgres.output import PgOutput
from taskctld.store.postgres.queues import PgQueues
from taskctld.store.postgres.ready import PgReady
from taskctld.store.postgres.schedules import PgSchedules
from taskctld.store.postgres.schema import MIGRATE_LOCK, MIGRATIONS

__all__ = ["CHANNEL", "MIGRATIONS", "PostgresStore", "notice_of", "redact"]


class PostgresStore(
    PgReady, PgBatches, PgAttempts, PgQueues, PgSchedules, PgMaintenance, PgNodes, PgOutput
):
    """`Store` and `NodeStore` on one PostgreSQL database shared by every node: connected
    and migrated here; each role is a part of its own (see the module docstring).

    `node`: this daemon's name among those sharing the database (its attempts, slots and
    heartbeat); `lease_ms`: how long a node's heartbeat holds its attempts."""

    def __init__(self, url: str, *, node: str, lease_ms: int = 30000) -> None:
        super().__init__(url, node=node, lease_ms=lease_ms)
        try:
            self.migrate()
        except BaseException:
            self.close()
            raise

    def schema_version(self) -> int:
        found = self._x("SELECT to_regclass('meta') IS NOT NULL").fetchone()
        if not (found and found[0]):
            return 0
        row = self._x("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return int(row[0]) if row else 0

    def migrate(self) -> None:
        """Run the migrations the database has not seen, each in its own transaction, under
        a session advisory lock: of nodes starting at once, one migrates and the others wait,
        then find nothing left to do. A database newer than this code is refused."""
        self._x("SELECT pg_advisory_lock(%s)", (MIGRATE_LOCK,))
        try:
            self._x("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            version = self.schema_version()
            if version > len(MIGRATIONS):
                raise TaskctlError(
                    f"{self.where} has schema version {version}, newer than this taskctld "
                    f"({len(MIGRATIONS)}); upgrade taskctl"
                )
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                with self.transaction():
                    self._x(script)
                    self._x(
                        "INSERT INTO meta (key, value) VALUES ('schema_version', %s) "
                        "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                        (str(number),),
                    )
        finally:
            if not (self.conn.closed or self.conn.broken):
                self._x("SELECT pg_advisory_unlock(%s)", (MIGRATE_LOCK,))

    def __repr__(self) -> str:
        return f"PostgresStore({self.where!r}, node={self.node!r})"
