"""The store contract: what every backend must do, and the lifecycle on top of it.

One set of tests, run once per backend in `BACKENDS` (SQLite, and PostgreSQL on the tests' own
throwaway cluster: skipped where the machine has no PostgreSQL server binaries). They reach a backend only through the `Store` Protocol, never its
SQL, and check both the primitives (conditional move, inserts, candidates, the event log,
queues, schedules, fires) and the rules `Lifecycle` builds on them (initial states, claims,
dependencies, promotion). What only SQLite has is `test_store.py`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from taskctl.api import Outcome, TaskState
from taskctl.errors import Conflict, InvalidRequest
from taskctld import states
from taskctld.lifecycle import INITIAL, PROMOTE_AT_MOST, Ending, Lifecycle, initial_state
from taskctld.store import (
    AttemptEnd,
    AttemptStart,
    EventRow,
    Move,
    NewSchedule,
    NewTask,
    Store,
    TaskFilter,
)
from taskctld.store.postgres import PostgresStore
from taskctld.store.sqlite import SqliteStore


@dataclass(frozen=True)
class Backend:
    open: Callable[[Path, pytest.FixtureRequest], Store]  # a new, empty store


BACKENDS = {
    "sqlite": Backend(lambda folder, _: SqliteStore(folder / "t.db", durability="normal")),
    # a fresh database on the tests' own cluster, asked for only by this backend's cases
    "postgresql": Backend(
        lambda _, request: PostgresStore(request.getfixturevalue("pg_url"), node="n1")
    ),
}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> Backend:
    return BACKENDS[request.param]


@pytest.fixture
def store(backend: Backend, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Store]:
    opened = backend.open(tmp_path, request)
    yield opened
    opened.close()


def _submit(store: Store, n: int = 1, **kw: object) -> list[int]:
    with store.transaction():
        return Lifecycle(store).submit(
            [NewTask(command=["true"], cwd="/", **kw) for _ in range(n)], now=1000
        )  # type: ignore[arg-type]


def _stage(store: Store, tasks: list[NewTask]) -> str:
    staging = store.open_staging()
    store.stage(staging, 1, tasks[: len(tasks) // 2])
    store.stage(staging, len(tasks) // 2 + 1, tasks[len(tasks) // 2 :])
    return staging


def _state(store: Store, task_id: int) -> TaskState:
    task = store.get_task(task_id)
    assert task is not None
    return task.state


def _insert(store: Store, state: TaskState, now: int = 1000, **kw: object) -> int:
    """One task put straight in `state`, as the lifecycle would give it to the store."""
    with store.transaction():
        (task_id,) = store.insert_tasks([NewTask(command=["true"], cwd="/", **kw)], [state], now)  # type: ignore[arg-type]
    return task_id


# -- the primitives ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new"), list(itertools.product(TaskState, TaskState)), ids=lambda s: str(s)
)
def test_move_takes_exactly_the_pairs_of_the_state_machine(
    store: Store, old: TaskState, new: TaskState
) -> None:
    """Every (from, to) cell, the task inserted in `old`: `move` moves it with one event, or
    raises and leaves the task and the event log as they were."""
    task_id = _insert(store, old)
    before, events = store.get_task(task_id), store.events_after(0, 100)
    with store.transaction():
        if (old, new) in states.TRANSITIONS:
            assert store.move(task_id, old, new, 2000, reason="walk", attempt=3)
        else:
            with pytest.raises(RuntimeError, match="not in the state machine"):
                store.move(task_id, old, new, 2000, reason="walk")
    after = store.get_task(task_id)
    assert after is not None
    if (old, new) in states.TRANSITIONS:
        assert (after.state, after.reason) == (new, "walk")
        (event,) = store.events_after(events[-1].id, 100)
        assert (event.task_id, event.from_state, event.to_state) == (task_id, old, new)
        assert (event.reason, event.attempt, event.queue, event.at) == ("walk", 3, "default", 2000)
    else:
        assert after == before and store.events_after(0, 100) == events


def test_move_refuses_a_stale_state_or_a_stale_fence_and_changes_nothing(store: Store) -> None:
    task_id = _insert(store, TaskState.RUNNING)
    with store.transaction():
        assert store.move(task_id, TaskState.RUNNING, TaskState.QUEUED, 1100, fence=0, tries=0)
    events = store.events_after(0, 100)
    with store.transaction():
        assert not store.move(task_id, TaskState.RUNNING, TaskState.FAILED, 1200)  # stale state
        assert not store.move(task_id, TaskState.QUEUED, TaskState.RUNNING, 1200, fence=1)
        assert list(store.uncommitted_events()) == []
    task = store.get_task(task_id)
    assert task is not None and (task.state, task.attempts) == (TaskState.QUEUED, 0)
    assert store.events_after(0, 100) == events


def test_move_sets_the_fields_it_is_given_in_the_same_write(store: Store) -> None:
    task_id = _insert(store, TaskState.RUNNING)
    with store.transaction():
        assert store.move(
            task_id, TaskState.RUNNING, TaskState.FAILED, 5000, reason="exited", exit_code=3,
            finished_at=5000, tries=2,
        )  # fmt: skip
    task = store.get_task(task_id)
    assert task is not None
    assert (task.reason, task.exit_code, task.finished_at, task.tries) == ("exited", 3, 5000, 2)


def test_a_move_to_a_final_state_settles_nothing_by_itself(store: Store) -> None:
    """Settling dependents is the lifecycle's: the store's `move` only moves."""
    (dep,) = _submit(store)
    (waiting,) = _submit(store, after=[dep])
    with store.transaction():
        assert store.move(dep, TaskState.QUEUED, TaskState.CANCELLED, 2000)
    assert _state(store, waiting) is TaskState.WAITING


def test_insert_gives_ids_in_order_each_task_in_the_state_given(store: Store) -> None:
    tasks = [NewTask(command=["echo", str(i)], cwd="/", queue=f"q{i % 2}") for i in range(4)]
    given = [TaskState.QUEUED, TaskState.SCHEDULED, TaskState.WAITING, TaskState.QUEUED]
    with store.transaction():
        ids = store.insert_tasks(tasks, given, 1000)
        created = list(store.uncommitted_events())
    assert ids == sorted(ids) and len(set(ids)) == 4 and ids[0] > 0
    rows = store.get_tasks(ids)
    assert [(r.state, r.command[1], r.queue) for r in rows] == [
        (s, str(i), f"q{i % 2}") for i, s in enumerate(given)
    ]
    assert [(e.task_id, e.from_state, e.to_state, e.queue) for e in created] == [
        (i, None, s, r.queue) for i, s, r in zip(ids, given, rows, strict=True)
    ]
    assert {"q0", "q1"} <= {q.name for q in store.list_queues()}  # made on first use
    assert store.last_task_id() == ids[-1] and list(store.iter_all_ids()) == ids


def test_insert_refuses_an_unknown_dependency_and_inserts_nothing(store: Store) -> None:
    with pytest.raises(InvalidRequest, match="4242"), store.transaction():
        Lifecycle(store).submit([NewTask(command=["true"], cwd="/", after=[4242])], 1000)
    assert store.list_tasks(TaskFilter()) == [] and store.events_after(0, 10) == []


def test_events_of_a_savepoint_that_fails_are_dropped_and_the_rest_published(
    store: Store,
) -> None:
    seen: list[list[EventRow]] = []
    store.on_commit(seen.append)
    with store.transaction():
        kept = _submit(store)
        with pytest.raises(ZeroDivisionError), store.savepoint():
            _submit(store)
            1 / 0  # noqa: B018
        assert [e.task_id for e in store.uncommitted_events()] == kept
    assert [[e.task_id for e in events] for events in seen] == [kept]
    assert [t.id for t in store.list_tasks(TaskFilter())] == kept


def test_events_after_resumes_where_it_left_off_without_skipping(store: Store) -> None:
    ids = _submit(store, 7)
    with store.transaction():
        for task_id in ids[:5]:
            store.move(task_id, TaskState.QUEUED, TaskState.CANCELLED, 2000)
    read: list[EventRow] = []
    cursor = 0
    while page := store.events_after(cursor, 3):
        assert len(page) <= 3
        read += page
        cursor = page[-1].id
    assert cursor == store.last_event_id()
    assert [e.id for e in read] == sorted({e.id for e in read})  # increasing, no repeats
    assert [(e.task_id, e.to_state) for e in read] == [
        *((i, TaskState.QUEUED) for i in ids),
        *((i, TaskState.CANCELLED) for i in ids[:5]),
    ]
    assert store.events_after(read[3].id, 100) == read[4:]


def test_attempts_open_once_and_end_once(store: Store) -> None:
    task_id = _insert(store, TaskState.RUNNING)
    with store.transaction():
        store.open_attempt(task_id, 1, 1500)
        store.mark_started(task_id, 1, pid=77, started_at=1510)
    assert [(a.task_id, a.number, a.pid) for a in store.open_attempts()] == [(task_id, 1, 77)]
    end = AttemptEnd(task_id, 1, Outcome.SIGNALED, 1900, signal=9, max_rss=1024)
    with store.transaction():
        assert store.end_attempt(end)
        assert not store.end_attempt(end)  # a repeated report
        assert not store.end_attempt(AttemptEnd(task_id, 2, Outcome.EXITED, 1900))  # none open
    (attempt,) = store.attempts_of([task_id])[task_id]
    assert (attempt.outcome, attempt.signal, attempt.started_at, attempt.ended_at) == (
        Outcome.SIGNALED, 9, 1510, 1900,
    )  # fmt: skip
    assert store.open_attempts() == [] and store.count_attempt_outcomes() == {"signaled": 1}


def test_start_attempts_moves_the_tasks_still_in_the_state_with_their_attempts(
    store: Store,
) -> None:
    """A claim's moves at once: each task still `old` becomes `new` as its next attempt
    (counted, its first start kept), with an open attempt row and an event; a stale id (moved
    meanwhile, or unknown) is passed over; rows come back in the order given."""
    first, stale, retried = _submit(store, 3)
    with store.transaction():
        assert store.move(stale, TaskState.QUEUED, TaskState.CANCELLED, 1500)
        assert store.start_attempts([retried], TaskState.QUEUED, TaskState.RUNNING, 1600)
        assert store.move(retried, TaskState.RUNNING, TaskState.QUEUED, 1700, fence=1)
    seen: list[list[EventRow]] = []
    store.on_commit(seen.append)
    with store.transaction():
        rows = store.start_attempts(
            [retried, stale, 4242, first], TaskState.QUEUED, TaskState.RUNNING, 2000
        )
        with pytest.raises(RuntimeError, match="not in the state machine"):
            store.start_attempts([first], TaskState.QUEUED, TaskState.SUCCEEDED, 2000)
    assert [(r.id, r.state, r.attempts, r.tries, r.started_at) for r in rows] == [
        (retried, TaskState.RUNNING, 2, 2, 1600), (first, TaskState.RUNNING, 1, 1, 2000),
    ]  # fmt: skip
    assert rows == store.get_tasks([retried, first])
    assert [(e.task_id, e.from_state, e.to_state, e.attempt, e.at) for e in seen[0]] == [
        (retried, TaskState.QUEUED, TaskState.RUNNING, 2, 2000),
        (first, TaskState.QUEUED, TaskState.RUNNING, 1, 2000),
    ]
    assert [e.id for e in seen[0]] == [e.id for e in store.events_after(0, 100)[-2:]]
    opened = store.attempts_of([retried, first, stale])
    assert [(a.number, a.started_at, a.outcome) for a in opened[retried]] == [
        (1, 1600, None), (2, 2000, None),
    ]  # fmt: skip
    assert [(a.number, a.started_at) for a in opened[first]] == [(1, 2000)] and not opened[stale]
    with store.transaction():
        assert store.start_attempts([first, stale], TaskState.QUEUED, TaskState.RUNNING, 3000) == []
        assert store.start_attempts([], TaskState.QUEUED, TaskState.RUNNING, 3000) == []


def _running(store: Store, n: int, **kw: object) -> list[int]:
    """`n` tasks claimed (running as their attempt 1)."""
    ids = _submit(store, n, **kw)
    with store.transaction():
        store.start_attempts(ids, TaskState.QUEUED, TaskState.RUNNING, 1500)
    return ids


def test_move_many_moves_those_still_in_their_state_and_passes_over_the_stale(
    store: Store,
) -> None:
    """The set-based form of the moves that end attempts: each move as `move` makes it, with
    its own states, fence and fields; a stale one (state or fence) is passed over and the
    others move; their events are appended once each, in the order given, and published
    after the commit."""
    done, stale_state, stale_fence, retried, again = _running(store, 5)
    with store.transaction():
        assert store.move(stale_state, TaskState.RUNNING, TaskState.QUEUED, 1600, fence=1)
    seen: list[list[EventRow]] = []
    store.on_commit(seen.append)
    run = TaskState.RUNNING
    moves = [
        Move(retried, run, TaskState.SCHEDULED, reason="exit 3", attempt=1, exit_code=3,
             fence=1, run_at=9000),
        Move(stale_state, run, TaskState.FAILED, attempt=1, fence=1, finished_at=2000),
        Move(done, run, TaskState.SUCCEEDED, queue="default", reason="ok", attempt=1,
             exit_code=0, fence=1, finished_at=2000),
        Move(stale_fence, run, TaskState.FAILED, attempt=2, fence=2, finished_at=2000),
        Move(again, run, TaskState.QUEUED, reason="interrupted", attempt=1, fence=1, tries=0),
    ]  # fmt: skip
    with store.transaction():
        assert store.move_many(moves, 2000) == {retried, done, again}
        assert [e.task_id for e in store.uncommitted_events()] == [retried, done, again]
        assert seen == []
    assert [
        (e.task_id, e.from_state, e.to_state, e.attempt, e.exit_code, e.reason, e.queue, e.at)
        for e in seen[0]
    ] == [
        (retried, run, TaskState.SCHEDULED, 1, 3, "exit 3", "default", 2000),
        (done, run, TaskState.SUCCEEDED, 1, 0, "ok", "default", 2000),
        (again, run, TaskState.QUEUED, 1, None, "interrupted", "default", 2000),
    ]
    assert [e.id for e in seen[0]] == [e.id for e in store.events_after(0, 100)[-3:]]
    rows = {t.id: t for t in store.get_tasks([done, stale_state, stale_fence, retried, again])}
    assert (rows[retried].state, rows[retried].run_at, rows[retried].exit_code) == (
        TaskState.SCHEDULED, 9000, 3,
    )  # fmt: skip
    assert (rows[retried].finished_at, rows[retried].tries, rows[retried].reason) == (
        None, 1, "exit 3",
    )  # fmt: skip
    assert (rows[done].state, rows[done].finished_at, rows[done].exit_code) == (
        TaskState.SUCCEEDED, 2000, 0,
    )  # fmt: skip
    assert (rows[again].state, rows[again].tries, rows[again].exit_code, rows[again].run_at) == (
        TaskState.QUEUED, 0, None, 1000,
    )  # fmt: skip
    assert (rows[stale_state].state, rows[stale_state].finished_at) == (TaskState.QUEUED, None)
    assert (rows[stale_fence].state, rows[stale_fence].finished_at) == (run, None)
    with store.transaction():
        assert store.move_many([], 3000) == set()
        assert store.move_many(moves, 3000) == set()  # each is stale now: nothing moves
        assert list(store.uncommitted_events()) == []


def test_move_many_checks_every_move_before_it_writes_any(store: Store) -> None:
    """A pair outside the state machine, or a task twice, and nothing of the call is written."""
    first, second = _running(store, 2)
    events = store.events_after(0, 100)
    ok = Move(first, TaskState.RUNNING, TaskState.SUCCEEDED, fence=1, finished_at=2000)
    with store.transaction():
        with pytest.raises(RuntimeError, match="not in the state machine"):
            store.move_many([ok, Move(second, TaskState.RUNNING, TaskState.WAITING)], 2000)
        with pytest.raises(ValueError, match="more than once"):
            store.move_many([ok, ok._replace(new=TaskState.FAILED)], 2000)
        assert list(store.uncommitted_events()) == []
    assert store.events_after(0, 100) == events
    assert {t.state for t in store.get_tasks([first, second])} == {TaskState.RUNNING}
    with store.transaction():
        assert store.move_many([ok, ok._replace(task_id=second)], 2000) == {first, second}
    with pytest.raises(RuntimeError, match="inside transaction"):
        store.move_many([ok], 2000)


def test_attempts_start_and_end_many_at_once(store: Store) -> None:
    """`mark_started_many` and `end_attempts`: the ends that were news are the attempts that
    were open; an attempt ended already, or twice in one call (the first counts), or never
    opened, is not news."""
    a, b, c = _running(store, 3)
    with store.transaction():
        store.mark_started_many([AttemptStart(a, 1, 71, 1510), AttemptStart(b, 1, 72, 1520)])
        store.mark_started_many([])
        assert store.end_attempt(AttemptEnd(c, 1, Outcome.LOST, 1600))
    assert {(r.task_id, r.pid, r.started_at) for r in store.open_attempts()} == {
        (a, 71, 1510), (b, 72, 1520),
    }  # fmt: skip
    ends = [
        AttemptEnd(a, 1, Outcome.EXITED, 1900, exit_code=0, max_rss=2048, cpu_user=0.5),
        AttemptEnd(c, 1, Outcome.EXITED, 1900, exit_code=0),  # ended already
        AttemptEnd(b, 1, Outcome.SIGNALED, 1950, signal=9, error="killed"),
        AttemptEnd(b, 1, Outcome.EXITED, 1990, exit_code=1),  # the same, again
        AttemptEnd(a, 2, Outcome.EXITED, 1900),  # never opened
    ]
    with store.transaction():
        assert store.end_attempts(ends) == {(a, 1), (b, 1)}
        assert store.end_attempts(ends) == set()
        assert store.end_attempts([]) == set()
    found = store.attempts_of([a, b, c])
    got = [
        (r.outcome, r.exit_code, r.signal, r.error, r.ended_at, r.max_rss, r.cpu_user, r.pid)
        for task_id in (a, b, c)
        for r in found[task_id]
    ]
    assert got == [
        (Outcome.EXITED, 0, None, None, 1900, 2048, 0.5, 71),
        (Outcome.SIGNALED, None, 9, "killed", 1950, None, None, 72),
        (Outcome.LOST, None, None, None, 1600, None, None, None),
    ]
    assert store.open_attempts() == []


def test_claim_candidates_come_in_claim_order_and_say_when_they_are_all(store: Store) -> None:
    low = _submit(store, 2, priority=1)
    late = _submit(store, 1, priority=5, run_at=900)  # in the past: ready, run_at 900
    high = _submit(store, 1, priority=5)
    with store.transaction():
        found, complete = store.claim_candidates("default", 2, held=())
        rest, all_read = store.claim_candidates("default", 10, held={late[0]})
    assert [c.id for c in found] == [late[0], *high, low[0]] and not complete
    assert [c.id for c in rest] == [*high, *low] and all_read
    assert store.claim_candidates("elsewhere", 5, held=()) == ([], True)


def test_the_ready_and_due_counts(store: Store) -> None:
    _submit(store, 2, queue="a")
    (later,) = _submit(store, 1, run_at=50_000)
    (sooner,) = _submit(store, 1, run_at=20_000)
    with store.transaction():
        Lifecycle(store).claim({"a": 1}, 1, now=2000)
    assert store.ready_queues() == {"a"} and store.running_by_queue() == {"a": 1}
    assert store.oldest_queued() == {"a": 1000}
    assert store.next_due() == 20_000 and store.count_due(50_000) == 1
    assert store.due_ids(50_000, 10) == [sooner, later] and store.due_ids(19_999, 10) == []


def test_idempotency_keys_are_found_while_the_task_is_live_or_recent(store: Store) -> None:
    old, new = _submit(store, 2, key="k", key_fingerprint="f")
    with store.transaction():
        store.move(old, TaskState.QUEUED, TaskState.CANCELLED, 2000, finished_at=2000)
        store.move(new, TaskState.QUEUED, TaskState.CANCELLED, 3000, finished_at=3000)
    assert store.find_by_key("k", since=1000).id == new  # type: ignore[union-attr]
    assert store.find_by_key("k", since=3000).id == new  # type: ignore[union-attr]
    assert store.find_by_key("k", since=3001) is None
    assert store.find_by_key("other", since=0) is None
    (live,) = _submit(store, key="k", key_fingerprint="f")
    assert store.find_by_key("k", since=10**12).id == live  # type: ignore[union-attr]


def test_queues_are_made_on_first_use_and_changed_by_set(store: Store) -> None:
    assert [q.name for q in store.list_queues()] == ["default"]
    with store.transaction():
        store.ensure_queues({"b", "a"}, 1000)
        changed = store.set_queue("a", 1000, concurrency=2, paused=True, defaults={"retries": 3})
        store.set_queue("c", 1000)
    assert (changed.name, changed.concurrency, changed.paused) == ("a", 2, True)
    assert changed.defaults == {"retries": 3} and store.get_queue("a") == changed
    assert [q.name for q in store.list_queues()] == ["a", "b", "c", "default"]
    b = store.get_queue("b")
    assert b is not None and (b.concurrency, b.paused, b.defaults) == (None, False, {})
    assert store.get_queue("nowhere") is None


def _schedule(name: str | None, kind: str = "cron", next_due: int | None = 60_000) -> NewSchedule:
    return NewSchedule(name, kind, "* * * * *", None, "allow", "latest", '{"command": ["true"]}', next_due)  # fmt: skip


def test_schedules_are_added_found_changed_and_deleted(store: Store) -> None:
    with store.transaction():
        first = store.add_schedule(_schedule("nightly"), 1000)
        unnamed = store.add_schedule(_schedule(None, "trigger", None), 1000)
    assert (first.name, first.created_at, first.paused) == ("nightly", 1000, False)
    assert unnamed.name == f"trigger-{unnamed.id}"
    with pytest.raises(Conflict, match="nightly"), store.transaction():
        store.add_schedule(_schedule("nightly"), 2000)
    assert store.get_schedule("nightly") == first == store.get_schedule_by_id(first.id)
    assert store.list_schedules() == [first, unnamed] and store.list_schedules("trigger") == [
        unnamed
    ]
    assert store.schedule_names({first.id, unnamed.id}) == {
        first.id: "nightly",
        unnamed.id: unnamed.name,
    }
    assert store.due_schedules(59_999) == [] and store.due_schedules(60_000) == [first]
    assert store.next_schedule_due() == 60_000
    with store.transaction():
        store.update_schedule(first.id, paused=1, next_due=120_000)
    assert store.due_schedules(200_000) == [] and store.next_schedule_due() is None
    with store.transaction():
        store.record_fire(first.id, 60_000, 60_010, None, "fired")
        store.delete_schedule(first.id)
    assert store.get_schedule("nightly") is None and store.fires_of(first.id, 10) == []


def test_a_due_time_fires_once(store: Store) -> None:
    """`claim_fire` takes a (schedule, due time) once: a second claim (another node's, or a
    later turn's) gets False and changes nothing, and neither does a second `record_fire`;
    neither raises, so the rest of the loser's transaction stands."""
    with store.transaction():
        schedule = store.add_schedule(_schedule("every"), 1000)
    with store.transaction():
        assert not store.fire_exists(schedule.id, 60_000)
        assert store.claim_fire(schedule.id, 60_000, 60_010)
        (task_id,) = Lifecycle(store).submit(
            [NewTask(command=["true"], cwd="/", schedule_id=schedule.id, due_at=60_000)], 60_010
        )
        store.set_fire_task(schedule.id, 60_000, task_id, "fired")
    assert store.fire_exists(schedule.id, 60_000)
    with store.transaction():
        assert not store.claim_fire(schedule.id, 60_000, 60_020)
        store.record_fire(schedule.id, 60_000, 60_020, None, "error: late")
        (other,) = _submit(store)  # the rest of the turn commits
    assert [t.id for t in store.list_tasks(TaskFilter())] == [other, task_id]
    (fire,) = store.fires_of(schedule.id, 10)
    assert (fire.due_at, fire.fired_at, fire.task_id, fire.outcome, fire.task_state) == (
        60_000, 60_010, task_id, "fired", "queued",
    )  # fmt: skip
    assert store.latest_task_of(schedule.id) == (task_id, "queued")
    with store.transaction():  # a claim that rolls back leaves the due time free
        assert store.claim_fire(schedule.id, 120_000, 120_010)
        with store.savepoint():
            assert not store.claim_fire(schedule.id, 120_000, 120_010)
        store.set_fire_task(schedule.id, 120_000, None, "skipped: the previous run is still going")
    assert [(f.due_at, f.task_id, f.outcome) for f in store.fires_of(schedule.id, 10)] == [
        (120_000, None, "skipped: the previous run is still going"), (60_000, task_id, "fired"),
    ]  # fmt: skip
    with pytest.raises(ZeroDivisionError), store.transaction():
        assert store.claim_fire(schedule.id, 180_000, 180_010)
        1 / 0  # noqa: B018
    with store.transaction():
        assert store.claim_fire(schedule.id, 180_000, 180_020)


def test_removed_tasks_take_their_attempts_and_dependencies_with_them(store: Store) -> None:
    (done,) = _submit(store)
    with store.transaction():
        Lifecycle(store).claim({"default": 1}, 1, now=1500)
        store.move(done, TaskState.RUNNING, TaskState.SUCCEEDED, 2000, fence=1, finished_at=2000)
    (after,) = _submit(store, after=[done])
    assert store.prunable(cutoff=2001, keep=10, limit=10) == [(done, "default", "succeeded", 1)]
    with store.transaction():
        store.remove_tasks([done])
    assert store.get_task(done) is None and store.attempts_of([done]) == {done: []}
    assert store.deps_of([after]) == {after: ([], [])}


# -- moved from test_store.py: the first tests of the contract -----------------------------------


def test_move_is_conditional_on_the_current_state(store: Store) -> None:
    (task_id,) = _submit(store)
    with store.transaction():
        assert store.move(task_id, TaskState.QUEUED, TaskState.CANCELLED, 2000, reason="cancelled")
        assert not store.move(task_id, TaskState.QUEUED, TaskState.RUNNING, 2000)
    assert store.get_task(task_id).state is TaskState.CANCELLED  # type: ignore[union-attr]


def test_submit_ids_are_in_order_and_never_reused(store: Store) -> None:
    first = _submit(store, 3)
    assert first == [1, 2, 3]
    with store.transaction():
        store.remove_tasks([3])
    assert _submit(store, 2) == [4, 5]


def test_claim_takes_highest_priority_first_then_fifo(store: Store) -> None:
    low = _submit(store, 2, priority=1)
    high = _submit(store, 1, priority=5)
    with store.transaction():
        claim = Lifecycle(store).claim({"default": 10}, 2, now=3000)
    assert [t.id for t in claim.tasks] == [high[0], low[0]]
    assert all(t.state is TaskState.RUNNING and t.attempts == 1 for t in claim.tasks)
    assert claim.exhausted == set()
    with store.transaction():
        rest = Lifecycle(store).claim({"default": 10}, 10, now=3000)
    assert [t.id for t in rest.tasks] == [low[1]] and rest.exhausted == {"default"}


def test_claim_respects_per_queue_slots(store: Store) -> None:
    a = _submit(store, 3, queue="a")
    b = _submit(store, 3, queue="b")
    with store.transaction():
        claim = Lifecycle(store).claim({"a": 1, "b": 2}, 10, now=3000)
    assert sorted(t.id for t in claim.tasks) == sorted([a[0], *b[:2]])


def test_a_late_report_cannot_move_a_newer_attempt(store: Store) -> None:
    (task_id,) = _submit(store)
    with store.transaction():
        Lifecycle(store).claim({"default": 1}, 1, now=2000)
        store.end_attempt(AttemptEnd(task_id, 1, Outcome.EXITED, 2100, exit_code=1))
        assert store.move(task_id, TaskState.RUNNING, TaskState.QUEUED, 2100, fence=1)
        Lifecycle(store).claim({"default": 1}, 1, now=2200)
        # a duplicate report about attempt 1 arrives: the fence refuses it
        assert not store.move(task_id, TaskState.RUNNING, TaskState.FAILED, 2300, fence=1)
    task = store.get_task(task_id)
    assert task is not None and task.state is TaskState.RUNNING and task.attempts == 2


def test_events_are_published_after_commit_and_dropped_on_rollback(store: Store) -> None:
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


def test_writes_outside_a_transaction_are_refused(store: Store) -> None:
    with pytest.raises(RuntimeError, match="transaction"):
        Lifecycle(store).submit([NewTask(command=["true"], cwd="/")], now=1)


def test_a_queue_that_loses_the_global_slot_is_not_exhausted(store: Store) -> None:
    (older,) = _submit(store, 1, queue="a")
    (newer,) = _submit(store, 1, queue="b")
    with store.transaction():
        claim = Lifecycle(store).claim({"a": 1, "b": 1}, 1, now=3000)
    assert [t.id for t in claim.tasks] == [older]
    assert claim.exhausted == {"a"}  # b still has its task queued
    assert store.get_task(newer).state is TaskState.QUEUED  # type: ignore[union-attr]


def test_a_held_start_is_claimed_only_for_the_queueing_it_was_held_from(
    store: Store,
) -> None:
    """A supervisor's report of a held attempt claims the task when it is queued at the
    attempt before and was queued before that start; an old run (a journal's record from
    before the task was queued again) or a repeated report claims nothing."""
    held, retried = _submit(store, 2)  # queued at 1000
    with store.transaction():
        assert (
            Lifecycle(store).claim_attempt(held, 2, now=1500, started_at=1400) is None
        )  # not attempt 1
        claimed = Lifecycle(store).claim_attempt(held, 1, now=1500, started_at=1400)
        assert (
            Lifecycle(store).claim_attempt(held, 1, now=1600, started_at=1400) is None
        )  # already ran
        assert store.move(retried, TaskState.QUEUED, TaskState.CANCELLED, 2000)
        assert store.move(retried, TaskState.CANCELLED, TaskState.QUEUED, 3000)  # retried
        assert (
            Lifecycle(store).claim_attempt(retried, 1, now=3100, started_at=2500) is None
        )  # old run
        fresh = Lifecycle(store).claim_attempt(retried, 1, now=3100, started_at=3050)
        # an end is written once: a repeated report is not news
        assert store.end_attempt(AttemptEnd(held, 1, Outcome.EXITED, 1700, exit_code=0))
        assert not store.end_attempt(AttemptEnd(held, 1, Outcome.EXITED, 1800, exit_code=0))
    assert claimed is not None and claimed.state is TaskState.RUNNING and claimed.attempts == 1
    assert fresh is not None and fresh.attempts == 1


def test_a_held_start_claims_the_row_it_was_held_with(store: Store) -> None:
    """The dispatcher passes the row it held (unchanged since: any change takes the hold back);
    it is claimed as given, behind the same fences, without being read again."""
    (task_id,) = _submit(store, 1)  # queued at 1000
    with store.transaction():
        (row,) = store.peek_ready("default", 1, held=())
        assert (
            Lifecycle(store).claim_attempt(task_id, 1, now=1500, started_at=999, known=row) is None
        )
        claimed = Lifecycle(store).claim_attempt(task_id, 1, now=1500, started_at=1400, known=row)
    assert claimed is row and row.state is TaskState.RUNNING and (row.attempts, row.tries) == (1, 1)
    stored = store.get_task(task_id)
    assert stored is not None and stored.state is TaskState.RUNNING and stored.attempts == 1


def test_claim_passes_over_held_tasks(store: Store) -> None:
    first, second, third = _submit(store, 3)
    with store.transaction():
        ahead = store.peek_ready("default", 1, held=())
        claim = Lifecycle(store).claim({"default": 10}, 10, now=3000, held={first})
    assert [t.id for t in ahead] == [first] and ahead[0].state is TaskState.QUEUED
    assert [t.id for t in claim.tasks] == [second, third] and claim.exhausted == {"default"}
    with store.transaction():  # the held one is still queued: claimable once taken back
        assert [t.id for t in store.peek_ready("default", 5, held=())] == [first]


def test_a_staged_key_taken_meanwhile_gives_that_task_back_or_conflicts(
    store: Store,
) -> None:
    staged = [NewTask(command=["true"], cwd="/", key="k", key_fingerprint="f") for _ in range(1)]
    staged += [NewTask(command=["true"], cwd="/") for _ in range(3)]
    staging = _stage(store, staged)
    (meanwhile,) = _submit(store, key="k", key_fingerprint="f")
    with store.transaction():
        published = Lifecycle(store).publish_staged(staging, 2000, 0)
    store.drop_staging(staging)
    assert published.taken == {1: meanwhile}
    assert store.get_task(published.base + 1) is None  # not inserted: the key's task stands
    assert len(store.get_tasks([published.base + s for s in (2, 3, 4)])) == 3
    staging = _stage(store, [NewTask(command=["true"], cwd="/", key="k", key_fingerprint="g")] * 2)
    before = store.last_task_id()
    with pytest.raises(Conflict, match=f"task {meanwhile}"), store.transaction():
        Lifecycle(store).publish_staged(staging, 3000, 0)
    store.drop_staging(staging)
    assert store.last_task_id() == before


def test_a_staged_dependency_removed_meanwhile_publishes_nothing(store: Store) -> None:
    (dep,) = _submit(store)
    staging = _stage(store, [NewTask(command=["true"], cwd="/", after=[dep])] * 4)
    with store.transaction():
        store.remove_tasks([dep])
    with pytest.raises(InvalidRequest, match=str(dep)), store.transaction():
        Lifecycle(store).publish_staged(staging, 2000, 0)
    store.drop_staging(staging)
    assert store.list_tasks(TaskFilter()) == []


# -- the lifecycle on the store ------------------------------------------------------------------


@pytest.fixture
def lifecycle(store: Store) -> Lifecycle:
    return Lifecycle(store, jitter=lambda: 0.0)


def _run(lifecycle: Lifecycle, task_id: int, now: int) -> None:
    """Claim `task_id`, the only queued task."""
    with lifecycle.store.transaction():
        (task,) = lifecycle.claim({"default": 1}, 1, now).tasks
    assert task.id == task_id


def _end(lifecycle: Lifecycle, task_id: int, now: int, exit_code: int = 0, **kw: object) -> bool:
    """The running attempt of `task_id` exited with `exit_code`."""
    store = lifecycle.store
    task = store.get_task(task_id)
    assert task is not None
    end = AttemptEnd(task_id, task.attempts, Outcome.EXITED, now, exit_code=exit_code)
    with store.transaction():
        store.end_attempt(end)
        return lifecycle.finish(task, end, now, counts=bool(kw.get("counts", True)))


def test_a_new_task_starts_waiting_scheduled_or_queued(lifecycle: Lifecycle) -> None:
    store = lifecycle.store
    (dep,) = _submit(store)
    tasks = [
        NewTask(command=["true"], cwd="/"),
        NewTask(command=["true"], cwd="/", run_at=999),
        NewTask(command=["true"], cwd="/", run_at=1001),
        NewTask(command=["true"], cwd="/", run_at=1001, after=[dep]),
        NewTask(command=["true"], cwd="/", after_any=[dep]),
    ]
    with store.transaction():
        ids = lifecycle.submit(tasks, 1000)
    expected = [TaskState.QUEUED, TaskState.QUEUED, TaskState.SCHEDULED] + [TaskState.WAITING] * 2
    assert [_state(store, i) for i in ids] == expected
    assert [initial_state(t, 1000) for t in tasks] == expected
    assert [t.run_at for t in store.get_tasks(ids)] == [1000, 999, 1001, 1001, 1000]
    assert store.any_dependencies()


def test_a_staged_batch_starts_each_task_as_submit_would(lifecycle: Lifecycle) -> None:
    """The store applies `INITIAL` to a whole batch in one statement: the same states as the
    lifecycle's own rule, then its waiting tasks are settled the same way."""
    store = lifecycle.store
    (pending,) = _submit(store)
    (done,) = _submit(store)
    with store.transaction():
        store.move(done, TaskState.QUEUED, TaskState.CANCELLED, 1500, finished_at=1500)
    tasks = [
        NewTask(command=["true"], cwd="/"),
        NewTask(command=["true"], cwd="/", run_at=9000),
        NewTask(command=["true"], cwd="/", after=[pending]),
        NewTask(command=["true"], cwd="/", after_any=[done]),
        NewTask(command=["true"], cwd="/", after=[done]),
    ]
    staging = _stage(store, tasks)
    with store.transaction():
        batch = lifecycle.publish_staged(staging, 2000, 0)
        created = [e.to_state for e in store.events_after(0, 100) if e.task_id > batch.base]
    store.drop_staging(staging)
    ids = [batch.base + seq for seq in range(1, 6)]
    assert created[:5] == [initial_state(t, 2000) for t in tasks]
    assert [d.id for d in batch.dependent] == ids[2:]
    assert [_state(store, i) for i in ids] == [
        TaskState.QUEUED, TaskState.SCHEDULED, TaskState.WAITING, TaskState.QUEUED, TaskState.FAILED,
    ]  # fmt: skip
    dependent = _stage(store, tasks)
    assert not store.can_publish_apart(dependent)
    with pytest.raises(RuntimeError, match="dependencies"):
        lifecycle.publish_apart(dependent, 3000, 0)
    store.drop_staging(dependent)
    apart = _stage(store, tasks[:2])
    if store.can_publish_apart(apart):  # SQLite: no dependencies, so in a thread of its own
        assert not store.distributed
        published, span = lifecycle.publish_apart(apart, 3000, 0)
    else:  # a shared store publishes every batch in the caller's transaction
        assert store.distributed
        with store.transaction():
            published = lifecycle.publish_staged(apart, 3000, 0)
            (span,) = store.uncommitted_spans()
    store.drop_staging(apart)
    assert span.created == {("default", TaskState.QUEUED): 1, ("default", TaskState.SCHEDULED): 1}
    assert [_state(store, published.base + s) for s in (1, 2)] == [INITIAL.ready, INITIAL.delayed]


def test_dependencies_settle_as_the_tasks_they_wait_on_end(lifecycle: Lifecycle) -> None:
    store = lifecycle.store
    first, second = _submit(store, 2)
    (both,) = _submit(store, after=[first, second])
    (any_end,) = _submit(store, after_any=[first])
    (delayed,) = _submit(store, after=[first], run_at=50_000)
    assert {_state(store, i) for i in (both, any_end, delayed)} == {TaskState.WAITING}
    with store.transaction():
        (claimed,) = lifecycle.claim({"default": 1}, 1, 2000).tasks
    assert claimed.id == first
    assert _end(lifecycle, first, 3000, exit_code=1)  # failed: no retries left
    assert _state(store, any_end) is TaskState.QUEUED  # any end will do
    assert _state(store, both) is TaskState.FAILED and _state(store, delayed) is TaskState.FAILED
    task = store.get_task(both)
    assert task is not None and (task.reason, task.finished_at) == ("dependency_failed", 3000)
    (late,) = _submit(store, after_any=[second], run_at=50_000)
    with store.transaction():
        assert lifecycle.cancel(store.get_task(second), 4000)  # type: ignore[arg-type]
    assert _state(store, late) is TaskState.SCHEDULED  # its dependency ended, its time has not


def test_a_task_waits_until_every_dependency_succeeded(lifecycle: Lifecycle) -> None:
    store = lifecycle.store
    first, second = _submit(store, 2)
    (both,) = _submit(store, after=[first, second])
    for task_id, now in ((first, 2000), (second, 4000)):
        with store.transaction():
            (claimed,) = lifecycle.claim({"default": 1}, 1, now).tasks
        assert claimed.id == task_id and _end(lifecycle, task_id, now + 500)
        if task_id == first:
            assert _state(store, both) is TaskState.WAITING
    task = store.get_task(both)
    assert task is not None and (task.state, task.run_at) == (TaskState.QUEUED, 4500)


def test_a_dependency_that_ended_already_settles_its_task_at_submit(lifecycle: Lifecycle) -> None:
    store = lifecycle.store
    (cancelled,) = _submit(store)
    with store.transaction():
        assert lifecycle.cancel(store.get_task(cancelled), 1500)  # type: ignore[arg-type]
    (needs,) = _submit(store, after=[cancelled])
    (any_end,) = _submit(store, after_any=[cancelled])
    (later,) = _submit(store, after_any=[cancelled], run_at=9000)
    assert [_state(store, i) for i in (needs, any_end, later)] == [
        TaskState.FAILED, TaskState.QUEUED, TaskState.SCHEDULED,
    ]  # fmt: skip
    assert [e.to_state for e in store.events_after(0, 100) if e.task_id == needs] == [
        TaskState.WAITING, TaskState.FAILED,
    ]  # fmt: skip


@pytest.mark.parametrize("length", [2, 1500])
def test_a_failure_cascades_down_a_chain_of_any_length(lifecycle: Lifecycle, length: int) -> None:
    """Longer than Python's recursion limit: the cascade is worked through as a queue."""
    store = lifecycle.store
    with store.transaction():
        chain = lifecycle.submit([NewTask(command=["true"], cwd="/")], 1000)
        for _ in range(length - 1):
            chain += lifecycle.submit([NewTask(command=["true"], cwd="/", after=[chain[-1]])], 1000)
    (side,) = _submit(store, after_any=[chain[-1]])
    with store.transaction():
        assert lifecycle.cancel(store.get_task(chain[0]), 2000)  # type: ignore[arg-type]
    rows = store.get_tasks(chain[1:])
    assert {(t.state, t.reason, t.finished_at) for t in rows} == {
        (TaskState.FAILED, "dependency_failed", 2000)
    }
    assert _state(store, side) is TaskState.QUEUED  # the end of the chain ended: any end will do


def test_a_success_releases_only_the_next_link_of_a_chain(lifecycle: Lifecycle) -> None:
    store = lifecycle.store
    with store.transaction():
        chain = lifecycle.submit([NewTask(command=["true"], cwd="/")], 1000)
        for _ in range(3):
            chain += lifecycle.submit([NewTask(command=["true"], cwd="/", after=[chain[-1]])], 1000)
    _run(lifecycle, chain[0], 2000)
    assert _end(lifecycle, chain[0], 2500)
    assert [_state(store, i) for i in chain] == [
        TaskState.SUCCEEDED, TaskState.QUEUED, TaskState.WAITING, TaskState.WAITING,
    ]  # fmt: skip


def test_no_dependency_ever_means_none_is_looked_for(store: Store) -> None:
    assert not store.any_dependencies()
    _submit(store, 3)
    assert not store.any_dependencies()
    (first,) = _submit(store)
    _submit(store, after=[first])
    assert store.any_dependencies()


def test_due_tasks_are_promoted_a_batch_at_a_time(lifecycle: Lifecycle) -> None:
    store = lifecycle.store
    (soon,) = _submit(store, run_at=5000)
    many = _submit(store, PROMOTE_AT_MOST + 2, run_at=6000)
    with store.transaction():
        assert lifecycle.promote_due(4999) == 0
        assert lifecycle.promote_due(5000) == 1
    assert _state(store, soon) is TaskState.QUEUED
    with store.transaction():
        assert lifecycle.promote_due(6000) == PROMOTE_AT_MOST
        assert lifecycle.promote_due(6000) == 2
        assert lifecycle.promote_due(6000) == 0
    assert {_state(store, i) for i in many} == {TaskState.QUEUED}
    assert store.next_due() is None


def test_claims_take_every_queue_in_priority_then_fifo_order(lifecycle: Lifecycle) -> None:
    store = lifecycle.store
    (a,) = _submit(store, queue="a", priority=1)
    (b,) = _submit(store, queue="b", priority=5)
    (c,) = _submit(store, queue="c", priority=1, run_at=900)  # queued earlier than a
    (d,) = _submit(store, queue="a", priority=1)
    slots = {"a": 5, "b": 5, "c": 5}
    with store.transaction():
        first = lifecycle.claim(slots, 2, now=3000)
        second = lifecycle.claim(slots, 5, now=3000)
    assert [t.id for t in first.tasks] == [b, c] and first.exhausted == {"b", "c"}
    assert [t.id for t in second.tasks] == [a, d] and second.exhausted == {"a", "b", "c"}
    attempts = store.attempts_of([a, b])
    assert [(r.number, r.started_at) for r in attempts[a] + attempts[b]] == [(1, 3000)] * 2


def test_a_stray_start_is_recorded_on_a_cancelled_task_only(lifecycle: Lifecycle) -> None:
    store = lifecycle.store
    (task_id,) = _submit(store)
    with store.transaction():
        assert not lifecycle.record_stray_start(task_id, 1, pid=4242, started_at=1500)
        assert lifecycle.cancel(store.get_task(task_id), 1600)  # type: ignore[arg-type]
        assert lifecycle.record_stray_start(task_id, 1, pid=4242, started_at=1500)
        assert not lifecycle.record_stray_start(task_id, 1, pid=4242, started_at=1500)
    task = store.get_task(task_id)
    assert task is not None and (task.state, task.attempts) == (TaskState.CANCELLED, 1)
    assert [(a.number, a.pid, a.outcome) for a in store.attempts_of([task_id])[task_id]] == [
        (1, 4242, None)
    ]
    assert store.stray_attempts() == [(task_id, 1, "default")]


def test_ends_finished_together_each_follow_their_policy_and_settle_once(
    lifecycle: Lifecycle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`finish_many`: each end decided by its own task's retry policy as `finish` would, all
    moved at once, a stale one refused and the others moved; the dependents of those that
    became final settled after one look for any dependency."""
    store = lifecycle.store
    ok, failing, interrupted, stale = _submit(store, 4)
    (after_ok,) = _submit(store, after=[ok])
    (after_failing,) = _submit(store, after=[failing])
    (slow,) = _submit(store, retries=2, retry_delay=3.0)
    with store.transaction():
        claimed = {t.id: t for t in lifecycle.claim({"default": 9}, 9, 2000).tasks}
    assert set(claimed) == {ok, failing, interrupted, stale, slow}
    lost = AttemptEnd(stale, 1, Outcome.LOST, 2500)
    with store.transaction():  # `stale` ended already, as another node's rescue would end it
        assert store.end_attempt(lost)
        assert lifecycle.finish(claimed[stale], lost, 2500, counts=True)
    looks: list[bool] = []
    any_dependencies = store.any_dependencies

    def look() -> bool:
        looks.append(any_dependencies())
        return looks[-1]

    monkeypatch.setattr(store, "any_dependencies", look)
    endings = [
        Ending(claimed[ok], AttemptEnd(ok, 1, Outcome.EXITED, 3000, exit_code=0)),
        Ending(claimed[stale], AttemptEnd(stale, 1, Outcome.EXITED, 3000, exit_code=0)),
        Ending(claimed[failing], AttemptEnd(failing, 1, Outcome.EXITED, 3000, exit_code=2)),
        Ending(claimed[slow], AttemptEnd(slow, 1, Outcome.SIGNALED, 3000, signal=9)),
        Ending(claimed[interrupted], AttemptEnd(interrupted, 1, Outcome.INTERRUPTED, 3000), False),
    ]
    with store.transaction():
        assert lifecycle.finish_many(endings, 3000) == [True, False, True, True, True]
    assert looks == [True]
    rows = {t.id: t for t in store.get_tasks([ok, stale, failing, slow, interrupted])}
    assert [(rows[i].state, rows[i].finished_at) for i in (ok, failing)] == [
        (TaskState.SUCCEEDED, 3000), (TaskState.FAILED, 3000),
    ]  # fmt: skip
    assert rows[stale].state is TaskState.FAILED  # the rescue's end stands
    assert (rows[slow].state, rows[slow].run_at, rows[slow].tries) == (TaskState.SCHEDULED, 6000, 1)
    assert (rows[interrupted].state, rows[interrupted].tries) == (TaskState.QUEUED, 0)
    assert (_state(store, after_ok), _state(store, after_failing)) == (
        TaskState.QUEUED, TaskState.FAILED,
    )  # fmt: skip
    with store.transaction():
        assert lifecycle.finish_many([], 3000) == []
    assert looks == [True]  # nothing became final: no look


def test_an_attempt_end_follows_the_retry_policy_and_ignores_stale_reports(
    lifecycle: Lifecycle,
) -> None:
    store = lifecycle.store
    (task_id,) = _submit(store, retries=1, retry_delay=2.0)
    _run(lifecycle, task_id, 2000)
    assert _end(lifecycle, task_id, 3000, exit_code=1)
    task = store.get_task(task_id)
    assert task is not None and (task.state, task.run_at, task.tries) == (
        TaskState.SCHEDULED, 5000, 1,
    )  # fmt: skip
    with store.transaction():
        assert not lifecycle.finish(
            task, AttemptEnd(task_id, 1, Outcome.EXITED, 3100), 3100, counts=True
        )
        assert lifecycle.promote_due(5000) == 1
    _run(lifecycle, task_id, 5000)
    assert _end(lifecycle, task_id, 5500, exit_code=0, counts=False)  # interrupted: again
    task = store.get_task(task_id)
    assert task is not None and (task.state, task.tries, task.attempts) == (TaskState.QUEUED, 1, 2)
    with store.transaction():
        assert lifecycle.cancel(task, 6000)
        assert lifecycle.retry(store.get_task(task_id), 7000)  # type: ignore[arg-type]
    task = store.get_task(task_id)
    assert task is not None and (task.state, task.tries, task.finished_at) == (
        TaskState.QUEUED, 0, None,
    )  # fmt: skip
