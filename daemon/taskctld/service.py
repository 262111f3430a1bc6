"""The daemon's use cases: submit, read, cancel, wait, logs, health. The HTTP layer adapts to and
from this; the dispatcher and runner do the work behind it.

Every method either completes or raises a `TaskctlError` having changed nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from taskctl import API_VERSION, DEFAULT_QUEUE, __version__
from taskctl.api import FINAL_STATES, QueueSettings, ScheduleSpec, TaskSpec, TaskState
from taskctl.errors import Conflict, InvalidRequest, NotFound, StorageFull, TaskctlError
from taskctl.paths import Paths
from taskctl.units import ms_to_rfc3339, now_ms
from taskctl.wire import to_wire
from taskctld import scheduler
from taskctld.config import Config
from taskctld.dispatcher import Dispatcher
from taskctld.events import EventHub
from taskctld.metrics import Metrics
from taskctld.runner import Runner
from taskctld.scheduler import Scheduler, Triggers
from taskctld.store import (
    AttemptEnd,
    AttemptRow,
    NewSchedule,
    NewTask,
    QueueRow,
    ScheduleRow,
    StagedBatch,
    Store,
    TaskFilter,
    TaskRow,
)
from taskctld.views import task_view

log = logging.getLogger("taskctld.service")

MAX_ARG_STRLEN = 131072  # Linux: the longest single argument or environment string
PRUNE_BATCH = 2000  # tasks per transaction when pruning
Place = tuple[str, QueueRow | None]  # a task's working directory and its queue's row
UNHOLD_ANSWER_TIMEOUT = 5.0  # seconds a cancel waits to hear whether a held task had started


@dataclass
class Submitted:
    task_id: int
    deduplicated: bool


@dataclass
class Published:
    """A staged batch's tasks in the order given, told without one object each: task `index`
    is in `dups` when its key gave back another task (an id, or -seq: an earlier task of the
    batch), else it is the next staged row `seq`, which became task `base + seq` unless its key
    was `taken` meanwhile (seq -> the task that holds it)."""

    count: int
    base: int = 0
    dups: dict[int, int] = field(default_factory=dict)
    taken: dict[int, int] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Submitted]:
        seq = 0
        for index in range(self.count):
            ref = self.dups.get(index)
            if ref is not None and ref > 0:
                yield Submitted(ref, True)
                continue
            if ref is None:
                seq += 1
            own = seq if ref is None else -ref
            if own in self.taken:
                yield Submitted(self.taken[own], True)
            else:
                yield Submitted(self.base + own, ref is not None)


@dataclass
class Service:
    store: Store
    dispatcher: Dispatcher
    runner: Runner
    hub: EventHub
    config: Config
    paths: Paths
    started_monotonic: float
    shutdown: asyncio.Event
    scheduler: Scheduler = field(init=False)
    triggers: Triggers = field(init=False)
    metrics: Metrics = field(init=False)
    stop_mode: str = "leave"
    stop_timeout: float | None = None
    watchers: int = 0  # connected event streams
    followers: int = 0  # connected `logs --follow` streams
    pruning: asyncio.Lock = field(init=False, default_factory=asyncio.Lock)
    _ends: dict[tuple[int, int], asyncio.Event] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.scheduler = Scheduler(
            self.store,
            self.build_from_template,
            self.paths.state / "changes",
            lifecycle=self.dispatcher.lifecycle,
        )
        self.dispatcher.scheduler = self.scheduler
        self.triggers = Triggers(self._on_burst)
        self.metrics = Metrics(self.store, self.paths.database, self.started_monotonic)
        self.metrics.load()
        self.store.on_commit(self.metrics.on_events, self.metrics.on_span)
        self.dispatcher.on_attempt_end.append(
            lambda end: self.metrics.on_attempt_end(end, end.started_at)
        )
        self.dispatcher.on_attempt_end.append(self._note_end)
        self.scheduler.on_fire.append(self.metrics.on_fire)
        self.dispatcher.accepting = not self.config.hold

    def arm_triggers(self) -> None:
        """Watch every active trigger (at start-up: triggers persist)."""
        for schedule in self.store.list_schedules("trigger"):
            if not schedule.paused:
                self.triggers.arm(schedule)

    def _on_burst(self, schedule_id: int, changed: list[str]) -> None:
        self.dispatcher.cycle(lambda now: self.scheduler.fire_trigger(schedule_id, changed, now))

    # -- stopping -------------------------------------------------------------------------------

    def request_stop(self, mode: str, timeout: float | None) -> None:
        self.stop_mode, self.stop_timeout = mode, timeout
        self.shutdown.set()

    async def wind_down(self) -> None:
        """What a stop does before the daemon exits, by mode: `leave` nothing (tasks go on
        under their supervisor), `drain` wait for running tasks, `kill` interrupt them (they
        are queued again) and wait for that. Nothing new starts meanwhile."""
        self.dispatcher.stop_accepting()
        if self.stop_mode == "leave":
            return
        if self.stop_mode == "kill":
            self.runner.interrupt_all()
        deadline = None if self.stop_timeout is None else time.monotonic() + self.stop_timeout
        while self.dispatcher.running_count() > 0:
            if deadline is not None and time.monotonic() > deadline:
                log.warning(
                    "stop: %d task(s) still running; left to the next daemon",
                    self.dispatcher.running_count(),
                )
                return
            await asyncio.sleep(0.05)  # only while stopping

    # -- submit ---------------------------------------------------------------------------------

    def submit(self, specs: Sequence[TaskSpec]) -> list[Submitted]:
        """Validate every spec, then insert all of them in one transaction (all or none).
        The ids are returned only after the commit: an acknowledged task is durable.

        A spec with an idempotency key that matches a task not final, or finished within
        `key_retention`, gives that task back (deduplicated) instead of a new one; the same
        key with a different command or options is a Conflict."""
        return self.insert(self.resolve_all(specs, self.places(specs)))

    def places(
        self,
        specs: Sequence[TaskSpec],
        known: dict[tuple[str | None, str], Place] | None = None,
        first: int = 0,
    ) -> dict[tuple[str | None, str], Place]:
        """Each distinct (cwd, queue) of the specs, checked once: both must exist. A fault
        that every spec shares names no task; one of a few names the first task it hits.
        `known`: places checked already (added to); `first`: the index of specs[0] in the
        batch, when these are a later chunk of one."""
        places = {} if known is None else known
        if not places and len({(spec.cwd, spec.queue) for spec in specs}) == 1:
            places[(specs[0].cwd, specs[0].queue)] = self._where_it_runs(specs[0], check=True)
        for index, spec in enumerate(specs, start=first):
            if (spec.cwd, spec.queue) not in places:
                with _naming_task(index, 2 if first else len(specs)):
                    places[(spec.cwd, spec.queue)] = self._where_it_runs(spec, check=True)
        return places

    def resolve_all(
        self,
        specs: Sequence[TaskSpec],
        places: dict[tuple[str | None, str], Place],
        first: int = 0,
    ) -> list[NewTask]:
        """`resolve` for each spec, with its place checked already by `places`. Touches no
        store, so a big batch can be resolved in a thread. `first`: as for `places`."""
        now = now_ms()
        tasks = []
        for index, spec in enumerate(specs, start=first):
            with _naming_task(index, 2 if first else len(specs)):
                tasks.append(self.resolve(spec, now, place=places[(spec.cwd, spec.queue)]))
        return tasks

    async def submit_staged(self, chunks: AsyncIterator[list[TaskSpec]]) -> Published:
        """A big batch, all or none, without holding the event loop or the whole batch: each
        chunk is checked, resolved and staged (other requests run in between), then one short
        transaction publishes every staged task. Keys are checked per chunk against the store
        and the batch's own keys (kept in memory, nothing else is), and once more when
        publishing. Raises as `submit` does, the failing task named by its place in the
        batch; nothing is stored then."""
        staging = self.store.open_staging()
        try:
            published = Published(0)
            holders: dict[str, tuple[str | None, int]] = {}  # key -> (fingerprint, id or -seq)
            places: dict[tuple[str | None, str], Place] = {}
            seq = 0
            async for specs in chunks:
                first = published.count
                self.places(specs, places, first)
                tasks = await asyncio.to_thread(self.resolve_all, specs, places, first)
                fresh = self._fresh_of(tasks, first, holders, published.dups, seq)
                self.store.stage(staging, seq + 1, fresh)
                seq += len(fresh)
                published.count += len(specs)
                await asyncio.sleep(0)  # let other requests in between chunks
            began = time.monotonic()
            done = await self._publish(staging)
            log.info("a batch of %d published in %.3fs", seq, time.monotonic() - began)
            await asyncio.to_thread(self.store.checkpoint_apart)
            published.base, published.taken = done.base, done.taken
            return published
        finally:
            self.store.drop_staging(staging)

    async def _publish(self, staging: str) -> StagedBatch:
        """Publish a staged batch in one transaction. Without dependencies, in a thread on a
        connection of its own: requests that only read are answered meanwhile (100,000 tasks
        take 0.3 to 0.8 s to insert, by load). With them, in the dispatcher's cycle, which
        settles them in the same transaction."""
        retention = int(self.config.key_retention * 1000)
        if not self.store.can_publish_apart(staging):
            cycled = self.dispatcher.cycle(
                lambda now: self.dispatcher.lifecycle.publish_staged(staging, now, now - retention)
            )
            assert cycled is not None
            return cycled
        now = now_ms()
        done, span = await asyncio.to_thread(
            self.dispatcher.lifecycle.publish_apart, staging, now, now - retention
        )
        self.store.announce(span)
        self.dispatcher.wake()
        return done

    def _fresh_of(
        self,
        tasks: list[NewTask],
        first: int,
        holders: dict[str, tuple[str | None, int]],
        dups: dict[int, int],
        seq: int,
    ) -> list[NewTask]:
        """The tasks to stage, numbered on from `seq`; a task whose key a stored task or an
        earlier task of the batch holds is noted in `dups` instead (Conflict if the request
        differs), as `_insert_unless_known` does."""
        since = now_ms() - int(self.config.key_retention * 1000)
        fresh = []
        for index, task in enumerate(tasks, start=first):
            holder = self._key_holder(task, holders, since)
            if holder is not None:
                dups[index] = holder
                continue
            fresh.append(task)
            if task.key is not None:
                holders[task.key] = (task.key_fingerprint, -(seq + len(fresh)))
        return fresh

    def _key_holder(
        self, task: NewTask, holders: dict[str, tuple[str | None, int]], since: int
    ) -> int | None:
        """The task that holds `task`'s key (found in the store, or in `holders`: the batch's
        own keys, with a task id or a negative reference into the batch), None if no task
        does. Conflict when that task was submitted with a different command or options."""
        key = task.key
        if key is None:
            return None
        if key not in holders:
            found = self.store.find_by_key(key, since)
            if found is None:
                return None
            holders[key] = (found.key_fingerprint, found.id)
        fingerprint, holder = holders[key]
        if fingerprint != task.key_fingerprint:
            owner = f"task {holder}" if holder > 0 else "another task of this batch"
            raise Conflict(
                f"idempotency key {key!r} belongs to {owner}, submitted with a different "
                "command or options"
            )
        return holder

    def insert(self, tasks: list[NewTask]) -> list[Submitted]:
        """Resolved tasks into the store in one transaction (all or none)."""
        result = self.dispatcher.cycle(lambda now: self._insert_unless_known(tasks, now))
        assert result is not None
        return result

    def _insert_unless_known(self, tasks: list[NewTask], now: int) -> list[Submitted]:
        """Insert the tasks whose key (if any) is new; a key seen before, in the store or
        earlier in the same batch, gives back its task if the request is the same one."""
        since = now - int(self.config.key_retention * 1000)
        holders: dict[str, tuple[str | None, int]] = {}  # key -> (fingerprint, id or -1-index)
        fresh: list[NewTask] = []
        plan: list[tuple[int, bool]] = []  # (id, or -1-index into fresh; deduplicated)
        for task in tasks:
            holder = self._key_holder(task, holders, since)
            if holder is not None:
                plan.append((holder, True))
                continue
            plan.append((-1 - len(fresh), False))
            if task.key is not None:
                holders[task.key] = (task.key_fingerprint, -1 - len(fresh))
            fresh.append(task)
        ids = self.dispatcher.lifecycle.submit(fresh, now) if fresh else []
        return [Submitted(ref if ref > 0 else ids[-1 - ref], dedup) for ref, dedup in plan]

    def resolve(
        self, spec: TaskSpec, now: int, *, fired: bool = False, place: Place | None = None
    ) -> NewTask:
        """A spec with every default filled in and every check done (checks that need the
        machine: cwd exists, argv fits execve; and its queue exists). A task `fired` by a
        schedule skips the cwd and queue checks, made when the schedule was added: a directory
        that vanished since shows as the task's spawn error, not as a lost fire. `place`: its
        cwd and queue, checked already."""
        cwd, queue = place or self._where_it_runs(spec, check=not fired)
        if spec.shell and len(spec.command) != 1:
            raise InvalidRequest("with shell=true, command must be one string for `sh -c`")
        _check_exec_size(spec.command, spec.env)
        run_at = None
        if spec.run_at is not None:
            run_at = int(spec.run_at.timestamp() * 1000)
        elif spec.delay:
            run_at = now + int(spec.delay * 1000)
        c = self.config
        q = queue.defaults if queue else {}
        return NewTask(
            command=spec.command,
            cwd=cwd,
            queue=spec.queue,
            name=spec.name,
            shell=spec.shell,
            priority=spec.priority,
            env=spec.env,
            labels=spec.labels,
            retries=_first(spec.retries, q.get("retries"), c.retries),
            backoff=str(_first(spec.backoff, q.get("backoff"), c.backoff)),
            retry_delay=_first(spec.retry_delay, q.get("retry_delay"), c.retry_delay),
            max_delay=_first(spec.max_delay, q.get("max_delay"), c.max_delay),
            retry_on=spec.retry_on,
            no_retry_on=spec.no_retry_on,
            timeout=_first(spec.timeout, q.get("timeout"), None) or None,  # 0: no timeout
            kill_grace=_first(spec.kill_grace, q.get("kill_grace"), c.kill_grace),
            memory_limit=spec.memory_limit,
            run_at=run_at,
            key=spec.key,
            key_fingerprint=spec.fingerprint() if spec.key else None,
            after=spec.after,
            after_any=spec.after_any,
        )

    def _where_it_runs(self, spec: TaskSpec, *, check: bool) -> Place:
        """The task's working directory and queue; with `check`, both must exist."""
        cwd = spec.cwd or os.path.expanduser("~")
        queue = self.store.get_queue(spec.queue)
        if check:
            _check_cwd(cwd)
            if queue is None:
                self._unknown_queue(spec.queue)
        return cwd, queue

    def _unknown_queue(self, name: str) -> NoReturn:
        """A typo must not make a queue free of its limits and pause: queues are created only
        by `queue set`."""
        known = ", ".join(q.name for q in self.store.list_queues())
        raise InvalidRequest(
            f"no queue named {name!r} (queues: {known}); create it with `taskctl queue set {name}`"
        )

    # -- reads ----------------------------------------------------------------------------------

    def task(self, task_id: int) -> TaskRow:
        task = self.store.get_task(task_id)
        if task is None:
            raise NotFound(f"no task {task_id}")
        return task

    def views(self, tasks: list[TaskRow], *, show_env: bool = False) -> list[dict[str, Any]]:
        ids = [t.id for t in tasks]
        attempts, deps = self.store.attempts_of(ids), self.store.deps_of(ids)
        names = self.store.schedule_names({t.schedule_id for t in tasks if t.schedule_id})
        return [
            task_view(
                t, attempts[t.id], deps=deps[t.id], schedule=names.get(t.schedule_id or 0),
                env=self._env_for_view(t) if show_env else None,
            )
            for t in tasks
        ]  # fmt: skip

    def _env_for_view(self, task: TaskRow) -> dict[str, str]:
        env = self.store.env_of(task.env_id)
        return dict(env) if env is not None else {}

    def list_tasks(self, where: TaskFilter) -> list[TaskRow]:
        return self.store.list_tasks(where)

    def count_tasks(self, where: TaskFilter) -> int:
        return self.store.count_tasks(where)

    # -- cancel and wait ------------------------------------------------------------------------

    async def cancel(self, task_id: int) -> TaskRow:
        """Cancel a task that is not final. A running one is stopped (its whole process tree,
        SIGTERM then SIGKILL after its grace) and this returns once it has ended."""
        task = self.task(task_id)
        if task.state in FINAL_STATES:
            raise Conflict(f"task {task_id} is already {task.state.value}")
        if task.state is TaskState.RUNNING:
            attempt, limit = task.attempts, task.kill_grace + 10
            # Its supervisor ignores the cancel if the command has exited already (its end is
            # on the way, and the retry policy may queue it again): either way, wait for this
            # attempt to end, then cancel the task in whatever state it is in then.
            self.runner.stop(task.id, attempt, "cancel")
            if not await self._attempt_ended(task_id, attempt, limit):
                raise Conflict(f"task {task_id} did not stop within {limit:.0f}s")
            task = self.task(task_id)
            return task if task.state in FINAL_STATES else await self.cancel(task_id)

        def cancel_now(now: int) -> bool:
            return self.dispatcher.lifecycle.cancel(task, now)

        held = self.dispatcher.hold_settled(task_id)  # held: it may start as we cancel
        if not self.dispatcher.cycle(cancel_now):  # it changed state meanwhile: try again
            return await self.cancel(task_id)
        if held is not None:
            await self._settle_held_cancel(task_id, task.attempts + 1, held)
        return self.task(task_id)

    async def _settle_held_cancel(
        self, task_id: int, attempt: int, held: asyncio.Future[bool]
    ) -> None:
        """A held task was cancelled: answer once its supervisor has said it cannot start any
        more, and, if it had started, once that attempt (stopped, on the record) has ended."""
        try:
            if await asyncio.wait_for(asyncio.shield(held), UNHOLD_ANSWER_TIMEOUT):
                return
        except TimeoutError:
            log.warning("no answer about held task %d; cancelled without it", task_id)
            return
        open_attempt = any(
            a.number == attempt and a.outcome is None
            for a in self.store.attempts_of([task_id])[task_id]
        )
        if open_attempt:  # no await since the check: its end cannot slip past the waiter
            ended = self._ends[(task_id, attempt)] = asyncio.Event()
            try:
                await asyncio.wait_for(ended.wait(), self.task(task_id).kill_grace + 10)
            except TimeoutError:
                log.warning("task %d: its stray attempt did not end in time", task_id)
            finally:
                self._ends.pop((task_id, attempt), None)

    def _note_end(self, end: AttemptEnd) -> None:
        ended = self._ends.get((end.task_id, end.attempt))
        if ended is not None:
            ended.set()

    async def _attempt_ended(self, task_id: int, attempt: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while (t := self.task(task_id)).state is TaskState.RUNNING and t.attempts == attempt:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await self.hub.wait_change(task_id, left)
        return True

    def retry(self, task_id: int) -> TaskRow:
        """Queue a finished task again as a new attempt. Its history stays; its retry policy
        starts afresh (the retries count from this attempt on)."""
        task = self.task(task_id)
        if task.state not in FINAL_STATES:
            raise Conflict(
                f"task {task_id} is {task.state.value}; only a finished task can be retried"
            )

        def requeue(now: int) -> bool:
            return self.dispatcher.lifecycle.retry(task, now)

        if not self.dispatcher.cycle(requeue):
            raise Conflict(f"task {task_id} changed state meanwhile; try again")
        return self.task(task_id)

    async def wait_started(self, task_id: int) -> TaskRow:
        """The task once it has an attempt, or once it is final without one."""
        while True:
            task = self.task(task_id)
            if task.attempts or task.state in FINAL_STATES:
                return task
            await self.hub.wait_change(task_id, 60)

    async def wait_final(self, task_id: int, timeout: float | None) -> TaskRow:
        """The task once it is final, or as it is when `timeout` seconds have passed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            task = self.task(task_id)
            if task.state in FINAL_STATES:
                return task
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return task
            await self.hub.wait_final(task_id, left)

    # -- logs -----------------------------------------------------------------------------------

    def log_path(self, task: TaskRow, attempt: int | None, stream: str) -> tuple[int, Path]:
        """The log file of one attempt (default: the latest) and its number."""
        if task.attempts == 0:
            raise Conflict(f"task {task.id} has not started yet: no output")
        number = task.attempts if attempt is None else attempt
        if not 1 <= number <= task.attempts:
            raise NotFound(f"task {task.id} has no attempt {number} (it has {task.attempts})")
        suffix = "out" if stream == "stdout" else "err"
        return number, self.paths.logs / f"{task.id}.{number}.{suffix}"

    def attempt_open(self, task_id: int, number: int) -> bool:
        attempts: list[AttemptRow] = self.store.attempts_of([task_id])[task_id]
        return any(a.number == number and a.outcome is None for a in attempts)

    # -- retention ------------------------------------------------------------------------------

    async def prune(self, older_than: float | None = None) -> dict[str, int]:
        """Remove finished tasks (with their logs) ended more than `older_than` seconds ago
        (default: the configured retention) or beyond `keep_finished`, and older events. In
        short transactions, yielding between them, so the daemon keeps serving meanwhile; one
        prune at a time."""
        async with self.pruning:
            now = now_ms()
            retention = self.config.retention if older_than is None else older_than
            cutoff = now - int(retention * 1000)
            removed = logs = 0
            while batch := self.store.prunable(cutoff, self.config.keep_finished, PRUNE_BATCH):
                ids = [row[0] for row in batch]
                self.dispatcher.cycle(lambda now, ids=ids: self.store.remove_tasks(ids))  # type: ignore[misc]
                for task_id, queue, state, attempts in batch:
                    self.metrics.on_removed(queue, state, 1)
                    logs += _remove_logs(self.paths.logs, task_id, attempts)
                removed += len(batch)
                await asyncio.sleep(0)
            events = self.dispatcher.cycle(lambda now: self.store.prune_history(cutoff)) or 0
            _remove_old_listings(self.paths.state / "changes", cutoff)
            self.store.compact()
            return {"tasks": removed, "log_files": logs, "events": events}

    # -- queues ---------------------------------------------------------------------------------

    def queues(self) -> list[dict[str, Any]]:
        counts = self.metrics.state_counts()
        return [self.queue_view(q, counts.get(q.name, {})) for q in self.store.list_queues()]

    def queue_view(self, q: QueueRow, counts: dict[str, int] | None = None) -> dict[str, Any]:
        if counts is None:
            counts = self.metrics.state_counts().get(q.name, {})
        return {
            "name": q.name,
            "concurrency": q.concurrency,
            "paused": q.paused,
            "defaults": q.defaults,
            "counts": counts,
        }

    def set_queue(self, name: str, settings: QueueSettings) -> QueueRow:
        """Create or change a queue: its concurrency limit (null: only the global one) and the
        defaults of its tasks. Fields left out of the request keep their value."""
        existing = self.store.get_queue(name)
        given = settings.model_dump(exclude_unset=True)
        fields: dict[str, object] = {}
        if "concurrency" in given:
            fields["concurrency"] = given.pop("concurrency")
        if given:
            defaults = dict(existing.defaults if existing else {})
            defaults.update({k: (v.value if hasattr(v, "value") else v) for k, v in given.items()})
            if given.get("timeout") == 0:  # a timeout of 0 is none: clear the default
                defaults["timeout"] = None
            fields["defaults"] = {k: v for k, v in defaults.items() if v is not None}
        row = self.dispatcher.cycle(lambda now: self.store.set_queue(name, now, **fields))
        assert row is not None
        self.dispatcher.load_queues()
        return row

    def pause_queue(self, name: str, paused: bool) -> QueueRow:
        """Pause: nothing new starts from it (running tasks finish). Resume: it starts again."""
        if self.store.get_queue(name) is None:
            raise NotFound(f"no queue named {name!r}")
        row = self.dispatcher.cycle(lambda now: self.store.set_queue(name, now, paused=paused))
        assert row is not None
        self.dispatcher.load_queues()
        return row

    # -- schedules ------------------------------------------------------------------------------

    def build_from_template(self, template: dict[str, Any], now: int) -> NewTask:
        return self.resolve(TaskSpec.model_validate(template), now, fired=True)

    def add_schedule(self, spec: ScheduleSpec) -> ScheduleRow:
        """Validate everything (expression, zone, paths, the task), then store it. Nothing is
        created when anything is wrong."""
        now = now_ms()
        t = spec.task
        if t.after or t.after_any or t.key or t.delay or t.run_at:
            raise InvalidRequest(
                "a schedule's task cannot have dependencies, an idempotency key, a delay or a "
                "start time (the schedule decides when it runs)"
            )
        self.resolve(spec.task, now)  # the task must be valid today
        template = spec.task.model_dump_json(exclude_none=True)
        if spec.kind == "cron":
            if not spec.cron:
                raise InvalidRequest("a cron schedule needs a cron expression")
            expr = scheduler.normalize_cron(spec.cron)
            tz = spec.tz or scheduler.local_zone_name()
            scheduler.zone(tz)
            due = next(scheduler.times_after(expr, tz, now), None)
            new = NewSchedule(
                spec.name, "cron", expr, tz, spec.overlap, spec.catch_up, template, due
            )
        else:
            paths = [_existing_path(p) for p in spec.paths]
            if not paths:
                raise InvalidRequest("a trigger needs at least one path to watch")
            detail = json.dumps(
                {
                    "paths": paths,
                    "glob": spec.glob,
                    "recursive": spec.recursive,
                    "debounce": spec.debounce,
                }
            )
            new = NewSchedule(
                spec.name, "trigger", detail, None, spec.overlap, spec.catch_up, template
            )
        row = self.dispatcher.cycle(lambda now: self.store.add_schedule(new, now))
        assert row is not None
        self.dispatcher.times_changed()
        if row.kind == "trigger":
            self.triggers.arm(row)
        return row

    def schedule(self, name: str) -> ScheduleRow:
        found = self.store.get_schedule(name)
        if found is None:
            raise NotFound(f"no schedule named {name!r}")
        return found

    def remove_schedule(self, name: str) -> None:
        row = self.schedule(name)
        self.triggers.disarm(row.id)
        self.dispatcher.cycle(lambda now: self.store.delete_schedule(row.id))

    def pause_schedule(self, name: str, paused: bool) -> ScheduleRow:
        """Pause or resume. A resumed cron schedule does not catch up on the time it spent
        paused: it continues from now."""
        row = self.schedule(name)

        def change(now: int) -> None:
            fields: dict[str, object] = {"paused": int(paused), "updated_at": now}
            if not paused and row.kind == "cron":
                fields["last_due"] = now
                fields["next_due"] = next(
                    scheduler.times_after(row.spec, row.tz or "UTC", now), None
                )
            self.store.update_schedule(row.id, **fields)

        self.dispatcher.cycle(change)
        self.dispatcher.times_changed()
        row = self.schedule(name)
        if row.kind == "trigger":
            if paused:
                self.triggers.disarm(row.id)
            else:
                self.triggers.arm(row)
        return row

    def next_fires(self, name: str, n: int, after: int | None) -> list[str]:
        row = self.schedule(name)
        if row.kind != "cron":
            raise InvalidRequest(f"{name!r} is a file trigger: it has no fire times")
        times = scheduler.next_times(
            row.spec, row.tz or "UTC", now_ms() if after is None else after, n
        )
        return [ms_to_rfc3339(int(t.timestamp() * 1000)) or "" for t in times]

    def schedule_view(self, row: ScheduleRow, *, runs: int = 0) -> dict[str, Any]:
        template = json.loads(row.template)
        view: dict[str, Any] = {
            "name": row.name,
            "kind": row.kind,
            "overlap": row.overlap,
            "catch_up": row.catch_up,
            "paused": row.paused,
            "command": [to_wire(arg) for arg in template["command"]],
            "shell": template.get("shell", False),
            "queue": template.get("queue", DEFAULT_QUEUE),
            "options": _template_options(template),
            "created_at": ms_to_rfc3339(row.created_at),
        }
        if row.id in self.triggers.failures:
            view["problem"] = self.triggers.failures[row.id]
        if row.kind == "cron":
            due = None if row.paused else row.next_due
            view.update(cron=row.spec, tz=row.tz or "UTC", next_due=ms_to_rfc3339(due))
        else:
            view.update(json.loads(row.spec))
        if runs:
            view["runs"] = [
                {
                    "due_at": ms_to_rfc3339(f.due_at), "fired_at": ms_to_rfc3339(f.fired_at),
                    "task_id": f.task_id, "outcome": f.outcome, "state": f.task_state, "exit_code": f.exit_code,
                }
                for f in self.store.fires_of(row.id, runs)
            ]  # fmt: skip
        return view

    # -- health ---------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """Alive is not enough: the store must take a write, the state and log folders must
        take a file, and no cron schedule may be overdue. Each failed check is a reason."""
        reasons = []
        writable = True
        full = False
        try:
            self.store.check_writable()
        except TaskctlError as e:
            writable = False
            full = isinstance(e, StorageFull)
            reasons.append(f"store not writable: {e.message}")
        for folder in (self.paths.state, self.paths.logs):
            error = _probe_folder(folder)
            if error is not None:
                full = full or error.errno in (errno.ENOSPC, errno.EDQUOT)
                reasons.append(f"{folder} is not writable: {error.strerror}")
        if self.runner.problem:
            reasons.append(self.runner.problem)
        if silent := self.runner.unanswered():
            reasons.append(silent)
        failing = self.triggers.failures
        names = self.store.schedule_names(set(failing)) if failing else {}
        reasons += [f"trigger {names.get(i, i)}: {why}" for i, why in failing.items()]
        late = self.scheduler.overdue(now_ms())
        if late:
            reasons.append(f"scheduler behind: {', '.join(late)} past due")
        tick = self.scheduler.last_tick
        return {
            "status": "unhealthy" if reasons else "ok",
            "reasons": reasons,
            "version": __version__,
            "api": API_VERSION,
            "pid": os.getpid(),
            "uptime": round(time.monotonic() - self.started_monotonic, 3),
            "store_writable": writable,
            "storage_full": full,
            "running": self.dispatcher.running_count(),
            "queued": self.metrics.total("queued"),
            "held": self.dispatcher.held_count(),
            "concurrency": self.config.concurrency,
            "hold": self.config.hold,
            "containment": self.runner.containment,
            "last_event_id": self.store.last_event_id(),
            "streams": self.watchers + self.followers,
            "scheduler_heartbeat_age": round((now_ms() - tick) / 1000, 3) if tick else None,
            "database_size": _size(self.paths.database),
            "wal_size": _size(self.paths.database.with_name(self.paths.database.name + "-wal")),
            "disk_free": shutil.disk_usage(self.paths.state).free,
            "disk_free_logs": shutil.disk_usage(self.paths.logs).free,
        }

    def summary(self) -> dict[str, Any]:
        counts = self.metrics.state_counts()
        states: dict[str, int] = {s.value: 0 for s in TaskState}
        for per_queue in counts.values():
            for state, n in per_queue.items():
                states[state] += n
        return {"health": self.health(), "states": states, "queues": self.queues()}


@contextlib.contextmanager
def _naming_task(index: int, count: int) -> Iterator[None]:
    """An InvalidRequest about one task of several says which: `task 3: ...`."""
    try:
        yield
    except InvalidRequest as e:
        raise InvalidRequest((f"task {index + 1}: " if count > 1 else "") + e.message) from None


def _first(*values: Any) -> Any:
    """The first of the values that is set (task, then queue, then daemon default)."""
    return next((v for v in values if v is not None), None)


def _remove_old_listings(folder: Path, cutoff: int) -> None:
    """File triggers' changed-path listings, by age."""
    for listing in folder.glob("*.txt"):
        with contextlib.suppress(OSError):
            if listing.stat().st_mtime * 1000 < cutoff:
                listing.unlink()


def _remove_logs(folder: Path, task_id: int, attempts: int) -> int:
    removed = 0
    for number in range(1, attempts + 1):
        for suffix in ("out", "err"):
            with contextlib.suppress(FileNotFoundError):
                (folder / f"{task_id}.{number}.{suffix}").unlink()
                removed += 1
    return removed


def _probe_folder(folder: Path) -> OSError | None:
    """Create and remove a small file: the only honest test of writability (permission
    bits do not tell the whole story: read-only mounts, full disks, root). The file goes
    whatever happens (on a full disk it is created, and only its write fails)."""
    probe = folder / f".health.{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"ok")
    except OSError as e:
        return e
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _existing_path(path: str) -> str:
    if not os.path.isabs(path):
        raise InvalidRequest(f"path {path!r} must be absolute")
    if not os.path.exists(path):
        raise InvalidRequest(f"path {path!r} does not exist")
    return os.path.normpath(path)


def _check_cwd(cwd: str) -> None:
    if not os.path.isabs(cwd):
        raise InvalidRequest(f"working directory {cwd!r} must be an absolute path")
    if "\0" in cwd:
        raise InvalidRequest("working directory must not contain NUL bytes")
    if not os.path.exists(cwd):
        raise InvalidRequest(f"working directory {cwd!r} does not exist")
    if not os.path.isdir(cwd):
        raise InvalidRequest(f"working directory {cwd!r} is not a directory")


def _check_exec_size(command: list[str], env: dict[str, str] | None) -> None:
    """Refuse what execve would refuse (E2BIG), with the reason, at submit time."""
    strings = [*command, *(f"{k}={v}" for k, v in (env or {}).items())]
    sizes = [len(os.fsencode(s)) for s in strings]  # the bytes execve gets
    if max(sizes) >= MAX_ARG_STRLEN:
        raise InvalidRequest(
            f"an argument or environment entry is {max(sizes)} bytes; "
            f"the limit for one is {MAX_ARG_STRLEN - 1}"
        )
    total = sum(size + 1 + 8 for size in sizes)  # bytes plus a pointer each
    limit = os.sysconf("SC_ARG_MAX") - 4096  # room for the TASKCTL_* variables we add
    if total > limit:
        raise InvalidRequest(
            f"command and environment take {total} bytes; execve accepts at most {limit} here"
        )


_SHOWN_APART = {"command", "shell", "queue", "env"}  # env: it may hold secrets


def _template_options(template: dict[str, Any]) -> dict[str, Any]:
    """The submit options a schedule's tasks get, where they differ from the defaults."""
    fields = TaskSpec.model_fields
    return {
        k: to_wire(v) if k == "cwd" and isinstance(v, str) else v
        for k, v in template.items()
        if k not in _SHOWN_APART
        and k in fields
        and v != fields[k].get_default(call_default_factory=True)
    }
