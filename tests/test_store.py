"""The SQLite store on its own: what only SQLite has (migrations, WAL, the query plans of a
claim, the staging side file, a full disk) and the dispatcher's holding races on it. What
every backend must do is `test_store_contract.py`."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from taskctl.api import TaskState
from taskctl.errors import StorageFull
from taskctld import states
from taskctld.lifecycle import Lifecycle
from taskctld.store import NewTask, TaskFilter
from taskctld.store.sqlite import MIGRATIONS, SqliteStore


@pytest.fixture
def store(tmp_path: Path) -> SqliteStore:
    return SqliteStore(tmp_path / "t.db", durability="normal")


def _submit(store: SqliteStore, n: int = 1, **kw: object) -> list[int]:
    with store.transaction():
        return Lifecycle(store).submit(
            [NewTask(command=["true"], cwd="/", **kw) for _ in range(n)], now=1000
        )  # type: ignore[arg-type]


# The state machine as ARCHITECTURE.md draws it, written out cell by cell: `x` where a task may
# move from the row's state to the column's. Kept apart from `states.TRANSITIONS` on purpose: a
# pair added to (or dropped from) the table must show up here as a failing test.
TABLE = """
              waiting scheduled queued running succeeded failed cancelled
    (submit)     x        x       x       .        .        .       .
    waiting      .        x       x       .        .        x       x
    scheduled    .        .       x       .        .        .       x
    queued       .        .       .       x        .        .       x
    running      .        x       x       .        x        x       x
    succeeded    .        .       x       .        .        .       .
    failed       .        .       x       .        .        .       .
    cancelled    .        .       x       .        .        .       .
"""


def _table() -> set[tuple[TaskState | None, TaskState]]:
    header, *rows = (line.split() for line in TABLE.strip().splitlines())
    cells = set()
    for name, *marks in rows:
        old = None if name == "(submit)" else TaskState(name)
        cells |= {
            (old, TaskState(new)) for new, mark in zip(header, marks, strict=True) if mark == "x"
        }
    return cells


def test_the_transition_table_is_the_documented_one() -> None:
    assert _table() == states.TRANSITIONS


def _row(store: SqliteStore, task_id: int) -> tuple[object, ...]:
    return tuple(store.conn.execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone())


def _events(store: SqliteStore) -> list[tuple[object, ...]]:
    sql = "SELECT task_id, from_state, to_state, reason FROM events ORDER BY id"
    return [tuple(row) for row in store.conn.execute(sql)]


@pytest.mark.parametrize(
    ("old", "new"), list(itertools.product(TaskState, TaskState)), ids=lambda s: str(s)
)
def test_move_allows_exactly_the_pairs_in_the_table(
    store: SqliteStore, old: TaskState, new: TaskState
) -> None:
    """Every (from, to) cell: the row is put in `old` directly (not through `move`, so that the
    setup does not depend on the table) and `move` either moves it, with one event, or refuses
    and leaves the row and the events as they were."""
    (task_id,) = _submit(store)
    with store.transaction():
        store.conn.execute("UPDATE tasks SET state = ? WHERE id = ?", (old.value, task_id))
    before, events = _row(store, task_id), _events(store)
    with store.transaction():
        if (old, new) in _table():
            assert store.move(task_id, old, new, 2000, reason="walk")
        else:
            with pytest.raises(RuntimeError, match="not in the state machine"):
                store.move(task_id, old, new, 2000, reason="walk")
    if (old, new) in _table():
        after = store.get_task(task_id)
        assert after is not None and (after.state, after.reason) == (new, "walk")
        assert _events(store) == [*events, (task_id, old.value, new.value, "walk")]
    else:
        assert _row(store, task_id) == before
        assert _events(store) == events


def test_migrations_run_once_and_record_the_version(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    SqliteStore(path).close()
    again = SqliteStore(path)
    assert again.schema_version() == len(MIGRATIONS)
    assert again.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_environments_are_stored_once_per_content(store: SqliteStore) -> None:
    env = {"A": "1", "B": "2"}
    with store.transaction():
        Lifecycle(store).submit(
            [NewTask(command=["true"], cwd="/", env=dict(env)) for _ in range(5)], now=1
        )
    assert store.conn.execute("SELECT count(*) FROM envs").fetchone()[0] == 1
    task = store.get_task(1)
    assert task is not None and store.env_of(task.env_id) == env


def test_claim_reads_only_queued_rows(store: SqliteStore) -> None:
    """Every query a claim runs on `tasks` goes through an index, with no sort of its own: the
    SQL is captured as the store runs it, so a change to it is checked too."""
    _submit(store, 3)
    _submit(store, 2, queue="other")
    issued: list[str] = []
    store.conn.set_trace_callback(issued.append)
    with store.transaction():
        store.peek_ready("default", 2, held=())
        claimed = Lifecycle(store).claim({"default": 5, "other": 5}, 5, now=3000)
    store.conn.set_trace_callback(None)
    assert len(claimed.tasks) == 5
    reads = [
        sql for sql in issued if sql.lstrip().upper().startswith("SELECT") and " tasks " in sql
    ]
    plans = [
        " ".join(str(row) for row in store.conn.execute(f"EXPLAIN QUERY PLAN {sql}"))
        for sql in reads
    ]
    # SEARCH: an index (or the primary key) narrows the rows; any SCAN, even of an index, walks
    # rows that finished tasks add to
    for plan in plans:
        assert "SEARCH tasks" in plan and "SCAN" not in plan and "TEMP B-TREE" not in plan, plan
    assert any("tasks_ready" in plan for plan in plans)  # the ready list's own index


def test_a_full_database_inside_a_savepoint_is_storage_full(store: SqliteStore) -> None:
    """A schedule's fire runs in a savepoint and must tell a full disk (retry the whole turn)
    from a bad fire (record it and go on): the savepoint converts the error itself."""
    (pages,) = store.conn.execute("PRAGMA page_count").fetchone()
    store.conn.execute(f"PRAGMA max_page_count = {pages}")  # full: not one page more
    seen: list[type] = []
    with pytest.raises(StorageFull), store.transaction():
        try:
            with store.savepoint():
                tasks = [NewTask(command=["true"] * 100, cwd="/") for _ in range(500)]
                Lifecycle(store).submit(tasks, now=1000)
        except Exception as e:
            seen.append(type(e))
            raise
    assert seen == [StorageFull]


def _stage(store: SqliteStore, tasks: list[NewTask]) -> str:
    staging = store.open_staging()
    store.stage(staging, 1, tasks[: len(tasks) // 2])
    store.stage(staging, len(tasks) // 2 + 1, tasks[len(tasks) // 2 :])
    return staging


def test_a_staged_batch_is_invisible_until_published_then_contiguous(store: SqliteStore) -> None:
    (done,) = _submit(store)
    spans: list[object] = []
    store.on_commit(lambda events: None, spans.append)
    tasks = [NewTask(command=["echo", str(i)], cwd="/") for i in range(5)]
    tasks[3].after = [done]
    staging = _stage(store, tasks)
    assert [t.id for t in store.list_tasks(TaskFilter())] == [done]  # nothing shows yet
    with store.transaction():
        published = Lifecycle(store).publish_staged(staging, 2000, 0)
    store.drop_staging(staging)
    ids = [published.base + seq for seq in range(1, 6)]
    assert ids == list(range(done + 1, done + 6)) and published.taken == {}
    rows = store.get_tasks(ids)
    assert [r.command[1] for r in rows] == ["0", "1", "2", "3", "4"]
    assert rows[3].state is TaskState.WAITING and store.deps_of([ids[3]])[ids[3]] == ([done], [])
    assert [e.task_id for e in store.events_after(0, 100) if e.from_state is None][1:] == ids
    (span,) = spans
    assert span.created == {("default", TaskState.QUEUED): 4, ("default", TaskState.WAITING): 1}  # type: ignore[attr-defined]
    assert not store.path.with_name(store.path.name + "-batch").exists()


def test_a_batch_published_apart_is_all_there_and_announced_once(store: SqliteStore) -> None:
    spans: list[object] = []
    store.on_commit(lambda events: None, spans.append)
    tasks = [
        NewTask(command=["echo", str(i)], cwd="/", key=f"k{i}", key_fingerprint="f")
        for i in range(4)
    ]
    staging = _stage(store, tasks)
    (meanwhile,) = _submit(store, key="k2", key_fingerprint="f")
    assert store.can_publish_apart(staging)
    published, span = Lifecycle(store).publish_apart(staging, 2000, 0)
    assert spans == []  # nothing is told before `announce`
    store.announce(span)
    store.drop_staging(staging)
    assert published.taken == {3: meanwhile} and spans == [span]
    rows = store.get_tasks([published.base + s for s in (1, 2, 4)])
    assert [r.command[1] for r in rows] == ["0", "1", "3"]
    assert span.created == {("default", TaskState.QUEUED): 3}
    assert not store.path.with_name(store.path.name + "-batch").exists()
    deps = _stage(store, [NewTask(command=["true"], cwd="/", after=[meanwhile])] * 2)
    assert not store.can_publish_apart(deps)
