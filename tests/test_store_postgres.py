"""The PostgreSQL store on its own: what only a shared store has (several nodes on one
database: racing claims, keys, fires and batches, commit-ordered events, NOTIFY, nodes and
their leases) and its connection (redacted URLs, a lost server, concurrent migrations). What
every backend must do is `test_store_contract.py`, which runs on PostgreSQL too.

Every store here is a node of its own on the tests' own throwaway cluster (`pg_url`); a test
that needs a lease to lapse ages the heartbeat in the database instead of waiting for it.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from taskctl.api import Outcome, TaskState
from taskctl.errors import TaskctlError
from taskctld.dispatcher import Dispatcher, Limits
from taskctld.launcher import Ended, Started
from taskctld.lifecycle import Lifecycle
from taskctld.store import AttemptEnd, EventRow, NewSchedule, NewTask, NodeStore, Store, TaskFilter
from taskctld.store.postgres import CHANNEL, MIGRATIONS, PostgresStore, notice_of, redact

from conftest import ScriptedRunner


@pytest.fixture
def nodes(pg_url: str) -> Iterator[Callable[..., PostgresStore]]:
    """Open nodes on one fresh database: `nodes("a")`, `nodes("b", lease_ms=...)`."""
    opened: list[PostgresStore] = []

    def open_node(name: str, **kw: Any) -> PostgresStore:
        store = PostgresStore(pg_url, node=name, **kw)
        opened.append(store)
        return store

    yield open_node
    for store in opened:
        store.close()


def _submit(store: Store, n: int = 1, now: int = 1000, **kw: Any) -> list[int]:
    fields = {"command": ["true"], "cwd": "/", **kw}
    with store.transaction():
        return Lifecycle(store).submit([NewTask(**fields) for _ in range(n)], now)


def _in_threads(*work: Callable[[], Any]) -> list[Any]:
    """Run each in a thread of its own, started together; their results (or raise the first
    error)."""
    results: list[Any] = [None] * len(work)
    errors: list[BaseException] = []
    start = threading.Barrier(len(work))

    def run(i: int) -> None:
        try:
            start.wait()
            results[i] = work[i]()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(work))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return results


def _admin(url: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    """A statement on a connection of the test's own (what no node would do)."""
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(sql, params)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


# -- the connection --------------------------------------------------------------------------------


def test_redact_keeps_where_the_store_is_and_drops_the_password() -> None:
    assert redact("postgresql://taskctl:s3cret@db.example:6543/jobs?sslmode=require") == (
        "postgresql://taskctl@db.example:6543/jobs"
    )
    assert redact("host=db user=u password=s3cret dbname=jobs") == "postgresql://u@db/jobs"
    assert "s3cret" not in redact("postgresql://u:s3cret@[")


def test_an_unreachable_store_says_so_without_its_password(pg_cluster: Any) -> None:
    url = f"postgresql://postgres:hunter2secret@127.0.0.1:{pg_cluster.port + 1}/nowhere"
    began = time.monotonic()
    with pytest.raises(TaskctlError, match="store unreachable") as caught:
        PostgresStore(url, node="a")
    assert "hunter2secret" not in caught.value.message
    assert "postgres@127.0.0.1" in caught.value.message
    assert time.monotonic() - began < 10
    # A URL that does not parse (a bare % in its password): libpq quotes the password.
    with pytest.raises(TaskctlError) as caught:
        PostgresStore("postgresql://postgres:s3cr%zzet@127.0.0.1:1/x", node="a")
    assert "s3cr" not in caught.value.message and "\n" not in caught.value.message


def test_a_lost_connection_fails_the_call_and_the_next_transaction_reconnects(
    nodes: Callable[..., PostgresStore], pg_url: str
) -> None:
    store = nodes("a")
    (task_id,) = _submit(store)
    pid = store.conn.info.backend_pid
    _admin(pg_url, "SELECT pg_terminate_backend(%s)", (pid,))
    with pytest.raises(TaskctlError, match="store unreachable"), store.transaction():
        store.move(task_id, TaskState.QUEUED, TaskState.CANCELLED, 2000)
    with store.transaction():  # a new connection
        assert store.move(task_id, TaskState.QUEUED, TaskState.CANCELLED, 2000)
    assert store.conn.info.backend_pid != pid
    assert store.get_task(task_id).state is TaskState.CANCELLED  # type: ignore[union-attr]
    assert store.conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_two_nodes_starting_at_once_on_a_new_database_both_open_it(pg_url: str) -> None:
    opened = _in_threads(*(lambda i=i: PostgresStore(pg_url, node=f"n{i}") for i in range(4)))
    try:
        assert {s.schema_version() for s in opened} == {len(MIGRATIONS)}
        assert [q.name for q in opened[0].list_queues()] == ["default"]  # made once
    finally:
        for s in opened:
            s.close()


def test_a_database_newer_than_the_code_is_refused(pg_url: str) -> None:
    PostgresStore(pg_url, node="a").close()
    _admin(pg_url, "UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(TaskctlError, match="newer than this taskctld") as caught:
        PostgresStore(pg_url, node="a")
    assert "postgres@127.0.0.1" in caught.value.message


def test_non_utf8_arguments_environment_and_directory_come_back_the_same(
    nodes: Callable[..., PostgresStore],
) -> None:
    store = nodes("a")
    cwd = b"/tmp/caf\xe9".decode("utf-8", "surrogateescape")
    argv = ["printf", b"\xff\xfe%s".decode("utf-8", "surrogateescape"), "é\x00"]
    env = {"LANG": "C", "X": b"\x80".decode("utf-8", "surrogateescape")}
    (task_id,) = _submit(store, command=argv, cwd=cwd, env=env, labels={"é": "ü"})
    task = store.get_task(task_id)
    assert task is not None and (task.cwd, task.command) == (cwd, argv)
    assert task.cwd.encode("utf-8", "surrogateescape") == b"/tmp/caf\xe9"
    assert store.env_of(task.env_id) == env
    assert [t.id for t in store.list_tasks(TaskFilter(labels={"é": "ü"}))] == [task_id]


# -- events in commit order, and NOTIFY ------------------------------------------------------------


def test_event_ids_follow_commit_order_across_nodes(
    nodes: Callable[..., PostgresStore],
) -> None:
    """A transaction that began first but commits last gets the later ids: a cursor taken
    between the commits misses nothing."""
    a, b = nodes("a"), nodes("b")
    (early,) = _submit(a)
    seen: list[list[EventRow]] = []
    a.on_commit(seen.append)
    with a.transaction():
        assert a.move(early, TaskState.QUEUED, TaskState.CANCELLED, 2000)
        assert [e.id for e in a.uncommitted_events()] == [0]  # given at the commit
        (late,) = _submit(b)  # b commits meanwhile
        cursor = b.last_event_id()
    assert [e.task_id for e in b.events_after(cursor, 10)] == [early]
    assert seen[0][0].id == cursor + 1 == a.last_event_id()
    assert [(e.task_id, e.to_state) for e in a.events_after(0, 10)] == [
        (early, TaskState.QUEUED), (late, TaskState.QUEUED), (early, TaskState.CANCELLED),
    ]  # fmt: skip


def test_a_reader_following_two_busy_nodes_never_skips_an_event(
    nodes: Callable[..., PostgresStore],
) -> None:
    writers = [nodes("a"), nodes("b")]
    reader = nodes("r")
    done = threading.Event()
    read: list[int] = []

    def write(store: PostgresStore) -> None:
        for _ in range(60):
            ids = _submit(store, 2)
            with store.transaction():
                store.move(ids[0], TaskState.QUEUED, TaskState.CANCELLED, 2000)

    def follow() -> None:
        cursor = 0
        while True:
            finished = done.is_set()
            page = reader.events_after(cursor, 1000)
            read.extend(e.id for e in page)
            cursor = page[-1].id if page else cursor
            if finished and not page:
                return

    follower = threading.Thread(target=follow)
    follower.start()
    _in_threads(*(lambda s=s: write(s) for s in writers))
    done.set()
    follower.join(60)
    stored = [e.id for e in reader.events_after(0, 10_000)]
    assert len(stored) == 2 * 60 * 3 and read == stored


def test_each_commit_notifies_its_last_event_and_queued_queues(
    nodes: Callable[..., PostgresStore], pg_url: str
) -> None:
    store = nodes("a")
    with psycopg.connect(pg_url, autocommit=True) as listener:
        listener.execute(f"LISTEN {CHANNEL}")
        (task_id,) = _submit(store, queue="q")
        with store.transaction():
            assert len(Lifecycle(store).claim({"q": 1}, 1, 2000).tasks) == 1
            store.request_stop(task_id, 1)
        with store.transaction():
            store.ensure_queues({"nothing-happens"}, 3000)  # no event, no notify
        got = [json.loads(n.payload) for n in listener.notifies(timeout=5, stop_after=2)]
    assert got == [
        {"node": "a", "last": 1, "queued": ["q"], "freed": [], "stop": [], "more": False},
        {"node": "a", "last": 2, "queued": [], "freed": [], "stop": [[task_id, 1]], "more": False},
    ]


def test_a_notice_too_big_for_notify_is_cut_and_says_more() -> None:
    queues = [f"queue-{i:05}" for i in range(2000)]
    head, tail = notice_of("a", queues, [], [(i, 1) for i in range(2000)])
    payload = json.loads(f"{head}123{tail}")
    assert len(f"{head}{2**62}{tail}".encode()) < 8000
    assert payload["more"] and payload["last"] == 123
    assert payload["queued"] == queues[: len(payload["queued"])] and payload["stop"]


# -- several nodes on one queue ----------------------------------------------------------------------


def _claim_all(store: PostgresStore, queue: str = "default") -> list[int]:
    """Claim from `queue`, 7 at a time, until a claim finds nothing."""
    mine: list[int] = []
    lifecycle = Lifecycle(store)
    while True:
        with store.transaction():
            claim = lifecycle.claim({queue: 7}, 7, 2000)
        if not claim.tasks:
            return mine
        mine += [t.id for t in claim.tasks]


def test_two_nodes_claiming_one_queue_never_get_the_same_task(
    nodes: Callable[..., PostgresStore],
) -> None:
    a, b = nodes("a"), nodes("b")
    ids = _submit(a, 200)
    got_a, got_b = _in_threads(lambda: _claim_all(a), lambda: _claim_all(b))
    assert not set(got_a) & set(got_b) and sorted(got_a + got_b) == ids
    assert len(got_a) == len(set(got_a)) and len(got_b) == len(set(got_b))
    assert a.running_by_queue() == {"default": len(got_a)}  # each node counts its own
    assert {x.task_id for x in b.open_attempts()} == set(got_b)


def test_a_queue_limit_holds_across_nodes(nodes: Callable[..., PostgresStore]) -> None:
    a, b = nodes("a"), nodes("b")
    with a.transaction():
        a.set_queue("gpu", 1000, concurrency=3)
    _submit(a, 10, queue="gpu")

    def claim(store: PostgresStore) -> int:
        with store.transaction():
            return len(Lifecycle(store).claim({"gpu": 5}, 5, 2000).tasks)

    assert sum(_in_threads(lambda: claim(a), lambda: claim(b))) == 3
    assert claim(a) + claim(b) == 0


def test_a_task_pinned_to_a_node_runs_only_there(nodes: Callable[..., PostgresStore]) -> None:
    a, b = nodes("a"), nodes("b")
    (pinned,) = _submit(a, node="b")
    assert _claim_all(a) == [] and a.ready_queues() == set()
    assert _claim_all(b) == [pinned]
    assert a.node_of(pinned) == "b"


def test_two_nodes_submitting_one_key_make_one_task(nodes: Callable[..., PostgresStore]) -> None:
    a, b = nodes("a"), nodes("b")
    first_looked = threading.Event()

    def submit(store: PostgresStore, first: bool) -> int:
        if not first:
            first_looked.wait(10)
        with store.transaction():
            found = store.find_by_key("nightly", since=0)
            if first:
                first_looked.set()
                time.sleep(0.3)  # the other node asks now, and must wait for this commit
            if found is not None:
                return found.id
            return Lifecycle(store).submit(
                [NewTask(command=["true"], cwd="/", key="nightly", key_fingerprint="f")], 1000
            )[0]

    one, other = _in_threads(lambda: submit(a, True), lambda: submit(b, False))
    assert one == other and [t.id for t in a.list_tasks(TaskFilter())] == [one]


def test_a_due_time_fires_on_one_node_only(nodes: Callable[..., PostgresStore]) -> None:
    a, b = nodes("a"), nodes("b")
    with a.transaction():
        schedule = a.add_schedule(
            NewSchedule("every", "cron", "* * * * *", None, "allow", "latest", "{}", 60_000),
            1000,
        )
    claimed = threading.Event()

    def fire(store: PostgresStore, first: bool) -> bool:
        if not first:
            claimed.wait(10)
        with store.transaction():
            won = store.claim_fire(schedule.id, 60_000, 60_001)
            if first:
                claimed.set()
                time.sleep(0.2)  # b's claim waits for this commit, then loses
            (task_id,) = _submit(store)  # the rest of the turn stands either way
            if won:
                store.set_fire_task(schedule.id, 60_000, task_id, "fired")
            return won

    assert _in_threads(lambda: fire(a, True), lambda: fire(b, False)) == [True, False]
    assert len(a.list_tasks(TaskFilter())) == 2
    assert [f.outcome for f in a.fires_of(schedule.id, 10)] == ["fired"]


def test_a_batch_gets_contiguous_ids_while_other_nodes_insert(
    nodes: Callable[..., PostgresStore],
) -> None:
    a, b = nodes("a"), nodes("b")
    staging = a.open_staging()
    a.stage(staging, 1, [NewTask(command=["batch"], cwd="/") for _ in range(300)])
    a.stage(staging, 301, [NewTask(command=["batch"], cwd="/") for _ in range(200)])
    stop = threading.Event()
    singles: list[int] = []

    def insert() -> None:
        while not stop.is_set():
            singles.extend(_submit(b))

    inserter = threading.Thread(target=insert)
    inserter.start()
    try:
        while len(singles) < 5:
            time.sleep(0.01)
        with a.transaction():
            batch = Lifecycle(a).publish_staged(staging, 2000, 0)
        after = len(singles)
        while len(singles) < after + 5:
            time.sleep(0.01)
    finally:
        stop.set()
        inserter.join(30)
    a.drop_staging(staging)
    ids = range(batch.base + 1, batch.base + 501)
    assert {t.command[0] for t in a.get_tasks(list(ids))} == {"batch"}
    assert len(a.get_tasks(list(ids))) == 500 and not set(ids) & set(singles)
    assert min(singles) < batch.base < max(singles)  # the others went on, before and after


# -- nodes and leases --------------------------------------------------------------------------------


def _age(url: str, node: str, ms: int) -> None:
    """Make a node's last heartbeat `ms` older (what a node that stopped beating looks like)."""
    _admin(url, "UPDATE nodes SET heartbeat_at = heartbeat_at - %s WHERE name = %s", (ms, node))


def test_nodes_join_beat_and_drain(nodes: Callable[..., PostgresStore]) -> None:
    a, b = nodes("a"), nodes("b")
    assert isinstance(a, NodeStore) and a.distributed
    assert not b.beat()  # never joined
    a.join("a", "1.2", slots=8, queues=None)
    b.join("b", "1.2", slots=2, queues=["gpu"])
    assert a.beat() and b.beat()
    rows = a.nodes()
    assert [(n.name, n.state, n.slots, n.queues, n.running) for n in rows] == [
        ("a", "up", 8, None, 0), ("b", "up", 2, ["gpu"], 0),
    ]  # fmt: skip
    assert all(0 <= n.age_ms < 5000 and n.heartbeat_at >= n.started_at for n in rows)
    _submit(a, 2)
    assert a.set_node_state("b", "draining")
    assert _claim_all(b) == []  # a node that is not up claims nothing
    b.join("b", "1.3", slots=2, queues=None)  # a restart keeps it draining
    assert [n.state for n in a.nodes()] == ["up", "draining"]
    assert a.set_node_state("b", "up") and len(_claim_all(b)) == 2
    assert not a.set_node_state("nobody", "up")
    with pytest.raises(ValueError, match="lost"):
        a.set_node_state("b", "lost")


def test_a_lapsed_node_is_taken_once_and_finds_itself_lost(
    nodes: Callable[..., PostgresStore], pg_url: str
) -> None:
    a, b, c = nodes("a"), nodes("b", lease_ms=30_000), nodes("c")
    for store in (a, b, c):
        store.join(store.node, "1", slots=4, queues=None)
    ids = _submit(a, 3)
    taken_by_b = _claim_all(b)
    assert sorted(taken_by_b) == ids and a.lapsed() == []
    _age(pg_url, "b", 29_000)
    assert a.lapsed() == []  # within its lease
    _age(pg_url, "b", 2_000)
    assert a.lapsed() == ["b"] and c.lapsed() == ["b"] and b.lapsed() == []  # not itself
    with a.transaction():
        lost = a.take_lost("b")
    with c.transaction():
        assert c.take_lost("b") == []  # a took it first
    assert sorted(x.task_id for x in lost) == ids and {x.node for x in lost} == {"b"}
    assert not b.beat()  # b learns it is lost
    assert [(n.name, n.state, n.running) for n in a.nodes()][1] == ("b", "lost", 3)
    assert not a.set_node_state("b", "up") and a.lapsed() == []
    b.join("b", "1", slots=4, queues=None)  # back, as a new start
    assert b.beat()
    # A drained node that is lost comes back drained.
    assert a.set_node_state("b", "draining")
    _age(pg_url, "b", 31_000)
    with a.transaction():
        a.take_lost("b")
    b.join("b", "1", slots=4, queues=None)
    assert [n.state for n in a.nodes()][1] == "draining"


def test_a_node_that_beats_in_time_is_not_taken(
    nodes: Callable[..., PostgresStore], pg_url: str
) -> None:
    a, b = nodes("a"), nodes("b")
    a.join("a", "1", slots=1, queues=None)
    b.join("b", "1", slots=1, queues=None)
    _age(pg_url, "b", 60_000)
    assert a.lapsed() == ["b"]
    assert b.beat()  # just in time
    with a.transaction():
        assert a.take_lost("b") == []
    assert [n.state for n in a.nodes()] == ["up", "up"]


# -- round trips -----------------------------------------------------------------------------------


def _turn_statements(store: PostgresStore, n: int, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The statements of the dispatcher turn that applies the starts and ends of `n` claimed
    attempts (and claims the next `n`), on a dispatcher wired as app.py wires it on a shared
    store (no holding ahead)."""
    sent: list[str] = []
    runner = ScriptedRunner()
    dispatcher = Dispatcher(store, runner, Limits(n), lifecycle=Lifecycle(store), hold_ahead=False)

    async def turns() -> None:
        dispatcher.load()
        ids = dispatcher.cycle(lambda now: dispatcher.lifecycle.submit(
            [NewTask(command=["true"], cwd="/") for _ in range(2 * n)], now
        ))  # fmt: skip
        assert ids is not None and runner.started() == ids[:n]
        for task_id in ids[:n]:
            dispatcher.report(Started(task_id, 1, pid=4242, started_at=2000))
            end = AttemptEnd(task_id, 1, Outcome.EXITED, 2500, exit_code=0, started_at=2000)
            dispatcher.report(Ended(end))
        execute = store._x
        monkeypatch.setattr(store, "_x", lambda sql, *a: sent.append(sql) or execute(sql, *a))
        dispatcher.cycle()
        monkeypatch.undo()
        assert runner.started() == ids
        assert {t.state for t in store.get_tasks(ids[:n])} == {TaskState.SUCCEEDED}

    asyncio.run(turns())
    return sent


def test_a_turn_applies_its_starts_and_ends_in_a_few_statements_whatever_their_number(
    nodes: Callable[..., PostgresStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reports of a turn are written set-based: the statements of a turn that applies 3
    starts and ends (and claims 3 more) are those of one that applies 30: BEGIN, the starts,
    the ends, their moves, a look for dependencies, the claim's candidates (with the queue's
    limit) and moves, the events and COMMIT (before: 4 a report pair, 126 for 30)."""
    few = _turn_statements(nodes("a"), 3, monkeypatch)
    many = _turn_statements(nodes("b"), 30, monkeypatch)
    assert few == many
    assert len(many) == 9, many


def test_a_dependent_that_two_nodes_released_at_once_is_settled_by_the_sweep(
    nodes: Callable[..., PostgresStore],
) -> None:
    """Y waits on X1 and X2; node a ends X1 while node b ends X2, both transactions open at
    once: each sees the other dependency still running, and neither queues Y. The sweep
    (`unsettled`, then `Lifecycle.settle`) finds it and queues it."""
    from taskctl.api import Outcome
    from taskctld.store import AttemptEnd

    a, b = nodes("a"), nodes("b")
    a.join("a", "x", 4, None)
    b.join("b", "x", 4, None)
    la, lb = Lifecycle(a), Lifecycle(b)
    with a.transaction():
        x1, x2 = la.submit([NewTask(command=["true"], cwd="/") for _ in range(2)], 1000)
        (y,) = la.submit([NewTask(command=["true"], cwd="/", after=[x1, x2])], 1000)
    with a.transaction():
        (t1,) = la.claim({"default": 1}, 1, 1001).tasks
    with b.transaction():
        (t2,) = lb.claim({"default": 1}, 1, 1001).tasks
    both = []
    for store, life, task in ((a, la, t1), (b, lb, t2)):
        opened = store.transaction()
        opened.__enter__()
        end = AttemptEnd(task.id, 1, Outcome.EXITED, ended_at=1002, exit_code=0)
        store.end_attempt(end)
        life.finish(task, end, 1002, counts=True)
        both.append(opened)
    for opened in both:
        opened.__exit__(None, None, None)
    assert a.state_of(y)[0] is TaskState.WAITING  # the race (PostgreSQL's READ COMMITTED)
    found = a.unsettled(10)
    assert [d.id for d in found] == [y]
    with a.transaction():
        la.settle(found, 1003)
    assert a.state_of(y)[0] is TaskState.QUEUED
    assert a.unsettled(10) == []


def test_a_claim_that_leaves_tasks_queued_says_so_for_the_nodes_that_passed_them_over(
    nodes: Callable[..., PostgresStore], pg_url: str
) -> None:
    """b's claim of one task also locks the next (to know whether more are queued); a claim
    of a's meanwhile passes over both and finds the queue empty. b's commit names the queue
    as queued, so a looks again instead of waiting for its poll."""
    a, b = nodes("a"), nodes("b")
    for store in (a, b):
        store.join(store.node, "x", 4, None)
    _submit(a, 2)
    with psycopg.connect(pg_url, autocommit=True) as listener:
        listener.execute(f"LISTEN {CHANNEL}")
        with b.transaction():
            assert len(Lifecycle(b).claim({"default": 1}, 1, 2000).tasks) == 1
            with a.transaction():
                claim = Lifecycle(a).claim({"default": 1}, 1, 2000)
            assert claim.tasks == [] and claim.exhausted == {"default"}
        got = [json.loads(n.payload) for n in listener.notifies(timeout=5, stop_after=1)]
    assert got[0]["node"] == "b" and got[0]["queued"] == ["default"]
    with a.transaction():
        assert len(Lifecycle(a).claim({"default": 1}, 1, 2001).tasks) == 1
