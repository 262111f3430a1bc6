"""The PostgreSQL schema: numbered migrations (`meta.schema_version` says how many ran), the
advisory lock keys every node agrees on, and the column lists the inserts share.

Times and ids are BIGINT (epoch ms; ids from sequences). JSON is kept as TEXT, as SQLite keeps
it: `json.dumps` escapes a lone surrogate (an argument or environment value that is not UTF-8)
as `\\udcXX`, which JSONB would refuse; the labels filter casts to JSONB (labels are UTF-8).
`cwd` is BYTEA: the directory's bytes, whatever they are.
"""

from __future__ import annotations

from taskctl.api import TaskState

# Advisory lock keys (one bigint space per database; "tc" in the high bytes to stay clear of
# other users of the database).
MIGRATE_LOCK = 0x7463_0000_0001  # session lock while migrating: one node at a time
EVENTS_LOCK = 0x7463_0000_0002  # xact lock from the first event id given to the commit
TASK_IDS_LOCK = 0x7463_0000_0003  # shared by task inserts; exclusive to reserve a batch's range

# The database's clock in epoch ms: leases and heartbeats never trust a node's own clock.
NOW_MS = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint"

_STATE_LIST = ", ".join(f"'{s.value}'" for s in TaskState)

MIGRATIONS: list[str] = [
    # 1: everything SQLite's five migrations make, plus nodes and the node of tasks and attempts
    f"""
    CREATE TABLE queues (
        name TEXT PRIMARY KEY,
        concurrency INTEGER,
        paused BOOLEAN NOT NULL DEFAULT false,
        defaults TEXT NOT NULL DEFAULT '{{}}',
        created_at BIGINT NOT NULL
    );
    CREATE TABLE envs (id TEXT PRIMARY KEY, data TEXT NOT NULL);
    CREATE TABLE tasks (
        id BIGSERIAL PRIMARY KEY,
        name TEXT,
        queue TEXT NOT NULL,
        priority INTEGER NOT NULL DEFAULT 0,
        state TEXT NOT NULL CHECK (state IN ({_STATE_LIST})),
        reason TEXT,
        command TEXT NOT NULL,
        shell BOOLEAN NOT NULL DEFAULT false,
        cwd BYTEA NOT NULL,
        env_id TEXT,
        labels TEXT NOT NULL DEFAULT '{{}}',
        retries INTEGER NOT NULL DEFAULT 0,
        backoff TEXT NOT NULL DEFAULT 'fixed',
        retry_delay DOUBLE PRECISION NOT NULL DEFAULT 1,
        max_delay DOUBLE PRECISION NOT NULL DEFAULT 3600,
        retry_on TEXT,
        no_retry_on TEXT,
        timeout DOUBLE PRECISION,
        kill_grace DOUBLE PRECISION NOT NULL DEFAULT 10,
        memory_limit BIGINT,
        run_at BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        started_at BIGINT,
        finished_at BIGINT,
        attempts INTEGER NOT NULL DEFAULT 0,
        tries INTEGER NOT NULL DEFAULT 0,
        exit_code INTEGER,
        key TEXT,
        schedule_id BIGINT,
        due_at BIGINT,
        key_fingerprint TEXT,
        node TEXT
    );
    CREATE INDEX tasks_ready ON tasks (queue, priority DESC, run_at, id) WHERE state = 'queued';
    CREATE INDEX tasks_due ON tasks (run_at) WHERE state = 'scheduled';
    CREATE INDEX tasks_state ON tasks (state, queue);
    CREATE INDEX tasks_by_schedule ON tasks (schedule_id, id) WHERE schedule_id IS NOT NULL;
    CREATE INDEX tasks_by_key ON tasks (key, id) WHERE key IS NOT NULL;
    CREATE INDEX tasks_finished ON tasks (finished_at) WHERE finished_at IS NOT NULL;
    CREATE TABLE attempts (
        task_id BIGINT NOT NULL,
        number INTEGER NOT NULL,
        outcome TEXT,
        exit_code INTEGER,
        signal INTEGER,
        error TEXT,
        started_at BIGINT,
        ended_at BIGINT,
        pid INTEGER,
        max_rss BIGINT,
        cpu_user DOUBLE PRECISION,
        cpu_system DOUBLE PRECISION,
        node TEXT,
        PRIMARY KEY (task_id, number)
    );
    CREATE INDEX attempts_open ON attempts (node, task_id) WHERE outcome IS NULL;
    CREATE TABLE events (
        id BIGSERIAL PRIMARY KEY,
        at BIGINT NOT NULL,
        task_id BIGINT NOT NULL,
        queue TEXT NOT NULL,
        from_state TEXT,
        to_state TEXT NOT NULL,
        attempt INTEGER,
        exit_code INTEGER,
        reason TEXT
    );
    CREATE INDEX events_task ON events (task_id);
    CREATE INDEX events_at ON events (at);
    CREATE TABLE deps (
        task_id BIGINT NOT NULL,
        dep_id BIGINT NOT NULL,
        any_end BOOLEAN NOT NULL DEFAULT false,
        PRIMARY KEY (task_id, dep_id)
    );
    CREATE INDEX deps_by_dep ON deps (dep_id);
    CREATE TABLE schedules (
        id BIGSERIAL PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL CHECK (kind IN ('cron', 'trigger')),
        spec TEXT NOT NULL,
        tz TEXT,
        overlap TEXT NOT NULL CHECK (overlap IN ('skip', 'queue', 'allow')),
        catch_up TEXT NOT NULL CHECK (catch_up IN ('none', 'latest', 'all')),
        paused BOOLEAN NOT NULL DEFAULT false,
        template TEXT NOT NULL,
        next_due BIGINT,
        last_due BIGINT,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL
    );
    CREATE TABLE fires (
        schedule_id BIGINT NOT NULL,
        due_at BIGINT NOT NULL,
        fired_at BIGINT NOT NULL,
        task_id BIGINT,
        outcome TEXT NOT NULL,
        PRIMARY KEY (schedule_id, due_at)
    );
    CREATE TABLE nodes (
        name TEXT PRIMARY KEY,
        version TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('up', 'draining', 'lost')),
        started_at BIGINT NOT NULL,
        heartbeat_at BIGINT NOT NULL,
        slots INTEGER NOT NULL,
        queues TEXT
    );
    INSERT INTO queues (name, created_at) VALUES ('default', {NOW_MS})
    """,
    # 2: attempts' output, shipped by the node that ran them so that any node can show it
    """
    CREATE TABLE output (
        task_id BIGINT NOT NULL,
        attempt INTEGER NOT NULL,
        stream TEXT NOT NULL CHECK (stream IN ('stdout', 'stderr')),
        at BIGINT NOT NULL,
        data BYTEA NOT NULL,
        PRIMARY KEY (task_id, attempt, stream, at)
    );
    CREATE TABLE output_done (
        task_id BIGINT NOT NULL,
        attempt INTEGER NOT NULL,
        stream TEXT NOT NULL,
        size BIGINT NOT NULL,
        PRIMARY KEY (task_id, attempt, stream)
    );
    """,
    # 3: a stop asked of an attempt's node (a cancel made elsewhere), kept until it ends: its
    # node may not be listening when it is asked, or be lost before it can stop it
    """
    ALTER TABLE attempts ADD COLUMN stop_asked BOOLEAN NOT NULL DEFAULT false;
    """,
    # 4: whether a node was drained, which its state forgets while it is lost
    """
    ALTER TABLE nodes ADD COLUMN drained BOOLEAN NOT NULL DEFAULT false;
    UPDATE nodes SET drained = true WHERE state = 'draining';
    """,
]

TASK_JSON = ("command", "labels", "retry_on", "no_retry_on")
INSERT_COLUMNS = [
    "name", "queue", "priority", "state", "command", "shell", "cwd", "env_id", "labels",
    "retries", "backoff", "retry_delay", "max_delay", "retry_on", "no_retry_on", "timeout",
    "kill_grace", "memory_limit", "run_at", "created_at", "updated_at", "key", "schedule_id",
    "due_at", "key_fingerprint", "node",
]  # fmt: skip
# The PostgreSQL type of each inserted column, for `unnest` of one array per column.
COLUMN_TYPES = {
    "name": "text", "queue": "text", "priority": "int4", "state": "text", "command": "text",
    "shell": "bool", "cwd": "bytea", "env_id": "text", "labels": "text", "retries": "int4",
    "backoff": "text", "retry_delay": "float8", "max_delay": "float8", "retry_on": "text",
    "no_retry_on": "text", "timeout": "float8", "kill_grace": "float8", "memory_limit": "int8",
    "run_at": "int8", "created_at": "int8", "updated_at": "int8", "key": "text",
    "schedule_id": "int8", "due_at": "int8", "key_fingerprint": "text", "node": "text",
    "after": "text", "after_any": "text", "seq": "int8",
}  # fmt: skip
STAGED_COLUMNS = [
    "name", "queue", "priority", "command", "shell", "cwd", "env_id", "labels", "retries",
    "backoff", "retry_delay", "max_delay", "retry_on", "no_retry_on", "timeout", "kill_grace",
    "memory_limit", "run_at", "key", "key_fingerprint", "node", "after", "after_any",
]  # fmt: skip
