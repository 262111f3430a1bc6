"""Applying a launcher's reports, inside the dispatcher's turn: a start is recorded (or, for an
attempt we did not claim, claimed now or stopped), an end is written and its task moved on by the
lifecycle, and each changes the slot accounting (`Slots`) and the holds (`HoldAhead`, when on).

This is the hot path. The plain reports (starts and ends of attempts we claimed) of a turn are
written set-based, a few statements for all of them whatever their number (a round trip each on
PostgreSQL); the rare ones one at a time, and a read of a task only when no claimed (or held)
row stands for it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from taskctl.api import TaskState
from taskctld.dispatcher.holding import HoldAhead
from taskctld.dispatcher.slots import Slots
from taskctld.launcher import Ended, Key, Launcher, Released, Report, Started
from taskctld.lifecycle import Ending, Lifecycle
from taskctld.store import AttemptEnd, AttemptStart, Store, TaskRow

log = logging.getLogger("taskctld.dispatcher")


@dataclass
class _Batch:
    """Reports gathered to be written together: starts of claimed attempts, and ends of
    claimed running attempts with their claimed rows."""

    starts: list[Started] = field(default_factory=list)
    ends: list[tuple[Ended, TaskRow]] = field(default_factory=list)


class ReportApplier:
    """Owns nothing but the ends applied in the current turn (for observers, after its commit)."""

    def __init__(
        self,
        store: Store,
        lifecycle: Lifecycle,
        launcher: Launcher,
        slots: Slots,
        holds: HoldAhead | None,
    ) -> None:
        self.store = store
        self.lifecycle = lifecycle
        self.launcher = launcher
        self.slots = slots
        self.holds = holds
        self._ended: list[AttemptEnd] = []

    def apply(self, reports: list[Report], now: int) -> list[Key]:
        """Apply `reports` as if in order; returns the attempts whose end was applied (the
        launcher may forget them once the turn commits).

        The plain cases, a start of an attempt we claimed and the end of one, are gathered
        and written a batch at a time (`_Batch`): its starts first, then its ends. Any other
        report (an attempt to adopt, a refused or stray start, a hold's answer, an end heard
        twice) first writes the batch gathered before it, then is applied alone: what it
        does may rest on what came before it (the slot an end passed on, say)."""
        ended: list[Key] = []
        batch = _Batch()
        for report in reports:
            if isinstance(report, Started):
                if self.slots.is_claimed(report.key):
                    batch.starts.append(report)
                    continue
                self._write(batch, now)
                self._started(report, now)
            elif isinstance(report, Ended):
                key = (report.end.task_id, report.end.attempt)
                ended.append(key)
                if self.slots.is_claimed(key) and not self.slots.is_refused(key):
                    batch.ends.append(self._gather_end(key, report))
                    continue
                self._write(batch, now)
                self._ended_one(report, now)
            else:
                self._write(batch, now)
                if isinstance(report, Released):
                    self._released(report)
                elif self.holds is not None:
                    self.holds.answered(report)
        self._write(batch, now)
        return ended

    def take_ends(self) -> list[AttemptEnd]:
        """The ends recorded by the turn that just committed (each once)."""
        ended, self._ended = self._ended, []
        return ended

    def rolled_back(self) -> None:
        """The turn rolled back: its ends come again with its reports."""
        self._ended.clear()

    # -- the plain cases, a batch at a time -------------------------------------------------------

    def _gather_end(self, key: Key, report: Ended) -> tuple[Ended, TaskRow]:
        """The end of an attempt we claimed, with its claimed row (right for the policy:
        running tasks change only through here; the fenced move refuses anything stale). Its
        slot stays counted until the batch is written."""
        if self.holds is not None:
            self.holds.slot_ended(key)
        task = self.slots.ended(key)
        assert task is not None
        return report, task

    def _write(self, batch: _Batch, now: int) -> None:
        """Write what `batch` gathered: its starts, then its ends and their tasks' next moves
        (a slot is freed, or passed on, by each end whose task moved); then empty it."""
        if batch.starts:
            self.store.mark_started_many(
                [AttemptStart(s.task_id, s.attempt, s.pid, s.started_at) for s in batch.starts]
            )
            batch.starts.clear()
        if not batch.ends:
            return
        news = self.store.end_attempts([report.end for report, _ in batch.ends])
        endings = []
        for report, task in batch.ends:
            end = report.end
            if (end.task_id, end.attempt) in news:  # a repeated or stale report is not
                self._ended.append(end)
                if end.started_at is not None:  # how long its queue's attempts take lately
                    self.slots.took(task.queue, max(0, end.ended_at - end.started_at))
            endings.append(Ending(task, end, report.counts))
        self.lifecycle.finish_many(endings, now)
        # Each was our claim: its slot is free (or passed on) whether its task moved or not.
        # On a shared store another node may have rescued the attempt (the move is stale),
        # and the slot is ours all the same.
        for report, task in batch.ends:
            self.slots.pass_or_free(task.queue, report.next)
        batch.ends.clear()

    # -- one report at a time: the rare cases -----------------------------------------------------

    def _released(self, report: Released) -> None:
        key = self.holds.released(report) if self.holds is not None else None
        if key is not None:  # it was to take a slot passed on: that slot is free
            self.slots.given_back(key)

    def _started(self, report: Started, now: int) -> None:
        key = (report.task_id, report.attempt)
        if not self.slots.is_claimed(key):
            adopted = self._adopt(key, now, report.started_at)
            task = adopted or self.store.get_task(report.task_id)
            if task is None or task.state is not TaskState.RUNNING or task.attempts != key[1]:
                # A held task cancelled as it started: stop it, and keep on the record that
                # it ran (its end is written to this attempt as it comes).
                log.warning("task %d started as it was cancelled; stopping it", key[0])
                recorded = self.lifecycle.record_stray_start(
                    *key, pid=report.pid, started_at=report.started_at
                )
                self.launcher.stop(*key, "cancel")
                if recorded and task is not None and not self.slots.is_refused(key):
                    self.slots.count_stray(key, task.queue)  # first heard of after a restart
                return
            if adopted is not None:
                self.slots.keep(key, adopted)
        self.store.mark_started(*key, pid=report.pid, started_at=report.started_at)

    def _adopt(self, key: Key, now: int, started_at: int) -> TaskRow | None:
        """Claim an attempt the supervisor started (or tried to) without a claim of ours: a
        held one, or one that started while no daemon listened. Its slot is counted unless
        it was passed on from the attempt before it. The caller keeps the row if it runs."""
        held = self.holds.started(key) if self.holds is not None else None
        task = self.lifecycle.claim_attempt(*key, now, started_at, held)
        self.slots.adopt(key, None if task is None else task.queue)
        return task

    def _ended_one(self, report: Ended, now: int) -> None:
        end = report.end
        key = (end.task_id, end.attempt)
        if self.holds is not None:
            self.holds.slot_ended(key)
        refused = self.slots.refused_end(key)
        task = claimed = None
        if refused is None:
            # The row as claimed is still right for the policy (running tasks do not change
            # but through here); the fenced move below refuses anything stale.
            claimed = task = self.slots.ended(key)
            task = task or self._adopt(key, now, end.started_at or end.ended_at)
            refused = self.slots.refused_end(key)  # refused just now: it never said it started
        if refused is not None:  # a held start that was refused: its end and its slot
            self.slots.pass_or_free(refused, report.next)
            if self.store.end_attempt(end):
                self._ended.append(end)
            return
        news = self.store.end_attempt(end)  # a repeated or stale report is not
        if news:
            self._ended.append(end)
        task = task or self.store.get_task(end.task_id)
        if task is None or task.state is not TaskState.RUNNING or task.attempts != end.attempt:
            if claimed is not None:  # ours, rescued by another node meanwhile: its slot is free
                self.slots.pass_or_free(claimed.queue, report.next)
            return
        if news and end.started_at is not None:  # how long its queue's attempts take lately
            self.slots.took(task.queue, max(0, end.ended_at - end.started_at))
        if self.lifecycle.finish(task, end, now, counts=report.counts) or claimed is not None:
            self.slots.pass_or_free(task.queue, report.next)
