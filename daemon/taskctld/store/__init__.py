"""The Store interface: what the daemon may ask of its database, one Protocol per role.

Nothing outside `taskctld.store` writes SQL, and nothing inside it decides a task's state: the
store carries out what `taskctld.lifecycle` decides, through primitives (a conditional `move`,
inserts given their states, reads of candidates and dependencies). Each backend is a package
that implements `Store` and passes `tests/test_store_contract.py`: `sqlite` (one node) and
`postgres` (several nodes on one database, also a `NodeStore`). Rows
cross this boundary as the plain dataclasses below; times are integer epoch milliseconds (UTC).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, runtime_checkable

from taskctl import DEFAULT_QUEUE
from taskctl.api import FINAL_STATES, Outcome, TaskState
from taskctld import states

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
    node: str | None = None  # run only on this node (a distributed store); None: anywhere


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
    node: str | None = None  # the node that runs it (a distributed store); None on SQLite


@dataclass
class NodeRow:
    """A daemon sharing a distributed store, as `NodeStore.nodes` reports it. Times are the
    database's clock (epoch ms): nodes' own clocks never decide a lease."""

    name: str
    version: str
    state: str  # up | draining | lost
    started_at: int
    heartbeat_at: int
    age_ms: int  # since its last heartbeat, by the database's clock
    slots: int
    queues: list[str] | None  # the queues it serves; None: every queue
    running: int  # its open attempts


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


class Dependent(NamedTuple):
    """A task with dependencies, as settling it needs it."""

    id: int
    queue: str
    run_at: int


@dataclass
class StagedBatch:
    """A published batch: staged row `seq` became task `base + seq`, except the rows in
    `taken`, whose key another task had taken meanwhile: seq -> that task (not inserted).
    `dependent`: the published tasks that have dependencies, in id order (to settle)."""

    base: int
    taken: dict[int, int]
    dependent: list[Dependent] = field(default_factory=list)


@dataclass(frozen=True)
class InitialStates:
    """The rule for a new task's state, as data a store can apply in one statement to a whole
    batch: `dependent` for a task with dependencies, else `delayed` for one whose `run_at` is
    after now, else `ready`. The lifecycle chooses the states."""

    dependent: TaskState
    delayed: TaskState
    ready: TaskState


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


class Move(NamedTuple):
    """One conditional move of `TaskStore.move_many`: `task_id` from `old` to `new` if it is
    still in `old` (and, with `fence`, at that attempt count), as `move` would make it (its
    `reason`, `attempt` and `exit_code` in the event; `reason`, and `exit_code` when given,
    on the task), with the fields an attempt's end sets; None leaves a field as it is.
    `queue`: the task's, for its event (read when not given)."""

    task_id: int
    old: TaskState
    new: TaskState
    queue: str | None = None
    reason: str | None = None
    attempt: int | None = None
    exit_code: int | None = None
    fence: int | None = None
    finished_at: int | None = None
    run_at: int | None = None
    tries: int | None = None

    def fields(self) -> dict[str, object]:
        """The columns this move sets besides its state and reason, as `move` takes them."""
        given = (("finished_at", self.finished_at), ("run_at", self.run_at), ("tries", self.tries))
        return {name: value for name, value in given if value is not None}


def check_moves(moves: Sequence[Move]) -> None:
    """What `move_many` checks before it writes anything: every pair is in the state machine
    (RuntimeError), and no task comes twice (ValueError)."""
    for m in moves:
        if not states.allowed(m.old, m.new):
            raise RuntimeError(f"transition {m.old} -> {m.new} is not in the state machine")
    if len({m.task_id for m in moves}) != len(moves):
        raise ValueError("move_many: a task comes more than once")


class AttemptStart(NamedTuple):
    """What a supervisor reported as attempt `attempt` of a task started (`mark_started_many`)."""

    task_id: int
    attempt: int
    pid: int
    started_at: int


class Candidate(NamedTuple):
    """A queued task as a claim orders it: priority (highest first), then run_at, then id."""

    id: int
    priority: int
    run_at: int


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


# -- the roles ------------------------------------------------------------------------------------
#
# Every method that writes must run inside `transaction()` (RuntimeError otherwise). Calls are
# synchronous; ARCHITECTURE.md says how the daemon drives a backend whose calls are network
# round trips without stalling its event loop.


class Transactions(Protocol):
    """The unit of work. Events appended inside a transaction are published to the
    `on_commit` subscribers once it commits, in commit order, and dropped if it rolls back.

    On PostgreSQL, event ids are given at the commit (in commit order across nodes), so
    `uncommitted_events` has id 0 on each; other nodes hear a commit through NOTIFY
    (`taskctld.store.postgres.CHANNEL`); this interface stays the node-local half."""

    def transaction(self) -> AbstractContextManager[None]: ...
    def savepoint(self) -> AbstractContextManager[None]: ...
    def on_commit(
        self,
        callback: Callable[[list[EventRow]], None],
        on_span: Callable[[EventSpan], None] | None = None,
    ) -> None: ...
    def uncommitted_events(self) -> Sequence[EventRow]: ...
    def uncommitted_spans(self) -> Sequence[EventSpan]: ...


class TaskStore(Protocol):
    """Task rows: inserted in the states the lifecycle gives, changed only by `move`, and read.

    `move` is the only write of a task's state: conditional on the state (and, with `fence`,
    on the attempt count), checked against `states.TRANSITIONS`, with its event appended in
    the same transaction. It decides nothing: settling dependents is the lifecycle's.
    `any_dependencies` only lets the lifecycle skip a read after each end: it may say True
    when unsure, never False once a dependency exists.

    `start_attempts` is the set-based form of a claim's moves: many tasks to their next
    attempt at once, with their attempt rows and events (one statement on PostgreSQL).
    `move_many` is that of the moves that end attempts: each `Move` as `move` would make it
    (checked against `states.TRANSITIONS` first, all or none; a stale one is passed over and
    the others move); each task at most once (ValueError otherwise); returns the ids that
    moved, their events appended in the order given (one statement on PostgreSQL).

    On PostgreSQL a node that lost its lease cannot write through the fence: the node that
    rescued it ended its attempts (`NodeStore.take_lost`), so the late node's `move` finds
    the task in another state or at another attempt. `any_dependencies` does not cache a
    False there (another node may add the first dependency). `find_by_key`, in a transaction,
    first locks the key until the commit, so two nodes submitting one key make one task."""

    def insert_tasks(
        self, tasks: Sequence[NewTask], states: Sequence[TaskState], now: int
    ) -> list[int]: ...
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
    def start_attempts(
        self, ids: Sequence[int], old: TaskState, new: TaskState, now: int
    ) -> list[TaskRow]: ...
    def move_many(self, moves: Sequence[Move], now: int) -> set[int]: ...
    def state_of(self, task_id: int) -> tuple[TaskState, int] | None: ...
    def any_dependencies(self) -> bool: ...
    def dependency_states(self, task_id: int) -> list[tuple[TaskState, bool]]: ...
    def dependents(self, task_id: int, state: TaskState) -> list[Dependent]: ...
    def deps_of(self, ids: Sequence[int]) -> dict[int, tuple[list[int], list[int]]]: ...
    def get_task(self, task_id: int) -> TaskRow | None: ...
    def get_tasks(self, ids: Sequence[int]) -> list[TaskRow]: ...
    def list_tasks(self, where: TaskFilter) -> list[TaskRow]: ...
    def count_tasks(self, where: TaskFilter) -> int: ...
    def count_by_state(self) -> dict[str, dict[str, int]]: ...
    def find_by_key(self, key: str, since: int) -> TaskRow | None: ...
    def env_of(self, env_id: str | None) -> dict[str, str] | None: ...
    def last_task_id(self) -> int: ...
    def iter_all_ids(self) -> Iterator[int]: ...


class ReadyStore(Protocol):
    """What is ready to run or due, read for claims, hold-ahead and promotion. Candidates come
    in claim order (`Candidate`); choosing among them and claiming is the lifecycle's.

    On PostgreSQL, candidates are read `FOR UPDATE SKIP LOCKED` inside the claim's
    transaction, so that two nodes never get the same task; a queue's concurrency limit is
    counted there too, over every node (its queue row locked), and caps `want`; tasks pinned
    to another node are passed over, and a node that is not up gets none. `running_by_queue`
    counts this node's attempts only (its slots)."""

    def claim_candidates(
        self, queue: str, want: int, held: Collection[int]
    ) -> tuple[list[Candidate], bool]: ...
    def peek_ready(self, queue: str, limit: int, held: Collection[int]) -> list[TaskRow]: ...
    def ready_queues(self) -> set[str]: ...
    def running_by_queue(self) -> dict[str, int]: ...
    def oldest_queued(self) -> dict[str, int]: ...
    def due_ids(self, now: int, limit: int) -> list[int]: ...
    def count_due(self, before: int) -> int: ...
    def next_due(self) -> int | None: ...


class BatchStore(Protocol):
    """A big batch staged out of the main tables a chunk at a time, then published in one
    transaction (one statement per table), its initial states given as `InitialStates`.

    On PostgreSQL, staging is an unlogged table filled with COPY, and a batch is never
    published apart (`can_publish_apart` is False)."""

    def open_staging(self) -> str: ...
    def stage(self, staging: str, first_seq: int, tasks: Sequence[NewTask]) -> None: ...
    def publish_staged(
        self, staging: str, now: int, since: int, initial: InitialStates
    ) -> StagedBatch: ...
    def can_publish_apart(self, staging: str) -> bool: ...
    def publish_apart(
        self, staging: str, now: int, since: int, initial: InitialStates
    ) -> tuple[StagedBatch, EventSpan]: ...
    def announce(self, span: EventSpan) -> None: ...
    def checkpoint_apart(self) -> None: ...
    def drop_staging(self, staging: str) -> None: ...


class AttemptStore(Protocol):
    """Attempt rows: opened when a task is claimed (or a held start is found), ended once.

    On PostgreSQL an attempt carries the node that runs it (the store's own, set by
    `open_attempt`); its lease is its node's heartbeat (`NodeStore`). `open_attempts` and
    `stray_attempts` are this node's only (what its runner has), and `node_of` says which
    node runs a task's open attempt (None on SQLite).

    `mark_started_many` and `end_attempts` are the set-based forms of `mark_started` and
    `end_attempt`, for a dispatcher turn's reports (one statement each on PostgreSQL):
    `end_attempts` returns the (task id, attempt) of the ends that were news (the attempt was
    still open); of one attempt ended twice in a call, the first counts."""

    def open_attempt(
        self, task_id: int, number: int, started_at: int, pid: int | None = None
    ) -> None: ...
    def note_attempt(self, task_id: int, number: int, state: TaskState) -> bool: ...
    def mark_started(self, task_id: int, attempt: int, **fields: object) -> None: ...
    def mark_started_many(self, starts: Sequence[AttemptStart]) -> None: ...
    def end_attempt(self, end: AttemptEnd) -> bool: ...
    def end_attempts(self, ends: Sequence[AttemptEnd]) -> set[tuple[int, int]]: ...
    def attempts_of(self, ids: Sequence[int]) -> dict[int, list[AttemptRow]]: ...
    def open_attempts(self) -> list[AttemptRow]: ...
    def stray_attempts(self) -> list[tuple[int, int, str]]: ...
    def count_attempt_outcomes(self) -> dict[str, int]: ...
    def node_of(self, task_id: int) -> str | None: ...


class QueueStore(Protocol):
    """Queue rows: created on first use, changed by `queue set`."""

    def ensure_queues(self, names: set[str], now: int) -> None: ...
    def list_queues(self) -> list[QueueRow]: ...
    def get_queue(self, name: str) -> QueueRow | None: ...
    def set_queue(self, name: str, now: int, **fields: object) -> QueueRow: ...


class ScheduleStore(Protocol):
    """Cron schedules and file triggers, and their fires: one per (schedule, due time), the
    key that makes a fire exactly-once (on every backend: a primary key).

    `claim_fire` takes a due time (False: it was taken, here or by another node, and nothing
    changed), `set_fire_task` then records what came of it; `record_fire` of a due time
    that has a fire already changes nothing. None of them raises on a taken key, so a fire
    that loses a race never takes the rest of its transaction down."""

    def add_schedule(self, schedule: NewSchedule, now: int) -> ScheduleRow: ...
    def get_schedule(self, name: str) -> ScheduleRow | None: ...
    def get_schedule_by_id(self, schedule_id: int) -> ScheduleRow | None: ...
    def list_schedules(self, kind: str | None = None) -> list[ScheduleRow]: ...
    def update_schedule(self, schedule_id: int, **fields: object) -> None: ...
    def delete_schedule(self, schedule_id: int) -> None: ...
    def schedule_names(self, ids: set[int]) -> dict[int, str]: ...
    def due_schedules(self, now: int) -> list[ScheduleRow]: ...
    def next_schedule_due(self) -> int | None: ...
    def fire_exists(self, schedule_id: int, due_at: int) -> bool: ...
    def record_fire(
        self, schedule_id: int, due_at: int, now: int, task_id: int | None, outcome: str
    ) -> None: ...
    def claim_fire(self, schedule_id: int, due_at: int, now: int) -> bool: ...
    def set_fire_task(
        self, schedule_id: int, due_at: int, task_id: int | None, outcome: str
    ) -> None: ...
    def fires_of(self, schedule_id: int, limit: int) -> list[FireRow]: ...
    def latest_task_of(self, schedule_id: int) -> tuple[int, str] | None: ...


class EventLog(Protocol):
    """Every state change as a row, appended by `move` and `insert_tasks` (or a batch's
    publish) in the changing transaction; read back in id order, which `watch --since` and a
    stream that overflowed resume from.

    On PostgreSQL, ids are given under one lock at each commit, so they are in commit order
    across nodes: a cursor never skips an event that commits later with a smaller id.
    `last_event_id` is the newest committed one."""

    def events_after(self, event_id: int, limit: int) -> list[EventRow]: ...
    def last_event_id(self) -> int: ...


class Maintenance(Protocol):
    """Retention, space and health."""

    def prunable(self, cutoff: int, keep: int, limit: int) -> list[tuple[int, str, str, int]]: ...
    def remove_tasks(self, ids: Sequence[int]) -> None: ...
    def prune_history(self, cutoff: int) -> int: ...
    def compact(self) -> None: ...
    def check_writable(self) -> None: ...
    def describe(self) -> str:
        """What the store is, for people: "sqlite", or a URL without its password."""
        ...

    def close(self) -> None: ...


class Store(
    Transactions,
    TaskStore,
    ReadyStore,
    BatchStore,
    AttemptStore,
    QueueStore,
    ScheduleStore,
    EventLog,
    Maintenance,
    Protocol,
):
    """Every role: what the daemon is given (`SqliteStore`, or `PostgresStore`).

    `distributed`: whether other nodes share this store (PostgreSQL); then it is also a
    `NodeStore`, and a claim's slots, open attempts and wake-ups are this node's."""

    distributed: bool


@runtime_checkable
class NodeStore(Protocol):
    """The daemons sharing a distributed store (PostgreSQL only; `Store.distributed` says).

    Each node has a row, its heartbeat renewed by `beat` on the database's clock; a node
    whose heartbeat is older than the lease has lapsed, and any other node may `take_lost`
    it (in its transaction: the lifecycle then ends each returned attempt as `lost`). A
    node that finds itself lost (`beat` is False) stops its own task trees. A node whose
    row is not up (draining, lost) claims nothing. `join`, `beat` and `set_node_state` are
    one statement each and may run outside a transaction."""

    node: str

    def join(self, name: str, version: str, slots: int, queues: list[str] | None) -> None: ...
    def beat(self) -> bool: ...
    def nodes(self) -> list[NodeRow]: ...
    def set_node_state(self, name: str, state: str) -> bool: ...
    def lapsed(self) -> list[str]: ...
    def take_lost(self, name: str) -> list[AttemptRow]: ...
    def request_stop(self, task_id: int, attempt: int) -> None:
        """Ask, with the transaction's NOTIFY, the node that runs the attempt to stop it."""
        ...

    def ship_output(
        self, task_id: int, attempt: int, stream: str, at: int, data: bytes, *, done: bool
    ) -> None:
        """Keep `data`, an attempt's stream from byte `at`, for every node to read; `done`:
        the stream ends after it."""
        ...

    def output_of(
        self, task_id: int, attempt: int, stream: str, start: int, limit: int
    ) -> tuple[bytes, bool]:
        """Shipped bytes of a stream from `start` (up to about `limit`), and whether they
        reach its end."""
        ...

    def unsettled(self, limit: int) -> list[Dependent]:
        """Waiting tasks whose dependencies would settle them now (races between nodes can
        leave one waiting: a sweep settles it)."""
        ...

    def asked_stops(self, name: str) -> list[tuple[int, int]]:
        """The open attempts of node `name` whose stop another node asked for (a cancel)."""
        ...

    def close_output(self, task_id: int, attempt: int) -> None:
        """A lost node's attempt: its output is whole as far as it was shipped."""
        ...

    def tell(self, message: dict[str, object]) -> None:
        """Send every node `message` (JSON) on the notification channel: at once outside a
        transaction, at its commit inside one (a stop asked of the node that runs an attempt,
        a queue's settings changed)."""
        ...


class DistributedStore(Store, NodeStore, Protocol):
    """A store that several nodes share (PostgreSQL): every role, and the nodes'."""
