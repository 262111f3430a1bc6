"""The SQLite store on its own: transitions, claims, events, migrations."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from taskctl.api import Outcome, TaskState
from taskctl.errors import Conflict, InvalidRequest, StorageFull
from taskctld import states
from taskctld.store import AttemptEnd, NewTask, TaskFilter
from taskctld.store.sqlite import MIGRATIONS, SqliteStore


@pytest.fixture
def store(tmp_path: Path) -> SqliteStore:
    return SqliteStore(tmp_path / "t.db", durability="normal")


def _submit(store: SqliteStore, n: int = 1, **kw: object) -> list[int]:
    with store.transaction():
        return store.submit([NewTask(command=["true"], cwd="/", **kw) for _ in range(n)], now=1000)  # type: ignore[arg-type]


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


def test_move_is_conditional_on_the_current_state(store: SqliteStore) -> None:
    (task_id,) = _submit(store)
    with store.transaction():
        assert store.move(task_id, TaskState.QUEUED, TaskState.CANCELLED, 2000, reason="cancelled")
        assert not store.move(task_id, TaskState.QUEUED, TaskState.RUNNING, 2000)
    assert store.get_task(task_id).state is TaskState.CANCELLED  # type: ignore[union-attr]


def test_submit_ids_are_in_order_and_never_reused(store: SqliteStore) -> None:
    first = _submit(store, 3)
    assert first == [1, 2, 3]
    with store.transaction():
        store.conn.execute("DELETE FROM tasks WHERE id = 3")
    assert _submit(store, 2) == [4, 5]


def test_claim_takes_highest_priority_first_then_fifo(store: SqliteStore) -> None:
    low = _submit(store, 2, priority=1)
    high = _submit(store, 1, priority=5)
    with store.transaction():
        claim = store.claim({"default": 10}, 2, now=3000)
    assert [t.id for t in claim.tasks] == [high[0], low[0]]
    assert all(t.state is TaskState.RUNNING and t.attempts == 1 for t in claim.tasks)
    assert claim.exhausted == set()
    with store.transaction():
        rest = store.claim({"default": 10}, 10, now=3000)
    assert [t.id for t in rest.tasks] == [low[1]] and rest.exhausted == {"default"}


def test_claim_respects_per_queue_slots(store: SqliteStore) -> None:
    a = _submit(store, 3, queue="a")
    b = _submit(store, 3, queue="b")
    with store.transaction():
        claim = store.claim({"a": 1, "b": 2}, 10, now=3000)
    assert sorted(t.id for t in claim.tasks) == sorted([a[0], *b[:2]])


def test_a_late_report_cannot_move_a_newer_attempt(store: SqliteStore) -> None:
    (task_id,) = _submit(store)
    with store.transaction():
        store.claim({"default": 1}, 1, now=2000)
        store.end_attempt(AttemptEnd(task_id, 1, Outcome.EXITED, 2100, exit_code=1))
        assert store.move(task_id, TaskState.RUNNING, TaskState.QUEUED, 2100, fence=1)
        store.claim({"default": 1}, 1, now=2200)
        # a duplicate report about attempt 1 arrives: the fence refuses it
        assert not store.move(task_id, TaskState.RUNNING, TaskState.FAILED, 2300, fence=1)
    task = store.get_task(task_id)
    assert task is not None and task.state is TaskState.RUNNING and task.attempts == 2


def test_events_are_published_after_commit_and_dropped_on_rollback(store: SqliteStore) -> None:
    seen: list[list] = []
    store.on_commit(seen.append)
    (task_id,) = _submit(store)
    assert [(e.task_id, e.from_state, e.to_state) for e in seen[0]] == [
        (task_id, None, TaskState.QUEUED)
    ]
    with pytest.raises(ZeroDivisionError), store.transaction():
        store.move(task_id, TaskState.QUEUED, TaskState.CANCELLED, 2000)
        1 / 0  # noqa: B018
    assert len(seen) == 1
    assert store.get_task(task_id).state is TaskState.QUEUED  # type: ignore[union-attr]
    assert [e.to_state for e in store.events_after(0, 10)] == [TaskState.QUEUED]


def test_writes_outside_a_transaction_are_refused(store: SqliteStore) -> None:
    with pytest.raises(RuntimeError, match="transaction"):
        store.submit([NewTask(command=["true"], cwd="/")], now=1)


def test_migrations_run_once_and_record_the_version(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    SqliteStore(path).close()
    again = SqliteStore(path)
    assert again.schema_version() == len(MIGRATIONS)
    assert again.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_environments_are_stored_once_per_content(store: SqliteStore) -> None:
    env = {"A": "1", "B": "2"}
    with store.transaction():
        store.submit([NewTask(command=["true"], cwd="/", env=dict(env)) for _ in range(5)], now=1)
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
        claimed = store.claim({"default": 5, "other": 5}, 5, now=3000)
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


def test_a_queue_that_loses_the_global_slot_is_not_exhausted(store: SqliteStore) -> None:
    (older,) = _submit(store, 1, queue="a")
    (newer,) = _submit(store, 1, queue="b")
    with store.transaction():
        claim = store.claim({"a": 1, "b": 1}, 1, now=3000)
    assert [t.id for t in claim.tasks] == [older]
    assert claim.exhausted == {"a"}  # b still has its task queued
    assert store.get_task(newer).state is TaskState.QUEUED  # type: ignore[union-attr]


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
                store.submit(tasks, now=1000)
        except Exception as e:
            seen.append(type(e))
            raise
    assert seen == [StorageFull]


def test_a_held_start_is_claimed_only_for_the_queueing_it_was_held_from(
    store: SqliteStore,
) -> None:
    """A supervisor's report of a held attempt claims the task when it is queued at the
    attempt before and was queued before that start; an old run (a journal's record from
    before the task was queued again) or a repeated report claims nothing."""
    held, retried = _submit(store, 2)  # queued at 1000
    with store.transaction():
        assert store.claim_attempt(held, 2, now=1500, started_at=1400) is None  # not attempt 1
        claimed = store.claim_attempt(held, 1, now=1500, started_at=1400)
        assert store.claim_attempt(held, 1, now=1600, started_at=1400) is None  # already ran
        assert store.move(retried, TaskState.QUEUED, TaskState.CANCELLED, 2000)
        assert store.move(retried, TaskState.CANCELLED, TaskState.QUEUED, 3000)  # retried
        assert store.claim_attempt(retried, 1, now=3100, started_at=2500) is None  # old run
        fresh = store.claim_attempt(retried, 1, now=3100, started_at=3050)
        # an end is written once: a repeated report is not news
        assert store.end_attempt(AttemptEnd(held, 1, Outcome.EXITED, 1700, exit_code=0))
        assert not store.end_attempt(AttemptEnd(held, 1, Outcome.EXITED, 1800, exit_code=0))
    assert claimed is not None and claimed.state is TaskState.RUNNING and claimed.attempts == 1
    assert fresh is not None and fresh.attempts == 1


def test_a_held_start_claims_the_row_it_was_held_with(store: SqliteStore) -> None:
    """The dispatcher passes the row it held (unchanged since: any change takes the hold back);
    it is claimed as given, behind the same fences, without being read again."""
    (task_id,) = _submit(store, 1)  # queued at 1000
    with store.transaction():
        (row,) = store.peek_ready("default", 1, held=())
        assert store.claim_attempt(task_id, 1, now=1500, started_at=999, known=row) is None
        claimed = store.claim_attempt(task_id, 1, now=1500, started_at=1400, known=row)
    assert claimed is row and row.state is TaskState.RUNNING and (row.attempts, row.tries) == (1, 1)
    stored = store.get_task(task_id)
    assert stored is not None and stored.state is TaskState.RUNNING and stored.attempts == 1


def test_claim_passes_over_held_tasks(store: SqliteStore) -> None:
    first, second, third = _submit(store, 3)
    with store.transaction():
        ahead = store.peek_ready("default", 1, held=())
        claim = store.claim({"default": 10}, 10, now=3000, held={first})
    assert [t.id for t in ahead] == [first] and ahead[0].state is TaskState.QUEUED
    assert [t.id for t in claim.tasks] == [second, third] and claim.exhausted == {"default"}
    with store.transaction():  # the held one is still queued: claimable once taken back
        assert [t.id for t in store.peek_ready("default", 5, held=())] == [first]


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
        published = store.publish_staged(staging, 2000, 0)
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


def test_a_staged_key_taken_meanwhile_gives_that_task_back_or_conflicts(
    store: SqliteStore,
) -> None:
    staged = [NewTask(command=["true"], cwd="/", key="k", key_fingerprint="f") for _ in range(1)]
    staged += [NewTask(command=["true"], cwd="/") for _ in range(3)]
    staging = _stage(store, staged)
    (meanwhile,) = _submit(store, key="k", key_fingerprint="f")
    with store.transaction():
        published = store.publish_staged(staging, 2000, 0)
    store.drop_staging(staging)
    assert published.taken == {1: meanwhile}
    assert store.get_task(published.base + 1) is None  # not inserted: the key's task stands
    assert len(store.get_tasks([published.base + s for s in (2, 3, 4)])) == 3
    staging = _stage(store, [NewTask(command=["true"], cwd="/", key="k", key_fingerprint="g")] * 2)
    before = store.last_task_id()
    with pytest.raises(Conflict, match=f"task {meanwhile}"), store.transaction():
        store.publish_staged(staging, 3000, 0)
    store.drop_staging(staging)
    assert store.last_task_id() == before


def test_a_staged_dependency_removed_meanwhile_publishes_nothing(store: SqliteStore) -> None:
    (dep,) = _submit(store)
    staging = _stage(store, [NewTask(command=["true"], cwd="/", after=[dep])] * 4)
    with store.transaction():
        store.remove_tasks([dep])
    with pytest.raises(InvalidRequest, match=str(dep)), store.transaction():
        store.publish_staged(staging, 2000, 0)
    store.drop_staging(staging)
    assert store.list_tasks(TaskFilter()) == []


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
    published, span = store.publish_apart(staging, 2000, 0)
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
