"""The Store interface: what the server, dispatcher, scheduler and runner may ask of the database.

Nothing outside `taskctld.store` writes SQL. A second backend (PostgreSQL) is one more module that
implements `Store`. Rows cross this boundary as the plain dataclasses below; times are integer
epoch milliseconds (UTC).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

from taskctl import DEFAULT_QUEUE
from taskctl.api import FINAL_STATES, Outcome, TaskState

FINAL_VALUES = frozenset(s.value for s in FINAL_STATES)


@dataclass
class NewTask:
    """A validated submit with every default resolved; what the store inserts."""

    command: list[str]
    cwd: str
    queue: str = DEFAULT_QUEUE
    name: str | None = None
    shell: bool = False
    priority: int = 0
    env: dict[str, str] | None = None
    labels: dict[str, str] = field(default_factory=dict)
    retries: int = 0
    backoff: str = "fixed"
    retry_delay: float = 1.0
    max_delay: float = 3600.0
    retry_on: list[int] | None = None
    no_retry_on: list[int] | None = None
    timeout: float | None = None
    kill_grace: float = 10.0
    memory_limit: int | None = None
    run_at: int | None = None  # epoch ms; None or past = ready now
    key: str | None = None
    after: list[int] = field(default_factory=list)  # run once these succeeded
    after_any: list[int] = field(default_factory=list)  # run once these are final, however
    schedule_id: int | None = None  # the cron schedule or trigger that created it
    due_at: int | None = None  # the schedule's due time it stands for
    key_fingerprint: str | None = None  # what a repeated submit with the same key must match


@dataclass
class TaskRow(NewTask):
    id: int = 0
    state: TaskState = TaskState.QUEUED
    reason: str | None = None
    created_at: int = 0
    started_at: int | None = None
    finished_at: int | None = None
    attempts: int = 0  # attempt rows
    tries: int = 0  # attempts that count against the retry policy
    exit_code: int | None = None
    env_id: str | None = None


@dataclass
class AttemptRow:
    task_id: int
    number: int
    outcome: Outcome | None = None
    exit_code: int | None = None
    signal: int | None = None
    error: str | None = None
    started_at: int | None = None
    ended_at: int | None = None
    pid: int | None = None
    max_rss: int | None = None
    cpu_user: float | None = None
    cpu_system: float | None = None


@dataclass
class EventRow:
    id: int
    at: int
    task_id: int
    queue: str
    from_state: TaskState | None
    to_state: TaskState
    attempt: int | None = None
    exit_code: int | None = None
    reason: str | None = None


@dataclass
class EventSpan:
    """The creation events of a published batch, `first`..`last` in the events table, told by
    their ids and counts instead of one `EventRow` each (those of 100,000 tasks would take more
    memory than the batch's body). Read the rows themselves with `events_after`."""

    first: int
    last: int
    at: int
    created: dict[tuple[str, TaskState], int]  # (queue, initial state) -> how many tasks


@dataclass
class StagedBatch:
    """A published batch: staged row `seq` became task `base + seq`, except the rows in
    `taken`, whose key another task had taken meanwhile: seq -> that task (not inserted)."""

    base: int
    taken: dict[int, int]


@dataclass
class AttemptEnd:
    """How an attempt ended, as its supervisor (or recovery) reported it."""

    task_id: int
    attempt: int
    outcome: Outcome
    ended_at: int
    exit_code: int | None = None
    signal: int | None = None
    error: str | None = None
    max_rss: int | None = None
    cpu_user: float | None = None
    cpu_system: float | None = None
    cause: str | None = None  # a more precise reason than the outcome (memory_limit)
    started_at: int | None = None


@dataclass
class QueueRow:
    name: str
    concurrency: int | None
    paused: bool
    defaults: dict[str, object]  # retries, backoff, retry_delay, max_delay, timeout, kill_grace


@dataclass
class NewSchedule:
    name: str | None
    kind: str  # cron | trigger
    spec: str  # the cron expression, or a trigger's JSON (paths, glob, recursive, debounce)
    tz: str | None
    overlap: str  # skip | queue | allow
    catch_up: str  # none | latest | all
    template: str  # JSON: the task to create, in the API's fields
    next_due: int | None = None


@dataclass
class ScheduleRow(NewSchedule):
    id: int = 0
    paused: bool = False
    last_due: int | None = None
    created_at: int = 0
    updated_at: int = 0


@dataclass
class FireRow:
    due_at: int
    fired_at: int
    task_id: int | None
    outcome: str
    task_state: str | None = None
    exit_code: int | None = None


@dataclass
class Claim:
    tasks: list[TaskRow]
    exhausted: set[str]  # queues that have no more queued tasks


@dataclass
class TaskFilter:
    states: Sequence[TaskState] = ()
    queue: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    limit: int = 100
    before_id: int | None = None


class Store(Protocol):
    """The daemon's only way to the database. Methods that change anything must run inside
    `transaction()`; events they append are published only once it commits."""

    def transaction(self) -> AbstractContextManager[None]: ...
    def savepoint(self) -> AbstractContextManager[None]: ...
    def on_commit(
        self,
        callback: Callable[[list[EventRow]], None],
        on_span: Callable[[EventSpan], None] | None = None,
    ) -> None: ...
    def uncommitted_events(self) -> Sequence[EventRow]: ...
    def uncommitted_spans(self) -> Sequence[EventSpan]: ...

    def submit(self, tasks: Sequence[NewTask], now: int) -> list[int]: ...
    def open_staging(self) -> str: ...
    def stage(self, staging: str, first_seq: int, tasks: Sequence[NewTask]) -> None: ...
    def publish_staged(self, staging: str, now: int, since: int) -> StagedBatch: ...
    def can_publish_apart(self, staging: str) -> bool: ...
    def publish_apart(
        self, staging: str, now: int, since: int
    ) -> tuple[StagedBatch, EventSpan]: ...
    def announce(self, span: EventSpan) -> None: ...
    def checkpoint_apart(self) -> None: ...
    def drop_staging(self, staging: str) -> None: ...
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
    ) -> bool: ...

    def claim(
        self, slots: dict[str, int], limit: int, now: int, held: Collection[int] = ()
    ) -> Claim: ...
    def claim_attempt(
        self, task_id: int, attempt: int, now: int, started_at: int, known: TaskRow | None = None
    ) -> TaskRow | None: ...
    def peek_ready(self, queue: str, limit: int, held: Collection[int]) -> list[TaskRow]: ...
    def mark_started(self, task_id: int, attempt: int, **fields: object) -> None: ...
    def record_stray_start(self, task_id: int, attempt: int, pid: int, started_at: int) -> bool: ...
    def end_attempt(self, end: AttemptEnd) -> bool: ...
    def promote_due(self, now: int) -> int: ...
    def count_due(self, before: int) -> int: ...
    def next_due(self) -> int | None: ...

    def get_task(self, task_id: int) -> TaskRow | None: ...
    def get_tasks(self, ids: Sequence[int]) -> list[TaskRow]: ...
    def list_tasks(self, where: TaskFilter) -> list[TaskRow]: ...
    def count_tasks(self, where: TaskFilter) -> int: ...
    def attempts_of(self, ids: Sequence[int]) -> dict[int, list[AttemptRow]]: ...
    def deps_of(self, ids: Sequence[int]) -> dict[int, tuple[list[int], list[int]]]: ...
    def schedule_names(self, ids: set[int]) -> dict[int, str]: ...
    def open_attempts(self) -> list[AttemptRow]: ...
    def ready_queues(self) -> set[str]: ...
    def running_by_queue(self) -> dict[str, int]: ...
    def stray_attempts(self) -> list[tuple[int, int, str]]: ...
    def count_by_state(self) -> dict[str, dict[str, int]]: ...
    def events_after(self, event_id: int, limit: int) -> list[EventRow]: ...
    def count_attempt_outcomes(self) -> dict[str, int]: ...
    def last_task_id(self) -> int: ...
    def oldest_queued(self) -> dict[str, int]: ...
    def last_event_id(self) -> int: ...
    def env_of(self, env_id: str | None) -> dict[str, str] | None: ...
    def find_by_key(self, key: str, since: int) -> TaskRow | None: ...
    def prunable(self, cutoff: int, keep: int, limit: int) -> list[tuple[int, str, str, int]]: ...
    def remove_tasks(self, ids: Sequence[int]) -> None: ...
    def prune_history(self, cutoff: int) -> int: ...
    def compact(self) -> None: ...
    def ensure_queues(self, names: set[str], now: int) -> None: ...
    def list_queues(self) -> list[QueueRow]: ...
    def get_queue(self, name: str) -> QueueRow | None: ...
    def set_queue(self, name: str, now: int, **fields: object) -> QueueRow: ...
    def add_schedule(self, schedule: NewSchedule, now: int) -> ScheduleRow: ...
    def get_schedule(self, name: str) -> ScheduleRow | None: ...
    def get_schedule_by_id(self, schedule_id: int) -> ScheduleRow | None: ...
    def list_schedules(self, kind: str | None = None) -> list[ScheduleRow]: ...
    def update_schedule(self, schedule_id: int, **fields: object) -> None: ...
    def delete_schedule(self, schedule_id: int) -> None: ...
    def due_schedules(self, now: int) -> list[ScheduleRow]: ...
    def next_schedule_due(self) -> int | None: ...
    def fire_exists(self, schedule_id: int, due_at: int) -> bool: ...
    def record_fire(
        self, schedule_id: int, due_at: int, now: int, task_id: int | None, outcome: str
    ) -> None: ...
    def fires_of(self, schedule_id: int, limit: int) -> list[FireRow]: ...
    def latest_task_of(self, schedule_id: int) -> tuple[int, str] | None: ...
    def check_writable(self) -> None: ...
    def close(self) -> None: ...

    def iter_all_ids(self) -> Iterator[int]: ...
