"""Task rows in PostgreSQL: inserted in the states given, changed only by `move` (and its
set-based form for claims, `start_attempts`), and read.

Task ids come from `tasks_id_seq`. Every insert takes `TASK_IDS_LOCK` shared until its commit,
so that a staged batch, which takes it exclusive for a moment, can reserve a contiguous range
that no concurrent insert on any node draws into (`batches`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

from taskctl.api import TaskState
from taskctl.errors import InvalidRequest
from taskctld import states
from taskctld.store import Dependent, Move, NewTask, TaskFilter, TaskRow, check_moves
from taskctld.store.common import dump
from taskctld.store.postgres.base import PgBase
from taskctld.store.postgres.rows import (
    Environments,
    path_in,
    rows_from_json,
    task_filter_sql,
    task_rows,
)
from taskctld.store.postgres.schema import COLUMN_TYPES, INSERT_COLUMNS, TASK_IDS_LOCK

_UNNEST = ", ".join(f"%({c})s::{COLUMN_TYPES[c]}[]" for c in INSERT_COLUMNS)
_INSERT = (
    "WITH envs_added AS ("
    "  INSERT INTO envs (id, data) SELECT * FROM unnest(%(env_ids)s::text[], %(env_data)s::text[])"
    "  ON CONFLICT (id) DO UPDATE SET data = EXCLUDED.data"  # locks it: a prune passes it over
    "), queues_added AS ("
    "  INSERT INTO queues (name, created_at) SELECT unnest(%(queues)s::text[]), %(now)s"
    "  ON CONFLICT DO NOTHING"
    f") INSERT INTO tasks ({', '.join(INSERT_COLUMNS)}) "
    f"SELECT {', '.join('u.' + c for c in INSERT_COLUMNS)} "
    "FROM (SELECT pg_advisory_xact_lock_shared(%(ids_lock)s)) AS locked, "
    f"unnest({_UNNEST}) WITH ORDINALITY AS u({', '.join(INSERT_COLUMNS)}, ord) "
    "ORDER BY u.ord RETURNING id"
)


# `move_many`: one conditional, fenced UPDATE for every move, each row with its own old and
# new states (bound, never spelt here) and fields (NULL: left as it is). `id = ANY(ids)` is
# what lets the planner reach the rows by index: it takes a JSON set for 100 rows, and would
# rather scan the whole table.
_MOVES = rows_from_json(
    "moves",
    "id int8, old text, new text, reason text, exit_code int4, fence int4, finished_at int8, "
    "run_at int8, tries int4",
)
_MOVE_MANY = (
    "UPDATE tasks t SET state = u.new, reason = u.reason, updated_at = %(now)s, "
    "exit_code = coalesce(u.exit_code, t.exit_code), "
    "finished_at = coalesce(u.finished_at, t.finished_at), "
    "run_at = coalesce(u.run_at, t.run_at), tries = coalesce(u.tries, t.tries) "
    f"FROM {_MOVES} AS u "
    "WHERE t.id = ANY(%(ids)s::int8[]) AND t.id = u.id AND t.state = u.old "
    "AND (u.fence IS NULL OR t.attempts = u.fence) RETURNING t.id, t.queue"
)


class PgTasks(PgBase):
    """`TaskStore` on PostgreSQL."""

    def __init__(self, url: str, *, node: str, lease_ms: int) -> None:
        super().__init__(url, node=node, lease_ms=lease_ms)
        self._update_sql: dict[tuple[tuple[str, ...], bool], str] = {}
        self._deps_seen = False  # only True is kept: another node may add the first one
        self._env_cache: dict[str, dict[str, str]] = {}

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
        """Move one task from `old` to `new` if it is still in `old` (and, with `fence`, at
        that attempt count); the event is kept for the commit. One statement. See
        `SqliteStore.move` for the contract, which is the same."""
        self._require_transaction()
        if not states.allowed(old, new):
            raise RuntimeError(f"transition {old} -> {new} is not in the state machine")
        if exit_code is not None:
            fields["exit_code"] = exit_code
        names = tuple(sorted(fields))
        key = (names, fence is not None)
        sql = self._update_sql.get(key)
        if sql is None:
            sets = "".join(f", {name} = %s" for name in names)
            fenced = " AND attempts = %s" if fence is not None else ""
            sql = (
                f"UPDATE tasks SET state = %s, reason = %s, updated_at = %s{sets} "
                f"WHERE id = %s AND state = %s{fenced} RETURNING queue"
            )
            self._update_sql[key] = sql
        values = [new.value, reason, now, *(fields[n] for n in names), task_id, old.value]
        if fence is not None:
            values.append(fence)
        found = self._x(sql, values).fetchone()
        if found is None:
            return False
        self._append_event(now, task_id, old, new, attempt, exit_code, reason, found[0])
        return True

    def _move_one(self, m: Move, now: int) -> bool:
        return self.move(
            m.task_id, m.old, m.new, now, reason=m.reason, attempt=m.attempt,
            exit_code=m.exit_code, fence=m.fence, queue=m.queue, **m.fields(),
        )  # fmt: skip

    def start_attempts(
        self, ids: Sequence[int], old: TaskState, new: TaskState, now: int
    ) -> list[TaskRow]:
        """Move each task that is still in `old` to `new` as its next attempt (attempts and
        tries counted, started_at kept from a first start), with its open attempt row (of this
        node) and its event; returns the tasks that moved, as they are now, in the order
        given. A task no longer in `old` is passed over. One statement for all of them."""
        self._require_transaction()
        if not states.allowed(old, new):
            raise RuntimeError(f"transition {old} -> {new} is not in the state machine")
        if not ids:
            return []
        cur = self._x(
            "WITH moved AS ("
            "  UPDATE tasks SET state = %(new)s, reason = NULL, updated_at = %(now)s,"
            "    attempts = attempts + 1, tries = tries + 1, started_at = coalesce(started_at, %(now)s)"
            "  WHERE id = ANY(%(ids)s::int8[]) AND state = %(old)s RETURNING *"
            "), opened AS ("
            "  INSERT INTO attempts (task_id, number, started_at, node)"
            "  SELECT id, attempts, %(now)s, %(node)s FROM moved"
            ") SELECT * FROM moved",
            {"new": new.value, "old": old.value, "now": now, "ids": list(ids), "node": self.node},
        )
        by_id = {row.id: row for row in task_rows(cur)}
        moved = [by_id[i] for i in ids if i in by_id]
        for row in moved:
            self._append_event(now, row.id, old, new, row.attempts, queue=row.queue)
        return moved

    def move_many(self, moves: Sequence[Move], now: int) -> set[int]:
        """Each of `moves` as `move` makes it, in one statement; returns the ids that moved (a
        stale move is passed over), their events kept for the commit in the order given.
        Every pair is checked against `states.TRANSITIONS` before anything is written
        (RuntimeError), and a task may come once (ValueError)."""
        self._require_transaction()
        check_moves(moves)
        if len(moves) <= 1:  # one move: `move`'s statement, cheaper than spreading rows
            return {m.task_id for m in moves if self._move_one(m, now)}
        rows = [
            (m.task_id, m.old.value, m.new.value, m.reason, m.exit_code, m.fence,
             m.finished_at, m.run_at, m.tries)
            for m in moves
        ]  # fmt: skip
        params = {"now": now, "moves": json.dumps(rows), "ids": [m.task_id for m in moves]}
        queue_of = dict(self._x(_MOVE_MANY, params).fetchall())
        for m in moves:
            if m.task_id in queue_of:
                self._append_event(
                    now, m.task_id, m.old, m.new, m.attempt, m.exit_code, m.reason,
                    queue_of[m.task_id],
                )  # fmt: skip
        return set(queue_of)

    # -- inserts --------------------------------------------------------------------------------

    def insert_tasks(
        self, tasks: Sequence[NewTask], states: Sequence[TaskState], now: int
    ) -> list[int]:
        """Insert tasks, task i in `states[i]` (one transaction with the caller's), each with
        its creation event and dependency rows; returns their ids in order. Ids are never
        reused. Dependencies must exist (so no cycle can ever form); raises InvalidRequest
        naming an unknown one. One statement (two more with dependencies)."""
        self._require_transaction()
        if not tasks:
            return []
        self._check_deps_exist(tasks)
        params = self._columns_of(tasks, states, now)
        params.update(queues=sorted({t.queue for t in tasks}), now=now, ids_lock=TASK_IDS_LOCK)
        ids = sorted(task_id for (task_id,) in self._x(_INSERT, params))
        deps: dict[str, list[Any]] = {"task": [], "dep": [], "any": []}
        for task_id, t, state in zip(ids, tasks, states, strict=True):
            self._append_event(now, task_id, None, state, queue=t.queue)
            for dep, any_end in [(d, False) for d in t.after] + [(d, True) for d in t.after_any]:
                deps["task"].append(task_id)
                deps["dep"].append(dep)
                deps["any"].append(any_end)
        if deps["task"]:
            self._deps_seen = True
            self._x(
                "INSERT INTO deps (task_id, dep_id, any_end) "
                "SELECT * FROM unnest(%s::int8[], %s::int8[], %s::bool[]) ON CONFLICT DO NOTHING",
                (deps["task"], deps["dep"], deps["any"]),
            )
        return ids

    def _columns_of(
        self, tasks: Sequence[NewTask], states: Sequence[TaskState], now: int
    ) -> dict[str, Any]:
        """The tasks as one list per column (for `unnest`), and their environments."""
        columns: dict[str, list[Any]] = {c: [] for c in INSERT_COLUMNS}
        envs = Environments()
        for t, state in zip(tasks, states, strict=True):
            row = (
                t.name, t.queue, t.priority, state.value, dump(t.command), t.shell,
                path_in(t.cwd), envs.id_of(t.env), dump(t.labels), t.retries, t.backoff, t.retry_delay,
                t.max_delay, dump(t.retry_on), dump(t.no_retry_on), t.timeout, t.kill_grace,
                t.memory_limit, t.run_at or now, now, now, t.key, t.schedule_id, t.due_at,
                t.key_fingerprint, t.node,
            )  # fmt: skip
            for name, value in zip(INSERT_COLUMNS, row, strict=True):
                columns[name].append(value)
        # Always written (cheap: the row is usually there): a cache of what was inserted could
        # outlive a rolled-back transaction and leave tasks pointing at no environment.
        return {**columns, "env_ids": list(envs.data), "env_data": list(envs.data.values())}

    def _check_deps_exist(self, tasks: Sequence[NewTask]) -> None:
        wanted = sorted({d for t in tasks for d in (*t.after, *t.after_any)})
        if not wanted:
            return
        found = {i for (i,) in self._x("SELECT id FROM tasks WHERE id = ANY(%s)", (wanted,))}
        missing = [d for d in wanted if d not in found]
        if missing:
            raise InvalidRequest(f"unknown task id in --after: {', '.join(map(str, missing))}")

    # -- dependencies ---------------------------------------------------------------------------

    def any_dependencies(self) -> bool:
        """Whether any dependency was ever recorded. Once True, True (kept); a False is read
        again each time, since another node may add the first one."""
        if not self._deps_seen:
            self._deps_seen = bool(self._x("SELECT EXISTS (SELECT 1 FROM deps)").fetchone()[0])  # type: ignore[index]
        return self._deps_seen

    def dependency_states(self, task_id: int) -> list[tuple[TaskState, bool]]:
        rows = self._x(
            "SELECT t.state, d.any_end FROM deps d JOIN tasks t ON t.id = d.dep_id "
            "WHERE d.task_id = %s",
            (task_id,),
        )
        return [(TaskState(state), bool(any_end)) for state, any_end in rows]

    def dependents(self, task_id: int, state: TaskState) -> list[Dependent]:
        rows = self._x(
            "SELECT t.id, t.queue, t.run_at FROM deps d JOIN tasks t ON t.id = d.task_id "
            "WHERE d.dep_id = %s AND t.state = %s ORDER BY d.task_id",
            (task_id, state.value),
        )
        return [Dependent(*row) for row in rows]

    def deps_of(self, ids: Sequence[int]) -> dict[int, tuple[list[int], list[int]]]:
        found: dict[int, tuple[list[int], list[int]]] = {i: ([], []) for i in ids}
        for task_id, dep_id, any_end in self._x(
            "SELECT task_id, dep_id, any_end FROM deps WHERE task_id = ANY(%s) "
            "ORDER BY task_id, dep_id",
            (list(ids),),
        ):
            found[task_id][1 if any_end else 0].append(dep_id)
        return found

    # -- reads ----------------------------------------------------------------------------------

    def state_of(self, task_id: int) -> tuple[TaskState, int] | None:
        row = self._x("SELECT state, updated_at FROM tasks WHERE id = %s", (task_id,)).fetchone()
        return None if row is None else (TaskState(row[0]), row[1])

    def get_task(self, task_id: int) -> TaskRow | None:
        found = self.get_tasks([task_id])
        return found[0] if found else None

    def get_tasks(self, ids: Sequence[int]) -> list[TaskRow]:
        """Tasks by id, in the order given; unknown ids are left out."""
        if not ids:
            return []
        cur = self._x("SELECT * FROM tasks WHERE id = ANY(%s::int8[])", (list(ids),))
        by_id = {row.id: row for row in task_rows(cur)}
        return [by_id[i] for i in ids if i in by_id]

    def list_tasks(self, where: TaskFilter) -> list[TaskRow]:
        sql, params = task_filter_sql(where)
        sql = "SELECT * FROM tasks" + sql + " ORDER BY id DESC LIMIT %s"
        return list(task_rows(self._x(sql, [*params, where.limit])))

    def count_tasks(self, where: TaskFilter) -> int:
        sql, params = task_filter_sql(where)
        return int(self._x("SELECT count(*) FROM tasks" + sql, params).fetchone()[0])  # type: ignore[index]

    def count_by_state(self) -> dict[str, dict[str, int]]:
        counts: dict[str, dict[str, int]] = {}
        for state, queue, n in self._x(
            "SELECT state, queue, count(*) FROM tasks GROUP BY state, queue"
        ):
            counts.setdefault(queue, {})[state] = n
        return counts

    def find_by_key(self, key: str, since: int) -> TaskRow | None:
        """The newest task with this idempotency key that is not final or ended after `since`.
        Inside a transaction it first locks the key until the commit: a submit on another
        node with the same key waits here for this one's commit, then finds its task."""
        if self._in_transaction:
            self._x("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (key,))
        cur = self._x(
            "SELECT * FROM tasks WHERE key = %s AND (finished_at IS NULL OR finished_at >= %s) "
            "ORDER BY id DESC LIMIT 1",
            (key, since),
        )
        return next(task_rows(cur), None)

    def env_of(self, env_id: str | None) -> dict[str, str] | None:
        """A task's environment (cached: rows never change)."""
        if env_id is None:
            return None
        env = self._env_cache.get(env_id)
        if env is None:
            row = self._x("SELECT data FROM envs WHERE id = %s", (env_id,)).fetchone()
            if row is None:
                return None
            env = json.loads(row[0])
            if len(self._env_cache) > 256:
                self._env_cache.clear()
            self._env_cache[env_id] = env
        return env

    def last_task_id(self) -> int:
        """The last id given (by any node; a rolled-back insert's too): ids are never reused."""
        row = self._x("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM tasks_id_seq")
        return int(row.fetchone()[0])  # type: ignore[index]

    def iter_all_ids(self) -> Iterator[int]:
        for (i,) in self._x("SELECT id FROM tasks ORDER BY id"):
            yield i
