"""The runner: starts attempts through the launcher, watches their workers, and adopts the
workers of an earlier daemon.

It never touches the database. What it learns (an attempt started, an attempt ended) becomes a
`Report` queued for the dispatcher, which applies reports in its next transaction. Workers report
by datagram on the notify socket; a pidfd per worker (sent by the worker itself, so it can never
name a reused pid) tells the runner when a worker is gone, whether or not it said goodbye.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taskctl.api import Outcome
from taskctl.environment import minimal_env
from taskctl.paths import Paths
from taskctl.units import now_ms
from taskctld.launcher import LauncherHandle
from taskctld.procfs import ProcessId
from taskctld.store import AttemptEnd, AttemptRow, TaskRow
from taskctld.worker import AttemptSpec, read_records

log = logging.getLogger("taskctld.runner")


@dataclass
class Started:
    task_id: int
    attempt: int
    pid: int
    worker_pid: int
    started_at: int


@dataclass
class Ended:
    end: AttemptEnd
    counts: bool = True  # False: the attempt never ran (not started, interrupted)


Report = Started | Ended


@dataclass
class Watched:
    """A worker the runner is responsible for."""

    task_id: int
    attempt: int
    pidfd: int | None = None
    worker_pid: int | None = None
    pending_signal: int | None = None  # to send as soon as the worker announces itself
    ended: bool = False


@dataclass
class RunnerSettings:
    log_cap: int = 100 << 20
    fsync: bool = True
    home: str = field(default_factory=lambda: os.path.expanduser("~"))


class Runner:
    def __init__(
        self,
        paths: Paths,
        launcher: LauncherHandle,
        settings: RunnerSettings,
        report: Callable[[Report], None],
        boot_id: str,
    ) -> None:
        self.paths = paths
        self.launcher = launcher
        self.settings = settings
        self.report = report
        self.boot_id = boot_id
        self.watched: dict[tuple[int, int], Watched] = {}
        self.notify: socket.socket | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        """Bind the notify socket and start listening to workers."""
        self.loop = loop
        path = self.paths.notify_socket
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        sock.bind(str(path))
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.notify = sock
        loop.add_reader(sock.fileno(), self._read_notify)

    def close(self) -> None:
        """Stop watching (workers keep running; the next daemon adopts them)."""
        if self.loop is not None and self.notify is not None:
            self.loop.remove_reader(self.notify.fileno())
            self.notify.close()
            self.notify = None
        for watched in self.watched.values():
            self._unwatch(watched)
        self.launcher.close()

    # -- starting and stopping attempts ---------------------------------------------------------

    def start(self, task: TaskRow, env: dict[str, str] | None) -> None:
        """Hand one claimed attempt to the launcher."""
        spec = self.spec_for(task, env)
        self.watched[(task.id, task.attempts)] = Watched(task.id, task.attempts)
        self.launcher.send(spec)

    def spec_for(self, task: TaskRow, env: dict[str, str] | None) -> AttemptSpec:
        number = task.attempts
        argv = ["/bin/sh", "-c", task.command[0]] if task.shell else list(task.command)
        full_env = dict(env) if env is not None else minimal_env()
        full_env["TASKCTL_TASK_ID"] = str(task.id)
        full_env["TASKCTL_ATTEMPT"] = str(number)
        full_env["TASKCTL_QUEUE"] = task.queue
        base = f"{task.id}.{number}"
        return AttemptSpec(
            task_id=task.id,
            attempt=number,
            argv=argv,
            cwd=task.cwd,
            env=full_env,
            stdout_path=str(self.paths.logs / f"{base}.out"),
            stderr_path=str(self.paths.logs / f"{base}.err"),
            run_path=str(self.run_path(task.id, number)),
            notify_path=str(self.paths.notify_socket),
            timeout=task.timeout,
            kill_grace=task.kill_grace,
            memory_limit=task.memory_limit,
            log_cap=self.settings.log_cap,
            fsync=self.settings.fsync,
        )

    def run_path(self, task_id: int, attempt: int) -> Path:
        return self.paths.run / f"{task_id}.{attempt}"

    def signal(self, task_id: int, attempt: int, sig: int) -> bool:
        """Ask the attempt's worker to stop it (SIGTERM: cancel, SIGUSR1: interrupt)."""
        watched = self.watched.get((task_id, attempt))
        if watched is None or watched.ended:
            return False
        if watched.pidfd is None:
            watched.pending_signal = sig
            return True
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(watched.pidfd, sig)
        return True

    def running_count(self) -> int:
        return sum(1 for w in self.watched.values() if not w.ended)

    def forget(self, task_id: int, attempt: int) -> None:
        """The attempt's end is committed: drop its run file and stop watching."""
        watched = self.watched.pop((task_id, attempt), None)
        if watched is not None:
            self._unwatch(watched)
        with contextlib.suppress(FileNotFoundError):
            self.run_path(task_id, attempt).unlink()

    # -- hearing from workers -------------------------------------------------------------------

    def _read_notify(self) -> None:
        assert self.notify is not None
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.notify, 65536, 4)
            except BlockingIOError:
                return
            try:
                self._on_message(json.loads(data), fds)
            except (ValueError, KeyError, TypeError) as e:
                log.warning("ignoring a malformed worker message: %s", e)
                for fd in fds:
                    os.close(fd)

    def _on_message(self, msg: dict[str, Any], fds: list[int]) -> None:
        key = (int(msg["task_id"]), int(msg["attempt"]))
        watched = self.watched.get(key)
        if watched is None or watched.ended:
            for fd in fds:
                os.close(fd)
            return
        if msg["type"] == "started":
            self._on_started(watched, msg, fds)
        elif msg["type"] == "done":
            self._on_done(watched, msg)

    def _on_started(self, watched: Watched, msg: dict[str, Any], fds: list[int]) -> None:
        watched.worker_pid = int(msg["worker_pid"])
        if fds:
            self._watch_pidfd(watched, fds[0])
            for extra in fds[1:]:
                os.close(extra)
        if watched.pending_signal is not None and watched.pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(watched.pidfd, watched.pending_signal)
            watched.pending_signal = None
        self.report(
            Started(
                watched.task_id,
                watched.attempt,
                pid=int(msg["pid"]),
                worker_pid=watched.worker_pid,
                started_at=int(msg["started_at"]),
            )
        )

    def _on_done(self, watched: Watched, final: dict[str, Any]) -> None:
        watched.ended = True
        self._unwatch(watched)
        self.report(ended_from_record(watched.task_id, watched.attempt, final))

    def _watch_pidfd(self, watched: Watched, pidfd: int) -> None:
        watched.pidfd = pidfd
        assert self.loop is not None
        self.loop.add_reader(pidfd, self._on_worker_exit, watched)

    def _unwatch(self, watched: Watched) -> None:
        if watched.pidfd is not None:
            if self.loop is not None:
                self.loop.remove_reader(watched.pidfd)
            os.close(watched.pidfd)
            watched.pidfd = None

    def _on_worker_exit(self, watched: Watched) -> None:
        """The worker process is gone; if it did not report, its run file tells."""
        self._read_notify()  # its goodbye may be queued behind this wake-up
        if watched.ended:
            return
        watched.ended = True
        self._unwatch(watched)
        self.report(self._end_from_run_file(watched.task_id, watched.attempt))

    def _end_from_run_file(self, task_id: int, attempt: int) -> Ended:
        records = read_records(str(self.run_path(task_id, attempt)))
        if "final" in records:
            return ended_from_record(task_id, attempt, records["final"])
        self._kill_orphaned_command(records.get("started"))
        return Ended(
            AttemptEnd(
                task_id,
                attempt,
                Outcome.LOST,
                ended_at=now_ms(),
                error="its supervising worker died without recording an outcome",
            )
        )

    def _kill_orphaned_command(self, started: dict[str, Any] | None) -> None:
        """A command whose worker died is unsupervised: end its process group."""
        if not started or "start" not in started:
            return
        ident = ProcessId(int(started["pid"]), int(started["start"]), self.boot_id)
        if ident.state(self.boot_id) == "alive":
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(ident.pid, signal.SIGKILL)

    # -- adoption after a restart ---------------------------------------------------------------

    def recover(self, attempt: AttemptRow) -> None:
        """Take responsibility for an attempt an earlier daemon left open.

        Its worker may have finished (its run file says how), may still run (adopt it: watch its
        pidfd), or may be gone without a word (lost). No run file at all means the worker never
        started: the attempt is recorded as interrupted and does not count.
        """
        key = (attempt.task_id, attempt.number)
        watched = Watched(attempt.task_id, attempt.number)
        self.watched[key] = watched
        records = read_records(str(self.run_path(*key)))
        worker = records.get("worker")
        if "final" in records or worker is None:
            watched.ended = True
            self.report(self._recovered_end(key, records))
            return
        ident = ProcessId(int(worker["pid"]), int(worker["start"]), str(worker["boot_id"]))
        pidfd = _open_pidfd(ident, self.boot_id)
        if pidfd is None:
            watched.ended = True
            self.report(self._end_from_run_file(*key))
            return
        watched.worker_pid = ident.pid
        self._watch_pidfd(watched, pidfd)
        log.info("adopted task %d attempt %d (worker pid %d)", *key, ident.pid)

    def _recovered_end(self, key: tuple[int, int], records: dict[str, Any]) -> Ended:
        if "final" in records:
            return ended_from_record(*key, records["final"])
        return Ended(
            AttemptEnd(
                *key,
                Outcome.INTERRUPTED,
                ended_at=now_ms(),
                error="never started: the daemon stopped before its worker ran",
            ),
            counts=False,
        )


def ended_from_record(task_id: int, attempt: int, final: dict[str, Any]) -> Ended:
    """The worker's final record as a report for the dispatcher."""
    raw = str(final.get("outcome", "lost"))
    if raw == "not_started":
        return Ended(
            AttemptEnd(
                task_id,
                attempt,
                Outcome.INTERRUPTED,
                ended_at=int(final.get("ended_at") or now_ms()),
                error=final.get("error") or "never started",
            ),
            counts=False,
        )
    outcome = Outcome(raw)
    return Ended(
        AttemptEnd(
            task_id,
            attempt,
            outcome,
            ended_at=int(final.get("ended_at") or now_ms()),
            exit_code=final.get("exit_code"),
            signal=final.get("signal"),
            error=final.get("error"),
            max_rss=final.get("max_rss"),
            cpu_user=final.get("cpu_user"),
            cpu_system=final.get("cpu_system"),
        ),
        counts=outcome is not Outcome.INTERRUPTED,
    )


def _open_pidfd(ident: ProcessId, boot_id: str) -> int | None:
    """A pidfd for the process `ident` names, or None if it has exited or the pid was reused."""
    if ident.state(boot_id) != "alive":
        return None
    try:
        pidfd = os.pidfd_open(ident.pid)
    except ProcessLookupError:
        return None
    if ident.state(boot_id) != "alive":  # reused between the check and the open
        os.close(pidfd)
        return None
    return pidfd
