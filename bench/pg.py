"""Claims and finishes on PostgreSQL, taskctl's store against PgQueuer's queries, for `make bench`.

Both sides take the same number of no-op jobs from a database of their own on one throwaway
server (`tests/pgcluster.py`), `batch` at a time, with 1 or several consumers, each a process
of its own (no GIL shared) with one connection of its own, released together once all have
connected. Timed: from that release to the last consumer finding nothing left (the jobs are
inserted before, untimed).

taskctl's consumer runs what a dispatcher turn runs, in one transaction per turn: the
`ReportApplier` (`dispatcher/applier.py`) applies a Started and an Ended report for each task
claimed by the turn before (a batch of starts, then of ends and their moves), then the next
`batch` are claimed (`Lifecycle.claim`, as `dispatcher/loop.py` does). PgQueuer's consumer does what its
QueueManager does for jobs whose handler returns at once: `Queries.dequeue(batch)`, then one
`Queries.log_jobs` acknowledging them as successful.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests")]

import pgcluster  # noqa: E402

ENTRYPOINT = "noop"


def missing() -> str | None:
    """Why the PostgreSQL rows cannot run here, or None."""
    if pgcluster.server_bindir() is None:
        return f"no PostgreSQL server here: needs {pgcluster.INSTALL}"
    return None


def peer_missing() -> str | None:
    """Why the PgQueuer column cannot be measured here, or None."""
    try:
        import pgqueuer  # noqa: F401
    except ImportError:
        return "pgqueuer is not installed (pip install -e '.[bench]')"
    return None


@contextlib.contextmanager
def cluster() -> Iterator[pgcluster.Cluster]:
    """A throwaway PostgreSQL server of the bench's own (never the machine's databases)."""
    root = Path(tempfile.mkdtemp(prefix="pgb", dir="/tmp"))
    try:
        with pgcluster.running_cluster(root) as c:
            yield c
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -- taskctl's store -------------------------------------------------------------------------------


def fill_ours(url: str, n: int) -> None:
    """`n` queued tasks of `true` (the store's schema made first)."""
    from taskctld.lifecycle import Lifecycle
    from taskctld.store import NewTask
    from taskctld.store.postgres import PostgresStore

    store = PostgresStore(url, node="filler")
    lifecycle = Lifecycle(store)
    now = int(time.time() * 1000)
    for start in range(0, n, 5000):
        with store.transaction():
            lifecycle.submit(
                [NewTask(command=["true"], cwd="/tmp") for _ in range(min(5000, n - start))], now
            )
    store.close()


def _consume_ours(url: str, node: str, batch: int, go: Barrier, done: Any) -> None:
    """One node's turns until a claim finds nothing; puts (tasks finished, monotonic end)."""
    from typing import cast

    from taskctl.api import Outcome
    from taskctld.dispatcher.applier import ReportApplier
    from taskctld.dispatcher.slots import Slots
    from taskctld.launcher import Ended, Launcher, Report, Started
    from taskctld.lifecycle import Lifecycle
    from taskctld.store import AttemptEnd, TaskRow
    from taskctld.store.postgres import PostgresStore

    store = PostgresStore(url, node=node)
    lifecycle = Lifecycle(store)
    slots = Slots()
    # Reports of attempts we claimed never reach the launcher (it stops strays only).
    applier = ReportApplier(store, lifecycle, cast(Launcher, None), slots, None)
    running: list[TaskRow] = []
    finished = 0
    go.wait()
    while True:
        now = int(time.time() * 1000)
        reports: list[Report] = []
        for task in running:  # what the supervisor reports of a task that ran
            reports.append(Started(task.id, task.attempts, pid=1, started_at=now))
            end = AttemptEnd(
                task.id, task.attempts, Outcome.EXITED, now, exit_code=0, max_rss=1024,
                cpu_user=0.0, cpu_system=0.0, started_at=now,
            )  # fmt: skip
            reports.append(Ended(end))
        with store.transaction():
            applier.apply(reports, now)
            running = lifecycle.claim({"default": batch}, batch, now).tasks
            for task in running:
                slots.claimed(task)
        finished += len(applier.take_ends())
        if not running:
            break
    done.put((finished, time.monotonic()))
    store.close()


# -- PgQueuer ------------------------------------------------------------------------------------


def fill_peer(url: str, n: int) -> None:
    """PgQueuer's schema, then `n` no-op jobs (enqueued in batches, as a producer would)."""

    async def fill() -> None:
        import psycopg
        from pgqueuer.queries import Queries

        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            queries = Queries.from_psycopg_connection(conn)
            await queries.install()
            for start in range(0, n, 5000):
                k = min(5000, n - start)
                await queries.enqueue([ENTRYPOINT] * k, [None] * k, [0] * k)

    asyncio.run(fill())


def _consume_peer(url: str, batch: int, go: Barrier, done: Any) -> None:
    """One PgQueuer consumer until a dequeue finds nothing; puts (jobs acked, monotonic end)."""

    async def consume() -> int:
        import psycopg
        from pgqueuer.queries import EntrypointExecutionParameter, Queries
        from pgqueuer.types import QueueEntrypoint, QueueManagerId

        acked = 0
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            queries = Queries.from_psycopg_connection(conn)
            entrypoints = {QueueEntrypoint(ENTRYPOINT): EntrypointExecutionParameter(0)}
            manager = QueueManagerId(uuid.uuid4())
            go.wait()
            while jobs := await queries.dequeue(
                batch_size=batch,
                entrypoints=entrypoints,
                queue_manager_id=manager,
                global_concurrency_limit=None,
                heartbeat_timeout=timedelta(seconds=30),
            ):
                await queries.log_jobs([(job, "successful", None) for job in jobs])
                acked += len(jobs)
        return acked

    acked = asyncio.run(consume())
    done.put((acked, time.monotonic()))


# -- the measure ---------------------------------------------------------------------------------


def _race(workers: list[Callable[[Barrier, Any], None]], n: int) -> float:
    """Start each worker in a process of its own; release them together once all are ready
    (connected, at the barrier); jobs per second from the release to the last one done.
    Checks that they took `n` in all."""
    ctx = multiprocessing.get_context("fork")
    go, done = ctx.Barrier(len(workers) + 1), ctx.Queue()
    procs = [ctx.Process(target=w, args=(go, done)) for w in workers]
    for p in procs:
        p.start()
    go.wait(timeout=60)
    start = time.monotonic()
    results = [done.get(timeout=300) for _ in procs]
    for p in procs:
        p.join()
    took = max(end for _, end in results) - start
    total = sum(count for count, _ in results)
    if total != n:
        raise RuntimeError(f"the consumers finished {total} of {n}")
    return n / took


def ours(c: pgcluster.Cluster, n: int, batch: int, consumers: int) -> float:
    """Tasks per second of `consumers` taskctl nodes claiming and finishing `n` tasks."""
    url = c.new_database()
    fill_ours(url, n)
    return _race([_bind(_consume_ours, url, f"n{i}", batch) for i in range(consumers)], n)


def peer(c: pgcluster.Cluster, n: int, batch: int, consumers: int) -> float:
    """Jobs per second of `consumers` PgQueuer consumers dequeuing and acking `n` jobs."""
    url = c.new_database()
    fill_peer(url, n)
    return _race([_bind(_consume_peer, url, batch) for _ in range(consumers)], n)


def _bind(fn: Callable[..., None], *args: Any) -> Callable[[Barrier, Any], None]:
    def run(go: Barrier, done: Any) -> None:
        fn(*args, go, done)

    return run
