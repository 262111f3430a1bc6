"""The SQLite store: WAL mode, one connection owned by the daemon, explicit short transactions.

It keeps SQL and nothing else: which state a task goes to is `taskctld.lifecycle`'s to say.
Every read-modify-write runs inside `transaction()` (`BEGIN IMMEDIATE`), so a transaction never
has to upgrade a read lock. Each state change is one conditional `UPDATE ... WHERE id = ? AND
state = ?` through `move`, which also appends the matching event row; events reach subscribers
only after the commit. Claim candidates are read from the partial index of queued tasks, so
their cost does not grow with the number of finished tasks.

The parts, one per role of the `Store` Protocol: `base` (connection, transactions, event log),
`tasks`, `ready` (claim candidates, due tasks), `batches` (staged big batches), `attempts`,
`queues`, `schedules`, `maintenance`; `schema` holds the numbered migrations (`MIGRATIONS`;
`meta.schema_version` says how many ran).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import sqlite_utils

from taskctl.errors import TaskctlError
from taskctld.store.common import env_digest
from taskctld.store.sqlite.attempts import SqliteAttempts
from taskctld.store.sqlite.base import storage_error
from taskctld.store.sqlite.batches import SqliteBatches
from taskctld.store.sqlite.maintenance import SqliteMaintenance
from taskctld.store.sqlite.queues import SqliteQueues
from taskctld.store.sqlite.ready import SqliteReady
from taskctld.store.sqlite.schedules import SqliteSchedules
from taskctld.store.sqlite.schema import MIGRATIONS

__all__ = ["MIGRATIONS", "SqliteStore", "env_digest", "storage_error"]


class SqliteStore(
    SqliteReady, SqliteBatches, SqliteAttempts, SqliteQueues, SqliteSchedules, SqliteMaintenance
):
    """`Store` on one SQLite database file: opened, configured and migrated here; each role
    is a part of its own (see the module docstring)."""

    distributed = False  # one node: no other daemon shares this file

    def __init__(self, path: Path, *, durability: str = "full") -> None:
        if not path.exists():
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        conn = sqlite3.connect(
            str(path), isolation_level=None, check_same_thread=False, cached_statements=512
        )
        super().__init__(path, conn)
        self.db = sqlite_utils.Database(conn)
        try:
            self._configure(durability)
            self.migrate()
        except BaseException as e:
            # On a full disk even opening fails (a WAL database cannot create its -shm file):
            # StorageFull, like any write, so that the daemon can say so (exit code 6).
            conn.close()
            if isinstance(e, sqlite3.OperationalError):
                raise storage_error(e) from e
            raise

    def _configure(self, durability: str) -> None:
        c = self.conn
        c.execute("PRAGMA auto_vacuum = INCREMENTAL")  # only takes effect on a new file
        self.db.enable_wal()
        self._synchronous = "FULL" if durability == "full" else "NORMAL"
        c.execute(f"PRAGMA synchronous = {self._synchronous}")
        c.execute("PRAGMA busy_timeout = 5000")
        c.execute("PRAGMA journal_size_limit = 67108864")
        c.execute("PRAGMA temp_store = MEMORY")

    def schema_version(self) -> int:
        if not self.db["meta"].exists():
            return 0
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return int(row[0]) if row else 0

    def migrate(self) -> None:
        """Run the migrations this file has not seen, each in its own transaction."""
        version = self.schema_version()
        if version > len(MIGRATIONS):
            raise TaskctlError(
                f"{self.path} has schema version {version}, newer than this taskctld "
                f"({len(MIGRATIONS)}); upgrade taskctl"
            )
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            with self.transaction():
                for statement in script.split(";"):
                    if statement.strip():
                        self.conn.execute(statement)
                self.conn.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                    (str(number),),
                )
