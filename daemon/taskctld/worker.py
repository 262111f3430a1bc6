"""The per-task worker: the small parent of one attempt's command, independent of the daemon.

A worker is forked by the launcher (never by the daemon) and lives exactly as long as its
attempt. It starts the command in its own process group with stdin from /dev/null and its output
piped into per-attempt log files (capped, as bytes), enforces the timeout, kills the whole tree on
cancel or timeout, waits for it with `wait4` (exit status, peak RSS, CPU time) and writes the
outcome to its run file before it exits. The daemon hears about it through a datagram, but the
run file is the durable record: a daemon that died meanwhile reads it when it comes back.

The run file (`run/TASK.ATTEMPT`) is JSON lines, appended in this order:
  1. `{"worker": {pid, start, boot_id}}`   before the command starts (identity for adoption)
  2. `{"started": {pid, started_at}}`      once the command runs
  3. `{"final": {outcome, exit_code, ...}}` once it and everything it started are gone
A worker whose launcher died before it could be adopted writes `{"final": {"outcome":
"not_started"}}` and runs nothing.

The worker is a child subreaper, so processes that escape into their own session or process
group come back to it as orphans and are killed with the rest of the tree.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import json
import os
import resource
import selectors
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

from taskctld.procfs import ProcessId, descendants_of

PR_SET_CHILD_SUBREAPER = 36
_READ_SIZE = 65536


@dataclass
class AttemptSpec:
    """Everything a worker needs to run one attempt; sent by the daemon through the launcher."""

    task_id: int
    attempt: int
    argv: list[str]
    cwd: str
    env: dict[str, str]
    stdout_path: str
    stderr_path: str
    run_path: str
    notify_path: str
    timeout: float | None = None
    kill_grace: float = 10.0
    memory_limit: int | None = None
    log_cap: int = 100 << 20
    fsync: bool = True

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> AttemptSpec:
        return cls(**json.loads(raw))


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def append_record(path: str, record: dict[str, Any], *, sync: bool = False) -> None:
    """Append one JSON line; one write() call on an O_APPEND file, so lines never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, json.dumps(record, separators=(",", ":")).encode() + b"\n")
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read_records(path: str) -> dict[str, Any]:
    """The run file as {"worker": ..., "started": ..., "final": ...}; torn lines are ignored."""
    records: dict[str, Any] = {}
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except FileNotFoundError:
        return records
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.update(record)
    return records


class Notifier:
    """Datagrams to the daemon's notify socket; a daemon that is gone is not an error."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(2.0)  # a stuck daemon must not stall supervision

    def send(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        data = json.dumps(message, separators=(",", ":")).encode()
        try:
            # socket.send_fds ignores its address argument (CPython 3.11), so use sendmsg.
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds or []))]
            self.sock.sendmsg([data], ancillary if fds else [], 0, self.path)
        except OSError:
            pass  # no daemon right now: it will read the run file when it starts


@dataclass
class _LogSink:
    """One output stream: a pipe read end copied into a log file, up to a cap."""

    fd: int
    out: int
    cap: int
    written: int = 0
    discarded: int = 0

    def pump(self) -> bool:
        """Copy what is available; False once the pipe is closed."""
        try:
            data = os.read(self.fd, _READ_SIZE)
        except BlockingIOError:
            return True
        if not data:
            return False
        room = self.cap - self.written
        if room > 0:
            os.write(self.out, data[:room])
            self.written += min(room, len(data))
        if len(data) > room:
            if self.discarded == 0:
                notice = f"\n[taskctl: output truncated: the cap of {self.cap} bytes was reached]\n"
                os.write(self.out, notice.encode())
            self.discarded += len(data) - max(room, 0)
        return True


@dataclass
class _Kill:
    """A kill in progress: why, and when SIGKILL follows SIGTERM."""

    outcome: str
    kill_at: float


@dataclass
class Worker:
    spec: AttemptSpec
    launcher_pid: int
    boot_id: str
    notifier: Notifier = field(init=False)
    pid: int | None = None
    status: int | None = None
    kill: _Kill | None = None
    sinks: list[_LogSink] = field(default_factory=list)
    deadline: float | None = None
    pipes_deadline: float | None = None
    request: str | None = None
    wake_r: int = -1

    def __post_init__(self) -> None:
        self.notifier = Notifier(self.spec.notify_path)

    # -- the whole life of one attempt ----------------------------------------------------------

    def run(self) -> int:
        """Run the attempt to its end; returns the worker's own exit status (0 unless broken)."""
        me = ProcessId.of(os.getpid(), self.boot_id)
        assert me is not None
        append_record(
            self.spec.run_path,
            {"worker": {"pid": me.pid, "start": me.start, "boot_id": me.boot_id}},
        )
        if os.getppid() != self.launcher_pid:
            # The launcher died before we registered: the next daemon may not have seen our run
            # file, so running now could run unsupervised. Run nothing; it will be re-queued.
            self._finish({"outcome": "not_started"})
            return 0
        self._install_signals()
        _set_subreaper()
        final = self._spawn_and_supervise()
        self._finish(final)
        return 0

    def _spawn_and_supervise(self) -> dict[str, Any]:
        started_at = now_ms()
        try:
            self.pid = self._spawn()
        except OSError as e:
            return {
                "outcome": "spawn_error",
                "error": _spawn_message(e, self.spec),
                "ended_at": now_ms(),
            }
        ident = ProcessId.of(self.pid, self.boot_id)
        start = ident.start if ident else None
        record = {"pid": self.pid, "start": start, "started_at": started_at}
        append_record(self.spec.run_path, {"started": record})
        self._announce_start(started_at)
        if self.spec.timeout is not None:
            self.deadline = time.monotonic() + self.spec.timeout
        self._supervise()
        return self._final_record()

    def _spawn(self) -> int:
        """Start the command: own process group, stdin /dev/null, output into pipes."""
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        logs = [_open_log(self.spec.stdout_path), _open_log(self.spec.stderr_path)]
        try:
            proc = subprocess.Popen(
                self.spec.argv,
                cwd=self.spec.cwd,
                env=self.spec.env,
                stdin=subprocess.DEVNULL,
                stdout=out_w,
                stderr=err_w,
                process_group=0,
                close_fds=True,
                preexec_fn=_limits_setter(self.spec.memory_limit),
            )
        except BaseException:
            for fd in (out_r, err_r, *logs):
                os.close(fd)
            raise
        finally:
            os.close(out_w)  # the command holds the write ends now
            os.close(err_w)
        for r, log in ((out_r, logs[0]), (err_r, logs[1])):
            os.set_blocking(r, False)
            self.sinks.append(_LogSink(fd=r, out=log, cap=self.spec.log_cap))
        # We reap with wait4 ourselves; stop Popen from trying to as well.
        proc.returncode = 0
        return proc.pid

    def _announce_start(self, started_at: int) -> None:
        pidfd = os.pidfd_open(os.getpid())
        try:
            self.notifier.send(
                {
                    "type": "started",
                    "task_id": self.spec.task_id,
                    "attempt": self.spec.attempt,
                    "worker_pid": os.getpid(),
                    "pid": self.pid,
                    "started_at": started_at,
                },
                fds=[pidfd],
            )
        finally:
            os.close(pidfd)

    # -- supervision loop -------------------------------------------------------------------------

    def _supervise(self) -> None:
        """Pump output, act on signals and deadlines, until the tree is gone and pipes closed."""
        sel = selectors.DefaultSelector()
        for sink in self.sinks:
            sel.register(sink.fd, selectors.EVENT_READ, sink)
        sel.register(self.wake_r, selectors.EVENT_READ, None)
        while True:
            self._act_on_request()
            self._reap()
            self._check_deadlines()
            tree_gone = self.status is not None and not _has_children()
            if tree_gone and len(sel.get_map()) == 1:
                break  # everything reaped, every pipe drained to its end
            if tree_gone and self.pipes_deadline is None:
                # Only a process outside our tree could still hold the pipes: do not wait long.
                self.pipes_deadline = time.monotonic() + 1.0
            if self.pipes_deadline is not None and time.monotonic() >= self.pipes_deadline:
                break
            for key, _ in sel.select(self._next_timeout()):
                if key.data is None:
                    _drain(self.wake_r)
                elif not key.data.pump():
                    sel.unregister(key.fd)
                    os.close(key.fd)
        for key in list(sel.get_map().values()):
            if key.data is not None:
                os.close(key.fd)
        sel.close()

    def _reap(self) -> None:
        while True:
            try:
                pid, status, _ = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.pid:
                self.status = status
                if _has_children():
                    # The command is done; what it left running is stopped like on cancel.
                    self._start_kill(self.kill.outcome if self.kill else "")

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        if self.deadline is not None and now >= self.deadline and self.status is None:
            self.deadline = None
            self._start_kill("timeout")
        if self.kill is not None and now >= self.kill.kill_at:
            self._signal_tree(signal.SIGKILL)
            self.kill.kill_at = now + 1.0  # keep insisting on stragglers, once a second

    def _next_timeout(self) -> float | None:
        kill_at = self.kill.kill_at if self.kill else None
        times = [t for t in (self.deadline, kill_at, self.pipes_deadline) if t is not None]
        if not times:
            return None
        return max(0.0, min(times) - time.monotonic())

    def _start_kill(self, outcome: str) -> None:
        if self.kill is None:
            self.kill = _Kill(outcome=outcome, kill_at=time.monotonic() + self.spec.kill_grace)
        elif outcome and not self.kill.outcome:
            self.kill.outcome = outcome
        self._signal_tree(signal.SIGTERM)

    def _signal_tree(self, sig: int) -> None:
        """Signal the command's process group and every descendant, escaped ones included."""
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)
        for pid in descendants_of(os.getpid()):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    # -- signals from the daemon ----------------------------------------------------------------

    def _install_signals(self) -> None:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wake_r = r
        signal.set_wakeup_fd(w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, lambda *_: self._requested("cancelled"))
        signal.signal(signal.SIGUSR1, lambda *_: self._requested("interrupted"))
        # Terminal signals must not end supervision; handled (not ignored) so the command
        # gets the default disposition back at exec.
        signal.signal(signal.SIGINT, lambda *_: None)
        signal.signal(signal.SIGHUP, lambda *_: None)

    def _requested(self, outcome: str) -> None:
        """Signal handler: only records; the loop acts on its next turn."""
        self.request = outcome

    def _act_on_request(self) -> None:
        outcome, self.request = self.request, None
        if outcome and self.status is None and (self.kill is None or not self.kill.outcome):
            self._start_kill(outcome)

    # -- the end ----------------------------------------------------------------------------------

    def _final_record(self) -> dict[str, Any]:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        status = self.status if self.status is not None else 0
        record: dict[str, Any] = {
            "ended_at": now_ms(),
            "exit_code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            "max_rss": usage.ru_maxrss * 1024,
            "cpu_user": round(usage.ru_utime, 6),
            "cpu_system": round(usage.ru_stime, 6),
            "stdout_bytes": self.sinks[0].written + self.sinks[0].discarded if self.sinks else 0,
            "stderr_bytes": self.sinks[1].written + self.sinks[1].discarded if self.sinks else 0,
        }
        if self.kill is not None and self.kill.outcome:
            record["outcome"] = self.kill.outcome
        elif record["signal"] is not None:
            record["outcome"] = "signaled"
        else:
            record["outcome"] = "exited"
        return record

    def _finish(self, final: dict[str, Any]) -> None:
        append_record(self.spec.run_path, {"final": final}, sync=self.spec.fsync)
        self.notifier.send(
            {"type": "done", "task_id": self.spec.task_id, "attempt": self.spec.attempt, **final}
        )


def _has_children() -> bool:
    """True while the worker has any child, running or not yet reaped."""
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _open_log(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)


def _set_subreaper() -> None:
    # Not Linux: escaped processes cannot be caught, but the process group still is.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _limits_setter(memory_limit: int | None) -> Any:
    if memory_limit is None:
        return None

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))

    return apply


def _spawn_message(error: OSError, spec: AttemptSpec) -> str:
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
