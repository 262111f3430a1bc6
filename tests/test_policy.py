"""Retry decisions are a pure function of (policy, attempt count, outcome): no processes here."""

from __future__ import annotations

import pytest

from taskctl.api import Backoff, Outcome, TaskState
from taskctld.policy import RetryPolicy, backoff_delay, decide

RETRY3 = RetryPolicy(retries=3, retry_delay=1.0)


def test_success_is_final_whatever_the_policy() -> None:
    assert decide(RETRY3, 1, Outcome.EXITED, 0, 0.5).state is TaskState.SUCCEEDED


@pytest.mark.parametrize(
    "outcome", [Outcome.EXITED, Outcome.SIGNALED, Outcome.TIMEOUT, Outcome.LOST]
)
def test_retryable_outcomes_retry_while_tries_are_left(outcome: Outcome) -> None:
    for tries in (1, 2, 3):
        assert decide(RETRY3, tries, outcome, 1, 0.5).state is TaskState.SCHEDULED
    final = decide(RETRY3, 4, outcome, 1, 0.5)
    assert final.state is TaskState.FAILED
    assert final.reason == ("exit_code" if outcome is Outcome.EXITED else outcome.value)


@pytest.mark.parametrize("outcome", [Outcome.SPAWN_ERROR, Outcome.CANCELLED])
def test_spawn_errors_and_cancels_are_never_retried(outcome: Outcome) -> None:
    decision = decide(RETRY3, 1, outcome, None, 0.5)
    assert decision.state is (
        TaskState.CANCELLED if outcome is Outcome.CANCELLED else TaskState.FAILED
    )


def test_no_retries_by_default() -> None:
    assert decide(RetryPolicy(), 1, Outcome.EXITED, 1, 0.5).state is TaskState.FAILED


def test_interrupted_attempts_run_again_without_counting() -> None:
    decision = decide(RetryPolicy(), 1, Outcome.INTERRUPTED, None, 0.5)
    assert decision.state is TaskState.QUEUED and decision.counts is False


def test_retry_on_narrows_and_no_retry_on_excludes() -> None:
    only75 = RetryPolicy(retries=2, retry_on=frozenset({75}))
    assert decide(only75, 1, Outcome.EXITED, 75, 0).state is TaskState.SCHEDULED
    assert decide(only75, 1, Outcome.EXITED, 1, 0).state is TaskState.FAILED
    assert decide(only75, 1, Outcome.TIMEOUT, None, 0).state is TaskState.FAILED
    not2 = RetryPolicy(retries=2, no_retry_on=frozenset({2}))
    assert decide(not2, 1, Outcome.EXITED, 2, 0).state is TaskState.FAILED
    assert decide(not2, 1, Outcome.EXITED, 3, 0).state is TaskState.SCHEDULED


def test_fixed_backoff_is_constant() -> None:
    assert [backoff_delay(RETRY3, n, 0.9) for n in (1, 2, 3)] == [1.0, 1.0, 1.0]


def test_exponential_backoff_doubles_with_equal_jitter_and_a_cap() -> None:
    policy = RetryPolicy(retries=10, backoff=Backoff.EXPONENTIAL, retry_delay=1.0, max_delay=6.0)
    lows = [backoff_delay(policy, n, 0.0) for n in (1, 2, 3, 4)]
    highs = [backoff_delay(policy, n, 0.999999) for n in (1, 2, 3, 4)]
    assert lows == [0.5, 1.0, 2.0, 3.0]  # half of 1, 2, 4, min(8, 6)
    assert [round(h, 3) for h in highs] == [1.0, 2.0, 4.0, 6.0]
    scheduled = decide(policy, 2, Outcome.EXITED, 1, 0.5)
    assert scheduled.state is TaskState.SCHEDULED and scheduled.delay == 1.5
