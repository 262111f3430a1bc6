"""Task rows in SQLite: inserted in the states given, changed only by `move`, and read."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from taskctl.api import TaskState
from taskctl.errors import InvalidRequest
from taskctld import states
from taskctld.store import Dependent, Move, NewTask, TaskFilter, TaskRow, check_moves
from taskctld.store.common import dump, env_digest
from taskctld.store.sqlite.base import (
    SqliteBase,
    chunks,
    insert_queues,
    marks,
    path_in,
)
from taskctld.store.sqlite.rows import task_filter_sql, task_rows
from taskctld.store.sqlite.schema import INSERT_TASK


class SqliteTasks(SqliteBase):
    """`TaskStore` on SQLite."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        super().__init__(path, conn)
        self._update_sql: dict[tuple[str, ...], str] = {}
        self._deps_seen: bool | None = None
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
        """Move one task from `old` to `new` if it is still in `old`; append the event.

        Returns False (and changes nothing) when the task is no longer in `old`: another actor
        won. `fence`, when given, also requires the task's attempt count to equal it, so a late
        report about an earlier attempt cannot move the task. `fields` are more columns to set
        in the same UPDATE; `attempt`, `exit_code` and `reason` are recorded in the event, and
        `reason` and `exit_code` (when given) on the task too. Raises RuntimeError for a pair
        that is not in `states.TRANSITIONS`. What follows a move (settling dependents) is the
        caller's.
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
        return True

    def start_attempts(
        self, ids: Sequence[int], old: TaskState, new: TaskState, now: int
    ) -> list[TaskRow]:
        """Move each task that is still in `old` to `new` as its next attempt (attempts and
        tries counted, started_at kept from a first start), with its open attempt row and its
        event; returns the tasks that moved, as they are now, in the order given. A task no
        longer in `old` is passed over. The set-based form of a claim's moves; here the rows
        are read once and each is one fenced UPDATE (a local file pays no round trips)."""
        self._require_transaction()
        if not states.allowed(old, new):
            raise RuntimeError(f"transition {old} -> {new} is not in the state machine")
        moved: list[TaskRow] = []
        for task in self.get_tasks(ids):
            number, started_at = task.attempts + 1, task.started_at or now
            if (
                task.state is not old
                or self.conn.execute(
                    "UPDATE tasks SET state = ?, reason = NULL, updated_at = ?, attempts = ?, "
                    "tries = tries + 1, started_at = ? WHERE id = ? AND state = ? AND attempts = ?",
                    (new.value, now, number, started_at, task.id, old.value, task.attempts),
                ).rowcount
                != 1
            ):
                continue
            self.conn.execute(
                "INSERT INTO attempts (task_id, number, started_at) VALUES (?, ?, ?)",
                (task.id, number, now),
            )
            self._append_event(now, task.id, old, new, number, queue=task.queue)
            task.state, task.reason, task.attempts, task.tries = new, None, number, task.tries + 1
            task.started_at = started_at
            moved.append(task)
        return moved

    def move_many(self, moves: Sequence[Move], now: int) -> set[int]:
        """Each of `moves` as `move` makes it; returns the ids that moved (a stale move is
        passed over). Every pair is checked against `states.TRANSITIONS` before anything is
        written (RuntimeError), and a task may come once (ValueError). Here a loop of `move`:
        a local file pays no round trips."""
        self._require_transaction()
        check_moves(moves)
        moved = set()
        for m in moves:
            if self.move(
                m.task_id, m.old, m.new, now, reason=m.reason, attempt=m.attempt,
                exit_code=m.exit_code, fence=m.fence, queue=m.queue, **m.fields(),
            ):  # fmt: skip
                moved.add(m.task_id)
        return moved

    # -- inserts --------------------------------------------------------------------------------

    def insert_tasks(
        self, tasks: Sequence[NewTask], states: Sequence[TaskState], now: int
    ) -> list[int]:
        """Insert tasks, task i in `states[i]` (one transaction with the caller's), each with
        its creation event and dependency rows; returns their ids in order. Ids are never
        reused. Dependencies must exist (so no cycle can ever form); raises InvalidRequest
        naming an unknown one."""
        self._require_transaction()
        self._check_deps_exist(tasks)
        rows = self._rows_of(tasks, states, now)
        insert_queues(self.conn, {t.queue for t in tasks}, now)
        before = self._sequence("tasks")
        self.conn.executemany(INSERT_TASK, rows)
        ids = list(range(before + 1, before + 1 + len(rows)))
        for task_id, t, state in zip(ids, tasks, states, strict=True):
            self._append_event(now, task_id, None, state, queue=t.queue)
            if t.after or t.after_any:
                self._deps_seen = True
                self.conn.executemany(
                    "INSERT OR IGNORE INTO deps (task_id, dep_id, any_end) VALUES (?, ?, ?)",
                    [(task_id, d, 0) for d in t.after] + [(task_id, d, 1) for d in t.after_any],
                )
        return ids

    def _rows_of(
        self, tasks: Sequence[NewTask], states: Sequence[TaskState], now: int
    ) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = []
        env_ids: dict[int, str | None] = {}  # a batch shares one environment object: hash it once
        for t, state in zip(tasks, states, strict=True):
            env_id = env_ids.get(id(t.env), "")
            if env_id == "":
                env_id = env_ids[id(t.env)] = self._store_env(t.env)
            rows.append(
                (
                    t.name, t.queue, t.priority, state.value, dump(t.command),
                    int(t.shell), path_in(t.cwd), env_id, dump(t.labels), t.retries, t.backoff,
                    t.retry_delay, t.max_delay, dump(t.retry_on), dump(t.no_retry_on),
                    t.timeout, t.kill_grace, t.memory_limit, t.run_at or now, now, now, t.key,
                    t.schedule_id, t.due_at, t.key_fingerprint,
                )
            )  # fmt: skip
        return rows

    def _store_env(self, env: dict[str, str] | None) -> str | None:
        if env is None:
            return None
        env_id, data = env_digest(env)
        # Always written (cheap: the row is usually there): a cache of what was inserted could
        # outlive a rolled-back transaction and leave tasks pointing at no environment.
        self.conn.execute("INSERT OR IGNORE INTO envs (id, data) VALUES (?, ?)", (env_id, data))
        return env_id

    def _check_deps_exist(self, tasks: Sequence[NewTask]) -> None:
        wanted = sorted({d for t in tasks for d in (*t.after, *t.after_any)})
        found: set[int] = set()
        for chunk in chunks(wanted):
            found.update(
                i
                for (i,) in self.conn.execute(
                    f"SELECT id FROM tasks WHERE id IN ({marks(len(chunk))})", chunk
                )
            )
        missing = [d for d in wanted if d not in found]
        if missing:
            raise InvalidRequest(f"unknown task id in --after: {', '.join(map(str, missing))}")

    # -- dependencies ---------------------------------------------------------------------------

    def any_dependencies(self) -> bool:
        """Whether any dependency was ever recorded: most stores have none, and then the
        lifecycle skips looking for dependents after every end. Cached: once True, True."""
        if self._deps_seen is None:
            self._deps_seen = (
                self.conn.execute("SELECT EXISTS (SELECT 1 FROM deps)").fetchone()[0] == 1
            )
        return self._deps_seen

    def dependency_states(self, task_id: int) -> list[tuple[TaskState, bool]]:
        """The state of each task `task_id` depends on, and whether any end of it will do
        (`after_any`) rather than success only."""
        rows = self.conn.execute(
            "SELECT t.state, d.any_end FROM deps d JOIN tasks t ON t.id = d.dep_id "
            "WHERE d.task_id = ?",
            (task_id,),
        )
        return [(TaskState(state), bool(any_end)) for state, any_end in rows]

    def dependents(self, task_id: int, state: TaskState) -> list[Dependent]:
        """The tasks in `state` that depend on `task_id`, by id."""
        rows = self.conn.execute(
            "SELECT t.id, t.queue, t.run_at FROM deps d JOIN tasks t ON t.id = d.task_id "
            "WHERE d.dep_id = ? AND t.state = ? ORDER BY d.task_id",
            (task_id, state.value),
        )
        return [Dependent(*row) for row in rows]

    def deps_of(self, ids: Sequence[int]) -> dict[int, tuple[list[int], list[int]]]:
        """(after, after_any) of each task."""
        found: dict[int, tuple[list[int], list[int]]] = {i: ([], []) for i in ids}
        for chunk in chunks(ids):
            for task_id, dep_id, any_end in self.conn.execute(
                f"SELECT task_id, dep_id, any_end FROM deps WHERE task_id IN ({marks(len(chunk))}) "
                "ORDER BY task_id, dep_id",
                chunk,
            ):
                found[task_id][1 if any_end else 0].append(dep_id)
        return found

    # -- reads ----------------------------------------------------------------------------------

    def state_of(self, task_id: int) -> tuple[TaskState, int] | None:
        """A task's state and when it entered it (ms); None for no such task."""
        row = self.conn.execute(
            "SELECT state, updated_at FROM tasks WHERE id = ?", (task_id,)
        ).fetchone()
        return None if row is None else (TaskState(row[0]), row[1])

    def get_task(self, task_id: int) -> TaskRow | None:
        found = self.get_tasks([task_id])
        return found[0] if found else None

    def get_tasks(self, ids: Sequence[int]) -> list[TaskRow]:
        """Tasks by id, in the order given; unknown ids are left out."""
        by_id: dict[int, TaskRow] = {}
        for chunk in chunks(ids):
            cur = self.conn.execute(f"SELECT * FROM tasks WHERE id IN ({marks(len(chunk))})", chunk)
            by_id.update((row.id, row) for row in task_rows(cur))
        return [by_id[i] for i in ids if i in by_id]

    def list_tasks(self, where: TaskFilter) -> list[TaskRow]:
        sql, params = task_filter_sql(where)
        sql = "SELECT * FROM tasks" + sql + " ORDER BY id DESC LIMIT ?"
        return list(task_rows(self.conn.execute(sql, [*params, where.limit])))

    def count_tasks(self, where: TaskFilter) -> int:
        """How many tasks `where` matches, whatever its limit."""
        sql, params = task_filter_sql(where)
        return int(self.conn.execute("SELECT count(*) FROM tasks" + sql, params).fetchone()[0])

    def count_by_state(self) -> dict[str, dict[str, int]]:
        """{queue: {state: count}} over every task in the store."""
        counts: dict[str, dict[str, int]] = {}
        for state, queue, n in self.conn.execute(
            "SELECT state, queue, count(*) FROM tasks GROUP BY state, queue"
        ):
            counts.setdefault(queue, {})[state] = n
        return counts

    def find_by_key(self, key: str, since: int) -> TaskRow | None:
        """The newest task with this idempotency key that is not final or ended after `since`."""
        cur = self.conn.execute(
            "SELECT * FROM tasks WHERE key = ? AND (finished_at IS NULL OR finished_at >= ?) "
            "ORDER BY id DESC LIMIT 1",
            (key, since),
        )
        return next(task_rows(cur), None)

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

    def last_task_id(self) -> int:
        return self._sequence("tasks")

    def iter_all_ids(self) -> Iterator[int]:
        for (i,) in self.conn.execute("SELECT id FROM tasks ORDER BY id"):
            yield i
