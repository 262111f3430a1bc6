"""Delayed tasks, cron schedules and file triggers against a real daemon."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from taskctl.units import rfc3339_to_ms

from conftest import FINAL, Home, figure, socket_get, wait_until


def test_delay_starts_the_task_after_that_long(daemon: Home) -> None:
    task = daemon.json("submit", "--delay", "3s", "--", "true")
    assert task["state"] == "scheduled"
    done = daemon.wait_final(task["id"], timeout=10)
    waited = (
        rfc3339_to_ms(done["attempts"][0]["started_at"]) - rfc3339_to_ms(task["created_at"])
    ) / 1000
    figure("--delay 3s: submit to start (s)", waited)
    assert 2.5 <= waited <= 3.5, waited


def test_at_a_time_starts_then(daemon: Home) -> None:
    when = datetime.now(UTC) + timedelta(seconds=2)
    task = daemon.json("submit", "--at", when.isoformat(), "--", "true")
    assert task["state"] == "scheduled"
    done = daemon.wait_final(task["id"], timeout=10)
    late = rfc3339_to_ms(done["attempts"][0]["started_at"]) / 1000 - when.timestamp()
    figure("--at: start minus the given time (s)", round(late, 3))
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
    assert [t for t in spring if t.startswith("2026-03-08")] == ["2026-03-08T07:00:00.000Z"]
    fall = daemon.json("cron", "next", "fall", "--from", "2026-10-31T12:00:00-04:00", "-n", "3")
    assert [t for t in fall if t.startswith("2026-11-01")] == ["2026-11-01T05:30:00.000Z"]


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
        "--retries", "2", "--timeout", "5m", "-p", "3", "-l", "team=ops", "-e", "TOKEN=hunter2",
        "0 3 * * *",
        "--",
        "true",
    )  # fmt: skip
    shown = daemon.json("cron", "show", "nightly")
    options = shown["options"]  # what its tasks get; never the environment (secrets)
    assert (options["retries"], options["timeout"], options["priority"]) == (2, 300, 3)
    assert options["labels"] == {"team": "ops"} and "hunter2" not in json.dumps(shown)
    assert "retries=2 " in daemon.ok("cron", "show", "nightly")
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
    wait_until(lambda: daemon.api("/v1/tasks"), timeout=75, interval=0.5)
    first = daemon.json("list")[0]
    first_due = rfc3339_to_ms(first["due_at"]) / 1000
    daemon.kill9()  # down across the next due minute
    wait_until(lambda: time.time() > first_due + 65, timeout=70, interval=0.5)
    daemon.start()
    wait_until(lambda: len(daemon.api("/v1/tasks")) >= 3, timeout=75, interval=0.5)
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
    daemon.wait_watching(watched)  # it watches from when it is armed, not retroactively
    began = time.monotonic()
    for n in range(20):
        (watched / f"f{n:02d}").write_text("x")
    assert time.monotonic() - began < 0.2
    burst = sorted(str(watched / f"f{n:02d}") for n in range(20))
    assert _outputs_after_change(daemon, 1) == [burst]
    # Exactly one: a later change is a task of its own that lists only itself, and nothing
    # from the burst came in between.
    assert _outputs_after_change(daemon, 2, watched / "sentinel") == [
        burst,
        [str(watched / "sentinel")],
    ]


def test_triggers_work_where_there_is_no_inotify(home: Home, tmp_path) -> None:
    """On file systems without inotify (NFS, some containers) watchfiles polls instead; forced
    here with its own switch. The poller's first scan is not observable, so the test touches a
    new file each second until a task comes, then checks that a later change fires again."""
    home.env["WATCHFILES_FORCE_POLLING"] = "1"
    home.start()
    watched = tmp_path / "in"
    watched.mkdir()
    home.ok(
        "trigger", "add", str(watched), "--debounce", "200ms", "--", "sh", "-c",
        'cat "$TASKCTL_CHANGED_PATHS"',
    )  # fmt: skip
    written: list[Path] = []

    def fired() -> bool:
        if home.api("/v1/tasks"):
            return True
        written.append(watched / f"poke{len(written)}")
        written[-1].write_text("x")
        return False

    def reported() -> list[str]:
        """Every path the finished tasks were given (all, once none is running)."""
        tasks = home.api("/v1/tasks")
        if any(t["state"] not in FINAL for t in tasks):
            return []
        sock = str(home.path / "taskctld.sock")
        logs = [socket_get(sock, f"/v1/tasks/{t['id']}/logs")[1] for t in tasks]
        return [path for log in logs for path in log.decode().split()]

    wait_until(fired, timeout=30, interval=1.0)
    home.wait_watching(watched, 0)  # no inotify watch: the changes were found by polling
    wait_until(lambda: str(written[-1]) in reported(), timeout=30)  # every poke has fired
    before = len(home.json("list"))
    (watched / "later").write_text("x")
    wait_until(lambda: len(home.api("/v1/tasks")) > before, timeout=30)
    newest = max(t["id"] for t in home.json("list"))
    assert home.ok("logs", str(home.wait_final(newest)["id"])).split() == [str(watched / "later")]


def _outputs_after_change(daemon: Home, tasks: int, change: Path | None = None) -> list[list[str]]:
    """Make `change` (if any), wait for the `tasks`-th task to finish, and return every task's
    output (the paths it was given), sorted, in task order."""
    if change is not None:
        change.write_text("x")
    wait_until(lambda: len(daemon.api("/v1/tasks")) >= tasks, timeout=10)
    ids = sorted(t["id"] for t in daemon.json("list"))
    return [sorted(daemon.ok("logs", str(daemon.wait_final(i)["id"])).split()) for i in ids]


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
        "sh",
        "-c",
        'cat "$TASKCTL_CHANGED_PATHS"',
    )
    daemon.ok("daemon", "stop")
    daemon.start()
    daemon.wait_watching(watched)  # the trigger outlived the restart
    (watched / "notes.txt").write_text("ignored")
    (watched / "readme.md").write_text("counted")
    readme = [str(watched / "readme.md")]
    assert _outputs_after_change(daemon, 1) == [readme]  # notes.txt is filtered out
    daemon.ok("trigger", "pause", "md")
    listed = daemon.json("trigger", "list")
    assert [(t["name"], t["paused"], t["glob"]) for t in listed] == [("md", True, "*.md")]
    daemon.wait_watching(watched, 0)  # a paused trigger lets go of the folder
    (watched / "again.md").write_text("while paused")
    daemon.ok("trigger", "resume", "md")
    daemon.wait_watching(watched)
    after = watched / "after.md"
    # The change made while paused never becomes a task, now or after the resume.
    assert _outputs_after_change(daemon, 2, after) == [readme, [str(after)]]
