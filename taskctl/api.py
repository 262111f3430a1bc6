"""The wire contract between `taskctl` and `taskctld`: pydantic models of requests and responses.

Requests are closed (unknown fields are refused, so a misspelt option is never silently dropped);
responses are open (unknown fields are ignored, so an older CLI can read a newer daemon). Times
are RFC 3339 strings in UTC; durations are seconds (requests also accept `30s`, `1h30m`...);
sizes are bytes (requests also accept `100M`).

The CLI does not import this module on its fast paths (pydantic costs start-up time); the
daemon validates every request with it and FastAPI derives `/openapi.json` from it.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
)

from taskctl import DEFAULT_QUEUE
from taskctl.units import parse_duration, parse_size
from taskctl.wire import from_wire


class TaskState(StrEnum):
    WAITING = "waiting"  # dependencies not yet met
    SCHEDULED = "scheduled"  # run_at in the future (delay, backoff before a retry)
    QUEUED = "queued"  # ready; waits for a slot
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL_STATES = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED})


class Outcome(StrEnum):
    """How one attempt ended."""

    EXITED = "exited"  # with an exit code (0 is success)
    SIGNALED = "signaled"  # ended by a signal it did not handle
    TIMEOUT = "timeout"  # killed by taskctl after --timeout
    SPAWN_ERROR = "spawn_error"  # never started: no such program, bad cwd...
    LOST = "lost"  # its outcome cannot be known (its supervisor vanished)
    CANCELLED = "cancelled"  # killed by taskctl on request
    INTERRUPTED = "interrupted"  # killed by `daemon stop --kill`; re-queued, attempt not counted


class Backoff(StrEnum):
    FIXED = "fixed"
    EXPONENTIAL = "exponential"


QUEUE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
LABEL_KEY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]{0,63}$")
MAX_PRIORITY = 1_000_000


def _duration(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return parse_duration(value)
        except ValueError as e:
            raise ValueError(str(e)) from None
    return value


def _size(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return parse_size(value)
        except ValueError as e:
            raise ValueError(str(e)) from None
    return value


EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)


def _moment(value: datetime) -> datetime:
    """A time of the API as an aware UTC datetime. A naive time is local. The instant must lie
    from 1970 to the end of 9999 UTC: what epoch milliseconds in the store, RFC 3339 output
    and cron's arithmetic can all hold (year 1 naive, or 9999-12-31T23:00-05:00, cannot)."""
    try:
        utc = (value if value.tzinfo else value.astimezone()).astimezone(UTC)
    except (OverflowError, ValueError):
        utc = None
    if utc is None or not EARLIEST <= utc <= LATEST:
        raise ValueError(f"{value.isoformat()} is out of range: give a time from 1970 to 9999 UTC")
    return utc


Duration = Annotated[float, BeforeValidator(_duration), Field(ge=0, le=10 * 365 * 86400)]
Moment = Annotated[datetime, AfterValidator(_moment)]  # every time the API takes is one
Size = Annotated[int, BeforeValidator(_size), Field(ge=1 << 20, le=1 << 50)]
TaskIds = Annotated[list[Annotated[int, Field(ge=1, le=(1 << 63) - 1)]], Field(max_length=1000)]
ExitCodes = Annotated[list[Annotated[int, Field(ge=0, le=255)]], Field(max_length=256)]
# A command's argument, an environment value, a working directory: bytes to the kernel. A JSON
# string when they are UTF-8, else {"base64": ...} of the exact bytes (see taskctl.wire).
BYTES_SCHEMA = {
    "anyOf": [
        {"type": "string"},
        {
            "type": "object",
            "properties": {"base64": {"type": "string", "contentEncoding": "base64"}},
            "required": ["base64"],
            "additionalProperties": False,
            "description": "bytes that are not UTF-8",
        },
    ]
}
Bytes = Annotated[str, BeforeValidator(from_wire), WithJsonSchema(BYTES_SCHEMA)]
BytesOut = Annotated[str | dict[str, str], WithJsonSchema(BYTES_SCHEMA)]  # in responses


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Response(BaseModel):
    model_config = ConfigDict(extra="ignore")


class RetryPolicy(Request):
    """When and how soon a failed attempt is tried again. Unset fields take the queue's or the
    daemon's defaults."""

    retries: int | None = Field(None, ge=0, le=1000, description="attempts after the first")
    backoff: Backoff | None = None
    retry_delay: Duration | None = None
    max_delay: Duration | None = None
    retry_on: ExitCodes | None = Field(None, description="retry only these exit codes")
    no_retry_on: ExitCodes | None = Field(None, description="never retry these exit codes")


class ExecutionLimits(Request):
    timeout: Duration | None = Field(
        None, description="per attempt, seconds; 0: none (not even the queue's default)"
    )
    kill_grace: Duration | None = Field(None, description="SIGTERM to SIGKILL, seconds")
    memory_limit: Size | None = Field(None, description="address-space limit, bytes")


class TaskOptions(RetryPolicy, ExecutionLimits):
    """Everything about a task but its command (what a batch's `defaults` may set)."""

    shell: bool = Field(False, description="run command[0] through `sh -c`")
    name: str | None = Field(None, max_length=200)
    queue: str = Field(DEFAULT_QUEUE, pattern=QUEUE_NAME_PATTERN)
    node: str | None = Field(
        None, pattern=QUEUE_NAME_PATTERN, description="run only on this node of a cluster"
    )
    priority: int = Field(0, ge=-MAX_PRIORITY, le=MAX_PRIORITY, description="higher runs first")
    cwd: Bytes | None = Field(None, description="absolute path; default: the daemon owner's home")
    env: dict[str, Bytes] | None = Field(
        None, description="the task's whole environment; null gives a minimal one"
    )
    labels: dict[str, str] = Field(default_factory=dict, max_length=64)
    delay: Duration | None = None
    run_at: Moment | None = None
    key: str | None = Field(None, min_length=1, max_length=200)
    after: TaskIds = Field(default_factory=list, description="run once these tasks succeeded")
    after_any: TaskIds = Field(default_factory=list, description="run once these tasks are final")

    @field_validator("env")
    @classmethod
    def _env_is_valid(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for k, v in (value or {}).items():
            if not k or "=" in k or "\0" in k or "\0" in v:
                raise ValueError(f"invalid environment variable name or value: {k!r}")
        return value

    @field_validator("labels")
    @classmethod
    def _labels_are_valid(cls, value: dict[str, str]) -> dict[str, str]:
        for k, v in value.items():
            if not LABEL_KEY_PATTERN.match(k) or len(v) > 200:
                raise ValueError(f"invalid label {k!r}: keys are [A-Za-z0-9_.-/], values <= 200")
            if "\0" in v:
                raise ValueError(f"label {k!r}: a value must not contain NUL bytes")
        return value

    @field_validator("name", "key")
    @classmethod
    def _text_has_no_nul(cls, value: str | None) -> str | None:
        """No store keeps a NUL in text (PostgreSQL refuses one), and no shell can type it."""
        if value is not None and "\0" in value:
            raise ValueError("must not contain NUL bytes")
        return value


class ScheduleSpec(Request):
    """What `POST /v1/schedules` accepts: a cron schedule or a file trigger, and the task it
    creates each time it fires."""

    kind: Literal["cron", "trigger"]
    name: str | None = Field(None, pattern=QUEUE_NAME_PATTERN)
    cron: str | None = Field(None, max_length=200, description="five fields, or @hourly...")
    tz: str | None = Field(None, max_length=64, description="IANA zone; default: the local one")
    paths: list[str] = Field(default_factory=list, max_length=100)
    glob: str | None = Field(None, max_length=200)
    recursive: bool = False
    debounce: Duration = 0.5
    overlap: Literal["skip", "queue", "allow"] = "skip"
    catch_up: Literal["none", "latest", "all"] = "latest"
    task: TaskSpec


class Fire(Response):
    due_at: str
    fired_at: str
    task_id: int | None = None
    outcome: str
    state: str | None = None
    exit_code: int | None = None


class Schedule(Response):
    name: str
    kind: str
    cron: str | None = None
    tz: str | None = None
    paths: list[str] | None = None
    glob: str | None = None
    recursive: bool | None = None
    debounce: float | None = None
    node: str | None = Field(None, description="a trigger's node in a cluster: it watches it")
    overlap: str
    catch_up: str
    paused: bool
    next_due: str | None = Field(None, description="RFC 3339 in UTC; null while paused")
    command: list[BytesOut]
    shell: bool = False
    queue: str
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="the other submit options its tasks get, where not the default (env not shown)",
    )
    created_at: str
    runs: list[Fire] | None = Field(None, description="recent fires, newest first (show only)")
    problem: str | None = Field(None, description="why a trigger's watcher is not running")


class TaskSpec(TaskOptions):
    """What `POST /v1/tasks` accepts: one command to run."""

    command: list[Bytes] = Field(min_length=1, max_length=100_000)

    @field_validator("command")
    @classmethod
    def _command_has_no_nul(cls, value: list[str]) -> list[str]:
        if any("\0" in arg for arg in value):
            raise ValueError("command arguments must not contain NUL bytes")
        if not value[0]:
            raise ValueError("the program name must not be empty")
        return value

    def fingerprint(self) -> str:
        """What makes two submits with one idempotency key the same request: everything but
        the captured environment (which changes between shells) and the timing."""
        import hashlib

        fields = self.model_dump(mode="json", exclude={"env", "key", "delay", "run_at"})
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


class BatchSpec(Request):
    """Many tasks in one transaction. `defaults` apply to every task that does not set the
    field itself (send the environment once, not ten thousand times)."""

    defaults: TaskOptions | None = None
    tasks: list[TaskSpec] = Field(min_length=1, max_length=100_000)

    def merged(self) -> list[TaskSpec]:
        if self.defaults is None:
            return self.tasks
        base = {k: getattr(self.defaults, k) for k in self.defaults.model_fields_set}
        return [
            t.model_copy(update={k: v for k, v in base.items() if k not in t.model_fields_set})
            for t in self.tasks
        ]


class QueueSettings(Request):
    """`PUT /v1/queues/{name}`: a queue's limit and the defaults of its tasks."""

    concurrency: int | None = Field(
        None, ge=1, le=10_000, description="null: only the global limit"
    )
    retries: int | None = Field(None, ge=0, le=1000)
    backoff: Backoff | None = None
    retry_delay: Duration | None = None
    max_delay: Duration | None = None
    timeout: Duration | None = Field(None, description="0 or null: clear the default")
    kill_grace: Duration | None = None


class StopRequest(Request):
    mode: Literal["leave", "drain", "kill"] = "leave"
    timeout: Duration | None = Field(
        None, description="drain/kill: give up waiting after this long"
    )


class PruneRequest(Request):
    older_than: Duration | None = Field(None, description="default: the daemon's retention")


class Attempt(Response):
    number: int
    outcome: Outcome | None = None  # null while it runs
    exit_code: int | None = None
    signal: int | None = None
    error: str | None = None
    started_at: str | None = None
    ended_at: str | None = None
    pid: int | None = None
    max_rss: int | None = Field(None, description="peak resident set size, bytes")
    cpu_user: float | None = Field(None, description="seconds")
    cpu_system: float | None = Field(None, description="seconds")
    node: str | None = Field(None, description="the node it ran on (a cluster's)")


class Task(Response):
    id: int
    name: str | None = None
    state: TaskState
    reason: str | None = None
    queue: str
    node: str | None = Field(None, description="the only node it may run on (a cluster's)")
    priority: int
    command: list[BytesOut]
    shell: bool = False
    cwd: BytesOut
    labels: dict[str, str] = Field(default_factory=dict)
    env: dict[str, BytesOut] | None = Field(None, description="only with show_env=true")
    created_at: str
    run_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    exit_code: int | None = None
    attempts: list[Attempt] = Field(default_factory=list)
    retries: int = 0
    backoff: Backoff = Backoff.FIXED
    retry_delay: float = 0
    max_delay: float | None = None
    retry_on: list[int] | None = None
    no_retry_on: list[int] | None = None
    timeout: float | None = None
    kill_grace: float = 10
    memory_limit: int | None = None
    key: str | None = None
    after: list[int] = Field(default_factory=list)
    after_any: list[int] = Field(default_factory=list)
    schedule: str | None = Field(None, description="the cron schedule or trigger that created it")
    due_at: str | None = Field(None, description="the schedule's due time this task stands for")
    deduplicated: bool | None = None


class Event(Response):
    id: int
    at: str
    task_id: int
    from_state: TaskState | None = None
    to_state: TaskState
    attempt: int | None = None
    exit_code: int | None = None
    reason: str | None = None


class QueueInfo(Response):
    name: str
    concurrency: int | None = None
    paused: bool = False
    defaults: dict[str, Any] = Field(default_factory=dict)
    counts: dict[str, int] = Field(default_factory=dict)


class NodeInfo(Response):
    """One daemon of a cluster sharing a PostgreSQL store (on SQLite: the one daemon)."""

    name: str
    version: str
    state: str  # up | draining | lost
    heartbeat_age: float  # seconds since its last heartbeat, by the database's clock
    running: int  # attempts it runs now
    slots: int  # its concurrency
    queues: list[str] | None = None  # the queues it takes work from (None: all)
    this: bool = False  # the node that answered


class Health(Response):
    status: str  # "ok" or "unhealthy"
    reasons: list[str] = Field(default_factory=list)
    version: str
    api: str
    pid: int
    uptime: float
    store_writable: bool
    storage_full: bool = False  # the store or a state folder refused a write for want of space
    running: int
    queued: int
    held: int = 0  # queued tasks handed ahead to the supervisor, to start as slots free up
    concurrency: int
    hold: bool = False  # config.toml's `hold = true`: tasks are accepted, none is started
    containment: str | None = None  # "cgroup", or "process-group (why no cgroup)"
    last_event_id: int | None = None
    store: str | None = None  # "sqlite", or the cluster's PostgreSQL (never its password)
    node: str | None = None  # this daemon's name in a cluster
    streams: int = 0  # connected `watch` and `logs --follow` streams
    scheduler_heartbeat_age: float | None = None
    database_size: int | None = None
    wal_size: int | None = None
    disk_free: int | None = None
    disk_free_logs: int | None = None


class Summary(Response):
    health: Health
    states: dict[str, int]
    queues: list[QueueInfo]


class ErrorDetail(Response):
    code: str
    message: str


class ErrorBody(Response):
    error: ErrorDetail
