"""Supervisors' frames and journal records as the dispatcher's reports (pure functions)."""

from __future__ import annotations

from typing import Any

from taskctl.api import Outcome
from taskctl.units import now_ms
from taskctld.launcher import Ended, Key, Released, Started, Unheld
from taskctld.store import AttemptEnd
from taskctld.supervisor import messages as wire


def started(message: wire.Started) -> Started:
    return Started(message.task_id, message.attempt, message.pid, message.started_at)


def ended_from_final(final: wire.Final, following: Key | None = None) -> Ended:
    """A supervisor's final record as a report for the dispatcher; `following`: the held
    attempt it started in the slot."""
    if final.outcome == "not_started":
        return interrupted(final.key, final.error or "never started")
    outcome = Outcome(final.outcome)
    return Ended(
        AttemptEnd(
            *final.key,
            outcome,
            ended_at=final.ended_at or now_ms(),
            exit_code=final.exit_code,
            signal=final.signal,
            error=final.error,
            max_rss=final.max_rss,
            cpu_user=final.cpu_user,
            cpu_system=final.cpu_system,
            cause=final.cause,
            started_at=final.started_at,
        ),
        counts=outcome is not Outcome.INTERRUPTED,
        next=following,
    )


def on_node(ended: Ended, node: str | None) -> Ended:
    """On a cluster, a spawn error says on which node (a cwd or program that exists on the
    node where the task was submitted may not exist where it ran)."""
    end = ended.end
    if node is not None and end.outcome is Outcome.SPAWN_ERROR:
        end.error = f"on node {node}: {end.error or 'could not start'}"
    return ended


def released(message: wire.Released) -> Released:
    return Released(message.task_id, message.attempt, token=_token(message.hold))


def unheld(message: wire.Unheld) -> Unheld:
    return Unheld(message.task_id, message.attempt, message.taken, _token(message.hold))


def interrupted(key: Key, why: str) -> Ended:
    """The end of an attempt that never ran (not counted against its retries)."""
    return Ended(AttemptEnd(*key, Outcome.INTERRUPTED, ended_at=now_ms(), error=why), counts=False)


def lost(key: Key) -> Ended:
    """The end of an attempt whose supervisor died while it ran."""
    return Ended(
        AttemptEnd(
            *key,
            Outcome.LOST,
            ended_at=now_ms(),
            error="its supervisor died while it ran; the outcome is unknown",
        )
    )


def _token(hold: Any) -> int | None:
    return int(hold) if hold is not None else None
