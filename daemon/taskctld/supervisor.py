"""The supervisor: the parent of every command, independent of the daemon.

One supervisor process per daemon generation starts the commands (vfork+exec, each in its own
process group, stdin from /dev/null, output piped into capped per-attempt log files), enforces
timeouts, kills whole process trees on cancel or timeout, reaps them with `wait4` (exit status,
CPU time, peak RSS), and writes each attempt's run file. It is single-threaded: one selector
loop over the daemon's connection, the output pipes, a signal wake-up pipe and the deadlines.

Why not one Python worker per task: forking an interpreter costs about 0.8-1 ms here, more than
starting the command itself (`bench/fork_cost.py`); a shared supervisor pays only the vfork.

Only its daemon may talk to it. A connection from another uid (SO_PEERCRED) is refused and
logged; one of our uid must first prove it is the daemon with the secret the daemon handed us at
launch (on our stdin; it is also in our 0600 info file for the next daemon). Until it does, it
is a stranger: it gets no `hello`, and it never displaces the daemon's link. Each attempt runs
in a cgroup of its own where one can be made (`containment`), else in its own process group.

It outlives the daemon. The daemon starts it as a fresh interpreter (`python -m
taskctld.supervisor`, importing only this module and `procfs`, so it is small and
single-threaded) and talks to it over a Unix socket.
When the daemon dies, the supervisor keeps running its tasks and keeps their outcomes (in memory
and in run files); the next daemon connects to it, receives a `hello` listing what runs and what
ended, and tells it to retire: it takes no new work and exits once its last task has ended.
A new supervisor takes the new work (so an upgrade runs new tasks with new code).

Its journal (`run/supervisor.PID.journal`, JSON lines, appended through one open file):
  {"started": {task_id, attempt, pid, boot_id, started_at}}   once a command runs
  {"ident": {task_id, attempt, start}}     its start time in ticks, for identity (after 1 s)
  {"final": {task_id, attempt, outcome, exit_code, ...}}      once it and its tree are gone
A daemon reads the journal only when the supervisor is dead; what a live one knows it says in
`hello`. The journal is compacted when it grows. The supervisor's identity (pid, start time,
boot id, socket) is in `run/supervisor.PID.json`.

Wire: 4-byte big-endian length, then a JSON object with an "op".
  daemon -> supervisor: auth {token} (first), spawn {spec, after?}, unhold {task_id, attempt,
                        hold}, signal {task_id, attempt, kind}, ack {task_id, attempt}, retire,
                        ping {seq}
  supervisor -> daemon: hello {pid, running, done, containment}, started {...}, done {..., next},
                        pong {seq},
                        released {task_id, attempt, hold}, unheld {task_id, attempt, taken, hold}

A spawn with `after` (and a `hold` token) is held: it starts the moment attempt `after` ends (its slot passes on
without a round trip through the daemon), and `done` of `after` names it in `next`. A held spec
belongs to the connection that sent it: it is dropped when that daemon goes away or retires us,
and given back (`released`) when `after` is not running when it arrives.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import heapq
import hmac
import json
import os
import resource
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from taskctld import containment
from taskctld.containment import Cgroups
from taskctld.procfs import ProcessId, children_of, descendants_of, read_boot_id

PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36
HEADER = struct.Struct("!I")
READ_SIZE = 65536
UNATTACHED_LIMIT = 60.0  # seconds a fresh supervisor waits for its first daemon
AUTH_LIMIT = 5.0  # seconds a new connection has to prove it is the daemon
AUTH_FRAME_LIMIT = 4096  # bytes a connection may send before it has proved it
LEFTOVER_GRACE = 1.0  # seconds we wait for pipes held open by processes outside the tree
REJOURNAL_EVERY = 1.0  # seconds between tries to journal an end the journal did not take
EXIT_NO_SPACE = 6  # our exit status when the run folder is out of space (as taskctl's)
STDERR_TAIL = 4096  # bytes of stderr kept to explain a failure (memory limit)
OOM_HINTS = (b"MemoryError", b"Cannot allocate memory", b"out of memory", b"bad_alloc")


@dataclass
class AttemptSpec:
    """Everything needed to run one attempt; sent by the daemon with `spawn`."""

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


def now_ms() -> int:
    return time.time_ns() // 1_000_000


JOURNAL_COMPACT_AT = 4 << 20


class Journal:
    """An append-only JSON-lines file; each record is one write() on an O_APPEND descriptor."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self.size = os.fstat(self.fd).st_size
        self.compact_at = JOURNAL_COMPACT_AT
        self.torn = False  # the last append failed: the file may end in part of a line

    def append(self, kind: str, record: dict[str, Any]) -> bool:
        """Best effort: False when the record could not be written (a full disk). The
        connected daemon gets it anyway; the journal only matters if both die, and a final
        record that is not in it keeps the supervisor alive until a daemon has it (see
        `Supervisor.unjournaled`)."""
        line = json.dumps({kind: record}, separators=(",", ":")).encode() + b"\n"
        if self.torn:  # end the part of a line a failed write may have left (readers skip it)
            line = b"\n" + line
        try:
            written = os.write(self.fd, line)
        except OSError as e:
            self.torn = True
            _say(f"cannot append to {self.path}: {e.strerror}")
            return False
        self.size += written
        self.torn = written < len(line)
        return not self.torn

    def rewrite(self, records: list[tuple[str, dict[str, Any]]]) -> None:
        """Replace the journal with just `records` (atomic: a new file renamed over it). When
        that fails (a full disk), the old journal stays in use and the next try waits until it
        has grown by another JOURNAL_COMPACT_AT."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                for kind, record in records:
                    f.write(json.dumps({kind: record}, separators=(",", ":")).encode() + b"\n")
            os.chmod(tmp, 0o600)
            tmp.replace(self.path)
        except OSError as e:
            _say(f"cannot compact {self.path}: {e.strerror}")
            with contextlib.suppress(OSError):
                tmp.unlink()
            self.compact_at = self.size + JOURNAL_COMPACT_AT
            return
        try:  # never leave self.fd closed (a reused descriptor number would take our appends)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        except OSError as e:
            _say(f"cannot reopen {self.path}: {e.strerror}")
            self.compact_at = self.size + JOURNAL_COMPACT_AT
            return
        os.close(self.fd)
        self.fd = fd
        self.size = os.fstat(self.fd).st_size
        # Many long-running attempts can keep even the compacted journal big: compact again
        # only once it has doubled, not on every record.
        self.compact_at = max(JOURNAL_COMPACT_AT, 2 * self.size)

    def wants_compacting(self) -> bool:
        return self.size > self.compact_at


def read_journal(path: Path) -> dict[tuple[int, int], dict[str, Any]]:
    """A journal as {(task_id, attempt): {"started": ..., "ident": ..., "final": ...}}; torn or
    foreign lines are skipped."""
    attempts: dict[tuple[int, int], dict[str, Any]] = {}
    try:
        lines = path.read_bytes().split(b"\n")
    except FileNotFoundError:
        return attempts
    for line in lines:
        try:
            record = json.loads(line)
            ((kind, body),) = record.items()
            key = (int(body["task_id"]), int(body["attempt"]))
        except (ValueError, TypeError, KeyError, AttributeError):
            continue
        attempts.setdefault(key, {})[kind] = body
    return attempts


def encode_frame(message: dict[str, Any]) -> bytes:
    payload = json.dumps(message, separators=(",", ":")).encode()
    return HEADER.pack(len(payload)) + payload


class FrameReader:
    """Splits a byte stream into length-prefixed JSON frames."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self.buf += data
        frames = []
        while len(self.buf) >= HEADER.size:
            (size,) = HEADER.unpack_from(self.buf)
            if len(self.buf) < HEADER.size + size:
                break
            frames.append(json.loads(self.buf[HEADER.size : HEADER.size + size]))
            del self.buf[: HEADER.size + size]
        return frames


# -- one running attempt -------------------------------------------------------------------------


@dataclass
class LogSink:
    """One output stream: a pipe's read end copied into a log file, up to a cap. The file is
    created on the first byte: silent tasks cost no files."""

    fd: int
    path: str
    cap: int
    out: int = -1
    written: int = 0
    discarded: int = 0
    tail: bytes = b""  # the last bytes seen (stderr), to explain a failure
    keep_tail: bool = False
    broken: str | None = None  # why the log cannot be written (a full disk): output is dropped

    def pump(self) -> bool:
        """Copy what is available; False once the pipe is at its end. The pipe is always
        drained, whatever happens to the file, so the command never blocks on its output."""
        try:
            data = os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return True
        if not data:
            return False
        if self.keep_tail:
            self.tail = (self.tail + data)[-STDERR_TAIL:]
        if self.broken is None:
            try:
                self._store(data)
            except OSError as e:
                self.broken = e.strerror or str(e)
        return True

    def _store(self, data: bytes) -> None:
        if self.out < 0:
            self.out = os.open(
                self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600
            )
        room = self.cap - self.written
        if room > 0:
            os.write(self.out, data[:room])
            self.written += min(room, len(data))
        if len(data) > room:
            if self.discarded == 0:
                notice = f"\n[taskctl: output truncated: the cap of {self.cap} bytes was reached]\n"
                os.write(self.out, notice.encode())
            self.discarded += len(data) - max(room, 0)

    def close(self) -> None:
        for fd in (self.fd, self.out):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)


@dataclass
class Running:
    spec: AttemptSpec
    pid: int
    start_ticks: int | None
    started_at: int
    sinks: list[LogSink] = field(default_factory=list)
    status: int | None = None
    usage: Any = None
    deadline: float | None = None
    kill_outcome: str | None = None  # why we are killing it: timeout, cancelled, interrupted
    kill_at: float | None = None  # when SIGKILL follows SIGTERM
    exited_at: float | None = None  # when the main process was reaped
    peak_rss: int = 0  # sampled VmHWM of the main process (bytes)
    stderr_tail: bytes = b""
    log_problem: str | None = None
    cgroup: Path | None = None  # its own cgroup, when containment is by cgroup

    @property
    def key(self) -> tuple[int, int]:
        return (self.spec.task_id, self.spec.attempt)


# -- the supervisor ------------------------------------------------------------------------------


class Supervisor:
    def __init__(
        self,
        listener: socket.socket,
        journal: Journal,
        boot_id: str,
        token: str,
        cgroups: Cgroups | None,
        containment: str,
    ) -> None:
        self.listener = listener
        self.journal = journal
        self.boot_id = boot_id
        self.token = token.encode()
        self.cgroups = cgroups
        self.containment = containment  # what hello tells the daemon, for `health`
        self.strangers: dict[socket.socket, tuple[FrameReader, float]] = {}  # not yet proven
        self.sel = selectors.DefaultSelector()
        self.conn: socket.socket | None = None
        self.reader = FrameReader()
        self.outbox = bytearray()
        self.conn_events = selectors.EVENT_READ
        self.running: dict[tuple[int, int], Running] = {}
        self.by_pid: dict[int, Running] = {}
        self.done: dict[tuple[int, int], dict[str, Any]] = {}
        # Ends in `done` whose final record the journal did not take (a full disk): only we
        # know them, so we stay until a daemon acknowledges them or the journal takes them.
        self.unjournaled: set[tuple[int, int]] = set()
        self.rejournal_at: float | None = None
        self.held: dict[tuple[int, int], AttemptSpec] = {}  # by the attempt it follows
        self.held_keys: set[tuple[int, int]] = set()  # the attempts in self.held
        self.hold_tokens: dict[tuple[int, int], Any] = {}  # what the daemon calls each hold
        self.timers: list[tuple[float, tuple[int, int] | None]] = []
        self.sweep_at: float | None = None  # next look for leftovers of finished tasks
        self.sample_at: float | None = None  # next sample of peak RSS of running tasks
        self.warned: set[int] = set()  # leftovers already sent SIGTERM
        self.retired = False
        self.ever_attached = False
        self.born = time.monotonic()
        self.own_hwm = 0
        self.wake_r = -1

    # -- the loop -------------------------------------------------------------------------------

    def serve(self) -> int:
        self._install_signals()
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, "accept")
        self.sel.register(self.wake_r, selectors.EVENT_READ, "wake")
        self.own_hwm = _vm_hwm(os.getpid())
        while not self._finished():
            for key, mask in self.sel.select(self._next_timeout()):
                self._dispatch(key, mask)
            self._reap()
            self._run_timers()
            if self.outbox and self.conn is not None and self.conn_events == selectors.EVENT_READ:
                self._flush()  # (when the socket is full, the selector says when to go on)
        return 0

    def _finished(self) -> bool:
        if self.running or self.unjournaled:
            return False
        if self.retired or (self.ever_attached and self.conn is None):
            return not self.outbox or self.conn is None
        return not self.ever_attached and time.monotonic() - self.born > UNATTACHED_LIMIT

    def _dispatch(self, key: selectors.SelectorKey, mask: int) -> None:
        tag = key.data
        if tag == "accept":
            self._accept()
        elif tag == "wake":
            _drain(self.wake_r)
        elif tag == "stranger":
            self._read_stranger(key.fileobj)  # type: ignore[arg-type]
        elif tag == "conn":
            if mask & selectors.EVENT_READ:
                self._read_conn()
            if mask & selectors.EVENT_WRITE and self.conn is not None:
                self._flush()
        else:
            running, sink = tag
            more = sink.pump()
            if sink.keep_tail:
                running.stderr_tail = sink.tail
            if sink.broken and not running.log_problem:
                running.log_problem = f"output not saved: {sink.broken}"
            if not more:
                self.sel.unregister(sink.fd)
                sink.close()
                running.sinks.remove(sink)
                self._maybe_finish(running)

    # -- the daemon's connection ----------------------------------------------------------------

    def _accept(self) -> None:
        """A new connection: refused at once unless it is of our uid, and a stranger (heard
        only for its `auth`) until it proves it is the daemon."""
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        pid, uid = _peer_of(conn)
        if uid != os.getuid():
            _say(f"refused a connection from uid {uid} (pid {pid}): not our user")
            conn.close()
            return
        conn.setblocking(False)
        deadline = time.monotonic() + AUTH_LIMIT
        self.strangers[conn] = (FrameReader(), deadline)
        self.sel.register(conn, selectors.EVENT_READ, "stranger")
        heapq.heappush(self.timers, (deadline, None))

    def _read_stranger(self, conn: socket.socket) -> None:
        reader, _ = self.strangers[conn]
        try:
            data = conn.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        try:
            frames = reader.feed(data)
        except ValueError:
            frames = [{}]
        if data and not frames and len(reader.buf) <= AUTH_FRAME_LIMIT:
            return  # the rest of its first frame is still on its way
        self._forget_stranger(conn)
        if frames and self._proves(frames[0]):
            self._attach(conn, reader)
            for frame in frames[1:]:
                self._handle(frame)
            return
        pid, _ = _peer_of(conn)
        _say(f"refused a connection from pid {pid}: it did not prove it is the daemon")
        conn.close()

    def _proves(self, frame: dict[str, Any]) -> bool:
        token = frame.get("token") if frame.get("op") == "auth" else None
        return isinstance(token, str) and hmac.compare_digest(token.encode(), self.token)

    def _forget_stranger(self, conn: socket.socket) -> None:
        self.strangers.pop(conn, None)
        self.sel.unregister(conn)

    def _expire_strangers(self, now: float) -> None:
        for conn, (_, deadline) in list(self.strangers.items()):
            if now >= deadline:
                self._forget_stranger(conn)
                _say("refused a connection that did not prove it is the daemon in time")
                conn.close()

    def _attach(self, conn: socket.socket, reader: FrameReader) -> None:
        """The daemon (proven): it replaces the link of a vanished one, and hears `hello`."""
        if self.conn is not None:
            self._drop_conn()
        self.conn = conn
        self.ever_attached = True
        self.reader = reader
        self.outbox = bytearray()
        self.sel.register(conn, selectors.EVENT_READ, "conn")
        self.conn_events = selectors.EVENT_READ
        running = [
            {
                "task_id": r.spec.task_id,
                "attempt": r.spec.attempt,
                "pid": r.pid,
                "started_at": r.started_at,
            }
            for r in self.running.values()
        ]
        done = [{"task_id": k[0], "attempt": k[1], **final} for k, final in self.done.items()]
        self._send(
            {
                "op": "hello",
                "pid": os.getpid(),
                "running": running,
                "done": done,
                "containment": self.containment,
            }
        )

    def _drop_conn(self) -> None:
        if self.conn is not None:
            self.sel.unregister(self.conn)
            self.conn.close()
            self.conn = None
            self.outbox = bytearray()
            self.held.clear()
            self.held_keys.clear()
            self.hold_tokens.clear()  # held specs are that daemon's; the next one decides again

    def _read_conn(self) -> None:
        assert self.conn is not None
        try:
            data = self.conn.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop_conn()
            return
        for frame in self.reader.feed(data):
            self._handle(frame)

    def _handle(self, frame: dict[str, Any]) -> None:
        op = frame.get("op")
        if op == "spawn":
            spec = AttemptSpec(**frame["spec"])
            if frame.get("after"):
                after = (int(frame["after"][0]), int(frame["after"][1]))
                self._hold(spec, after, frame.get("hold"))
            else:
                self._spawn(spec)
        elif op == "unhold":
            self._unhold((int(frame["task_id"]), int(frame["attempt"])), frame.get("hold"))
        elif op == "signal":
            self._signal_request((int(frame["task_id"]), int(frame["attempt"])), str(frame["kind"]))
        elif op == "ack":
            self._ack((int(frame["task_id"]), int(frame["attempt"])))
        elif op == "ping":
            self._send({"op": "pong", "seq": frame.get("seq")})
        elif op == "retire":
            self.retired = True
            self.held.clear()
            self.held_keys.clear()
            self.hold_tokens.clear()

    def _send(self, message: dict[str, Any]) -> None:
        """Queue a message; the loop sends what is queued once per turn (one write for an
        end and the start that followed it)."""
        if self.conn is None:
            return  # no daemon: the run file has it, and `hello` repeats it to the next one
        self.outbox += encode_frame(message)

    def _flush(self) -> None:
        assert self.conn is not None
        try:
            sent = self.conn.send(self.outbox)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._drop_conn()
            return
        del self.outbox[:sent]
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.outbox else 0)
        if events != self.conn_events:  # a syscall: only when it changes
            self.sel.modify(self.conn, events, "conn")
            self.conn_events = events

    # -- starting -------------------------------------------------------------------------------

    def _hold(self, spec: AttemptSpec, after: tuple[int, int], token: Any) -> None:
        """Keep `spec` to start when `after` ends, if `after` is running or itself held;
        otherwise give it back (the daemon's view was behind ours). `token` names this hold
        in `released`, so that a late answer is not taken for a newer hold of the same task."""
        key = (spec.task_id, spec.attempt)
        waiting = after in self.running or after in self.held_keys
        known = key in self.running or key in self.done or key in self.held_keys
        if self.retired or not waiting or after in self.held or known:
            self._release(key, token)
            return
        self.held[after] = spec
        self.held_keys.add(key)
        self.hold_tokens[key] = token

    def _unhold(self, key: tuple[int, int], token: Any) -> None:
        """The daemon takes a held spec back (cancelled, its queue paused): drop it, and give
        back what was held after it. The answer, `unheld` (with the hold's token), says whether
        it was still held (`taken`: it will never start); if not, it is not held any more: it
        started (and `started` went out before this) or had been given back."""
        taken = key in self.held_keys
        for after, spec in list(self.held.items()) if taken else ():
            if (spec.task_id, spec.attempt) == key:
                self._take_held(after)
                self.hold_tokens.pop(key, None)
                self._release_after(key)
        self._send(
            {"op": "unheld", "task_id": key[0], "attempt": key[1], "taken": taken, "hold": token}
        )

    def _take_held(self, after: tuple[int, int]) -> AttemptSpec | None:
        spec = self.held.pop(after, None)
        if spec is not None:
            self.held_keys.discard((spec.task_id, spec.attempt))
        return spec

    def _release_after(self, key: tuple[int, int]) -> None:
        while (spec := self._take_held(key)) is not None:
            key = (spec.task_id, spec.attempt)
            self._release(key, self.hold_tokens.pop(key, None))

    def _release(self, key: tuple[int, int], token: Any) -> None:
        self._send({"op": "released", "task_id": key[0], "attempt": key[1], "hold": token})

    def _spawn(self, spec: AttemptSpec) -> None:
        key = (spec.task_id, spec.attempt)
        if key in self.running or key in self.done:
            return  # a repeated request (the daemon reconnected): once is enough
        if self.retired:
            self._finish_now(spec, {"outcome": "not_started", "error": "supervisor retired"})
            return
        started_at = now_ms()
        try:
            cgroup = self._cgroup_for(spec)
        except OSError as e:
            error = f"cannot make its cgroup: {e.strerror or e}"
            self._finish_now(spec, {"outcome": "spawn_error", "error": error})
            return
        try:
            pid, sinks = self._start_process(spec, cgroup)
        except OSError as e:
            self._remove_cgroup(cgroup)
            self._finish_now(spec, {"outcome": "spawn_error", "error": spawn_message(e, spec)})
            return
        running = Running(spec, pid, None, started_at, sinks, cgroup=cgroup)
        self.journal.append("started", self._started_record(running))
        self.running[key] = running
        self.by_pid[pid] = running
        for sink in sinks:
            self.sel.register(sink.fd, selectors.EVENT_READ, (running, sink))
        if spec.timeout is not None:
            running.deadline = time.monotonic() + spec.timeout
            heapq.heappush(self.timers, (running.deadline, key))
        self._schedule_sample()
        self._send(
            {
                "op": "started",
                "task_id": spec.task_id,
                "attempt": spec.attempt,
                "pid": pid,
                "started_at": started_at,
            }
        )

    def _started_record(self, running: Running) -> dict[str, Any]:
        record = {
            "task_id": running.key[0],
            "attempt": running.key[1],
            "pid": running.pid,
            "boot_id": self.boot_id,
            "started_at": running.started_at,
        }
        if running.cgroup is not None:
            record["cgroup"] = str(running.cgroup)
        return record

    def _cgroup_for(self, spec: AttemptSpec) -> Path | None:
        if self.cgroups is None:
            return None
        return self.cgroups.take()

    def _remove_cgroup(self, cgroup: Path | None) -> None:
        if cgroup is not None and self.cgroups is not None:
            self.cgroups.give_back(cgroup)

    def _start_process(self, spec: AttemptSpec, cgroup: Path | None) -> tuple[int, list[LogSink]]:
        """Start the command: own process group (and cgroup), stdin /dev/null, output into
        pipes."""
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        spawn = _spawn_fast if spec.memory_limit is None else _spawn_limited
        try:
            if cgroup is None or self.cgroups is None:
                pid = spawn(spec, out_w, err_w)
            else:
                with self.cgroups.inside(cgroup):
                    pid = spawn(spec, out_w, err_w)
        except BaseException:
            os.close(out_r)
            os.close(err_r)
            raise
        finally:
            os.close(out_w)  # the command holds the write ends now
            os.close(err_w)
        sinks = [
            LogSink(fd=out_r, path=spec.stdout_path, cap=spec.log_cap),
            LogSink(
                fd=err_r,
                path=spec.stderr_path,
                cap=spec.log_cap,
                keep_tail=spec.memory_limit is not None,
            ),
        ]
        for sink in sinks:
            os.set_blocking(sink.fd, False)
        return pid, sinks

    # -- signals from outside and timers ---------------------------------------------------------

    def _signal_request(self, key: tuple[int, int], kind: str) -> None:
        running = self.running.get(key)
        if running is None or running.status is not None:
            return
        outcome = {"cancel": "cancelled", "interrupt": "interrupted"}.get(kind)
        if outcome:
            self._start_kill(running, outcome)

    def _start_kill(self, running: Running, outcome: str | None) -> None:
        """SIGTERM the tree now, SIGKILL after the grace. `outcome` None: leftovers of a
        command that already exited (its outcome is its own)."""
        if outcome and not running.kill_outcome:
            running.kill_outcome = outcome
        if running.kill_at is None:
            running.kill_at = time.monotonic() + running.spec.kill_grace
            heapq.heappush(self.timers, (running.kill_at, running.key))
        self._signal_tree(running, signal.SIGTERM)

    def _signal_tree(self, running: Running, sig: int) -> None:
        """Every process of the attempt: its cgroup's; or, without one, its process group plus
        every process of its tree wherever it moved: its descendants, and orphans (reparented
        to us, the subreaper) carrying its task id."""
        if running.cgroup is not None:
            containment.signal_members(running.cgroup, sig)
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(running.pid, sig)
        for pid in self._tree_of(running):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def _tree_of(self, running: Running) -> list[int]:
        """Every live process of the attempt: descendants of its main process, and orphans
        (reparented to us) whose environment names its task. Scans /proc: only on kills."""
        pids = descendants_of(running.pid) if running.status is None else []
        marker = f"TASKCTL_TASK_ID={running.spec.task_id}".encode()
        for orphan in descendants_of(os.getpid()):
            if orphan not in self.by_pid and _environ_has(orphan, marker):
                pids.append(orphan)
        return pids

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _, key = heapq.heappop(self.timers)
            if key is None:
                self._periodic(now)
            elif (running := self.running.get(key)) is not None:
                self._tick(running, now)

    def _tick(self, running: Running, now: float) -> None:
        if running.status is None and running.deadline is not None and now >= running.deadline:
            running.deadline = None
            self._start_kill(running, "timeout")
        if running.kill_at is not None and now >= running.kill_at:
            self._signal_tree(running, signal.SIGKILL)
            running.kill_at = now + 1.0  # keep insisting on stragglers, once a second
            heapq.heappush(self.timers, (running.kill_at, running.key))
        if running.exited_at is not None and now - running.exited_at >= LEFTOVER_GRACE:
            # Only a process outside its group can still hold its pipes: stop waiting for them.
            self._maybe_finish(running, force=not _tree_alive(running))

    def _schedule_rejournal(self) -> None:
        if self.rejournal_at is None:
            self.rejournal_at = time.monotonic() + REJOURNAL_EVERY
            heapq.heappush(self.timers, (self.rejournal_at, None))

    def _rejournal(self) -> None:
        """Try again to journal the final records the journal did not take."""
        for key in sorted(self.unjournaled):
            final = self.done.get(key)
            if final is not None and not self.journal.append(
                "final", {"task_id": key[0], "attempt": key[1], **final}
            ):
                self._schedule_rejournal()
                return
            self.unjournaled.discard(key)

    def _periodic(self, now: float) -> None:
        if self.strangers:
            self._expire_strangers(now)
        if self.rejournal_at is not None and now >= self.rejournal_at:
            self.rejournal_at = None
            self._rejournal()
        if self.sample_at is not None and now >= self.sample_at:
            self.sample_at = None
            self._sample()
        if self.sweep_at is not None and now >= self.sweep_at:
            self.sweep_at = None
            self._sweep()

    def _schedule_sample(self) -> None:
        """Peak RSS of running commands, once a second while any runs (never when idle)."""
        if self.sample_at is None and self.running:
            self.sample_at = time.monotonic() + 1.0
            heapq.heappush(self.timers, (self.sample_at, None))

    def _sample(self) -> None:
        """Peak RSS so far; and, for commands that have run a second, their start time (which
        makes pid + start + boot id an identity a reused pid cannot fake)."""
        self.own_hwm = _vm_hwm(os.getpid())
        for running in self.running.values():
            if running.status is not None:
                continue
            running.peak_rss = max(running.peak_rss, _vm_hwm(running.pid))
            if running.start_ticks is None:
                ident = ProcessId.of(running.pid, self.boot_id)
                if ident is not None:
                    running.start_ticks = ident.start
                    self.journal.append(
                        "ident",
                        {
                            "task_id": running.key[0],
                            "attempt": running.key[1],
                            "start": ident.start,
                        },
                    )
        self._schedule_sample()

    def _schedule_sweep(self) -> None:
        if self.sweep_at is None:
            self.sweep_at = time.monotonic() + 2.0
            heapq.heappush(self.timers, (self.sweep_at, None))

    def _sweep(self) -> None:
        """Processes that escaped both the process group and the pipes of a task that has
        ended come back to us as orphans (we are the subreaper): stop them, TERM then KILL."""
        live_tasks = {key[0] for key in self.running}
        leftovers = False
        for pid in children_of(os.getpid()):
            if pid in self.by_pid:
                continue
            task = _task_of(pid)
            if task is None or task in live_tasks:
                continue
            sig = signal.SIGKILL if pid in self.warned else signal.SIGTERM
            self.warned.add(pid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
            leftovers = True
        if leftovers:
            self._schedule_sweep()
        else:
            self.warned.clear()

    def _next_timeout(self) -> float | None:
        if not self.timers:
            return None if self.ever_attached else UNATTACHED_LIMIT
        return max(0.0, self.timers[0][0] - time.monotonic())

    # -- reaping and finishing ------------------------------------------------------------------

    def _reap(self) -> None:
        """Collect every exited child: our commands, and orphans of their trees (reparented to
        us, the subreaper). Then finish what can be finished: an orphan reaped just now may
        have been the last member of an attempt's group (a killed shell's killed child, say)."""
        exited = []
        for pid, status, usage in _exited_children():
            running = self.by_pid.pop(pid, None)
            if running is None:
                self.warned.discard(pid)
                continue
            running.status, running.usage = status, usage
            running.exited_at = time.monotonic()
            heapq.heappush(self.timers, (running.exited_at + LEFTOVER_GRACE, running.key))
            exited.append(running)
        for running in exited:
            if _tree_alive(running):
                self._start_kill(running, None)  # it left processes behind in its group
        for running in [r for r in self.running.values() if r.status is not None]:
            self._maybe_finish(running)

    def _maybe_finish(self, running: Running, force: bool = False) -> None:
        """An attempt is over once its main process is reaped, its pipes are at their end and
        its process group is empty (or the leftover grace has passed)."""
        if running.status is None or running.key not in self.running:
            return
        if not force and (running.sinks or _tree_alive(running)):
            return
        for sink in list(running.sinks):
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(sink.fd)
            sink.close()
        running.sinks.clear()
        self.running.pop(running.key, None)
        self._remove_cgroup(running.cgroup)
        self._record_final(running.spec, self._final_of(running))
        self._schedule_sweep()

    def _final_of(self, running: Running) -> dict[str, Any]:
        status, usage = running.status or 0, running.usage
        record: dict[str, Any] = {
            "started_at": running.started_at,
            "ended_at": now_ms(),
            "exit_code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            "max_rss": self._peak_rss(running, usage.ru_maxrss * 1024 if usage else 0),
            "cpu_user": round(usage.ru_utime, 6) if usage else None,
            "cpu_system": round(usage.ru_stime, 6) if usage else None,
        }
        if running.log_problem:
            record["error"] = running.log_problem
        if running.kill_outcome:
            record["outcome"] = running.kill_outcome
        elif record["signal"] is not None:
            record["outcome"] = "signaled"
        else:
            record["outcome"] = "exited"
        if (
            running.spec.memory_limit
            and record["outcome"] in ("exited", "signaled")
            and record["exit_code"] != 0
        ):
            hint = self._memory_hint(running)
            if hint:
                record["error"] = hint
                record["cause"] = "memory_limit"
        return record

    def _peak_rss(self, running: Running, reported: int) -> int | None:
        """wait4's peak RSS also counts the pages the command had before its exec, which were
        ours (vfork shares our memory). Above our own high-water mark it is the command's exact
        peak; at or below, the best we know is what we sampled (None: too brief to sample)."""
        if reported > self.own_hwm:
            return reported
        return running.peak_rss or None

    def _memory_hint(self, running: Running) -> str | None:
        """Why a task with a memory limit failed, when the evidence says it hit the limit."""
        signaled = running.status is not None and os.WIFSIGNALED(running.status)
        if any(h in running.stderr_tail for h in OOM_HINTS) or signaled:
            limit = running.spec.memory_limit or 0
            return f"it hit its memory limit of {limit >> 20} MiB (address space)"
        return None

    def _finish_now(self, spec: AttemptSpec, final: dict[str, Any]) -> None:
        final.setdefault("ended_at", now_ms())
        self._record_final(spec, final)

    def _record_final(self, spec: AttemptSpec, final: dict[str, Any]) -> None:
        """Record and report an attempt's end; then start what was held to follow it (its
        slot is free now), saying so in the same `done`."""
        key = (spec.task_id, spec.attempt)
        if not self.journal.append("final", {"task_id": key[0], "attempt": key[1], **final}):
            self.unjournaled.add(key)
            self._schedule_rejournal()
        self.done[key] = final
        following = self._take_held(key)
        if following is not None:
            self.hold_tokens.pop((following.task_id, following.attempt), None)
        after = None if following is None else [following.task_id, following.attempt]
        self._send(
            {"op": "done", "task_id": spec.task_id, "attempt": spec.attempt, **final, "next": after}
        )
        if following is not None:
            self._spawn(following)

    def _ack(self, key: tuple[int, int]) -> None:
        self.done.pop(key, None)
        self.unjournaled.discard(key)
        if self.journal.wants_compacting():
            self._compact()

    def _compact(self) -> None:
        """Keep only what a later daemon could still need: running and unacknowledged ones."""
        records: list[tuple[str, dict[str, Any]]] = []
        for (task_id, attempt), r in self.running.items():
            records.append(("started", self._started_record(r)))
            if r.start_ticks is not None:
                records.append(
                    ("ident", {"task_id": task_id, "attempt": attempt, "start": r.start_ticks})
                )
        for (task_id, attempt), final in self.done.items():
            records.append(("final", {"task_id": task_id, "attempt": attempt, **final}))
        self.journal.rewrite(records)

    # -- signals to us --------------------------------------------------------------------------

    def _install_signals(self) -> None:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wake_r = r
        signal.set_wakeup_fd(w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        # We outlive the daemon: signals meant for it (a terminal's Ctrl-C, a service stop)
        # are not for us. Handled (not ignored), so that commands get the default back at exec.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda *_: None)


# -- starting the supervisor ---------------------------------------------------------------------


@dataclass
class SupervisorInfo:
    pid: int
    start: int
    boot_id: str
    socket: str
    token: str = ""  # what the daemon proves itself with ("": a supervisor from before auth)

    def path_in(self, run_dir: Path) -> Path:
        return run_dir / f"supervisor.{self.pid}.json"


def launch_supervisor(
    run_dir: Path, socket_path: Path, cgroup_home: Path | None
) -> tuple[subprocess.Popen[bytes], SupervisorInfo]:
    """Start a supervisor listening on `socket_path`, as a fresh process in its own session,
    with a new secret (on its stdin) that only this daemon and the next can prove.

    The socket is bound here, before the process starts, so the caller can connect at once
    (the connection waits in the backlog until the supervisor accepts it)."""
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()
    token = os.urandom(24).hex()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(socket_path))
    os.chmod(socket_path, 0o600)
    listener.listen(4)
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "taskctld.supervisor",
                str(listener.fileno()),
                str(run_dir),
                str(socket_path),
                str(cgroup_home or ""),
            ],
            pass_fds=(listener.fileno(),),
            stdin=subprocess.PIPE,
            start_new_session=True,
        )
    finally:
        listener.close()
    assert proc.stdin is not None
    with contextlib.suppress(BrokenPipeError), proc.stdin:
        proc.stdin.write(token.encode() + b"\n")
    ident = ProcessId.of(proc.pid)
    start = ident.start if ident else 0
    info = SupervisorInfo(proc.pid, start, read_boot_id(), str(socket_path), token)
    return proc, info


def _contain(home: str, pid: int) -> tuple[Cgroups | None, str]:
    """Our cgroups, or None and the containment we fall back to (with why)."""
    if not home:
        return None, containment.PROCESS_GROUP
    try:
        return Cgroups(Path(home), pid), containment.CGROUP
    except OSError as e:
        why = e.strerror or str(e)
        _say(f"cannot run attempts in cgroups ({why}); containing them by process group")
        return None, f"{containment.PROCESS_GROUP} (no cgroup: {why})"


def _main(argv: list[str]) -> int:
    """`python -m taskctld.supervisor FD RUN_DIR SOCKET CGROUP_HOME`, the daemon's secret on
    stdin: run one supervisor."""
    fd, run_dir, socket_path = int(argv[0]), Path(argv[1]), argv[2]
    home = argv[3] if len(argv) > 3 else ""
    os.set_inheritable(fd, False)  # it came through pass_fds; commands must not inherit it
    token = sys.stdin.buffer.readline().strip().decode()
    listener = socket.socket(fileno=fd)
    _prctl(PR_SET_NAME, b"taskctld-sup")
    boot_id = read_boot_id()
    me = ProcessId.of(os.getpid(), boot_id)
    info = SupervisorInfo(os.getpid(), me.start if me else 0, boot_id, socket_path, token)
    try:
        _announce(info, run_dir)
    except OSError as e:  # a full disk, say: leave nothing behind, and say why
        with contextlib.suppress(OSError):
            os.unlink(socket_path)
        _say(f"cannot write {info.path_in(run_dir)}: {e.strerror}")
        return EXIT_NO_SPACE if e.errno in (errno.ENOSPC, errno.EDQUOT) else 1
    journal = Journal(run_dir / f"supervisor.{info.pid}.journal")
    cgroups, contained_by = _contain(home, info.pid)
    supervisor = Supervisor(listener, journal, boot_id, token, cgroups, contained_by)
    code = supervisor.serve()
    if cgroups is not None:
        cgroups.close()
    # Outcomes no daemon acknowledged stay in the journal for the next daemon; without them
    # the journal holds nothing anyone needs.
    leftovers = [info.path_in(run_dir), Path(socket_path)]
    if not supervisor.done:
        leftovers.append(journal.path)
    for leftover in leftovers:
        with contextlib.suppress(OSError):
            leftover.unlink()
    return code


def _announce(info: SupervisorInfo, run_dir: Path) -> None:
    """Write our identity file (0600: it holds our secret) atomically; when that fails, no
    partial file is left."""
    tmp = run_dir / f".supervisor.{info.pid}.tmp"
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(json.dumps(asdict(info)))
        tmp.replace(info.path_in(run_dir))
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _say(message: str) -> None:
    """One line for the daemon's log (our stderr is the daemon's), which may itself be on the
    full disk."""
    with contextlib.suppress(OSError):
        print(f"taskctld supervisor: {message}", file=sys.stderr, flush=True)


def known_supervisors(run_dir: Path) -> list[SupervisorInfo]:
    """Supervisors that recorded themselves in the run folder and are still alive."""
    boot_id = read_boot_id()
    alive = []
    for path in run_dir.glob("supervisor.*.json"):
        try:
            info = SupervisorInfo(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if ProcessId(info.pid, info.start, info.boot_id).state(boot_id) == "alive":
            alive.append(info)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
    return alive


# -- helpers --------------------------------------------------------------------------------------


def _prctl(option: int, value: int | bytes) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)


def _peer_of(conn: socket.socket) -> tuple[int, int]:
    """The pid and uid of the process at the other end of a Unix socket."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _ = struct.unpack("3i", creds)
    return pid, uid


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 4096):
            pass


# Signals we handle or ignore here; the command must start with the default for each.
_DEFAULT_IN_CHILD = (
    signal.SIGPIPE,
    signal.SIGXFSZ,
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGCHLD,
)


def _spawn_fast(spec: AttemptSpec, out_w: int, err_w: int) -> int:
    """posix_spawn (vfork+exec): the cheapest way to start a process from Python. It cannot
    change directory, so we do (this process is single-threaded and uses absolute paths).
    Every descriptor of ours is close-on-exec (PEP 446), so the command gets only 0, 1, 2."""
    try:
        os.chdir(spec.cwd)
    except OSError as e:
        raise OSError(e.errno, e.strerror, spec.cwd) from None
    program = _resolve(spec.argv[0], spec.env.get("PATH", os.defpath))  # after chdir: ./x works
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_DUP2, out_w, 1),
        (os.POSIX_SPAWN_DUP2, err_w, 2),
    ]
    return os.posix_spawn(
        program, spec.argv, spec.env, file_actions=actions, setpgroup=0, setsigdef=_DEFAULT_IN_CHILD
    )


def _resolve(name: str, path: str) -> str:
    """The program to execute, looked up in the task's PATH (not ours), like execvp."""
    if "/" in name:
        return name
    for folder in path.split(os.pathsep):
        candidate = os.path.join(folder or ".", name)
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return candidate
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)


def _spawn_limited(spec: AttemptSpec, out_w: int, err_w: int) -> int:
    """With a memory limit: a pre-exec hook sets RLIMIT_AS, so it holds from the command's
    first instruction (this path forks instead of vforking; only limited tasks pay for it)."""
    limit = spec.memory_limit or resource.RLIM_INFINITY

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    proc = subprocess.Popen(
        spec.argv,
        cwd=spec.cwd,
        env=spec.env,
        stdin=subprocess.DEVNULL,
        stdout=out_w,
        stderr=err_w,
        process_group=0,
        close_fds=True,
        preexec_fn=apply,
    )
    proc.returncode = 0  # we reap it with wait4 ourselves; Popen must not try
    return proc.pid


def _vm_hwm(pid: int) -> int:
    """Peak resident set size of a live process, bytes (0 if unknown)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _exited_children() -> Iterator[tuple[int, int, resource.struct_rusage]]:
    while True:
        try:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status, usage


def _tree_alive(running: Running) -> bool:
    """Whether any process of the attempt is left: in its cgroup, or else its process group."""
    if running.cgroup is not None:
        return containment.populated(running.cgroup)
    return _group_alive(running.pid)


def _group_alive(pgid: int) -> bool:
    """Whether any process is left in the process group (a cheap check: no /proc scan)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _task_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for entry in f.read().split(b"\0"):
                if entry.startswith(b"TASKCTL_TASK_ID="):
                    return int(entry.split(b"=", 1)[1])
    except (OSError, ValueError):
        pass
    return None


def _environ_has(pid: int, marker: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return marker in f.read().split(b"\0")
    except OSError:
        return False


def spawn_message(error: OSError, spec: AttemptSpec) -> str:
    """A readable reason for a command that could not start."""
    if error.errno == errno.ENOENT and error.filename == spec.cwd:
        return f"working directory {spec.cwd!r} does not exist"
    if error.errno == errno.ENOENT:
        return f"no such program: {spec.argv[0]!r}"
    if error.errno == errno.EACCES:
        return f"permission denied: {error.filename or spec.argv[0]!r}"
    if error.errno == errno.ENOTDIR:
        return f"not a directory: {error.filename or spec.cwd!r}"
    if error.errno == errno.E2BIG:
        return "argument list and environment too long for execve (E2BIG)"
    return f"cannot start {spec.argv[0]!r}: {error.strerror or error}"


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
