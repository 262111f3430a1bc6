"""The supervisor's loop: one selector over the daemon's connection, the output pipes, a signal
wake-up pipe and a heap of deadlines; single-threaded. Each turn it handles what is readable,
reaps what exited, and runs what is due.

An attempt ends (`Attempt`'s phases) once its main process is reaped (`wait4`: status, CPU,
peak RSS), its pipes are at their end, and its process group (or cgroup) is empty; pipes held
open by something outside the group are waited for LEFTOVER_GRACE at most. Its final record
goes to the journal and the daemon, and what was held to follow it starts in its slot.
"""

from __future__ import annotations

import contextlib
import ctypes
import heapq
import os
import resource
import selectors
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from taskctld.containment import Cgroups
from taskctld.supervisor import messages as m
from taskctld.supervisor.attempt import (
    KILLING,
    Attempt,
    Exit,
    Phase,
    signal_tree,
    tree_alive,
    vm_hwm,
)
from taskctld.supervisor.connection import DaemonLink
from taskctld.supervisor.holds import Holds
from taskctld.supervisor.journal import Journal
from taskctld.supervisor.outcome import final_of
from taskctld.supervisor.output import LogSink
from taskctld.supervisor.spawn import spawn_message, start_process
from taskctld.supervisor.upkeep import REJOURNAL_EVERY, SWEEP_AFTER, Upkeep

PR_SET_CHILD_SUBREAPER = 36
UNATTACHED_LIMIT = 60.0  # seconds a fresh supervisor waits for its first daemon
LEFTOVER_GRACE = 1.0  # seconds we wait for pipes held open by processes outside the tree
Key = m.Key


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Supervisor:
    """The loop, and one handler per message the daemon sends (`_on_*`)."""

    def __init__(
        self,
        listener: socket.socket,
        journal: Journal,
        boot_id: str,
        token: str,
        cgroups: Cgroups | None,
        containment: str,
    ) -> None:
        self.journal = journal
        self.boot_id = boot_id
        self.cgroups = cgroups
        self.containment = containment  # what hello tells the daemon, for `health`
        self.sel = selectors.DefaultSelector()
        self.link = DaemonLink(
            listener, token, self.sel, self._handle, self._on_attach, self._on_drop, self._wake_at
        )
        self.running: dict[Key, Attempt] = {}
        self.by_pid: dict[int, Attempt] = {}
        self.done: dict[Key, m.Final] = {}
        # Ends in `done` whose final record the journal did not take (a full disk): only we
        # know them, so we stay until a daemon acknowledges them or the journal takes them.
        self.unjournaled: set[Key] = set()
        self.holds = Holds()
        self.timers: list[tuple[float, Key | None]] = []
        self.upkeep = Upkeep(
            journal, boot_id, self.running, self.by_pid, self.done, self.unjournaled, self._wake_at
        )
        self.retired = False
        self.ever_attached = False
        self.born = time.monotonic()
        self.wake_r = -1
        self.handlers: dict[type, Any] = {
            m.Auth: self._on_auth,
            m.Ping: self._on_ping,
            m.Spawn: self._on_spawn,
            m.Unhold: self._on_unhold,
            m.Signal: self._on_signal,
            m.Ack: self._on_ack,
            m.Retire: self._on_retire,
        }

    # -- the loop -------------------------------------------------------------------------------

    def serve(self) -> int:
        self.wake_r = _install_signals()
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
        self.link.listen()
        self.sel.register(self.wake_r, selectors.EVENT_READ, "wake")
        self.upkeep.own_hwm = vm_hwm(os.getpid())
        while not self._finished():
            idle = None if self.ever_attached else UNATTACHED_LIMIT
            for key, mask in self.sel.select(_timeout(self.timers, idle)):
                self._dispatch(key, mask)
            self._reap()
            self._run_timers()
            if self.link.wants_flush():
                self.link.flush()
        return 0

    def _finished(self) -> bool:
        if self.running or self.unjournaled:
            return False
        if self.retired or (self.ever_attached and self.link.conn is None):
            return not self.link.outbox or self.link.conn is None
        return not self.ever_attached and time.monotonic() - self.born > UNATTACHED_LIMIT

    def _dispatch(self, key: selectors.SelectorKey, mask: int) -> None:
        tag = key.data
        if tag == "wake":
            _drain(self.wake_r)
        elif isinstance(tag, str):
            self.link.on_event(tag, key.fileobj, mask)  # type: ignore[arg-type]
        else:
            self._pump(*tag)

    def _pump(self, attempt: Attempt, sink: LogSink) -> None:
        more = sink.pump()
        if sink.keep_tail:
            attempt.seen.stderr_tail = sink.tail
        if sink.broken and not attempt.seen.log_problem:
            attempt.seen.log_problem = f"output not saved: {sink.broken}"
        if not more:
            self.sel.unregister(sink.fd)
            sink.close()
            attempt.sinks.remove(sink)
            self._maybe_finish(attempt)

    # -- the daemon's messages, one handler each ------------------------------------------------

    def _handle(self, message: m.DaemonMessage) -> None:
        self.handlers[type(message)](message)

    def _on_attach(self) -> None:
        """A daemon proved itself: tell it what runs and which ends it has not acknowledged."""
        self.ever_attached = True
        running = [m.Started(*a.key, a.pid, a.started_at) for a in self.running.values()]
        hello = m.Hello(os.getpid(), running, list(self.done.values()), self.containment)
        self.link.send(hello)

    def _on_drop(self) -> None:
        self.holds.clear()  # held specs are that daemon's; the next one decides again

    def _on_auth(self, message: m.Auth) -> None:
        """Already proven: a repeated auth says nothing new."""

    def _on_ping(self, message: m.Ping) -> None:
        self.link.send(m.Pong(message.seq))

    def _on_spawn(self, message: m.Spawn) -> None:
        if message.after is None:
            self._spawn(message.spec)
        else:
            self._hold(message.spec, message.after, message.hold)

    def _on_unhold(self, message: m.Unhold) -> None:
        """The daemon takes a held spec back (cancelled, its queue paused): drop it, and give
        back what was held after it. The answer, `unheld`, says whether it was still held
        (`taken`: it will never start); if not, it started (and `started` went out before
        this) or had been given back."""
        key = (message.task_id, message.attempt)
        taken = key in self.holds
        if taken:
            for released, token in self.holds.withdraw(key):
                self.link.send(m.Released(*released, token))
        self.link.send(m.Unheld(*key, taken, message.hold))

    def _on_signal(self, message: m.Signal) -> None:
        attempt = self.running.get((message.task_id, message.attempt))
        reason = {"cancel": "cancelled", "interrupt": "interrupted"}.get(message.kind)
        if attempt is not None and attempt.alive and reason:
            self._stop(attempt, reason)

    def _on_ack(self, message: m.Ack) -> None:
        key = (message.task_id, message.attempt)
        self.done.pop(key, None)
        self.unjournaled.discard(key)
        if self.journal.wants_compacting():
            self.upkeep.compact()

    def _on_retire(self, message: m.Retire) -> None:
        self.retired = True
        self.holds.clear()

    # -- starting -------------------------------------------------------------------------------

    def _hold(self, spec: m.AttemptSpec, after: Key, token: Any) -> None:
        """Keep `spec` to start when `after` ends, if `after` is running or itself held;
        otherwise give it back (the daemon's view was behind ours)."""
        key = spec.key
        waiting = after in self.running or after in self.holds
        known = key in self.running or key in self.done or key in self.holds
        if self.retired or not waiting or not self.holds.can_follow(after) or known:
            self.link.send(m.Released(*key, token))
            return
        self.holds.add(spec, after, token)

    def _spawn(self, spec: m.AttemptSpec) -> None:
        key = spec.key
        if key in self.running or key in self.done:
            return  # a repeated request (the daemon reconnected): once is enough
        if self.retired:
            self._finish_now(spec, "not_started", "supervisor retired")
            return
        started_at = now_ms()
        try:
            cgroup = self.cgroups.take() if self.cgroups else None
        except OSError as e:
            self._finish_now(spec, "spawn_error", f"cannot make its cgroup: {e.strerror or e}")
            return
        try:
            pid, sinks = start_process(spec, self.cgroups, cgroup)
        except OSError as e:
            self._give_back(cgroup)
            self._finish_now(spec, "spawn_error", spawn_message(e, spec))
            return
        attempt = Attempt(spec, pid, started_at, sinks, cgroup)
        self.journal.append(attempt.started_record(self.boot_id))
        self.running[key] = attempt
        self.by_pid[pid] = attempt
        for sink in sinks:
            self.sel.register(sink.fd, selectors.EVENT_READ, (attempt, sink))
        if spec.timeout is not None:
            attempt.deadline = time.monotonic() + spec.timeout
            self._wake_at(attempt.deadline, key)
        self.upkeep.schedule_sample()
        self.link.send(m.Started(*key, pid, started_at))

    # -- stopping -------------------------------------------------------------------------------

    def _stop(self, attempt: Attempt, reason: str) -> None:
        """SIGTERM the tree of a running attempt now, SIGKILL after its grace; the first
        reason is its outcome."""
        if attempt.phase is Phase.RUNNING:
            attempt.move(Phase.STOPPING)
            attempt.seen.stop_reason = reason
            self._schedule_kill(attempt)
        signal_tree(attempt, signal.SIGTERM, self.by_pid)

    def _schedule_kill(self, attempt: Attempt) -> None:
        attempt.kill_at = time.monotonic() + attempt.spec.kill_grace
        self._wake_at(attempt.kill_at, attempt.key)

    def _tick(self, attempt: Attempt, now: float) -> None:
        """An attempt's deadline: its timeout, its SIGKILL, or the end of its leftover grace."""
        if attempt.alive and attempt.deadline is not None and now >= attempt.deadline:
            attempt.deadline = None
            self._stop(attempt, "timeout")
        if attempt.phase in KILLING and now >= attempt.kill_at:
            signal_tree(attempt, signal.SIGKILL, self.by_pid)
            attempt.kill_at = now + 1.0  # keep insisting on stragglers, once a second
            self._wake_at(attempt.kill_at, attempt.key)
        if attempt.exit is not None and now - attempt.exit.at >= LEFTOVER_GRACE:
            # Only a process outside its group can still hold its pipes: stop waiting for them.
            self._maybe_finish(attempt, force=not tree_alive(attempt))

    # -- reaping and finishing ------------------------------------------------------------------

    def _reap(self) -> None:
        """Collect every exited child: our commands, and orphans of their trees (reparented to
        us, the subreaper). Then finish what can be finished: an orphan reaped just now may
        have been the last member of an attempt's group (a killed shell's killed child, say)."""
        for pid, status, usage in _exited_children():
            attempt = self.by_pid.pop(pid, None)
            if attempt is None:
                self.upkeep.warned.discard(pid)
                continue
            attempt.exit = Exit(status, usage, time.monotonic())
            self._wake_at(attempt.exit.at + LEFTOVER_GRACE, attempt.key)
            self._exited(attempt)
        for attempt in [a for a in self.running.values() if a.exit is not None]:
            self._maybe_finish(attempt)

    def _exited(self, attempt: Attempt) -> None:
        """Its main process is reaped: what it left in its group is stopped too."""
        if attempt.phase is Phase.STOPPING:
            attempt.move(Phase.CLEANING)  # its SIGKILL is already scheduled
            if tree_alive(attempt):
                signal_tree(attempt, signal.SIGTERM, self.by_pid)
        elif tree_alive(attempt):
            attempt.move(Phase.CLEANING)
            self._schedule_kill(attempt)
            signal_tree(attempt, signal.SIGTERM, self.by_pid)
        else:
            attempt.move(Phase.EXITED)

    def _maybe_finish(self, attempt: Attempt, force: bool = False) -> None:
        """An attempt is over once its main process is reaped, its pipes are at their end and
        its process group is empty (or the leftover grace has passed)."""
        if attempt.exit is None or attempt.phase is Phase.ENDED:
            return
        if not force and (attempt.sinks or tree_alive(attempt)):
            return
        for sink in list(attempt.sinks):
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(sink.fd)
            sink.close()
        attempt.sinks.clear()
        attempt.move(Phase.ENDED)
        self.running.pop(attempt.key, None)
        self._give_back(attempt.cgroup)
        attempt.seen.own_hwm = self.upkeep.own_hwm
        final = final_of(
            attempt.key, attempt.exit.status, attempt.exit.usage, attempt.seen, now_ms()
        )
        self._record_final(attempt.spec, final)
        self.upkeep.schedule("sweep", SWEEP_AFTER)

    def _give_back(self, cgroup: Path | None) -> None:
        """An attempt's cgroup, empty now, kept for the next attempt."""
        if cgroup is not None and self.cgroups is not None:
            self.cgroups.give_back(cgroup)

    def _finish_now(self, spec: m.AttemptSpec, outcome: str, error: str) -> None:
        self._record_final(spec, m.Final(*spec.key, outcome, ended_at=now_ms(), error=error))

    def _record_final(self, spec: m.AttemptSpec, final: m.Final) -> None:
        """Record and report an attempt's end; then start what was held to follow it (its
        slot is free now), saying so in the same `done`."""
        key = spec.key
        if not self.journal.append(final):
            self.unjournaled.add(key)
            self.upkeep.schedule("rejournal", REJOURNAL_EVERY)
        self.done[key] = final
        following = self.holds.take(key)
        self.link.send(m.Done(final, following[0].key if following else None))
        if following is not None:
            self._spawn(following[0])

    # -- timers ---------------------------------------------------------------------------------

    def _wake_at(self, when: float, key: Key | None = None) -> None:
        """Run `_tick` of attempt `key` (None: `_periodic`) at monotonic time `when`."""
        heapq.heappush(self.timers, (when, key))

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _, key = heapq.heappop(self.timers)
            if key is None:
                self._periodic(now)
            elif (attempt := self.running.get(key)) is not None:
                self._tick(attempt, now)

    def _periodic(self, now: float) -> None:
        if self.link.strangers:
            self.link.expire_strangers(now)
        self.upkeep.run_due(now)

    def _rejournal(self) -> None:
        self.upkeep.rejournal()


def _install_signals() -> int:
    """Signals wake the loop (the returned pipe end becomes readable); none does more."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    # We outlive the daemon: signals meant for it (a terminal's Ctrl-C, a service stop) are
    # not for us. Handled (not ignored), so that commands get the default back at exec.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: None)
    return r


def _timeout(timers: list[tuple[float, Key | None]], idle: float | None) -> float | None:
    """How long the loop may wait: until the first timer, else `idle`."""
    return max(0.0, timers[0][0] - time.monotonic()) if timers else idle


def _prctl(option: int, value: int | bytes) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 4096):
            pass


def _exited_children() -> Iterator[tuple[int, int, resource.struct_rusage]]:
    while True:
        try:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status, usage
