"""Big batches in PostgreSQL: staged first, a chunk at a time, by COPY into a temporary table of
the store's connection (not WAL-logged, gone with the session, so a crash leaves nothing to
clean), then published in the caller's transaction, one statement per table.

A batch's task ids are contiguous (`StagedBatch`: row `seq` becomes task `base + seq`). Every
other insert, on every node, draws its ids while holding `TASK_IDS_LOCK` shared until its
commit; the publish takes it exclusive for the one statement that reserves the range (as a
session lock, released in that statement), so no insert draws an id inside it. Meanwhile the
inserts of other nodes wait: for as long as the transactions that hold it shared take to
commit, not for the publish.

A batch is never published apart (`can_publish_apart` is False): its staging table belongs
to the store's connection, and the store's thread is what the daemon awaits anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, LiteralString, cast

import psycopg

from taskctl.api import TaskState
from taskctl.errors import Conflict, InvalidRequest, TaskctlError
from taskctld.store import Dependent, EventSpan, InitialStates, NewTask, StagedBatch
from taskctld.store.common import dump
from taskctld.store.postgres.rows import Environments, path_in
from taskctld.store.postgres.schema import COLUMN_TYPES, STAGED_COLUMNS, TASK_IDS_LOCK
from taskctld.store.postgres.tasks import PgTasks


@dataclass
class _Staged:
    """What a staging table holds, as far as publishing it needs to know."""

    queues: set[str] = field(default_factory=set)
    keys: bool = False
    deps: bool = False
    last_seq: int = 0

    def note(self, task: NewTask, seq: int) -> None:
        self.queues.add(task.queue)
        self.keys = self.keys or task.key is not None
        self.deps = self.deps or bool(task.after or task.after_any)
        self.last_seq = max(self.last_seq, seq)


class PgBatches(PgTasks):
    """`BatchStore` on PostgreSQL."""

    def __init__(self, url: str, *, node: str, lease_ms: int) -> None:
        super().__init__(url, node=node, lease_ms=lease_ms)
        self._staged: dict[str, _Staged] = {}
        self._stagings = 0

    def open_staging(self) -> str:
        """A new, empty staging table for one batch (temporary: this connection's); its name
        is the handle."""
        self._stagings += 1
        name = f"batch{self._stagings}"
        columns = ", ".join(f"{c} {COLUMN_TYPES[c]}" for c in STAGED_COLUMNS)
        self._x(f"CREATE TEMP TABLE {name} (seq int8 PRIMARY KEY, {columns})")
        self._x("CREATE TEMP TABLE IF NOT EXISTS batch_envs (id text PRIMARY KEY, data text)")
        self._staged[name] = _Staged()
        return name

    def stage(self, staging: str, first_seq: int, tasks: Sequence[NewTask]) -> None:
        """Append tasks to a staging table as rows `first_seq`, `first_seq` + 1, ... by COPY.
        Their dependencies must exist now (InvalidRequest names one that does not);
        `publish_staged` checks again."""
        self._check_deps_exist(tasks)
        staged = self._staged[staging]
        envs = Environments()
        rows: list[tuple[Any, ...]] = []
        for seq, t in enumerate(tasks, start=first_seq):
            staged.note(t, seq)
            rows.append(
                (
                    seq, t.name, t.queue, t.priority, dump(t.command), t.shell, path_in(t.cwd),
                    envs.id_of(t.env), dump(t.labels), t.retries, t.backoff, t.retry_delay, t.max_delay,
                    dump(t.retry_on), dump(t.no_retry_on), t.timeout, t.kill_grace,
                    t.memory_limit, t.run_at, t.key, t.key_fingerprint, t.node,
                    dump(t.after) if t.after else None, dump(t.after_any) if t.after_any else None,
                )
            )  # fmt: skip
        if envs.data:
            self._x(
                "INSERT INTO batch_envs SELECT * FROM unnest(%s::text[], %s::text[]) "
                "ON CONFLICT DO NOTHING",
                (list(envs.data), list(envs.data.values())),
            )
        self._copy_rows(staging, rows)

    def _copy_rows(self, staging: str, rows: list[tuple[Any, ...]]) -> None:
        columns = ["seq", *STAGED_COLUMNS]
        sql = f"COPY {staging} ({', '.join(columns)}) FROM STDIN"
        if not self._in_transaction:
            self._ensure_connection()
        try:
            with self.conn.cursor() as cur, cur.copy(cast(LiteralString, sql)) as copy:
                copy.set_types([COLUMN_TYPES[c] for c in columns])
                for row in rows:
                    copy.write_row(row)
        except psycopg.OperationalError as e:
            raise self.error(e) from e

    def publish_staged(
        self, staging: str, now: int, since: int, initial: InitialStates
    ) -> StagedBatch:
        """Insert every staged task (one transaction with the caller's) in its initial state
        by `initial`: row `seq` becomes task `base + seq`, its creation event and dependencies
        with it. A staged key that a task not final, or finished after `since`, holds now
        gives that task back instead if its fingerprint matches, and raises Conflict if not
        (keys are locked first, as `find_by_key` locks them). Dependencies must still exist
        (InvalidRequest). The creation events reach subscribers as one `EventSpan`; the tasks
        with dependencies are the batch's `dependent`, to be settled."""
        self._require_transaction()
        staged = self._staged[staging]
        taken = self._staged_keys_taken(staging, since) if staged.keys else {}
        if taken:
            self._x(f"DELETE FROM {staging} WHERE seq = ANY(%s::int8[])", (list(taken),))
        if staged.deps:
            self._check_staged_deps(staging)
        base = self._reserve_task_ids(staged.last_seq) if staged.last_seq else 0
        self._x(
            "INSERT INTO queues (name, created_at) SELECT unnest(%s::text[]), %s "
            "ON CONFLICT DO NOTHING",
            (sorted(staged.queues), now),
        )
        self._x(
            "INSERT INTO envs (id, data) SELECT id, data FROM batch_envs "
            "ON CONFLICT (id) DO UPDATE SET data = EXCLUDED.data"
        )
        count = self._copy_tasks(staging, base, now, initial)
        span = self._copy_events(base, staged.last_seq, count, now)
        self._pending_spans.append(span)
        published = StagedBatch(base, taken)
        if staged.deps:
            published.dependent = self._copy_staged_deps(staging, base, now)
        return published

    def _reserve_task_ids(self, n: int) -> int:
        """`n` contiguous task ids no other insert can draw; returns the id before them. A
        failure may leave the session lock held: the connection is then closed (a new one
        is made at the next transaction), which releases it."""
        try:
            (last, _) = self._x(
                "SELECT last, pg_advisory_unlock(%(lock)s) FROM ("
                "  SELECT setval('tasks_id_seq', nextval('tasks_id_seq') + %(n)s - 1) AS last"
                "  FROM (SELECT pg_advisory_lock(%(lock)s)) AS locked OFFSET 0"
                ") AS reserved",
                {"lock": TASK_IDS_LOCK, "n": n},
            ).fetchone()  # type: ignore[misc]
        except BaseException:
            with suppress(psycopg.Error):
                self.conn.close()
            raise
        return int(last) - n

    def _copy_tasks(self, staging: str, base: int, now: int, initial: InitialStates) -> int:
        """Row `seq` of the staging table becomes task `base + seq`, its state by `initial`;
        returns how many."""
        state = (
            "CASE WHEN after IS NOT NULL OR after_any IS NOT NULL THEN %(dependent)s "
            "WHEN run_at > %(now)s THEN %(delayed)s ELSE %(ready)s END"
        )
        copied = ", ".join(c for c in STAGED_COLUMNS if c not in ("after", "after_any", "run_at"))
        return self._x(
            f"INSERT INTO tasks (id, state, run_at, created_at, updated_at, {copied}) "
            f"SELECT %(base)s + seq, {state}, coalesce(run_at, %(now)s), %(now)s, %(now)s, "
            f"{copied} FROM {staging} ORDER BY seq",
            {
                "base": base,
                "now": now,
                "dependent": initial.dependent.value,
                "delayed": initial.delayed.value,
                "ready": initial.ready.value,
            },
        ).rowcount

    def _copy_events(self, base: int, last_seq: int, count: int, now: int) -> EventSpan:
        """The creation event of every task of the batch, told as one span; its ids are
        reserved under the events lock, which this transaction holds until its commit."""
        if count == 0:
            after = self.last_event_id()
            return EventSpan(after + 1, after, now, {})
        first = self._reserve_event_ids(count)
        self._x(
            "INSERT INTO events (id, at, task_id, queue, to_state) "
            "SELECT %(first)s - 1 + row_number() OVER (ORDER BY id), %(now)s, id, queue, state "
            "FROM tasks WHERE id > %(base)s AND id <= %(top)s ORDER BY id",
            {"first": first, "now": now, "base": base, "top": base + last_seq},
        )
        created = {
            (queue, TaskState(state)): n
            for queue, state, n in self._x(
                "SELECT queue, state, count(*) FROM tasks WHERE id > %s AND id <= %s "
                "GROUP BY queue, state",
                (base, base + last_seq),
            )
        }
        return EventSpan(first, first + count - 1, now, created)

    def _copy_staged_deps(self, staging: str, base: int, now: int) -> list[Dependent]:
        """The dependency rows of the published tasks; returns those tasks."""
        for column, any_end in (("after", False), ("after_any", True)):
            self._x(
                "INSERT INTO deps (task_id, dep_id, any_end) "
                f"SELECT %s + b.seq, j.value::int8, %s FROM {staging} b, "
                f"json_array_elements_text(b.{column}::json) AS j(value) "
                f"WHERE b.{column} IS NOT NULL ON CONFLICT DO NOTHING",
                (base, any_end),
            )
        self._deps_seen = True
        rows = self._x(
            f"SELECT %s + seq, queue, coalesce(run_at, %s) FROM {staging} "
            "WHERE after IS NOT NULL OR after_any IS NOT NULL ORDER BY seq",
            (base, now),
        )
        return [Dependent(*row) for row in rows]

    def _staged_keys_taken(self, staging: str, since: int) -> dict[int, int]:
        """Staged rows whose key a stored task holds now, and that task (Conflict if the
        request differs). The keys are locked first, until the commit."""
        self._x(
            "SELECT pg_advisory_xact_lock(hashtextextended(key, 0)) FROM ("
            f"  SELECT DISTINCT key FROM {staging} WHERE key IS NOT NULL ORDER BY key"
            ") AS keys"
        )
        taken: dict[int, int] = {}
        for seq, key, mine, holder, theirs in self._x(
            f"SELECT b.seq, b.key, b.key_fingerprint, t.id, t.key_fingerprint "
            f"FROM {staging} b JOIN tasks t ON t.key = b.key "
            "WHERE b.key IS NOT NULL AND (t.finished_at IS NULL OR t.finished_at >= %s) "
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

    def _check_staged_deps(self, staging: str) -> None:
        missing = [
            d
            for (d,) in self._x(
                "SELECT DISTINCT j.value::int8 FROM "
                f"{staging} b, jsonb_array_elements_text(coalesce(b.after, '[]')::jsonb "
                "|| coalesce(b.after_any, '[]')::jsonb) AS j(value) "
                "WHERE NOT EXISTS (SELECT 1 FROM tasks t WHERE t.id = j.value::int8) "
                "ORDER BY 1 LIMIT 20"
            )
        ]
        if missing:
            raise InvalidRequest(f"unknown task id in --after: {', '.join(map(str, missing))}")

    def can_publish_apart(self, staging: str) -> bool:
        """Never here: see the module docstring."""
        return False

    def publish_apart(
        self, staging: str, now: int, since: int, initial: InitialStates
    ) -> tuple[StagedBatch, EventSpan]:
        raise RuntimeError(
            "a batch, with dependencies or not, is published in the daemon's transaction "
            "on PostgreSQL (can_publish_apart is False)"
        )

    def announce(self, span: EventSpan) -> None:
        """Tell subscribers of a batch published apart (never, here)."""
        for on_span in self._span_subscribers:
            on_span(span)

    def checkpoint_apart(self) -> None:
        """Nothing: PostgreSQL checkpoints on its own."""

    def drop_staging(self, staging: str) -> None:
        """Forget a staging table (published or not)."""
        if self._staged.pop(staging, None) is None:
            return
        with suppress(psycopg.Error, TaskctlError):
            if not (self.conn.closed or self.conn.broken):
                self._x(f"DROP TABLE IF EXISTS {staging}")
                if not self._staged and not self._in_transaction:
                    self._x("TRUNCATE batch_envs")
