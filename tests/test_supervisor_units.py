"""Pure parts of the supervisor: the final record, the attempt's phases, holds."""

from __future__ import annotations

import itertools
import resource
import signal

import pytest

from taskctld.supervisor import AttemptSpec
from taskctld.supervisor.attempt import TRANSITIONS, Attempt, BadTransition, Phase
from taskctld.supervisor.holds import Holds
from taskctld.supervisor.outcome import Observed, final_of, memory_hint, peak_rss

MiB = 1 << 20


def _usage(maxrss_kib: int = 2048, user: float = 0.1234567, system: float = 0.01) -> object:
    return resource.struct_rusage((user, system, maxrss_kib) + (0,) * 13)


def _exited(code: int) -> int:
    return code << 8


def _killed(sig: int) -> int:
    return int(sig)


def test_an_exit_is_exited_with_its_code_cpu_and_peak() -> None:
    final = final_of((1, 2), _exited(3), _usage(), Observed(started_at=10), ended_at=20)
    assert (final.key, final.outcome, final.exit_code, final.signal) == ((1, 2), "exited", 3, None)
    assert (final.started_at, final.ended_at, final.max_rss) == (10, 20, 2048 * 1024)
    assert (final.cpu_user, final.cpu_system) == (0.123457, 0.01)
    assert final.error is None and final.cause is None


def test_a_signal_is_signaled_unless_we_stopped_it() -> None:
    killed = _killed(signal.SIGKILL)
    assert final_of((1, 1), killed, None, Observed(0), 1).outcome == "signaled"
    stopped = final_of((1, 1), killed, None, Observed(0, stop_reason="timeout"), 1)
    assert (stopped.outcome, stopped.signal, stopped.max_rss, stopped.cpu_user) == (
        "timeout",
        signal.SIGKILL,
        None,
        None,
    )


def test_a_log_problem_is_its_error() -> None:
    seen = Observed(0, log_problem="output not saved: No space left on device")
    assert final_of((1, 1), _exited(0), None, seen, 1).error == seen.log_problem


def test_a_failure_under_a_memory_limit_names_the_limit_when_the_evidence_says_so() -> None:
    seen = Observed(0, memory_limit=64 * MiB, stderr_tail=b"...\nMemoryError\n")
    final = final_of((1, 1), _exited(1), None, seen, 1)
    assert final.cause == "memory_limit" and "64 MiB" in (final.error or "")
    quiet = Observed(0, memory_limit=64 * MiB, stderr_tail=b"usage: x\n")
    assert final_of((1, 1), _exited(2), None, quiet, 1).cause is None
    assert final_of((1, 1), _exited(0), None, seen, 1).cause is None  # it succeeded
    cancelled = Observed(0, memory_limit=64 * MiB, stop_reason="cancelled")
    assert final_of((1, 1), _killed(signal.SIGTERM), None, cancelled, 1).cause is None


def test_memory_hint() -> None:
    assert memory_hint(_killed(signal.SIGSEGV), b"", 8 * MiB) is not None
    assert memory_hint(_exited(1), b"std::bad_alloc", 8 * MiB) is not None
    assert memory_hint(_exited(1), b"nothing to see", 8 * MiB) is None


def test_peak_rss_above_our_own_is_the_commands_else_what_was_sampled() -> None:
    assert peak_rss(reported=50 * MiB, sampled=0, own_hwm=20 * MiB) == 50 * MiB
    assert peak_rss(reported=20 * MiB, sampled=3 * MiB, own_hwm=20 * MiB) == 3 * MiB
    assert peak_rss(reported=20 * MiB, sampled=0, own_hwm=20 * MiB) is None


def _attempt() -> Attempt:
    return Attempt(AttemptSpec(1, 1, ["true"], "/", {}, "/dev/null", "/dev/null"), 4242, 0)


@pytest.mark.parametrize(("start", "to"), list(itertools.product(Phase, Phase)))
def test_every_pair_of_phases_moves_only_when_the_table_allows_it(start: Phase, to: Phase) -> None:
    attempt = _attempt()
    attempt.phase = start
    if to in TRANSITIONS[start]:
        attempt.move(to)
        assert attempt.phase is to
    else:
        with pytest.raises(BadTransition):
            attempt.move(to)
        assert attempt.phase is start


def test_every_phase_can_reach_ended() -> None:
    for start in Phase:
        seen, todo = {start}, [start]
        while todo:
            for nxt in TRANSITIONS[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        assert Phase.ENDED in seen


def _spec(task_id: int) -> AttemptSpec:
    return AttemptSpec(task_id, 1, ["true"], "/", {}, "/dev/null", "/dev/null")


def test_withdrawing_a_hold_gives_back_the_chain_after_it() -> None:
    holds = Holds()
    holds.add(_spec(2), (1, 1), 102)
    holds.add(_spec(3), (2, 1), 103)
    holds.add(_spec(4), (3, 1), 104)
    assert not holds.can_follow((1, 1)) and (3, 1) in holds
    assert holds.withdraw((2, 1)) == [((3, 1), 103), ((4, 1), 104)]
    assert not holds.keys and not holds.by_after and not holds.tokens


def test_taking_a_hold_hands_over_its_spec_and_token() -> None:
    holds = Holds()
    holds.add(_spec(2), (1, 1), 102)
    taken = holds.take((1, 1))
    assert taken is not None and taken[0].key == (2, 1) and taken[1] == 102
    assert holds.take((1, 1)) is None and (2, 1) not in holds
