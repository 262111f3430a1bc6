"""The attempts a supervisor runs, from spawn to final record.

An attempt ends (`Attempt`'s phases) once its main process is reaped (`wait4`: status, CPU,
peak RSS), its pipes are at their end, and its process group (or cgroup) is empty; pipes held
open by something outside the group are waited for LEFTOVER_GRACE at most. Its final record
goes to the journal and the daemon, and what was held to follow it starts in its slot.
"""

from __future__ import annotations

import contextlib
import os
import resource
import selectors
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from taskctld.containment import Cgroups
from taskctld.supervisor import messages as m
from taskctld.supervisor.attempt import KILLING, Attempt, Exit, Phase, signal_tree, tree_alive
from taskctld.supervisor.connection import DaemonLink
from taskctld.supervisor.holds import Holds
from taskctld.supervisor.journal import Journal
from taskctld.supervisor.outcome import final_of
from taskctld.supervisor.output import LogSink
from taskctld.supervisor.spawn import spawn_message, start_process
from taskctld.supervisor.upkeep import REJOURNAL_EVERY, SWEEP_AFTER, Upkeep

LEFTOVER_GRACE = 1.0  # seconds we wait for pipes held open by processes outside the tree
Key = m.Key


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Running:
    """Owns the attempt tables: what runs (`running`, `by_pid`), which ends the daemon has not
    acknowledged (`done`), and which of those the journal did not take (`unjournaled`); and
    whether new work is refused (`retire`). `wake_at(when, key)` asks the loop to call `tick`
    of attempt `key` at monotonic time `when`; output pipes are registered on `sel`."""

    def __init__(
        self,
        journal: Journal,
        boot_id: str,
        cgroups: Cgroups | None,
        sel: selectors.BaseSelector,
        link: DaemonLink,
        holds: Holds,
        wake_at: Callable[..., None],
    ) -> None:
        self.journal = journal
        self.boot_id = boot_id
        self.cgroups = cgroups
        self.sel = sel
        self.link = link
        self.holds = holds
        self.wake_at = wake_at
        self.running: dict[Key, Attempt] = {}
        self.by_pid: dict[int, Attempt] = {}
        self.done: dict[Key, m.Final] = {}
        # Ends in `done` whose final record the journal did not take (a full disk): only we
        # know them, so we stay until a daemon acknowledges them or the journal takes them.
        self.unjournaled: set[Key] = set()
        self.retired = False
        self.upkeep = Upkeep(
            journal, boot_id, self.running, self.by_pid, self.done, self.unjournaled, wake_at
        )

    def retire(self) -> None:
        """Take no new work: a spawn from now on ends `not_started`."""
        self.retired = True

    def knows(self, key: Key) -> bool:
        """Whether the attempt runs or ended here (and is not acknowledged yet)."""
        return key in self.running or key in self.done

    def acknowledged(self, key: Key) -> None:
        """The daemon committed the attempt's end: forget it (and perhaps compact the
        journal)."""
        self.done.pop(key, None)
        self.unjournaled.discard(key)
        if self.journal.wants_compacting():
            self.upkeep.compact()

    # -- starting -------------------------------------------------------------------------------

    def spawn(self, spec: m.AttemptSpec) -> None:
        """Start an attempt now (a repeat of a known one is ignored); retired, it ends
        `not_started`, and one that cannot start ends `spawn_error`."""
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
            self.wake_at(attempt.deadline, key)
        self.upkeep.schedule_sample()
        self.link.send(m.Started(*key, pid, started_at))

    def pump(self, attempt: Attempt, sink: LogSink) -> None:
        """Copy what one of the attempt's pipes has to its log; at its end, maybe finish."""
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

    # -- stopping -------------------------------------------------------------------------------

    def stop(self, attempt: Attempt, reason: str) -> None:
        """SIGTERM the tree of a running attempt now, SIGKILL after its grace; the first
        reason is its outcome."""
        if attempt.phase is Phase.RUNNING:
            attempt.move(Phase.STOPPING)
            attempt.seen.stop_reason = reason
            self._schedule_kill(attempt)
        signal_tree(attempt, signal.SIGTERM, self.by_pid)

    def _schedule_kill(self, attempt: Attempt) -> None:
        attempt.kill_at = time.monotonic() + attempt.spec.kill_grace
        self.wake_at(attempt.kill_at, attempt.key)

    def tick(self, attempt: Attempt, now: float) -> None:
        """An attempt's deadline: its timeout, its SIGKILL, or the end of its leftover grace."""
        if attempt.alive and attempt.deadline is not None and now >= attempt.deadline:
            attempt.deadline = None
            self.stop(attempt, "timeout")
        if attempt.phase in KILLING and now >= attempt.kill_at:
            signal_tree(attempt, signal.SIGKILL, self.by_pid)
            attempt.kill_at = now + 1.0  # keep insisting on stragglers, once a second
            self.wake_at(attempt.kill_at, attempt.key)
        if attempt.exit is not None and now - attempt.exit.at >= LEFTOVER_GRACE:
            # Only a process outside its group can still hold its pipes: stop waiting for them.
            self._maybe_finish(attempt, force=not tree_alive(attempt))

    # -- reaping and finishing ------------------------------------------------------------------

    def reap(self) -> None:
        """Collect every exited child: our commands, and orphans of their trees (reparented to
        us, the subreaper). Then finish what can be finished: an orphan reaped just now may
        have been the last member of an attempt's group (a killed shell's killed child, say)."""
        for pid, status, usage in _exited_children():
            attempt = self.by_pid.pop(pid, None)
            if attempt is None:
                self.upkeep.warned.discard(pid)
                continue
            attempt.exit = Exit(status, usage, time.monotonic())
            self.wake_at(attempt.exit.at + LEFTOVER_GRACE, attempt.key)
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
        self.record_final(attempt.spec, final)
        self.upkeep.schedule("sweep", SWEEP_AFTER)

    def _give_back(self, cgroup: Path | None) -> None:
        """An attempt's cgroup, empty now, kept for the next attempt."""
        if cgroup is not None and self.cgroups is not None:
            self.cgroups.give_back(cgroup)

    def _finish_now(self, spec: m.AttemptSpec, outcome: str, error: str) -> None:
        self.record_final(spec, m.Final(*spec.key, outcome, ended_at=now_ms(), error=error))

    def record_final(self, spec: m.AttemptSpec, final: m.Final) -> None:
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
            self.spawn(following[0])


def _exited_children() -> Iterator[tuple[int, int, resource.struct_rusage]]:
    while True:
        try:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status, usage
