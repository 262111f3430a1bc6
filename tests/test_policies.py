"""Execution policies end to end: retries with backoff, timeouts, tree kills, accounting, limits."""

from __future__ import annotations

import itertools
import os
import sys
import time

from taskctl.units import rfc3339_to_ms

from conftest import Home, figure, wait_until

PYTHON = sys.executable


def _starts(task: dict) -> list[float]:
    return [rfc3339_to_ms(a["started_at"]) / 1000 for a in task["attempts"]]


def test_exponential_backoff_makes_four_attempts_with_growing_gaps(daemon: Home) -> None:
    task_id = daemon.submit(
        "sh",
        "-c",
        "exit 1",
        options=("--retries", "3", "--backoff", "exponential", "--retry-delay", "1s"),
    )
    waiting = wait_until(lambda: (t := daemon.task(task_id))["state"] == "scheduled" and t)
    assert waiting["run_at"] and rfc3339_to_ms(waiting["run_at"]) > rfc3339_to_ms(
        waiting["attempts"][0]["started_at"]
    )
    task = daemon.wait_final(task_id, timeout=30)
    assert task["state"] == "failed"
    assert [a["exit_code"] for a in task["attempts"]] == [1, 1, 1, 1]
    starts = _starts(task)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    figure(
        "gaps between attempts (s), delays 1/2/4 s with equal jitter", [round(g, 2) for g in gaps]
    )
    # equal jitter: each delay is between half and all of 1 s, 2 s, 4 s (plus start-up)
    for gap, full in zip(gaps, (1, 2, 4), strict=True):
        assert full / 2 - 0.05 <= gap <= full + 0.6, gaps
    assert gaps[0] <= gaps[1] <= gaps[2], gaps


def test_fails_twice_then_succeeds_on_the_third_attempt(daemon: Home) -> None:
    counter = daemon.path / "count"
    script = f'n=$(cat {counter} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {counter}; echo "$TASKCTL_ATTEMPT"; [ $n -ge 3 ]'
    task_id = daemon.submit(script, options=("--shell", "--retries", "3", "--retry-delay", "100ms"))
    task = daemon.wait_final(task_id)
    assert task["state"] == "succeeded"
    assert [a["exit_code"] for a in task["attempts"]] == [1, 1, 0]
    text = daemon.ok("status", str(task_id))
    assert text.count("exited") == 3
    for n in (1, 2, 3):
        assert daemon.ok("logs", "--attempt", str(n), str(task_id)) == f"{n}\n"


def test_retry_on_names_the_exit_codes_worth_retrying(daemon: Home) -> None:
    options = ("--retries", "2", "--retry-delay", "100ms", "--retry-on", "75")
    retried = daemon.wait_final(daemon.submit("sh", "-c", "exit 75", options=options))
    assert [a["exit_code"] for a in retried["attempts"]] == [75, 75, 75]
    final = daemon.wait_final(daemon.submit("sh", "-c", "exit 1", options=options))
    assert [a["exit_code"] for a in final["attempts"]] == [1]
    never = daemon.wait_final(
        daemon.submit("sh", "-c", "exit 2", options=("--retries", "2", "--no-retry-on", "2"))
    )
    assert len(never["attempts"]) == 1


def test_spawn_errors_are_not_retried(daemon: Home) -> None:
    task = daemon.wait_final(
        daemon.submit("/no/such/thing", options=("--retries", "3", "--retry-delay", "100ms"))
    )
    assert [a["outcome"] for a in task["attempts"]] == ["spawn_error"]


def _count(marker: str) -> int:
    """Live processes whose argv is exactly `sleep MARKER`."""
    count = 0
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")[:2]
            with open(f"/proc/{entry}/stat") as g:
                state = g.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        count += argv == [b"sleep", marker.encode()] and state != "Z"
    return count


def test_timeout_kills_the_whole_tree_including_a_new_session(daemon: Home) -> None:
    marker = str(600 + os.getpid() % 300)  # `sleep 6xx`: only ours
    script = f"sleep {marker} & sleep {marker} & setsid sleep {marker} & wait"
    began = time.monotonic()
    task_id = daemon.submit("sh", "-c", script, options=("--timeout", "1s", "--kill-grace", "2s"))
    wait_until(lambda: _count(marker) == 3)
    task = daemon.wait_final(task_id, timeout=10)
    figure("submit to final, --timeout 1s --kill-grace 2s (s)", round(time.monotonic() - began, 2))
    assert (
        time.monotonic() - began <= 1 + 2 + 2 + 1
    )  # timeout + grace + 2 s (+1 s of test overhead)
    assert task["state"] == "failed" and task["reason"] == "timeout"
    assert task["attempts"][0]["outcome"] == "timeout"
    wait_until(lambda: _count(marker) == 0, timeout=3)
    assert daemon.run("submit", "--wait", "--timeout", "1s", "--", "sleep", "5").returncode == 124


def test_a_task_ignoring_sigterm_is_killed_after_the_grace(daemon: Home) -> None:
    script = "trap '' TERM; echo ready; while :; do sleep 0.1; done"
    task_id = daemon.submit(
        "sh", "-c", script, options=("--timeout", "500ms", "--kill-grace", "1s")
    )
    task = daemon.wait_final(task_id, timeout=10)
    attempt = task["attempts"][0]
    assert attempt["outcome"] == "timeout" and attempt["signal"] == 9
    ran = (rfc3339_to_ms(attempt["ended_at"]) - rfc3339_to_ms(attempt["started_at"])) / 1000
    figure("SIGTERM ignored: start to SIGKILL, --timeout 500ms --kill-grace 1s (s)", ran)
    # 0.5 s timeout + 1 s grace, then SIGKILL; and no second waiting for the killed shell's
    # killed child (a zombie still counts as a member of the group until we reap it)
    assert 1.4 <= ran <= 2.2, ran


def test_cancel_respects_the_kill_grace(daemon: Home) -> None:
    task_id = daemon.submit(
        "sh", "-c", "trap '' TERM; while :; do sleep 0.1; done", options=("--kill-grace", "1s")
    )
    wait_until(lambda: (t := daemon.api_task(task_id))["attempts"] and t["attempts"][0]["pid"])
    began = time.monotonic()
    daemon.ok("cancel", str(task_id))
    assert 0.9 <= time.monotonic() - began <= 5
    task = daemon.task(task_id)
    assert task["state"] == "cancelled" and task["attempts"][0]["signal"] == 9


def test_memory_limit_is_enforced_from_the_start_with_a_clear_reason(daemon: Home) -> None:
    task_id = daemon.submit(
        PYTHON, "-c", "x = bytearray(500_000_000)", options=("--memory-limit", "100M")
    )
    task = daemon.wait_final(task_id)
    assert task["state"] == "failed" and task["reason"] == "memory_limit"
    assert "memory limit of 100 MiB" in task["attempts"][0]["error"]
    assert daemon.json("health")["status"] == "ok"
    fits = daemon.wait_final(
        daemon.submit(PYTHON, "-c", "x = bytearray(10_000_000)", options=("--memory-limit", "200M"))
    )
    assert fits["state"] == "succeeded"


def test_peak_rss_and_cpu_are_recorded(daemon: Home) -> None:
    task_id = daemon.submit(PYTHON, "-c", "x = b'x' * 210_000_000; sum(range(2_000_000))")
    attempt = daemon.wait_final(task_id)["attempts"][0]
    figure("peak RSS of a 210 MB allocation (MB)", attempt["max_rss"] / 1e6)
    assert attempt["max_rss"] >= 200_000_000
    assert attempt["cpu_user"] + attempt["cpu_system"] > 0.01
    assert "MiB" in daemon.ok("status", str(task_id))


def test_each_attempt_knows_its_task_and_number(daemon: Home) -> None:
    task_id = daemon.submit(
        'echo "$TASKCTL_TASK_ID/$TASKCTL_ATTEMPT"; exit 1',
        options=("--shell", "--retries", "1", "--retry-delay", "100ms"),
    )
    daemon.wait_final(task_id)
    assert daemon.ok("logs", "--attempt", "2", str(task_id)) == f"{task_id}/2\n"


def test_retry_runs_a_finished_task_again_and_keeps_its_history(daemon: Home) -> None:
    flag = daemon.path / "flag"
    task_id = daemon.submit("sh", "-c", f"test -e {flag}")
    assert daemon.wait_final(task_id)["state"] == "failed"
    flag.touch()
    assert daemon.json("retry", str(task_id))["state"] in ("queued", "running", "succeeded")
    task = daemon.wait_final(task_id)
    assert task["state"] == "succeeded"
    assert [a["exit_code"] for a in task["attempts"]] == [1, 0]
    running = daemon.submit("sleep", "30")
    assert daemon.run("retry", str(running)).returncode == 5
    assert daemon.run("retry", "999999").returncode == 4
    daemon.ok("cancel", str(running))


def test_cancel_after_the_command_exited_waits_for_the_attempt_not_in_vain(daemon: Home) -> None:
    """The command has exited but left a child that ignores SIGTERM in its group, so its
    supervisor no longer takes a cancel; the attempt ends when the grace kills the child, and
    the policy would retry it in an hour. The cancel waits for that end, then cancels the
    retry: it does not wait for a final state that would come only with the next attempt."""
    task_id = daemon.submit(
        "sh", "-c", "trap '' TERM; sleep 30 & exit 1",
        options=("--retries", "1", "--retry-delay", "1h", "--kill-grace", "2s"),
    )  # fmt: skip
    wait_until(lambda: daemon.api_task(task_id)["attempts"][0]["pid"])
    began = time.monotonic()
    done = daemon.run("cancel", str(task_id))
    took = time.monotonic() - began
    assert done.returncode == 0, done.stderr
    assert took < 2 + 3, took  # the grace, not the grace + 10 s of waiting for a final state
    task = daemon.task(task_id)
    assert task["state"] == "cancelled" and len(task["attempts"]) == 1
