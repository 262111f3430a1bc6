"""The SQLite store: WAL mode, one connection owned by the daemon, explicit short transactions.

Every read-modify-write runs inside `transaction()` (`BEGIN IMMEDIATE`), so a transaction never
has to upgrade a read lock. Each state change is one conditional `UPDATE ... WHERE id = ? AND
state = ?` through `move`, which also appends the matching event row; events reach subscribers
only after the commit. The claim reads the partial index of queued tasks, so its cost does not
grow with the number of finished tasks.

A big batch is staged first, a chunk at a time, in a side database file (`DATABASE-batch`,
attached as `staging`, no journal, no sync): writing it takes no lock on the main database and
its pages are not held in memory. One transaction then publishes it with `INSERT ... SELECT`.

Schema changes are numbered migrations in `MIGRATIONS`; `meta.schema_version` says how many ran.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlite_utils

from taskctl.api import FINAL_STATES, Outcome, TaskState
from taskctl.errors import Conflict, InvalidRequest, StorageFull, TaskctlError
from taskctld import states
from taskctld.store import (
    FINAL_VALUES,
    AttemptEnd,
    AttemptRow,
    Claim,
    EventRow,
    EventSpan,
    FireRow,
    NewSchedule,
    NewTask,
    QueueRow,
    ScheduleRow,
    StagedBatch,
    TaskFilter,
    TaskRow,
)

_STATE_LIST = ", ".join(f"'{s.value}'" for s in TaskState)

MIGRATIONS: list[str] = [
    # 1: tasks, attempts, queues, events, environments
    f"""
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE queues (
        name TEXT PRIMARY KEY,
        concurrency INTEGER,
        paused INTEGER NOT NULL DEFAULT 0,
        defaults TEXT NOT NULL DEFAULT '{{}}',
        created_at INTEGER NOT NULL
    );
    CREATE TABLE envs (id TEXT PRIMARY KEY, data TEXT NOT NULL);
    CREATE TABLE tasks (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT,
        queue TEXT NOT NULL,
        priority INTEGER NOT NULL DEFAULT 0,
        state TEXT NOT NULL CHECK (state IN ({_STATE_LIST})),
        reason TEXT,
        command TEXT NOT NULL,
        shell INTEGER NOT NULL DEFAULT 0,
        cwd TEXT NOT NULL,
        env_id TEXT,
        labels TEXT NOT NULL DEFAULT '{{}}',
        retries INTEGER NOT NULL DEFAULT 0,
        backoff TEXT NOT NULL DEFAULT 'fixed',
        retry_delay REAL NOT NULL DEFAULT 1,
        max_delay REAL NOT NULL DEFAULT 3600,
        retry_on TEXT,
        no_retry_on TEXT,
        timeout REAL,
        kill_grace REAL NOT NULL DEFAULT 10,
        memory_limit INTEGER,
        run_at INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        started_at INTEGER,
        finished_at INTEGER,
        attempts INTEGER NOT NULL DEFAULT 0,
        tries INTEGER NOT NULL DEFAULT 0,
        exit_code INTEGER,
        key TEXT
    );
    CREATE INDEX tasks_ready ON tasks (queue, priority DESC, run_at, id) WHERE state = 'queued';
    CREATE INDEX tasks_due ON tasks (run_at) WHERE state = 'scheduled';
    CREATE INDEX tasks_state ON tasks (state, queue);
    CREATE TABLE attempts (
        task_id INTEGER NOT NULL,
        number INTEGER NOT NULL,
        outcome TEXT,
        exit_code INTEGER,
        signal INTEGER,
        error TEXT,
        started_at INTEGER,
        ended_at INTEGER,
        pid INTEGER,
        max_rss INTEGER,
        cpu_user REAL,
        cpu_system REAL,
        PRIMARY KEY (task_id, number)
    ) WITHOUT ROWID;
    CREATE INDEX attempts_open ON attempts (task_id) WHERE outcome IS NULL;
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at INTEGER NOT NULL,
        task_id INTEGER NOT NULL,
        queue TEXT NOT NULL,
        from_state TEXT,
        to_state TEXT NOT NULL,
        attempt INTEGER,
        exit_code INTEGER,
        reason TEXT
    );
    CREATE INDEX events_task ON events (task_id);
    """,
    # 2: dependencies between tasks; cron schedules and file triggers, and their fires
    """
    CREATE TABLE deps (
        task_id INTEGER NOT NULL,
        dep_id INTEGER NOT NULL,
        any_end INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (task_id, dep_id)
    ) WITHOUT ROWID;
    CREATE INDEX deps_by_dep ON deps (dep_id);
    CREATE TABLE schedules (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL CHECK (kind IN ('cron', 'trigger')),
        spec TEXT NOT NULL,
        tz TEXT,
        overlap TEXT NOT NULL CHECK (overlap IN ('skip', 'queue', 'allow')),
        catch_up TEXT NOT NULL CHECK (catch_up IN ('none', 'latest', 'all')),
        paused INTEGER NOT NULL DEFAULT 0,
        template TEXT NOT NULL,
        next_due INTEGER,
        last_due INTEGER,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    );
    CREATE TABLE fires (
        schedule_id INTEGER NOT NULL,
        due_at INTEGER NOT NULL,
        fired_at INTEGER NOT NULL,
        task_id INTEGER,
        outcome TEXT NOT NULL,
        PRIMARY KEY (schedule_id, due_at)
    ) WITHOUT ROWID;
    ALTER TABLE tasks ADD COLUMN schedule_id INTEGER;
    ALTER TABLE tasks ADD COLUMN due_at INTEGER;
    CREATE INDEX tasks_by_schedule ON tasks (schedule_id, id) WHERE schedule_id IS NOT NULL
    """,
    # 3: idempotency keys
    """
    ALTER TABLE tasks ADD COLUMN key_fingerprint TEXT;
    CREATE INDEX tasks_by_key ON tasks (key, id) WHERE key IS NOT NULL
    """,
    # 4: retention
    """
    CREATE INDEX tasks_finished ON tasks (finished_at) WHERE finished_at IS NOT NULL;
    CREATE INDEX events_at ON events (at)
    """,
    # 5: the default queue is there from the start; the others are made by `queue set`
    """
    INSERT OR IGNORE INTO queues (name, created_at)
    VALUES ('default', CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER))
    """,
]

_TASK_JSON = ("command", "labels", "retry_on", "no_retry_on")
_INSERT_COLUMNS = [
    "name",
    "queue",
    "priority",
    "state",
    "command",
    "shell",
    "cwd",
    "env_id",
    "labels",
    "retries",
    "backoff",
    "retry_delay",
    "max_delay",
    "retry_on",
    "no_retry_on",
    "timeout",
    "kill_grace",
    "memory_limit",
    "run_at",
    "created_at",
    "updated_at",
    "key",
    "schedule_id",
    "due_at",
    "key_fingerprint",
]
_INSERT_TASK = (
    f"INSERT INTO tasks ({', '.join(_INSERT_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in _INSERT_COLUMNS)})"
)
_INSERT_EVENT = (
    "INSERT INTO events (at, task_id, queue, from_state, to_state, attempt, exit_code, reason) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_CHUNK = 500  # ids per IN (...) list
_STAGED_COLUMNS = [
    "name", "queue", "priority", "command", "shell", "cwd", "env_id", "labels", "retries",
    "backoff", "retry_delay", "max_delay", "retry_on", "no_retry_on", "timeout", "kill_grace",
    "memory_limit", "run_at", "key", "key_fingerprint", "after", "after_any",
]  # fmt: skip
_AUTOCHECKPOINT_PAGES = 1000  # SQLite's default
_APART_CACHE_KIB = 512  # the page cache of a connection opened to publish or checkpoint
_STAGING_CACHE_KIB = 256  # the side database's page cache: the rest stays in its file


def _chunks(ids: Sequence[int]) -> Iterator[Sequence[int]]:
    for i in range(0, len(ids), _CHUNK):
        yield ids[i : i + _CHUNK]


def _marks(n: int) -> str:
    return ", ".join("?" * n)


def _dump(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


def _path_in(path: str) -> str | bytes:
    """A path for a TEXT column: as text when it is UTF-8, else its bytes (a BLOB), which SQLite
    keeps as given and gives back as bytes."""
    try:
        path.encode()
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogateescape")
    return path


def env_digest(env: dict[str, str]) -> tuple[str, str]:
    """(content id, JSON): environments are stored once per distinct content."""
    data = json.dumps(env, separators=(",", ":"), sort_keys=True)
    return hashlib.blake2b(data.encode(), digest_size=16).hexdigest(), data


class SqliteStore:
    """`Store` on one SQLite database file; see the module docstring for the rules it keeps."""

    def __init__(self, path: Path, *, durability: str = "full") -> None:
        self.path = path
        if not path.exists():
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        conn = sqlite3.connect(
            str(path), isolation_level=None, check_same_thread=False, cached_statements=512
        )
        self.db = sqlite_utils.Database(conn)
        self.conn = conn
        self._in_transaction = False
        self._pending: list[EventRow] = []
        self._subscribers: list[Callable[[list[EventRow]], None]] = []
        self._env_cache: dict[str, dict[str, str]] = {}
        self._update_sql: dict[tuple[str, ...], str] = {}
        self._deps_seen: bool | None = None
        self._to_release: list[int] = []
        self._pending_spans: list[EventSpan] = []
        self._span_subscribers: list[Callable[[EventSpan], None]] = []
        self._staged: dict[str, _Staged] = {}  # staging tables in use, by name
        self._attached = False  # the side file, as `staging`
        self._stagings = 0
        with suppress(FileNotFoundError):  # a batch cut short by a crash: nothing published
            os.unlink(self._staging_path())
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

    # -- setup ----------------------------------------------------------------------------------

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
                self._pending.clear()
                self._pending_spans.clear()
                raise
            self.conn.execute("COMMIT")
        except sqlite3.OperationalError as e:
            self._pending.clear()
            self._pending_spans.clear()
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise storage_error(e) from e
        finally:
            self._in_transaction = False
        events, self._pending = self._pending, []
        spans, self._pending_spans = self._pending_spans, []
        for span in spans:
            for on_span in self._span_subscribers:
                on_span(span)
        if events:
            for callback in self._subscribers:
                callback(events)

    def on_commit(
        self,
        callback: Callable[[list[EventRow]], None],
        on_span: Callable[[EventSpan], None] | None = None,
    ) -> None:
        """`callback` gets the events of each commit; `on_span` (if given) each `EventSpan`,
        the creation events of a published batch, before them."""
        self._subscribers.append(callback)
        if on_span is not None:
            self._span_subscribers.append(on_span)

    def uncommitted_events(self) -> Sequence[EventRow]:
        """What the open transaction has appended so far (published only once it commits)."""
        return tuple(self._pending)

    def uncommitted_spans(self) -> Sequence[EventSpan]:
        """The batches the open transaction has published so far, as spans of events."""
        return tuple(self._pending_spans)

    def _require_transaction(self) -> None:
        if not self._in_transaction:
            raise RuntimeError("store writes must run inside transaction()")

    # -- the one place that changes a task's state ---------------------------------------------

    def move(
        self,
        task_id: int,
        old: TaskState,
        new: TaskState,
        now: int,
        *,
        reason: str | None = None,
        attempt: int | None = None,
        exit_code: int | None = None,
        fence: int | None = None,
        queue: str | None = None,
        **fields: object,
    ) -> bool:
        """Move one task from `old` to `new` if it is still in `old`; append the event.

        Returns False (and changes nothing) when the task is no longer in `old`: another actor
        won. `fence`, when given, also requires the task's attempt count to equal it, so a late
        report about an earlier attempt cannot move the task. `fields` are more columns to set
        in the same UPDATE; `attempt`, `exit_code` and `reason` are recorded in the event, and
        `reason` and `exit_code` (when given) on the task too.
        """
        self._require_transaction()
        if not states.allowed(old, new):
            raise RuntimeError(f"transition {old} -> {new} is not in the state machine")
        if exit_code is not None:
            fields["exit_code"] = exit_code
        names = tuple(sorted(fields))
        sql = self._update_sql.get(names)
        if sql is None:
            sets = "".join(f", {name} = ?" for name in names)
            sql = (
                f"UPDATE tasks SET state = ?, reason = ?, updated_at = ?{sets} "
                "WHERE id = ? AND state = ? AND (? IS NULL OR attempts = ?)"
            )
            self._update_sql[names] = sql
        values = [new.value, reason, now, *(fields[n] for n in names)]
        values += [task_id, old.value, fence, fence]
        if self.conn.execute(sql, values).rowcount != 1:
            return False
        self._append_event(now, task_id, old, new, attempt, exit_code, reason, queue)
        if new in FINAL_STATES:
            self._release_dependents(task_id, now)
        return True

    def _append_event(
        self,
        now: int,
        task_id: int,
        old: TaskState | None,
        new: TaskState,
        attempt: int | None,
        exit_code: int | None,
        reason: str | None,
        queue: str | None = None,
    ) -> None:
        if queue is None:
            queue = self.conn.execute(
                "SELECT queue FROM tasks WHERE id = ?", (task_id,)
            ).fetchone()[0]
        cur = self.conn.execute(
            _INSERT_EVENT,
            (now, task_id, queue, old and old.value, new.value, attempt, exit_code, reason),
        )
        self._pending.append(
            EventRow(cur.lastrowid or 0, now, task_id, queue, old, new, attempt, exit_code, reason)
        )

    # -- submit ---------------------------------------------------------------------------------

    def submit(self, tasks: Sequence[NewTask], now: int) -> list[int]:
        """Insert tasks (one transaction with the caller's); returns their ids in order.

        A task with dependencies starts `waiting` and is settled at once: queued if they are
        all met already, failed if one already failed. Dependencies must exist (so no cycle can
        ever form); raises InvalidRequest naming an unknown one."""
        self._require_transaction()
        self._check_deps_exist(tasks)
        rows: list[tuple[Any, ...]] = []
        env_ids: dict[int, str | None] = {}  # a batch shares one environment object: hash it once
        for t in tasks:
            env_id = env_ids.get(id(t.env), "")
            if env_id == "":
                env_id = env_ids[id(t.env)] = self._store_env(t.env)
            rows.append(
                (
                    t.name, t.queue, t.priority, _initial_state(t, now).value, _dump(t.command),
                    int(t.shell), _path_in(t.cwd), env_id, _dump(t.labels), t.retries, t.backoff,
                    t.retry_delay, t.max_delay, _dump(t.retry_on), _dump(t.no_retry_on),
                    t.timeout, t.kill_grace, t.memory_limit, t.run_at or now, now, now, t.key,
                    t.schedule_id, t.due_at, t.key_fingerprint,
                )
            )  # fmt: skip
        self.ensure_queues({t.queue for t in tasks}, now)
        before = self._sequence("tasks")
        self.conn.executemany(_INSERT_TASK, rows)
        ids = list(range(before + 1, before + 1 + len(rows)))
        waiting = []
        for task_id, row, t in zip(ids, rows, tasks, strict=True):
            self._append_event(now, task_id, None, TaskState(row[3]), None, None, None, row[1])
            if t.after or t.after_any:
                self._deps_seen = True
                self.conn.executemany(
                    "INSERT OR IGNORE INTO deps (task_id, dep_id, any_end) VALUES (?, ?, ?)",
                    [(task_id, d, 0) for d in t.after] + [(task_id, d, 1) for d in t.after_any],
                )
                waiting.append(task_id)
        for task_id in waiting:
            self._settle_waiting(task_id, now)
        return ids

    # -- big batches: staged, then published in one statement per table ----------------------

    def _staging_path(self) -> Path:
        return self.path.with_name(self.path.name + "-batch")

    def open_staging(self) -> str:
        """A new, empty staging table for one batch; its name is the handle. Writes nothing to
        the main database, so it needs no transaction."""
        try:
            if not self._attached:
                self.conn.execute("ATTACH DATABASE ? AS staging", (str(self._staging_path()),))
                self.conn.execute("PRAGMA staging.journal_mode = OFF")
                self.conn.execute("PRAGMA staging.synchronous = OFF")
                self.conn.execute(f"PRAGMA staging.cache_size = -{_STAGING_CACHE_KIB}")
                self.conn.execute(
                    "CREATE TABLE IF NOT EXISTS staging.envs (id TEXT PRIMARY KEY, data TEXT)"
                )
                self._attached = True
            self._stagings += 1
            name = f"batch{self._stagings}"
            self.conn.execute(
                f"CREATE TABLE staging.{name} (seq INTEGER PRIMARY KEY, {', '.join(_STAGED_COLUMNS)})"
            )
        except sqlite3.OperationalError as e:
            raise storage_error(e) from e
        self._staged[name] = _Staged()
        return name

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
                    seq, t.name, t.queue, t.priority, _dump(t.command), int(t.shell), _path_in(t.cwd), env_id,
                    _dump(t.labels), t.retries, t.backoff, t.retry_delay, t.max_delay,
                    _dump(t.retry_on), _dump(t.no_retry_on), t.timeout, t.kill_grace,
                    t.memory_limit, t.run_at, t.key, t.key_fingerprint,
                    _dump(t.after) if t.after else None, _dump(t.after_any) if t.after_any else None,
                )
            )  # fmt: skip
        marks = _marks(len(_STAGED_COLUMNS) + 1)
        try:
            self.conn.executemany(f"INSERT INTO staging.{staging} VALUES ({marks})", rows)
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

    def publish_staged(self, staging: str, now: int, since: int) -> StagedBatch:
        """Insert every staged task (one transaction with the caller's): row `seq` becomes task
        `base + seq`, its creation event and dependencies with it, in one statement each. A
        staged key that a task not final, or finished after `since`, holds now (another client
        took it meanwhile) gives that task back instead if its fingerprint matches, and raises
        Conflict if not. Dependencies must still exist (InvalidRequest names one that does not).
        The creation events reach subscribers as one `EventSpan`."""
        self._require_transaction()
        published, span = self._copy_staged(self.conn, staging, now, since)
        self._pending_spans.append(span)
        if self._staged[staging].deps:
            self._publish_staged_deps(staging, published.base, now)
        return published

    def can_publish_apart(self, staging: str) -> bool:
        """Whether `publish_apart` may publish this batch: it has no dependencies (settling
        them takes the daemon's connection)."""
        return not self._staged[staging].deps

    def publish_apart(self, staging: str, now: int, since: int) -> tuple[StagedBatch, EventSpan]:
        """`publish_staged` in a transaction of its own on a connection of its own, for a
        thread: the daemon's connection goes on reading meanwhile (WAL readers never wait on a
        writer), and a write of its own waits for this commit as it would wait on the loop.
        The span is the caller's to `announce` once this returns."""
        conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            conn.execute("PRAGMA busy_timeout = 5000")
            conn.execute(f"PRAGMA cache_size = -{_APART_CACHE_KIB}")  # the daemon's RSS: pages
            conn.execute("ATTACH DATABASE ? AS staging", (str(self._staging_path()),))  # spill
            conn.execute(f"PRAGMA staging.cache_size = -{_STAGING_CACHE_KIB}")
            conn.execute("BEGIN IMMEDIATE")
            try:
                published, span = self._copy_staged(conn, staging, now, since)
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
        self, conn: sqlite3.Connection, staging: str, now: int, since: int
    ) -> tuple[StagedBatch, EventSpan]:
        """The statements of `publish_staged`, on `conn` (the daemon's, or `publish_apart`'s),
        but settling dependencies."""
        # Its commit must not also copy the whole batch from the WAL into the database file:
        # `checkpoint_apart` does that, off the daemon's thread.
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        staged = self._staged[staging]
        taken = _staged_keys_taken(conn, staging, since) if staged.keys else {}
        for seq in taken:
            conn.execute(f"DELETE FROM staging.{staging} WHERE seq = ?", (seq,))
        if staged.deps:
            _check_staged_deps(conn, staging)
        base = _sequence_of(conn, "tasks")
        conn.executemany(
            "INSERT OR IGNORE INTO queues (name, created_at) VALUES (?, ?)",
            [(n, now) for n in sorted(staged.queues)],
        )
        conn.execute("INSERT OR IGNORE INTO envs (id, data) SELECT id, data FROM staging.envs")
        state = (
            "CASE WHEN after IS NOT NULL OR after_any IS NOT NULL THEN 'waiting' "
            "WHEN run_at > :now THEN 'scheduled' ELSE 'queued' END"
        )
        copied = [c for c in _STAGED_COLUMNS if c not in ("after", "after_any", "run_at")]
        conn.execute(
            f"INSERT INTO tasks (id, state, run_at, created_at, updated_at, {', '.join(copied)}) "
            f"SELECT :base + seq, {state}, coalesce(run_at, :now), :now, :now, {', '.join(copied)} "
            f"FROM staging.{staging} ORDER BY seq",
            {"base": base, "now": now},
        )
        first_event = _sequence_of(conn, "events") + 1
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
        span = EventSpan(first_event, _sequence_of(conn, "events"), now, created)
        return StagedBatch(base, taken), span

    def _publish_staged_deps(self, staging: str, base: int, now: int) -> None:
        """The dependency rows of the published tasks, and each waiting one settled."""
        for column, any_end in (("after", 0), ("after_any", 1)):
            self.conn.execute(
                "INSERT OR IGNORE INTO deps (task_id, dep_id, any_end) "
                f"SELECT ? + b.seq, j.value, ? FROM staging.{staging} b, json_each(b.{column}) j "
                f"WHERE b.{column} IS NOT NULL",
                (base, any_end),
            )
        waiting = [
            i
            for (i,) in self.conn.execute(
                "SELECT id FROM tasks WHERE id > ? AND state = 'waiting' ORDER BY id", (base,)
            )
        ]
        if waiting:
            self._deps_seen = True
        for task_id in waiting:
            self._settle_waiting(task_id, now)

    def checkpoint_apart(self) -> None:
        """Copy the WAL into the database file on a connection of its own: a thread may run
        this while the daemon's connection reads and writes (a checkpoint blocks neither)."""
        conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA cache_size = -{_APART_CACHE_KIB}")
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
            self.conn.execute(f"PRAGMA wal_autocheckpoint = {_AUTOCHECKPOINT_PAGES}")
        with suppress(sqlite3.OperationalError):
            self.conn.execute(f"DROP TABLE staging.{staging}")
        if not self._staged and self._attached and not self._in_transaction:
            with suppress(sqlite3.OperationalError):
                self.conn.execute("DETACH DATABASE staging")
                self._attached = False
                with suppress(FileNotFoundError):
                    os.unlink(self._staging_path())

    def _any_deps(self) -> bool:
        """Whether any dependency was ever recorded (most stores have none: skip the lookup)."""
        if self._deps_seen is None:
            self._deps_seen = (
                self.conn.execute("SELECT EXISTS (SELECT 1 FROM deps)").fetchone()[0] == 1
            )
        return self._deps_seen

    def _check_deps_exist(self, tasks: Sequence[NewTask]) -> None:
        wanted = sorted({d for t in tasks for d in (*t.after, *t.after_any)})
        found: set[int] = set()
        for chunk in _chunks(wanted):
            found.update(
                i
                for (i,) in self.conn.execute(
                    f"SELECT id FROM tasks WHERE id IN ({_marks(len(chunk))})", chunk
                )
            )
        missing = [d for d in wanted if d not in found]
        if missing:
            raise InvalidRequest(f"unknown task id in --after: {', '.join(map(str, missing))}")

    def _settle_waiting(self, task_id: int, now: int) -> None:
        """A waiting task whose dependencies changed: queue it, fail it, or leave it waiting."""
        rows = self.conn.execute(
            "SELECT t.state, d.any_end FROM deps d JOIN tasks t ON t.id = d.dep_id WHERE d.task_id = ?",
            (task_id,),
        ).fetchall()
        if any(not any_end and state in ("failed", "cancelled") for state, any_end in rows):
            self.move(
                task_id, TaskState.WAITING, TaskState.FAILED, now, reason="dependency_failed",
                finished_at=now,
            )  # fmt: skip
        elif all(state in FINAL_VALUES for state, _ in rows):
            run_at = self.conn.execute(
                "SELECT run_at FROM tasks WHERE id = ?", (task_id,)
            ).fetchone()[0]
            if run_at > now:  # it also had a delay that has not passed yet
                self.move(task_id, TaskState.WAITING, TaskState.SCHEDULED, now)
            else:  # ready now: it queues behind what was already waiting for a slot
                self.move(task_id, TaskState.WAITING, TaskState.QUEUED, now, run_at=now)

    def _release_dependents(self, task_id: int, now: int) -> None:
        """`task_id` just became final: settle every task waiting on it. Failures cascade
        (a dependent that fails releases its own dependents), worked through as a queue, not
        by recursion, so a chain of any length is fine."""
        if not self._any_deps():
            return
        self._to_release.append(task_id)
        if len(self._to_release) > 1:
            return  # an outer call is working through the queue
        try:
            while self._to_release:
                final = self._to_release[0]
                for (dependent,) in self.conn.execute(
                    "SELECT d.task_id FROM deps d JOIN tasks t ON t.id = d.task_id "
                    "WHERE d.dep_id = ? AND t.state = 'waiting'",
                    (final,),
                ).fetchall():
                    self._settle_waiting(dependent, now)
                self._to_release.pop(0)
        except BaseException:
            self._to_release.clear()  # a queue left behind would stop every later release
            raise

    def schedule_names(self, ids: set[int]) -> dict[int, str]:
        if not ids:
            return {}
        marks = _marks(len(ids))
        return dict(
            self.conn.execute(
                f"SELECT id, name FROM schedules WHERE id IN ({marks})", sorted(ids)
            ).fetchall()
        )

    def deps_of(self, ids: Sequence[int]) -> dict[int, tuple[list[int], list[int]]]:
        """(after, after_any) of each task."""
        found: dict[int, tuple[list[int], list[int]]] = {i: ([], []) for i in ids}
        for chunk in _chunks(ids):
            for task_id, dep_id, any_end in self.conn.execute(
                f"SELECT task_id, dep_id, any_end FROM deps WHERE task_id IN ({_marks(len(chunk))}) "
                "ORDER BY task_id, dep_id",
                chunk,
            ):
                found[task_id][1 if any_end else 0].append(dep_id)
        return found

    def _sequence(self, table: str) -> int:
        return _sequence_of(self.conn, table)

    def _store_env(self, env: dict[str, str] | None) -> str | None:
        if env is None:
            return None
        env_id, data = env_digest(env)
        # Always written (cheap: the row is usually there): a cache of what was inserted could
        # outlive a rolled-back transaction and leave tasks pointing at no environment.
        self.conn.execute("INSERT OR IGNORE INTO envs (id, data) VALUES (?, ?)", (env_id, data))
        return env_id

    def env_of(self, env_id: str | None) -> dict[str, str] | None:
        """A task's environment (cached: rows never change). None for no row, which the
        runner turns into the minimal environment."""
        if env_id is None:
            return None
        env = self._env_cache.get(env_id)
        if env is None:
            row = self.conn.execute("SELECT data FROM envs WHERE id = ?", (env_id,)).fetchone()
            if row is None:
                return None
            env = json.loads(row[0])
            if len(self._env_cache) > 256:
                self._env_cache.clear()
            self._env_cache[env_id] = env
        return env

    # -- the dispatcher's hot path ----------------------------------------------------------------

    def claim(
        self, slots: dict[str, int], limit: int, now: int, held: Collection[int] = ()
    ) -> Claim:
        """Move up to `limit` queued tasks to running, at most `slots[q]` from queue q, highest
        priority first (FIFO within a priority); starts an attempt row for each. Tasks in
        `held` (handed to a supervisor ahead, still queued) are passed over. Also says which
        queues have nothing more queued."""
        self._require_transaction()
        candidates: list[tuple[int, int, int]] = []
        last_of: dict[str, int] = {}  # queue -> id of its last queued task, if we saw it
        for queue, free in slots.items():
            want = min(free, limit)
            if want > 0:
                found, complete = self._ready(queue, want, held)
                if complete:
                    last_of[queue] = found[-1][0] if found else 0
                candidates += found[:want]
        if len(slots) > 1:
            candidates.sort(key=lambda c: (-c[1], c[2], c[0]))
        chosen = [c[0] for c in candidates[:limit]]
        # A queue is exhausted only if what it had is all taken now (a queue can lose the
        # global slots to others and keep its tasks).
        taken = set(chosen)
        exhausted = {q for q, last in last_of.items() if last == 0 or last in taken}
        claimed = []
        for task in self.get_tasks(chosen):
            if self._claim_one(task, task.attempts + 1, now):
                claimed.append(task)
        return Claim(claimed, exhausted)

    def _ready(
        self, queue: str, want: int, held: Collection[int]
    ) -> tuple[list[tuple[int, int, int]], bool]:
        """Up to `want` + 1 queued tasks of `queue` in claim order, not counting held ones
        (id, priority, run_at); and whether that is all the queue has."""
        rows = self.conn.execute(
            "SELECT id, priority, run_at FROM tasks WHERE state = 'queued' AND queue = ? "
            "ORDER BY priority DESC, run_at, id LIMIT ?",
            (queue, want + 1 + len(held)),
        ).fetchall()
        complete = len(rows) <= want + len(held)
        return [r for r in rows if r[0] not in held][: want + 1], complete

    def _claim_one(self, task: TaskRow, number: int, now: int) -> bool:
        """queued -> running as attempt `number` (fenced on the attempt before it)."""
        if not self.move(
            task.id, TaskState.QUEUED, TaskState.RUNNING, now, attempt=number, queue=task.queue,
            fence=number - 1, attempts=number, tries=task.tries + 1,
            started_at=task.started_at or now,
        ):  # fmt: skip
            return False
        self.conn.execute(
            "INSERT INTO attempts (task_id, number, started_at) VALUES (?, ?, ?)",
            (task.id, number, now),
        )
        task.attempts, task.tries, task.state = number, task.tries + 1, TaskState.RUNNING
        return True

    def claim_attempt(
        self, task_id: int, attempt: int, now: int, started_at: int, known: TaskRow | None = None
    ) -> TaskRow | None:
        """Claim one queued task as attempt `attempt`: a held attempt its supervisor started
        at `started_at`. None when the task is not queued at the attempt before (cancelled
        meanwhile, say), or was queued after that start (an old run that a journal kept is not
        this queueing's). `known`: the task as the caller knows it unchanged (else it is read)."""
        self._require_transaction()
        row = self.conn.execute(
            "SELECT updated_at FROM tasks WHERE id = ? AND state = 'queued'", (task_id,)
        ).fetchone()
        if row is None or row[0] > started_at:
            return None
        task = known if known is not None else self.get_task(task_id)
        if task is None or not self._claim_one(task, attempt, now):
            return None
        return task

    def peek_ready(self, queue: str, limit: int, held: Collection[int]) -> list[TaskRow]:
        """The next `limit` queued tasks of `queue` in claim order, held ones passed over."""
        found, _ = self._ready(queue, limit, held)
        return self.get_tasks([row[0] for row in found[:limit]])

    def mark_started(self, task_id: int, attempt: int, **fields: object) -> None:
        """Record what the supervisor reported at start (pid, exact start time)."""
        self._require_transaction()
        names = sorted(fields)
        self.conn.execute(
            f"UPDATE attempts SET {', '.join(f'{n} = ?' for n in names)} "
            "WHERE task_id = ? AND number = ?",
            [*(fields[n] for n in names), task_id, attempt],
        )

    def record_stray_start(self, task_id: int, attempt: int, pid: int, started_at: int) -> bool:
        """A held attempt that started as its task was cancelled (the cancel and the start
        crossed): the task stays cancelled, and its history shows that this attempt ran.
        False when the task is not cancelled at the attempt before."""
        self._require_transaction()
        if not self.conn.execute(
            "UPDATE tasks SET attempts = ? WHERE id = ? AND state = 'cancelled' AND attempts = ?",
            (attempt, task_id, attempt - 1),
        ).rowcount:
            return False
        self.conn.execute(
            "INSERT INTO attempts (task_id, number, started_at, pid) VALUES (?, ?, ?, ?)",
            (task_id, attempt, started_at, pid),
        )
        return True

    def end_attempt(self, end: AttemptEnd) -> bool:
        """Write how the attempt ended (only the first report of an attempt counts); False when
        there is no such open attempt (already ended, or never claimed)."""
        self._require_transaction()
        return self.conn.execute(
            "UPDATE attempts SET outcome = ?, exit_code = ?, signal = ?, error = ?, ended_at = ?, "
            "max_rss = ?, cpu_user = ?, cpu_system = ? "
            "WHERE task_id = ? AND number = ? AND outcome IS NULL",
            (
                end.outcome.value, end.exit_code, end.signal, end.error, end.ended_at,
                end.max_rss, end.cpu_user, end.cpu_system, end.task_id, end.attempt,
            ),
        ).rowcount == 1  # fmt: skip

    def promote_due(self, now: int) -> int:
        """Scheduled tasks whose time has come become queued; returns how many."""
        self._require_transaction()
        due = self.conn.execute(
            "SELECT id FROM tasks WHERE state = 'scheduled' AND run_at <= ? ORDER BY run_at LIMIT 1000",
            (now,),
        ).fetchall()
        return sum(self.move(i, TaskState.SCHEDULED, TaskState.QUEUED, now) for (i,) in due)

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

    # -- reads ----------------------------------------------------------------------------------

    def get_task(self, task_id: int) -> TaskRow | None:
        found = self.get_tasks([task_id])
        return found[0] if found else None

    def get_tasks(self, ids: Sequence[int]) -> list[TaskRow]:
        """Tasks by id, in the order given; unknown ids are left out."""
        by_id: dict[int, TaskRow] = {}
        for chunk in _chunks(ids):
            cur = self.conn.execute(
                f"SELECT * FROM tasks WHERE id IN ({_marks(len(chunk))})", chunk
            )
            by_id.update((row.id, row) for row in _task_rows(cur))
        return [by_id[i] for i in ids if i in by_id]

    def list_tasks(self, where: TaskFilter) -> list[TaskRow]:
        sql, params = _task_filter_sql(where)
        sql = "SELECT * FROM tasks" + sql + " ORDER BY id DESC LIMIT ?"
        return list(_task_rows(self.conn.execute(sql, [*params, where.limit])))

    def count_tasks(self, where: TaskFilter) -> int:
        """How many tasks `where` matches, whatever its limit."""
        sql, params = _task_filter_sql(where)
        return int(self.conn.execute("SELECT count(*) FROM tasks" + sql, params).fetchone()[0])

    def attempts_of(self, ids: Sequence[int]) -> dict[int, list[AttemptRow]]:
        found: dict[int, list[AttemptRow]] = {i: [] for i in ids}
        for chunk in _chunks(ids):
            cur = self.conn.execute(
                f"SELECT * FROM attempts WHERE task_id IN ({_marks(len(chunk))}) "
                "ORDER BY task_id, number",
                chunk,
            )
            for row in _attempt_rows(cur):
                found[row.task_id].append(row)
        return found

    def open_attempts(self) -> list[AttemptRow]:
        """Attempts with no outcome yet: what was running when the last daemon stopped."""
        return list(
            _attempt_rows(self.conn.execute("SELECT * FROM attempts WHERE outcome IS NULL"))
        )

    def ready_queues(self) -> set[str]:
        """Queues that have queued tasks (read once at start; the dispatcher tracks it after)."""
        return {
            q
            for (q,) in self.conn.execute("SELECT DISTINCT queue FROM tasks WHERE state = 'queued'")
        }

    def stray_attempts(self) -> list[tuple[int, int, str]]:
        """Open attempts of tasks no longer running them (a cancel crossed a held start): task
        id, attempt and queue. Each still holds a slot of its queue until it ends."""
        return self.conn.execute(
            "SELECT a.task_id, a.number, t.queue FROM attempts a JOIN tasks t ON t.id = a.task_id "
            "WHERE a.outcome IS NULL AND NOT (t.state = 'running' AND t.attempts = a.number)"
        ).fetchall()

    def running_by_queue(self) -> dict[str, int]:
        rows = self.conn.execute(
            "SELECT queue, count(*) FROM tasks WHERE state = 'running' GROUP BY queue"
        ).fetchall()
        return {queue: n for queue, n in rows}

    def count_by_state(self) -> dict[str, dict[str, int]]:
        """{queue: {state: count}} over every task in the store."""
        counts: dict[str, dict[str, int]] = {}
        for state, queue, n in self.conn.execute(
            "SELECT state, queue, count(*) FROM tasks GROUP BY state, queue"
        ):
            counts.setdefault(queue, {})[state] = n
        return counts

    def count_attempt_outcomes(self) -> dict[str, int]:
        return dict(
            self.conn.execute(
                "SELECT outcome, count(*) FROM attempts WHERE outcome IS NOT NULL GROUP BY outcome"
            ).fetchall()
        )

    def last_task_id(self) -> int:
        return self._sequence("tasks")

    def oldest_queued(self) -> dict[str, int]:
        """Per queue, the run_at (ms) of its oldest queued task."""
        return dict(
            self.conn.execute(
                "SELECT queue, min(run_at) FROM tasks WHERE state = 'queued' GROUP BY queue"
            ).fetchall()
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

    def iter_all_ids(self) -> Iterator[int]:
        for (i,) in self.conn.execute("SELECT id FROM tasks ORDER BY id"):
            yield i

    def find_by_key(self, key: str, since: int) -> TaskRow | None:
        """The newest task with this idempotency key that is not final or ended after `since`."""
        cur = self.conn.execute(
            "SELECT * FROM tasks WHERE key = ? AND (finished_at IS NULL OR finished_at >= ?) "
            "ORDER BY id DESC LIMIT 1",
            (key, since),
        )
        return next(_task_rows(cur), None)

    # -- retention ------------------------------------------------------------------------------

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
        for chunk in _chunks(ids):
            marks = _marks(len(chunk))
            self.conn.execute(f"DELETE FROM attempts WHERE task_id IN ({marks})", chunk)
            self.conn.execute(
                f"DELETE FROM deps WHERE task_id IN ({marks}) OR dep_id IN ({marks})",
                [*chunk, *chunk],
            )
            self.conn.execute(f"DELETE FROM tasks WHERE id IN ({marks})", chunk)

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

    # -- queues ---------------------------------------------------------------------------------

    def ensure_queues(self, names: set[str], now: int) -> None:
        """Queues are created on first use."""
        self.conn.executemany(
            "INSERT OR IGNORE INTO queues (name, created_at) VALUES (?, ?)",
            [(n, now) for n in sorted(names)],
        )

    def list_queues(self) -> list[QueueRow]:
        return [
            _queue_row(r)
            for r in self.conn.execute(
                "SELECT name, concurrency, paused, defaults FROM queues ORDER BY name"
            )
        ]

    def get_queue(self, name: str) -> QueueRow | None:
        row = self.conn.execute(
            "SELECT name, concurrency, paused, defaults FROM queues WHERE name = ?", (name,)
        ).fetchone()
        return _queue_row(row) if row else None

    def set_queue(self, name: str, now: int, **fields: object) -> QueueRow:
        """Create or change a queue: `concurrency`, `paused`, `defaults` (a dict)."""
        self._require_transaction()
        self.ensure_queues({name}, now)
        if "defaults" in fields:
            fields["defaults"] = _dump(fields["defaults"])
        if "paused" in fields:
            fields["paused"] = int(bool(fields["paused"]))
        names = sorted(fields)
        if names:
            self.conn.execute(
                f"UPDATE queues SET {', '.join(f'{n} = ?' for n in names)} WHERE name = ?",
                [*(fields[n] for n in names), name],
            )
        found = self.get_queue(name)
        assert found is not None
        return found

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

    # -- schedules ------------------------------------------------------------------------------

    def add_schedule(self, schedule: NewSchedule, now: int) -> ScheduleRow:
        """Insert a schedule; a missing name becomes `cron-ID` or `trigger-ID`. Raises
        Conflict when the name is taken."""
        self._require_transaction()
        name = schedule.name or f"{schedule.kind}-{self._sequence('schedules') + 1}"
        try:
            cur = self.conn.execute(
                "INSERT INTO schedules (name, kind, spec, tz, overlap, catch_up, template, next_due, "
                "last_due, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    name, schedule.kind, schedule.spec, schedule.tz, schedule.overlap,
                    schedule.catch_up, schedule.template, schedule.next_due, now, now, now,
                ),
            )  # fmt: skip
        except sqlite3.IntegrityError:
            raise Conflict(f"a schedule named {name!r} exists already") from None
        found = self.get_schedule_by_id(cur.lastrowid or 0)
        assert found is not None
        return found

    def get_schedule(self, name: str) -> ScheduleRow | None:
        rows = _schedule_rows(self.conn.execute("SELECT * FROM schedules WHERE name = ?", (name,)))
        return next(rows, None)

    def get_schedule_by_id(self, schedule_id: int) -> ScheduleRow | None:
        rows = _schedule_rows(
            self.conn.execute("SELECT * FROM schedules WHERE id = ?", (schedule_id,))
        )
        return next(rows, None)

    def list_schedules(self, kind: str | None = None) -> list[ScheduleRow]:
        if kind is None:
            return list(_schedule_rows(self.conn.execute("SELECT * FROM schedules ORDER BY id")))
        return list(
            _schedule_rows(
                self.conn.execute("SELECT * FROM schedules WHERE kind = ? ORDER BY id", (kind,))
            )
        )

    def update_schedule(self, schedule_id: int, **fields: object) -> None:
        self._require_transaction()
        names = sorted(fields)
        self.conn.execute(
            f"UPDATE schedules SET {', '.join(f'{n} = ?' for n in names)} WHERE id = ?",
            [*(fields[n] for n in names), schedule_id],
        )

    def delete_schedule(self, schedule_id: int) -> None:
        """The schedule and its fire records go; the tasks it created stay."""
        self._require_transaction()
        self.conn.execute("DELETE FROM fires WHERE schedule_id = ?", (schedule_id,))
        self.conn.execute("DELETE FROM schedules WHERE id = ?", (schedule_id,))

    def due_schedules(self, now: int) -> list[ScheduleRow]:
        return list(
            _schedule_rows(
                self.conn.execute(
                    "SELECT * FROM schedules WHERE kind = 'cron' AND paused = 0 AND next_due <= ? ORDER BY next_due",
                    (now,),
                )
            )
        )

    def next_schedule_due(self) -> int | None:
        row = self.conn.execute(
            "SELECT min(next_due) FROM schedules WHERE kind = 'cron' AND paused = 0"
        ).fetchone()
        return row[0] if row else None

    def fire_exists(self, schedule_id: int, due_at: int) -> bool:
        found = self.conn.execute(
            "SELECT 1 FROM fires WHERE schedule_id = ? AND due_at = ?", (schedule_id, due_at)
        )
        return found.fetchone() is not None

    def record_fire(
        self, schedule_id: int, due_at: int, now: int, task_id: int | None, outcome: str
    ) -> None:
        """The (schedule, due time) key is the primary key: a second fire of the same due
        time fails here, and takes its task down with it (same transaction)."""
        self._require_transaction()
        self.conn.execute(
            "INSERT INTO fires (schedule_id, due_at, fired_at, task_id, outcome) VALUES (?, ?, ?, ?, ?)",
            (schedule_id, due_at, now, task_id, outcome),
        )

    def fires_of(self, schedule_id: int, limit: int) -> list[FireRow]:
        cur = self.conn.execute(
            "SELECT f.due_at, f.fired_at, f.task_id, f.outcome, t.state, t.exit_code FROM fires f "
            "LEFT JOIN tasks t ON t.id = f.task_id WHERE f.schedule_id = ? ORDER BY f.due_at DESC LIMIT ?",
            (schedule_id, limit),
        )
        return [FireRow(*row) for row in cur]

    def latest_task_of(self, schedule_id: int) -> tuple[int, str] | None:
        row = self.conn.execute(
            "SELECT id, state FROM tasks WHERE schedule_id = ? ORDER BY id DESC LIMIT 1",
            (schedule_id,),
        ).fetchone()
        return (int(row[0]), str(row[1])) if row else None

    # -- health ---------------------------------------------------------------------------------

    def check_writable(self) -> None:
        """Raise StorageFull or TaskctlError unless a write transaction can commit."""
        with self.transaction():
            self.conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('last_write_check', ?)",
                (str(os.getpid()),),
            )

    def close(self) -> None:
        self.conn.close()


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


def _sequence_of(conn: sqlite3.Connection, table: str) -> int:
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)).fetchone()
    return int(row[0]) if row else 0


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


def _initial_state(task: NewTask, now: int) -> TaskState:
    if task.after or task.after_any:
        return TaskState.WAITING
    return TaskState.SCHEDULED if task.run_at and task.run_at > now else TaskState.QUEUED


def storage_error(error: sqlite3.OperationalError) -> TaskctlError:
    """SQLite's error as ours: StorageFull when it says the disk is full, or cannot size the
    WAL index (`disk I/O error`, SQLITE_IOERR_SHMSIZE, which is how a full disk shows on open)."""
    text = str(error)
    if "full" in text or "disk I/O" in text:
        return StorageFull(f"the state folder is out of space: {text}")
    return TaskctlError(f"database error: {text}")


def _task_rows(cur: sqlite3.Cursor) -> Iterator[TaskRow]:
    names = [d[0] for d in cur.description]
    for values in cur:
        row = dict(zip(names, values, strict=True))
        for name in _TASK_JSON:
            if row[name] is not None:
                row[name] = json.loads(row[name])
        row["state"] = TaskState(row["state"])
        row["shell"] = bool(row["shell"])
        if isinstance(row["cwd"], bytes):
            row["cwd"] = row["cwd"].decode("utf-8", "surrogateescape")
        row.pop("updated_at")
        yield TaskRow(**row)


def _queue_row(row: tuple[Any, ...]) -> QueueRow:
    name, concurrency, paused, defaults = row
    return QueueRow(name, concurrency, bool(paused), json.loads(defaults or "{}"))


def _schedule_rows(cur: sqlite3.Cursor) -> Iterator[ScheduleRow]:
    names = [d[0] for d in cur.description]
    for values in cur:
        row = dict(zip(names, values, strict=True))
        row["paused"] = bool(row["paused"])
        yield ScheduleRow(**row)


def _attempt_rows(cur: sqlite3.Cursor) -> Iterator[AttemptRow]:
    names = [d[0] for d in cur.description]
    for values in cur:
        row = dict(zip(names, values, strict=True))
        if row["outcome"] is not None:
            row["outcome"] = Outcome(row["outcome"])
        yield AttemptRow(**row)


def _task_filter_sql(where: TaskFilter) -> tuple[str, list[object]]:
    """The WHERE clause (or "") and its parameters for `where`, its limit aside."""
    clauses: list[str] = []
    params: list[object] = []
    if where.states:
        clauses.append(f"state IN ({_marks(len(where.states))})")
        params += [s.value for s in where.states]
    if where.queue is not None:
        clauses.append("queue = ?")
        params.append(where.queue)
    for key, value in where.labels.items():
        clauses.append("json_extract(labels, ?) = ?")
        params += [f'$."{key}"', value]
    if where.before_id is not None:
        clauses.append("id < ?")
        params.append(where.before_id)
    sql = " WHERE " + " AND ".join(clauses) if clauses else ""
    return sql, params
