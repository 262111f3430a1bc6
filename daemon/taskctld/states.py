"""The task state machine: which transitions exist. The store's `move` is the only code that
changes a task's state, and it refuses any pair not listed here (see DESIGN.md's diagram).
"""

from __future__ import annotations

from taskctl.api import FINAL_STATES, TaskState

W, S, Q, R = TaskState.WAITING, TaskState.SCHEDULED, TaskState.QUEUED, TaskState.RUNNING
OK, FAIL, CANCEL = TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED

TRANSITIONS: frozenset[tuple[TaskState | None, TaskState]] = frozenset(
    {
        # submit
        (None, W),
        (None, S),
        (None, Q),
        # dependencies met / failed
        (W, Q),
        (W, S),
        (W, FAIL),
        # due
        (S, Q),
        # claim
        (Q, R),
        # an attempt ends
        (R, OK),
        (R, FAIL),
        (R, CANCEL),
        (R, S),  # failed, attempts left: wait for the backoff
        (R, Q),  # interrupted (stop --kill) or never started: run again, attempt not counted
        # cancel before running
        (W, CANCEL),
        (S, CANCEL),
        (Q, CANCEL),
        # `taskctl retry` of a finished task
        (OK, Q),
        (FAIL, Q),
        (CANCEL, Q),
    }
)


def allowed(old: TaskState | None, new: TaskState) -> bool:
    return (old, new) in TRANSITIONS


def sources_of(new: TaskState) -> list[TaskState]:
    """Every state a task may move to `new` from."""
    return [old for old, to in TRANSITIONS if to == new and old is not None]


def is_final(state: TaskState | str) -> bool:
    return state in FINAL_STATES
