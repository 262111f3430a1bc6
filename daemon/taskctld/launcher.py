"""The contract between the dispatcher and what launches its attempts: the calls the dispatcher
makes (`Launcher`) and the news it hears back (`Report`).

`runner.Runner` is the launcher that speaks to supervisors; tests use a scripted one
(`tests/conftest.py: ScriptedRunner`). A launcher queues reports (an attempt started, one
ended, a held one given back, the answer to taking a held one back) and the dispatcher applies
them in its next transaction. They carry no wire format and no rule: the runner translates
supervisors' frames into them, the dispatcher turns them into store and lifecycle calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from taskctld.store import AttemptEnd, TaskRow

Key = tuple[int, int]  # (task id, attempt number)


class Launcher(Protocol):
    """What the dispatcher asks of the runner."""

    def ready(self) -> bool:
        """Whether new attempts can be handed over now (else nothing is claimed)."""

    def start(self, task: TaskRow, env: dict[str, str] | None) -> None:
        """Start claimed attempt `task.attempts` now; a failure to is reported as its end."""

    def hold(self, task: TaskRow, env: dict[str, str] | None, after: Key, token: int) -> bool:
        """Hand over queued `task` (as its next attempt) to start the moment `after` ends.
        False: it was not handed over."""

    def unhold(self, key: Key, token: int) -> None:
        """Take a held attempt back; the answer comes as `Unheld` (after its `Started`, if it
        started meanwhile)."""

    def stop(self, task_id: int, attempt: int, kind: str) -> bool:
        """End a running attempt: `cancel`, or `interrupt` (to run again later)."""

    def forget(self, task_id: int, attempt: int) -> None:
        """The attempt's end is committed: it need not be kept or reported again."""

    def committed(self) -> None:
        """A turn committed (what the reports before it said is in the store)."""

    def runs_on_current(self, key: Key) -> bool:
        """Whether attempts may be held to follow `key` (it runs where new work goes)."""


@dataclass
class Started:
    """An attempt's command is running (`started_at` in epoch ms)."""

    task_id: int
    attempt: int
    pid: int
    started_at: int

    @property
    def key(self) -> Key:
        return (self.task_id, self.attempt)


@dataclass
class Ended:
    end: AttemptEnd
    counts: bool = True  # False: the attempt never ran (not started, interrupted)
    next: Key | None = None  # the held attempt the supervisor started in its slot


@dataclass
class Released:
    """A held attempt given back unstarted (by its supervisor, or because that is gone)."""

    task_id: int
    attempt: int
    token: int | None = None  # the hold it answers; None: whichever hold it is


@dataclass
class Unheld:
    """The supervisor's answer to taking a held attempt back: `taken`, it will not start;
    else it had started (its Started came before this)."""

    task_id: int
    attempt: int
    taken: bool
    token: int | None  # the hold it answers


Report = Started | Ended | Released | Unheld
