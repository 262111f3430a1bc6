"""The SQLite schema: numbered migrations (`meta.schema_version` says how many ran) and the
column lists the inserts share."""

from __future__ import annotations

from taskctl.api import TaskState

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

TASK_JSON = ("command", "labels", "retry_on", "no_retry_on")
INSERT_COLUMNS = [
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
INSERT_TASK = (
    f"INSERT INTO tasks ({', '.join(INSERT_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in INSERT_COLUMNS)})"
)
INSERT_EVENT = (
    "INSERT INTO events (at, task_id, queue, from_state, to_state, attempt, exit_code, reason) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
STAGED_COLUMNS = [
    "name", "queue", "priority", "command", "shell", "cwd", "env_id", "labels", "retries",
    "backoff", "retry_delay", "max_delay", "retry_on", "no_retry_on", "timeout", "kill_grace",
    "memory_limit", "run_at", "key", "key_fingerprint", "after", "after_any",
]  # fmt: skip
