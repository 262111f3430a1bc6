"""Retry and outcome decisions: pure functions of (policy, attempt count, outcome). No I/O, no clock.

Which outcomes are retried: a non-zero exit, a signal, a timeout and a lost attempt are; a spawn
error (the command can never start as given) and a cancel are not. `--retry-on` narrows retries
to the listed exit codes; `--no-retry-on` excludes codes. An interrupted attempt (`daemon stop
--kill`) or one that never started is run again without counting against the policy.
"""

from __future__ import annotations

from dataclasses import dataclass

from taskctl.api import Backoff, Outcome, TaskState

DEFAULT_RETRY_DELAY = 1.0
DEFAULT_MAX_DELAY = 3600.0
DEFAULT_KILL_GRACE = 10.0

RETRYABLE = frozenset({Outcome.EXITED, Outcome.SIGNALED, Outcome.TIMEOUT, Outcome.LOST})


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 0
    backoff: Backoff = Backoff.FIXED
    retry_delay: float = DEFAULT_RETRY_DELAY
    max_delay: float = DEFAULT_MAX_DELAY
    retry_on: frozenset[int] | None = None
    no_retry_on: frozenset[int] = frozenset()


@dataclass(frozen=True)
class Decision:
    """What happens to a task after an attempt ended."""

    state: TaskState  # succeeded, failed, cancelled, scheduled (retry later) or queued (again)
    reason: str | None = None
    delay: float = 0.0  # seconds until the retry, for state scheduled
    counts: bool = True  # whether the attempt used up one of the policy's tries


def decide(
    policy: RetryPolicy, tries: int, outcome: Outcome, exit_code: int | None, jitter: float
) -> Decision:
    """The next state after attempt number `tries` (1-based, counted tries) ended with `outcome`.

    `jitter` is a number in [0, 1) supplied by the caller (random in production), so that this
    function stays deterministic under test.
    """
    if outcome is Outcome.EXITED and exit_code == 0:
        return Decision(TaskState.SUCCEEDED)
    if outcome is Outcome.CANCELLED:
        return Decision(TaskState.CANCELLED, reason="cancelled")
    if outcome is Outcome.INTERRUPTED:
        return Decision(TaskState.QUEUED, reason="interrupted", counts=False)
    reason = failure_reason(outcome)
    if should_retry(policy, tries, outcome, exit_code):
        return Decision(
            TaskState.SCHEDULED, reason=reason, delay=backoff_delay(policy, tries, jitter)
        )
    return Decision(TaskState.FAILED, reason=reason)


def failure_reason(outcome: Outcome) -> str:
    return "exit_code" if outcome is Outcome.EXITED else outcome.value


def should_retry(policy: RetryPolicy, tries: int, outcome: Outcome, exit_code: int | None) -> bool:
    if tries > policy.retries or outcome not in RETRYABLE:
        return False
    if outcome is Outcome.EXITED and exit_code is not None:
        if exit_code in policy.no_retry_on:
            return False
        if policy.retry_on is not None and exit_code not in policy.retry_on:
            return False
    elif policy.retry_on is not None:
        # `--retry-on CODES` names the failures worth retrying; anything else is final.
        return False
    return True


def backoff_delay(policy: RetryPolicy, tries: int, jitter: float) -> float:
    """Seconds before the next try after `tries` failed ones.

    Fixed: `retry_delay` every time. Exponential: `retry_delay * 2**(tries-1)` capped at
    `max_delay`, with equal jitter (half of it fixed, half random) so that many tasks failing
    together do not retry in lockstep.
    """
    if policy.backoff is Backoff.FIXED:
        return min(policy.retry_delay, policy.max_delay)
    delay = min(policy.retry_delay * (2 ** max(tries - 1, 0)), policy.max_delay)
    return delay / 2 + delay / 2 * jitter
