"""Delayed tasks, cron schedules and file triggers against a real daemon."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import pytest

from taskctl.units import rfc3339_to_ms

from conftest import Home, wait_until


def test_delay_starts_the_task_after_that_long(daemon: Home) -> None:
    task = daemon.json("submit", "--delay", "3s", "--", "true")
    assert task["state"] == "scheduled"
    done = daemon.wait_final(task["id"], timeout=10)
    waited = (
        rfc3339_to_ms(done["attempts"][0]["started_at"]) - rfc3339_to_ms(task["created_at"])
    ) / 1000
    assert 2.5 <= waited <= 3.5, waited


def test_at_a_time_starts_then(daemon: Home) -> None:
    when = datetime.now(UTC) + timedelta(seconds=2)
    task = daemon.json("submit", "--at", when.isoformat(), "--", "true")
    assert task["state"] == "scheduled"
    done = daemon.wait_final(task["id"], timeout=10)
    late = rfc3339_to_ms(done["attempts"][0]["started_at"]) / 1000 - when.timestamp()
    assert -0.05 <= late <= 0.5, late
    assert daemon.run("submit", "--at", "teatime", "--", "true").returncode == 2


def test_invalid_schedules_are_refused_and_change_nothing(daemon: Home) -> None:
    daemon.ok("cron", "add", "-n", "keep", "@daily", "--", "true")
    before = daemon.json("cron", "list")
    for args, words in [
        (["cron", "add", "not a cron", "--", "true"], "fields"),
        (["cron", "add", "61 * * * *", "--", "true"], "minute"),
        (["cron", "add", "0 0 31 2 *", "--", "true"], "day-of-month"),
        (["cron", "add", "--tz", "Mars/Olympus", "* * * * *", "--", "true"], "time zone"),
        (["cron", "add", "--overlap", "sometimes", "* * * * *", "--", "true"], "overlap"),
        (["cron", "add", "-n", "keep", "* * * * *", "--", "true"], "exists"),
        (["trigger", "add", "/no/such/dir", "--", "true"], "does not exist"),
    ]:
        done = daemon.run(*args)
        assert done.returncode in (2, 5), (args, done.stderr)
        assert words in done.stderr, (args, done.stderr)
    assert daemon.json("cron", "list") == before
    assert daemon.json("trigger", "list") == []


def test_cron_next_follows_dst_in_the_schedule_zone(daemon: Home) -> None:
    daemon.ok("cron", "add", "-n", "spring", "--tz", "America/New_York", "30 2 * * *", "--", "true")
    daemon.ok("cron", "add", "-n", "fall", "--tz", "America/New_York", "30 1 * * *", "--", "true")
    spring = daemon.json("cron", "next", "spring", "--from", "2026-03-07T12:00:00-05:00", "-n", "3")
    assert [t for t in spring if t.startswith("2026-03-08")] == ["2026-03-08T03:00:00-04:00"]
    fall = daemon.json("cron", "next", "fall", "--from", "2026-10-31T12:00:00-04:00", "-n", "3")
    assert [t for t in fall if t.startswith("2026-11-01")] == ["2026-11-01T01:30:00-04:00"]


def test_cron_pause_resume_show_and_rm(daemon: Home) -> None:
    daemon.ok(
        "cron",
        "add",
        "-n",
        "nightly",
        "--catch-up",
        "all",
        "--overlap",
        "queue",
        "0 3 * * *",
        "--",
        "true",
    )
    shown = daemon.json("cron", "show", "nightly")
    assert (
        shown["cron"] == "0 3 * * *" and shown["catch_up"] == "all" and shown["overlap"] == "queue"
    )
    assert shown["next_due"] and shown["runs"] == []
    assert daemon.json("cron", "pause", "nightly")["paused"] is True
    assert daemon.json("cron", "show", "nightly")["next_due"] is None
    assert daemon.json("cron", "resume", "nightly")["next_due"]
    daemon.ok("cron", "rm", "nightly")
    assert daemon.run("cron", "show", "nightly").returncode == 4
    assert daemon.run("cron", "rm", "nightly").returncode == 4


def _minute() -> float:
    return time.time() // 60 * 60


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cron_fires_once_per_minute_across_a_daemon_kill(daemon: Home) -> None:
    """The issue's check: `* * * * *` over about three minutes with a SIGKILL in the middle."""
    daemon.ok("cron", "add", "-n", "tick", "* * * * *", "--", "date")
    first = wait_until(lambda: daemon.json("list"), timeout=75, interval=0.5)[0]
    first_due = rfc3339_to_ms(first["due_at"]) / 1000
    daemon.kill9()  # down across the next due minute
    wait_until(lambda: time.time() > first_due + 65, timeout=70, interval=0.5)
    daemon.start()
    wait_until(lambda: len(daemon.json("list")) >= 3, timeout=75, interval=0.5)
    tasks = daemon.json("list")
    dues = sorted(rfc3339_to_ms(t["due_at"]) / 1000 for t in tasks)
    assert dues[:3] == [first_due, first_due + 60, first_due + 120], dues
    assert len(dues) == len(set(dues)), "a due minute fired twice"
    runs = daemon.json("cron", "show", "tick")["runs"]
    assert len({r["due_at"] for r in runs}) == len(runs)


def test_a_burst_of_changes_is_one_task_listing_every_path(daemon: Home, tmp_path) -> None:
    watched = tmp_path / "in"
    watched.mkdir()
    daemon.ok(
        "trigger",
        "add",
        str(watched),
        "--debounce",
        "500ms",
        "--",
        "sh",
        "-c",
        'cat "$TASKCTL_CHANGED_PATHS"',
    )
    time.sleep(0.3)  # let the watcher settle: it starts watching when armed, not retroactively
    began = time.monotonic()
    for n in range(20):
        (watched / f"f{n:02d}").write_text("x")
    assert time.monotonic() - began < 0.2
    task = wait_until(lambda: daemon.json("list"), timeout=10)[0]
    daemon.wait_final(task["id"])
    listed = daemon.ok("logs", str(task["id"])).split()
    assert sorted(listed) == sorted(str(watched / f"f{n:02d}") for n in range(20))
    time.sleep(1.5)
    assert len(daemon.json("list")) == 1  # exactly one


def test_triggers_persist_filter_and_pause(daemon: Home, tmp_path) -> None:
    watched = tmp_path / "docs"
    watched.mkdir()
    daemon.ok(
        "trigger",
        "add",
        "-n",
        "md",
        str(watched),
        "--glob",
        "*.md",
        "--debounce",
        "200ms",
        "--",
        "true",
    )
    daemon.ok("daemon", "stop")
    daemon.start()
    time.sleep(0.3)
    (watched / "notes.txt").write_text("ignored")
    (watched / "readme.md").write_text("counted")
    wait_until(lambda: len(daemon.json("list")) == 1, timeout=10)
    time.sleep(0.5)
    assert len(daemon.json("list")) == 1
    daemon.ok("trigger", "pause", "md")
    (watched / "again.md").write_text("while paused")
    time.sleep(1)
    assert len(daemon.json("list")) == 1
    listed = daemon.json("trigger", "list")
    assert [(t["name"], t["paused"], t["glob"]) for t in listed] == [("md", True, "*.md")]
    json.dumps(listed)
