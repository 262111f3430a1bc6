"""What every part of the SQLite store shares: the connection, its transactions, and the event
log they append to (published to subscribers only after the commit)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from taskctl.api import TaskState
from taskctl.errors import StorageFull, TaskctlError
from taskctld.store import EventRow
from taskctld.store.common import CommitEvents
from taskctld.store.sqlite.schema import INSERT_EVENT

CHUNK = 500  # ids per IN (...) list


class SqliteBase(CommitEvents):
    """The connection and its transactions; `Transactions` and `EventLog` of the Protocol.
    Each part of `SqliteStore` builds on this (their `__init__`s chain through `super()`)."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        super().__init__()
        self.path = path
        self.conn = conn
        self._synchronous = "FULL"

    # -- transactions ---------------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """`BEGIN IMMEDIATE` ... `COMMIT`; nested calls join the outer transaction. Events
        appended inside are published to subscribers after the commit, dropped on rollback."""
        if self._in_transaction:
            yield
            return
        self._in_transaction = True
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                if self.conn.in_transaction:  # SQLite may have rolled back itself (disk full)
                    self.conn.execute("ROLLBACK")
                self._drop_pending()
                raise
            self.conn.execute("COMMIT")
        except sqlite3.OperationalError as e:
            self._drop_pending()
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise storage_error(e) from e
        finally:
            self._in_transaction = False
        self._publish_pending()

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """A nested transaction: on an exception, what happened inside is undone (and its
        events dropped), the outer transaction goes on."""
        self._require_transaction()
        mark, spans = len(self._pending), len(self._pending_spans)
        self.conn.execute("SAVEPOINT inner")
        try:
            yield
        except BaseException as e:
            del self._pending[mark:]
            del self._pending_spans[spans:]
            if self.conn.in_transaction:  # SQLite may have rolled back all of it (disk full)
                with suppress(sqlite3.OperationalError):
                    self.conn.execute("ROLLBACK TO inner")
                    self.conn.execute("RELEASE inner")
            if isinstance(e, sqlite3.OperationalError):
                raise storage_error(e) from e  # a full disk is StorageFull here too
            raise
        self.conn.execute("RELEASE inner")

    # -- the event log --------------------------------------------------------------------------

    def _append_event(
        self,
        now: int,
        task_id: int,
        old: TaskState | None,
        new: TaskState,
        attempt: int | None = None,
        exit_code: int | None = None,
        reason: str | None = None,
        queue: str | None = None,
    ) -> None:
        if queue is None:
            queue = self.conn.execute(
                "SELECT queue FROM tasks WHERE id = ?", (task_id,)
            ).fetchone()[0]
        cur = self.conn.execute(
            INSERT_EVENT,
            (now, task_id, queue, old and old.value, new.value, attempt, exit_code, reason),
        )
        self._pending.append(
            EventRow(cur.lastrowid or 0, now, task_id, queue, old, new, attempt, exit_code, reason)
        )

    def events_after(self, event_id: int, limit: int) -> list[EventRow]:
        cur = self.conn.execute(
            "SELECT id, at, task_id, queue, from_state, to_state, attempt, exit_code, reason "
            "FROM events WHERE id > ? ORDER BY id LIMIT ?",
            (event_id, limit),
        )
        return [
            EventRow(i, at, t, q, TaskState(f) if f else None, TaskState(to), a, x, r)
            for i, at, t, q, f, to, a, x, r in cur
        ]

    def last_event_id(self) -> int:
        return self._sequence("events")

    def _sequence(self, table: str) -> int:
        return sequence_of(self.conn, table)

    def close(self) -> None:
        self.conn.close()


def sequence_of(conn: sqlite3.Connection, table: str) -> int:
    """The last id AUTOINCREMENT gave in `table` (ids are never reused)."""
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)).fetchone()
    return int(row[0]) if row else 0


def insert_queues(conn: sqlite3.Connection, names: set[str], now: int) -> None:
    """Queues are created on first use."""
    conn.executemany(
        "INSERT OR IGNORE INTO queues (name, created_at) VALUES (?, ?)",
        [(n, now) for n in sorted(names)],
    )


def chunks(ids: Sequence[int]) -> Iterator[Sequence[int]]:
    for i in range(0, len(ids), CHUNK):
        yield ids[i : i + CHUNK]


def marks(n: int) -> str:
    return ", ".join("?" * n)


def path_in(path: str) -> str | bytes:
    """A path for a TEXT column: as text when it is UTF-8, else its bytes (a BLOB), which SQLite
    keeps as given and gives back as bytes."""
    try:
        path.encode()
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogateescape")
    return path


def storage_error(error: sqlite3.OperationalError) -> TaskctlError:
    """SQLite's error as ours: StorageFull when it says the disk is full, or cannot size the
    WAL index (`disk I/O error`, SQLITE_IOERR_SHMSIZE, which is how a full disk shows on open)."""
    text = str(error)
    if "full" in text or "disk I/O" in text:
        return StorageFull(f"the state folder is out of space: {text}")
    return TaskctlError(f"database error: {text}")
