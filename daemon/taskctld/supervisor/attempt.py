"""One attempt the supervisor runs, and the explicit states it goes through.

    RUNNING ──(cancel, interrupt, timeout: SIGTERM)──> STOPPING
       │                                                  │
       │ reaped, group empty          reaped (either way) │
       v                                                  v
    EXITED  (waits for its pipes)           CLEANING (SIGKILL every second to what is left)
       │                                                  │
       └───────────(pipes at their end, group empty, or LEFTOVER_GRACE)──> ENDED

RUNNING also goes to CLEANING when its main process exits leaving processes in its group.
`Attempt.move` is the only way the phase changes; it refuses a move `TRANSITIONS` does not
list.
"""

from __future__ import annotations

import contextlib
import enum
import os
from collections.abc import Container
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taskctld import containment
from taskctld.procfs import descendants_of
from taskctld.supervisor.messages import AttemptSpec, StartedRecord
from taskctld.supervisor.outcome import Observed
from taskctld.supervisor.output import LogSink


class Phase(enum.StrEnum):
    RUNNING = "running"  # its main process runs
    STOPPING = "stopping"  # we asked its tree to stop (SIGTERM); SIGKILL follows at `kill_at`
    EXITED = "exited"  # its main process is reaped; its pipes are not at their end yet
    CLEANING = "cleaning"  # reaped, and we are killing what is left of its tree
    ENDED = "ended"  # its final record is made


TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.RUNNING: frozenset({Phase.STOPPING, Phase.EXITED, Phase.CLEANING}),
    Phase.STOPPING: frozenset({Phase.CLEANING}),
    Phase.EXITED: frozenset({Phase.ENDED}),
    Phase.CLEANING: frozenset({Phase.ENDED}),
    Phase.ENDED: frozenset(),
}
ALIVE = frozenset({Phase.RUNNING, Phase.STOPPING})  # its main process is not reaped yet
KILLING = frozenset({Phase.STOPPING, Phase.CLEANING})  # SIGKILL follows at kill_at


class BadTransition(RuntimeError):
    """A move the state machine does not allow: a bug in the supervisor."""


@dataclass
class Exit:
    """How the main process ended, as `wait4` said."""

    status: int
    usage: Any
    at: float  # monotonic


@dataclass
class Attempt:
    spec: AttemptSpec
    pid: int
    started_at: int
    sinks: list[LogSink] = field(default_factory=list)
    cgroup: Path | None = None  # its own cgroup, when containment is by cgroup
    phase: Phase = Phase.RUNNING
    deadline: float | None = None  # its timeout, monotonic
    kill_at: float = 0.0  # in STOPPING and CLEANING: when SIGKILL is next sent
    exit: Exit | None = None  # set on leaving RUNNING/STOPPING
    start_ticks: int | None = None  # its start time, once sampled
    seen: Observed = field(default_factory=lambda: Observed(0))

    def __post_init__(self) -> None:
        self.seen.started_at = self.started_at
        self.seen.memory_limit = self.spec.memory_limit

    @property
    def key(self) -> tuple[int, int]:
        return (self.spec.task_id, self.spec.attempt)

    @property
    def alive(self) -> bool:
        return self.phase in ALIVE

    def move(self, to: Phase) -> None:
        """The one way the phase changes. Raises BadTransition for a move not in TRANSITIONS."""
        if to not in TRANSITIONS[self.phase]:
            raise BadTransition(f"attempt {self.key}: {self.phase.value} -> {to.value}")
        self.phase = to

    def started_record(self, boot_id: str) -> StartedRecord:
        cgroup = str(self.cgroup) if self.cgroup is not None else None
        return StartedRecord(*self.key, self.pid, boot_id, self.started_at, cgroup)


# -- its processes -------------------------------------------------------------------------------


def signal_tree(attempt: Attempt, sig: int, ours: Container[int]) -> None:
    """Every process of the attempt: its cgroup's; or, without one, its process group plus
    every process of its tree wherever it moved: its descendants, and orphans (reparented
    to us, the subreaper) carrying its task id. `ours`: pids that are attempts' main
    processes (never signalled as orphans)."""
    if attempt.cgroup is not None:
        containment.signal_members(attempt.cgroup, sig)
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(attempt.pid, sig)
    for pid in tree_of(attempt, ours):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def tree_of(attempt: Attempt, ours: Container[int]) -> list[int]:
    """Every live process of the attempt: descendants of its main process, and orphans
    (reparented to us) whose environment names its task. Scans /proc: only on kills."""
    pids = descendants_of(attempt.pid) if attempt.alive else []
    marker = f"TASKCTL_TASK_ID={attempt.spec.task_id}".encode()
    for orphan in descendants_of(os.getpid()):
        if orphan not in ours and environ_has(orphan, marker):
            pids.append(orphan)
    return pids


def tree_alive(attempt: Attempt) -> bool:
    """Whether any process of the attempt is left: in its cgroup, or else its process group."""
    if attempt.cgroup is not None:
        return containment.populated(attempt.cgroup)
    return group_alive(attempt.pid)


def group_alive(pgid: int) -> bool:
    """Whether any process is left in the process group (a cheap check: no /proc scan)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def task_of(pid: int) -> int | None:
    """The task id in a process's environment (TASKCTL_TASK_ID), if it has one."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for entry in f.read().split(b"\0"):
                if entry.startswith(b"TASKCTL_TASK_ID="):
                    return int(entry.split(b"=", 1)[1])
    except (OSError, ValueError):
        pass
    return None


def environ_has(pid: int, marker: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return marker in f.read().split(b"\0")
    except OSError:
        return False


def vm_hwm(pid: int) -> int:
    """Peak resident set size of a live process, bytes (0 if unknown)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
