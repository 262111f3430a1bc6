"""The supervisor's periodic jobs: journal the ends a full disk refused, sample what runs, and
sweep what ended attempts left behind. Each runs only while it has something to do."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable

from taskctld.procfs import ProcessId, children_of
from taskctld.supervisor import messages as m
from taskctld.supervisor.attempt import Attempt, task_of, vm_hwm
from taskctld.supervisor.journal import Journal, Record

REJOURNAL_EVERY = 1.0  # seconds between tries to journal an end the journal did not take
SAMPLE_EVERY = 1.0  # seconds between samples of running commands (peak RSS, start time)
SWEEP_AFTER = 2.0  # seconds after an end before we look for what it left behind


class Upkeep:
    """Shares the supervisor's tables (it reads and updates them in place); `wake_at(when)`
    asks the loop to call `run_due` at monotonic time `when`."""

    def __init__(
        self,
        journal: Journal,
        boot_id: str,
        running: dict[m.Key, Attempt],
        by_pid: dict[int, Attempt],
        done: dict[m.Key, m.Final],
        unjournaled: set[m.Key],
        wake_at: Callable[[float], None],
    ) -> None:
        self.journal, self.boot_id = journal, boot_id
        self.running, self.by_pid, self.done, self.unjournaled = running, by_pid, done, unjournaled
        self.wake_at = wake_at
        self.due: dict[str, float] = {}  # job name -> when it runs next (monotonic)
        self.jobs: dict[str, Callable[[], None]] = {
            "rejournal": self.rejournal,
            "sample": self.sample,
            "sweep": self.sweep,
        }
        self.warned: set[int] = set()  # leftovers already sent SIGTERM
        self.own_hwm = 0  # our own peak RSS at the last sample (see `outcome.peak_rss`)

    def schedule(self, job: str, delay: float) -> None:
        """Run `job` in `delay` seconds, unless it is already due."""
        if job not in self.due:
            self.due[job] = when = time.monotonic() + delay
            self.wake_at(when)

    def run_due(self, now: float) -> None:
        for job, when in list(self.due.items()):
            if now >= when:
                del self.due[job]
                self.jobs[job]()

    def rejournal(self) -> None:
        """Try again to journal the final records the journal did not take."""
        for key in sorted(self.unjournaled):
            final = self.done.get(key)
            if final is not None and not self.journal.append(final):
                self.schedule("rejournal", REJOURNAL_EVERY)
                return
            self.unjournaled.discard(key)

    def compact(self) -> None:
        """Keep only what a later daemon could still need: running and unacknowledged ones."""
        records: list[Record] = []
        for attempt in self.running.values():
            records.append(attempt.started_record(self.boot_id))
            if attempt.start_ticks is not None:
                records.append(m.Ident(*attempt.key, attempt.start_ticks))
        records.extend(self.done.values())
        self.journal.rewrite(records)

    def schedule_sample(self) -> None:
        """Sample running commands once a second while any runs (never when idle)."""
        if self.running:
            self.schedule("sample", SAMPLE_EVERY)

    def sample(self) -> None:
        """Peak RSS so far; and, for commands that have run a second, their start time (which
        makes pid + start + boot id an identity a reused pid cannot fake)."""
        self.own_hwm = vm_hwm(os.getpid())
        for attempt in self.running.values():
            if not attempt.alive:
                continue
            attempt.seen.sampled_rss = max(attempt.seen.sampled_rss, vm_hwm(attempt.pid))
            if attempt.start_ticks is None:
                ident = ProcessId.of(attempt.pid, self.boot_id)
                if ident is not None:
                    attempt.start_ticks = ident.start
                    self.journal.append(m.Ident(*attempt.key, ident.start))
        self.schedule_sample()

    def sweep(self) -> None:
        """Processes that escaped both the process group and the pipes of a task that has
        ended come back to us as orphans (we are the subreaper): stop them, TERM then KILL."""
        live_tasks = {key[0] for key in self.running}
        leftovers = False
        for pid in children_of(os.getpid()):
            if pid in self.by_pid:
                continue
            task = task_of(pid)
            if task is None or task in live_tasks:
                continue
            sig = signal.SIGKILL if pid in self.warned else signal.SIGTERM
            self.warned.add(pid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
            leftovers = True
        if leftovers:
            self.schedule("sweep", SWEEP_AFTER)
        else:
            self.warned.clear()
