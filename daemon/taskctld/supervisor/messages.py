"""Everything the daemon and its supervisor say to each other, and how it is written.

The set is closed: each message is one dataclass below, named in `DAEMON_MESSAGES` (daemon to
supervisor) or `SUPERVISOR_MESSAGES` (supervisor to daemon), and each side has exactly one
handler per message it hears. A frame is a 4-byte big-endian length, then a JSON object whose
"op" names the message; the other keys are its fields. Journal records (`StartedRecord`,
`Ident`, `Final`) are written here too, so that a frame and a journal line cannot disagree.

Versions: `PROTOCOL` is said once per connection, in `auth` and in `hello`; a peer that does
not say it speaks version 0 (before the field existed; `tests/fixtures/supervisor_wire_v0`
holds its frames). A supervisor outlives the daemon that started it, so a newer daemon must
keep reading every older version whose supervisors may still run: a new field is optional
with a default, and a change that cannot be bumps `PROTOCOL` and keeps the old decoder.
Unknown ops decode to None (a newer peer's news) and are ignored; unknown fields are ignored.

Standard library only: the supervisor process imports this.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PROTOCOL = 1  # 0: the set before it was versioned (the same messages, no "protocol" field)
HEADER = struct.Struct("!I")
Key = tuple[int, int]  # (task_id, attempt)
Wire = dict[str, Any]


class BadMessage(ValueError):
    """A frame that names a known message but lacks a field or has one of the wrong type."""


# -- what an attempt is and how it ended ---------------------------------------------------------


@dataclass
class AttemptSpec:
    """Everything needed to run one attempt; sent by the daemon with `spawn`. Its fields are
    its wire form, and a supervisor of version 0 rejects a spec with a field it does not know:
    never add one without checking the supervisor's protocol first."""

    task_id: int
    attempt: int
    argv: list[str]
    cwd: str
    env: dict[str, str]
    stdout_path: str
    stderr_path: str
    timeout: float | None = None
    kill_grace: float = 10.0
    memory_limit: int | None = None
    log_cap: int = 100 << 20

    @property
    def key(self) -> Key:
        return (self.task_id, self.attempt)


@dataclass
class Final:
    """How an attempt ended: a `done` frame's body, an entry of `hello`'s `done`, and a journal
    `final` line. `outcome` is one of exited, signaled, timeout, cancelled, interrupted,
    spawn_error, not_started. `error` and `cause` are left out of the wire form when None."""

    task_id: int
    attempt: int
    outcome: str
    started_at: int | None = None
    ended_at: int | None = None
    exit_code: int | None = None
    signal: int | None = None
    max_rss: int | None = None
    cpu_user: float | None = None
    cpu_system: float | None = None
    error: str | None = None
    cause: str | None = None

    @property
    def key(self) -> Key:
        return (self.task_id, self.attempt)

    def to_wire(self) -> Wire:
        record: Wire = {
            "task_id": self.task_id,
            "attempt": self.attempt,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "max_rss": self.max_rss,
            "cpu_user": self.cpu_user,
            "cpu_system": self.cpu_system,
            "outcome": self.outcome,
        }
        if self.error is not None:
            record["error"] = self.error
        if self.cause is not None:
            record["cause"] = self.cause
        return record

    @classmethod
    def from_wire(cls, w: Wire) -> Final:
        """Tolerant, as records from crashed supervisors may be: only the key is required;
        an outcome that is missing is `lost`."""
        task_id, attempt = _key(w)
        return cls(
            task_id,
            attempt,
            str(w.get("outcome") or "lost"),
            started_at=_opt_int(w, "started_at"),
            ended_at=_opt_int(w, "ended_at"),
            exit_code=_opt_int(w, "exit_code"),
            signal=_opt_int(w, "signal"),
            max_rss=_opt_int(w, "max_rss"),
            cpu_user=_opt_float(w, "cpu_user"),
            cpu_system=_opt_float(w, "cpu_system"),
            error=_opt_str(w, "error"),
            cause=_opt_str(w, "cause"),
        )


@dataclass
class StartedRecord:
    """The journal's `started` line: enough to find and identify the command later."""

    task_id: int
    attempt: int
    pid: int
    boot_id: str
    started_at: int
    cgroup: str | None = None

    def to_wire(self) -> Wire:
        record: Wire = {
            "task_id": self.task_id,
            "attempt": self.attempt,
            "pid": self.pid,
            "boot_id": self.boot_id,
            "started_at": self.started_at,
        }
        if self.cgroup is not None:
            record["cgroup"] = self.cgroup
        return record

    @classmethod
    def from_wire(cls, w: Wire) -> StartedRecord:
        task_id, attempt = _key(w)
        return cls(
            task_id,
            attempt,
            _int(w, "pid"),
            str(w.get("boot_id")),
            _int(w, "started_at"),
            _opt_str(w, "cgroup"),
        )


@dataclass
class Ident:
    """The journal's `ident` line: the command's start time in clock ticks."""

    task_id: int
    attempt: int
    start: int

    def to_wire(self) -> Wire:
        return {"task_id": self.task_id, "attempt": self.attempt, "start": self.start}

    @classmethod
    def from_wire(cls, w: Wire) -> Ident:
        task_id, attempt = _key(w)
        return cls(task_id, attempt, _int(w, "start"))


# -- daemon -> supervisor ------------------------------------------------------------------------


@dataclass
class Auth:
    """The first frame: the secret handed at launch. Nothing is heard before it."""

    token: str
    protocol: int = PROTOCOL

    def to_wire(self) -> Wire:
        return {"op": "auth", "token": self.token, "protocol": self.protocol}

    @classmethod
    def from_wire(cls, w: Wire) -> Auth:
        token = w.get("token")
        if not isinstance(token, str):
            raise BadMessage("auth without a token")
        return cls(token, _opt_int(w, "protocol") or 0)


@dataclass
class Ping:
    seq: Any = None

    def to_wire(self) -> Wire:
        return {"op": "ping"} if self.seq is None else {"op": "ping", "seq": self.seq}

    @classmethod
    def from_wire(cls, w: Wire) -> Ping:
        return cls(w.get("seq"))


@dataclass
class Spawn:
    """Start `spec` now; or, with `after`, the moment that attempt ends (a hold named `hold`)."""

    spec: AttemptSpec
    after: Key | None = None
    hold: Any = None

    def to_wire(self) -> Wire:
        w: Wire = {"op": "spawn", "spec": self.spec.__dict__}
        if self.after is not None:
            w["after"], w["hold"] = list(self.after), self.hold
        return w

    @classmethod
    def from_wire(cls, w: Wire) -> Spawn:
        try:
            spec = AttemptSpec(**w["spec"])
        except (KeyError, TypeError) as e:
            raise BadMessage(f"spawn with a bad spec: {e}") from None
        after = w.get("after")
        return cls(spec, _pair(after) if after else None, w.get("hold"))


@dataclass
class Unhold:
    task_id: int
    attempt: int
    hold: Any = None

    def to_wire(self) -> Wire:
        return {"op": "unhold", "task_id": self.task_id, "attempt": self.attempt, "hold": self.hold}

    @classmethod
    def from_wire(cls, w: Wire) -> Unhold:
        return cls(*_key(w), w.get("hold"))


@dataclass
class Signal:
    """`kind`: cancel or interrupt (others are ignored)."""

    task_id: int
    attempt: int
    kind: str

    def to_wire(self) -> Wire:
        return {"op": "signal", "task_id": self.task_id, "attempt": self.attempt, "kind": self.kind}

    @classmethod
    def from_wire(cls, w: Wire) -> Signal:
        return cls(*_key(w), str(w.get("kind")))


@dataclass
class Ack:
    task_id: int
    attempt: int

    def to_wire(self) -> Wire:
        return {"op": "ack", "task_id": self.task_id, "attempt": self.attempt}

    @classmethod
    def from_wire(cls, w: Wire) -> Ack:
        return cls(*_key(w))


@dataclass
class Retire:
    def to_wire(self) -> Wire:
        return {"op": "retire"}

    @classmethod
    def from_wire(cls, w: Wire) -> Retire:
        return cls()


# -- supervisor -> daemon ------------------------------------------------------------------------


@dataclass
class Started:
    task_id: int
    attempt: int
    pid: int
    started_at: int

    @property
    def key(self) -> Key:
        return (self.task_id, self.attempt)

    def to_wire(self) -> Wire:
        return {
            "op": "started",
            "task_id": self.task_id,
            "attempt": self.attempt,
            "pid": self.pid,
            "started_at": self.started_at,
        }

    @classmethod
    def from_wire(cls, w: Wire) -> Started:
        return cls(*_key(w), _int(w, "pid"), _int(w, "started_at"))


@dataclass
class Hello:
    """Sent on connect: what runs and which ends are unacknowledged."""

    pid: int
    running: list[Started] = field(default_factory=list)
    done: list[Final] = field(default_factory=list)
    containment: str | None = None
    protocol: int = PROTOCOL

    def to_wire(self) -> Wire:
        running = [r.to_wire() for r in self.running]
        for r in running:
            del r["op"]
        return {
            "op": "hello",
            "pid": self.pid,
            "running": running,
            "done": [d.to_wire() for d in self.done],
            "containment": self.containment,
            "protocol": self.protocol,
        }

    @classmethod
    def from_wire(cls, w: Wire) -> Hello:
        try:
            running = [Started.from_wire(r) for r in w.get("running") or []]
            done = [Final.from_wire(d) for d in w.get("done") or []]
        except AttributeError:
            raise BadMessage("hello with a malformed list") from None
        return cls(_int(w, "pid"), running, done, _opt_str(w, "containment"), _version(w))


@dataclass
class Done:
    """An attempt and its process group are gone; `next` is the held attempt started in its
    slot."""

    final: Final
    next: Key | None = None

    def to_wire(self) -> Wire:
        w = self.final.to_wire()
        w["op"] = "done"
        w["next"] = list(self.next) if self.next is not None else None
        return w

    @classmethod
    def from_wire(cls, w: Wire) -> Done:
        following = w.get("next")
        return cls(Final.from_wire(w), _pair(following) if following else None)


@dataclass
class Pong:
    seq: Any = None

    def to_wire(self) -> Wire:
        return {"op": "pong", "seq": self.seq}

    @classmethod
    def from_wire(cls, w: Wire) -> Pong:
        return cls(w.get("seq"))


@dataclass
class Released:
    """A hold given back unstarted."""

    task_id: int
    attempt: int
    hold: Any = None

    def to_wire(self) -> Wire:
        return {
            "op": "released",
            "task_id": self.task_id,
            "attempt": self.attempt,
            "hold": self.hold,
        }

    @classmethod
    def from_wire(cls, w: Wire) -> Released:
        return cls(*_key(w), w.get("hold"))


@dataclass
class Unheld:
    """The answer to `unhold`: `taken`, it will never start; else it started or was released."""

    task_id: int
    attempt: int
    taken: bool
    hold: Any = None

    def to_wire(self) -> Wire:
        return {
            "op": "unheld",
            "task_id": self.task_id,
            "attempt": self.attempt,
            "taken": self.taken,
            "hold": self.hold,
        }

    @classmethod
    def from_wire(cls, w: Wire) -> Unheld:
        return cls(*_key(w), bool(w.get("taken")), w.get("hold"))


DaemonMessage = Auth | Ping | Spawn | Unhold | Signal | Ack | Retire
SupervisorMessage = Hello | Started | Done | Pong | Released | Unheld
DAEMON_MESSAGES: dict[str, Callable[[Wire], DaemonMessage]] = {
    "auth": Auth.from_wire,
    "ping": Ping.from_wire,
    "spawn": Spawn.from_wire,
    "unhold": Unhold.from_wire,
    "signal": Signal.from_wire,
    "ack": Ack.from_wire,
    "retire": Retire.from_wire,
}
SUPERVISOR_MESSAGES: dict[str, Callable[[Wire], SupervisorMessage]] = {
    "hello": Hello.from_wire,
    "started": Started.from_wire,
    "done": Done.from_wire,
    "pong": Pong.from_wire,
    "released": Released.from_wire,
    "unheld": Unheld.from_wire,
}


def decode_from_daemon(frame: Wire) -> DaemonMessage | None:
    """The message a frame carries; None for an op we do not know. Raises BadMessage."""
    return _decode(frame, DAEMON_MESSAGES)


def decode_from_supervisor(frame: Wire) -> SupervisorMessage | None:
    """The message a frame carries; None for an op we do not know. Raises BadMessage."""
    return _decode(frame, SUPERVISOR_MESSAGES)


def encode(message: DaemonMessage | SupervisorMessage) -> bytes:
    return encode_frame(message.to_wire())


def encode_frame(message: Wire) -> bytes:
    payload = json.dumps(message, separators=(",", ":")).encode()
    return HEADER.pack(len(payload)) + payload


class FrameReader:
    """Splits a byte stream into length-prefixed JSON frames."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[Wire]:
        """The frames completed by `data`. Raises ValueError on a payload that is not JSON."""
        self.buf += data
        frames = []
        while len(self.buf) >= HEADER.size:
            (size,) = HEADER.unpack_from(self.buf)
            if len(self.buf) < HEADER.size + size:
                break
            frames.append(json.loads(self.buf[HEADER.size : HEADER.size + size]))
            del self.buf[: HEADER.size + size]
        return frames


# -- field readers -------------------------------------------------------------------------------


def _decode(frame: Wire, table: dict[str, Callable[[Wire], Any]]) -> Any:
    if not isinstance(frame, dict):
        raise BadMessage(f"a frame that is not an object: {frame!r}")
    decoder = table.get(frame.get("op"))  # type: ignore[arg-type]
    if decoder is None:
        return None
    try:
        return decoder(frame)
    except (KeyError, TypeError, ValueError) as e:
        raise BadMessage(f"malformed {frame.get('op')}: {e!r}") from None


def _key(w: Wire) -> Key:
    return (int(w["task_id"]), int(w["attempt"]))


def _pair(value: Any) -> Key:
    return (int(value[0]), int(value[1]))


def _int(w: Wire, name: str) -> int:
    return int(w[name])


def _opt_int(w: Wire, name: str) -> int | None:
    value = w.get(name)
    return None if value is None else int(value)


def _opt_float(w: Wire, name: str) -> float | None:
    value = w.get(name)
    return None if value is None else float(value)


def _opt_str(w: Wire, name: str) -> str | None:
    value = w.get(name)
    return None if value is None else str(value)


def _version(w: Wire) -> int:
    return _opt_int(w, "protocol") or 0
