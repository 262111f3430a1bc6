"""Big batches in SQLite: staged first, a chunk at a time, in a side database file
(`DATABASE-batch`, attached as `staging`, no journal, no sync), so that writing them takes no
lock on the main database and their pages are not held in memory; then published in one
transaction, one `INSERT ... SELECT` per table."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taskctl.api import TaskState
from taskctl.errors import Conflict, InvalidRequest
from taskctld.store import Dependent, EventSpan, InitialStates, NewTask, StagedBatch
from taskctld.store.common import dump, env_digest
from taskctld.store.sqlite.base import (
    insert_queues,
    marks,
    path_in,
    sequence_of,
    storage_error,
)
from taskctld.store.sqlite.schema import STAGED_COLUMNS
from taskctld.store.sqlite.tasks import SqliteTasks

AUTOCHECKPOINT_PAGES = 1000  # SQLite's default
APART_CACHE_KIB = 512  # the page cache of a connection opened to publish or checkpoint
STAGING_CACHE_KIB = 256  # the side database's page cache: the rest stays in its file


@dataclass
class _Staged:
    """What a staging table holds, as far as publishing it needs to know."""

    queues: set[str] = field(default_factory=set)
    keys: bool = False
    deps: bool = False

    def note(self, task: NewTask) -> None:
        self.queues.add(task.queue)
        self.keys = self.keys or task.key is not None
        self.deps = self.deps or bool(task.after or task.after_any)


class SqliteBatches(SqliteTasks):
    """`BatchStore` on SQLite."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        super().__init__(path, conn)
        self._staged: dict[str, _Staged] = {}  # staging tables in use, by name
        self._attached = False  # the side file, as `staging`
        self._stagings = 0
        with suppress(FileNotFoundError):  # a batch cut short by a crash: nothing published
            os.unlink(self._staging_path())

    def _staging_path(self) -> Path:
        return self.path.with_name(self.path.name + "-batch")

    def open_staging(self) -> str:
        """A new, empty staging table for one batch; its name is the handle. Writes nothing to
        the main database, so it needs no transaction."""
        try:
            if not self._attached:
                self._attach_staging()
            self._stagings += 1
            name = f"batch{self._stagings}"
            self.conn.execute(
                f"CREATE TABLE staging.{name} (seq INTEGER PRIMARY KEY, {', '.join(STAGED_COLUMNS)})"
            )
        except sqlite3.OperationalError as e:
            raise storage_error(e) from e
        self._staged[name] = _Staged()
        return name

    def _attach_staging(self) -> None:
        self.conn.execute("ATTACH DATABASE ? AS staging", (str(self._staging_path()),))
        self.conn.execute("PRAGMA staging.journal_mode = OFF")
        self.conn.execute("PRAGMA staging.synchronous = OFF")
        self.conn.execute(f"PRAGMA staging.cache_size = -{STAGING_CACHE_KIB}")
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS staging.envs (id TEXT PRIMARY KEY, data TEXT)"
        )
        self._attached = True

    def stage(self, staging: str, first_seq: int, tasks: Sequence[NewTask]) -> None:
        """Append tasks to a staging table as rows `first_seq`, `first_seq` + 1, ... Their
        dependencies must exist now (InvalidRequest names one that does not); `publish_staged`
        checks again. Touches only the side database: no transaction, no lock on the main one."""
        self._check_deps_exist(tasks)
        rows: list[tuple[Any, ...]] = []
        envs: dict[int, str | None] = {}
        staged = self._staged[staging]
        for seq, t in enumerate(tasks, start=first_seq):
            staged.note(t)
            env_id = envs.get(id(t.env), "")
            if env_id == "":
                env_id = envs[id(t.env)] = self._stage_env(t.env)
            rows.append(
                (
                    seq, t.name, t.queue, t.priority, dump(t.command), int(t.shell), path_in(t.cwd), env_id,
                    dump(t.labels), t.retries, t.backoff, t.retry_delay, t.max_delay,
                    dump(t.retry_on), dump(t.no_retry_on), t.timeout, t.kill_grace,
                    t.memory_limit, t.run_at, t.key, t.key_fingerprint,
                    dump(t.after) if t.after else None, dump(t.after_any) if t.after_any else None,
                )
            )  # fmt: skip
        try:
            self.conn.executemany(
                f"INSERT INTO staging.{staging} VALUES ({marks(len(STAGED_COLUMNS) + 1)})", rows
            )
        except sqlite3.OperationalError as e:
            raise storage_error(e) from e

    def _stage_env(self, env: dict[str, str] | None) -> str | None:
        if env is None:
            return None
        env_id, data = env_digest(env)
        self.conn.execute(
            "INSERT OR IGNORE INTO staging.envs (id, data) VALUES (?, ?)", (env_id, data)
        )
        return env_id

    def publish_staged(
        self, staging: str, now: int, since: int, initial: InitialStates
    ) -> StagedBatch:
        """Insert every staged task (one transaction with the caller's) in its initial state
        by `initial`: row `seq` becomes task `base + seq`, its creation event and dependencies
        with it, in one statement each. A staged key that a task not final, or finished after
        `since`, holds now (another client took it meanwhile) gives that task back instead if
        its fingerprint matches, and raises Conflict if not. Dependencies must still exist
        (InvalidRequest names one that does not). The creation events reach subscribers as one
        `EventSpan`. The tasks with dependencies are the batch's `dependent`, to be settled."""
        self._require_transaction()
        published, span = self._copy_staged(self.conn, staging, now, since, initial)
        self._pending_spans.append(span)
        if self._staged[staging].deps:
            published.dependent = self._copy_staged_deps(staging, published.base, now)
        return published

    def can_publish_apart(self, staging: str) -> bool:
        """Whether `publish_apart` may publish this batch: it has no dependencies (settling
        them takes the daemon's connection)."""
        return not self._staged[staging].deps

    def publish_apart(
        self, staging: str, now: int, since: int, initial: InitialStates
    ) -> tuple[StagedBatch, EventSpan]:
        """`publish_staged` in a transaction of its own on a connection of its own, for a
        thread: the daemon's connection goes on reading meanwhile (WAL readers never wait on a
        writer), and a write of its own waits for this commit as it would wait on the loop.
        The span is the caller's to `announce` once this returns. Only for a batch that
        `can_publish_apart` (RuntimeError otherwise)."""
        if not self.can_publish_apart(staging):
            raise RuntimeError("a batch with dependencies is published in the daemon's transaction")
        conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            conn.execute("PRAGMA busy_timeout = 5000")
            conn.execute(f"PRAGMA cache_size = -{APART_CACHE_KIB}")  # the daemon's RSS: pages
            conn.execute("ATTACH DATABASE ? AS staging", (str(self._staging_path()),))  # spill
            conn.execute(f"PRAGMA staging.cache_size = -{STAGING_CACHE_KIB}")
            conn.execute("BEGIN IMMEDIATE")
            try:
                published, span = self._copy_staged(conn, staging, now, since, initial)
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return published, span
        except sqlite3.OperationalError as e:
            raise storage_error(e) from e
        finally:
            conn.close()

    def announce(self, span: EventSpan) -> None:
        """Tell subscribers of a batch `publish_apart` has committed."""
        for on_span in self._span_subscribers:
            on_span(span)

    def _copy_staged(
        self, conn: sqlite3.Connection, staging: str, now: int, since: int, initial: InitialStates
    ) -> tuple[StagedBatch, EventSpan]:
        """The statements of `publish_staged` on `conn` (the daemon's, or `publish_apart`'s),
        but the dependency rows."""
        # Its commit must not also copy the whole batch from the WAL into the database file:
        # `checkpoint_apart` does that, off the daemon's thread.
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        staged = self._staged[staging]
        taken = _staged_keys_taken(conn, staging, since) if staged.keys else {}
        for seq in taken:
            conn.execute(f"DELETE FROM staging.{staging} WHERE seq = ?", (seq,))
        if staged.deps:
            _check_staged_deps(conn, staging)
        base = sequence_of(conn, "tasks")
        insert_queues(conn, staged.queues, now)
        conn.execute("INSERT OR IGNORE INTO envs (id, data) SELECT id, data FROM staging.envs")
        _copy_tasks(conn, staging, base, now, initial)
        return StagedBatch(base, taken), _copy_events(conn, base, now)

    def _copy_staged_deps(self, staging: str, base: int, now: int) -> list[Dependent]:
        """The dependency rows of the published tasks; returns those tasks."""
        for column, any_end in (("after", 0), ("after_any", 1)):
            self.conn.execute(
                "INSERT OR IGNORE INTO deps (task_id, dep_id, any_end) "
                f"SELECT ? + b.seq, j.value, ? FROM staging.{staging} b, json_each(b.{column}) j "
                f"WHERE b.{column} IS NOT NULL",
                (base, any_end),
            )
        self._deps_seen = True
        rows = self.conn.execute(
            f"SELECT ? + seq, queue, coalesce(run_at, ?) FROM staging.{staging} "
            "WHERE after IS NOT NULL OR after_any IS NOT NULL ORDER BY seq",
            (base, now),
        )
        return [Dependent(*row) for row in rows]

    def checkpoint_apart(self) -> None:
        """Copy the WAL into the database file on a connection of its own: a thread may run
        this while the daemon's connection reads and writes (a checkpoint blocks neither)."""
        conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA cache_size = -{APART_CACHE_KIB}")
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.OperationalError:
            pass  # busy or full: the next automatic checkpoint does it
        finally:
            conn.close()

    def drop_staging(self, staging: str) -> None:
        """Forget a staging table (published or not); the side file goes with the last one.
        Checkpoints are automatic again once no batch is being published."""
        if staging not in self._staged:
            return
        del self._staged[staging]
        if not self._staged:
            self.conn.execute(f"PRAGMA wal_autocheckpoint = {AUTOCHECKPOINT_PAGES}")
        with suppress(sqlite3.OperationalError):
            self.conn.execute(f"DROP TABLE staging.{staging}")
        if not self._staged and self._attached and not self._in_transaction:
            with suppress(sqlite3.OperationalError):
                self.conn.execute("DETACH DATABASE staging")
                self._attached = False
                with suppress(FileNotFoundError):
                    os.unlink(self._staging_path())


def _copy_tasks(
    conn: sqlite3.Connection, staging: str, base: int, now: int, initial: InitialStates
) -> None:
    """Row `seq` of the staging table becomes task `base + seq`, its state by `initial`."""
    state = (
        "CASE WHEN after IS NOT NULL OR after_any IS NOT NULL THEN :dependent "
        "WHEN run_at > :now THEN :delayed ELSE :ready END"
    )
    copied = ", ".join(c for c in STAGED_COLUMNS if c not in ("after", "after_any", "run_at"))
    conn.execute(
        f"INSERT INTO tasks (id, state, run_at, created_at, updated_at, {copied}) "
        f"SELECT :base + seq, {state}, coalesce(run_at, :now), :now, :now, {copied} "
        f"FROM staging.{staging} ORDER BY seq",
        {
            "base": base,
            "now": now,
            "dependent": initial.dependent.value,
            "delayed": initial.delayed.value,
            "ready": initial.ready.value,
        },
    )


def _copy_events(conn: sqlite3.Connection, base: int, now: int) -> EventSpan:
    """The creation event of every task after `base`, told as one span."""
    first_event = sequence_of(conn, "events") + 1
    conn.execute(
        "INSERT INTO events (at, task_id, queue, to_state) "
        "SELECT :now, id, queue, state FROM tasks WHERE id > :base ORDER BY id",
        {"base": base, "now": now},
    )
    created = {
        (queue, TaskState(state)): n
        for queue, state, n in conn.execute(
            "SELECT queue, state, count(*) FROM tasks WHERE id > ? GROUP BY queue, state",
            (base,),
        )
    }
    return EventSpan(first_event, sequence_of(conn, "events"), now, created)


def _staged_keys_taken(conn: sqlite3.Connection, staging: str, since: int) -> dict[int, int]:
    """Staged rows whose key a stored task holds now, and that task (Conflict if the
    request differs)."""
    taken: dict[int, int] = {}
    for seq, key, mine, holder, theirs in conn.execute(
        f"SELECT b.seq, b.key, b.key_fingerprint, t.id, t.key_fingerprint "
        f"FROM staging.{staging} b JOIN tasks t ON t.key = b.key "
        "WHERE b.key IS NOT NULL AND (t.finished_at IS NULL OR t.finished_at >= ?) "
        "ORDER BY b.seq, t.id DESC",
        (since,),
    ):
        if seq in taken:
            continue
        if mine != theirs:
            raise Conflict(
                f"idempotency key {key!r} belongs to task {holder}, submitted with a "
                "different command or options"
            )
        taken[seq] = holder
    return taken


def _check_staged_deps(conn: sqlite3.Connection, staging: str) -> None:
    missing = [
        d
        for (d,) in conn.execute(
            f"SELECT DISTINCT j.value FROM staging.{staging} b, "
            "json_each(coalesce(b.after, '[]')) j WHERE j.value NOT IN (SELECT id FROM tasks) "
            f"UNION SELECT DISTINCT j.value FROM staging.{staging} b, "
            "json_each(coalesce(b.after_any, '[]')) j WHERE j.value NOT IN (SELECT id FROM tasks) "
            "ORDER BY 1 LIMIT 20"
        )
    ]
    if missing:
        raise InvalidRequest(f"unknown task id in --after: {', '.join(map(str, missing))}")
