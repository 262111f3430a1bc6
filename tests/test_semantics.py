"""What a demanding shell user expects, checked from the CLI against a real daemon: a failure
says why, a probe starts nothing, a hold is visible, a timeout of 0 is none, a schedule takes
the shell's zone, a debounce is a quiet period, catch-up `all` runs all, and times are local
for people and UTC for scripts."""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import sqlite3
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from taskctl.units import now_ms, rfc3339_to_ms

from conftest import BACKEND, Home, figure, wait_until

ON_NODE = "on node n1: " if BACKEND == "postgresql" else ""  # a cluster's spawn errors name it


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_a_failed_wait_says_why_on_stderr_and_exits_like_the_task(daemon: Home) -> None:
    cases = [
        (("--", "nosuch-h17"), 127, f"failed: {ON_NODE}no such program: 'nosuch-h17'"),
        (("--", "sh", "-c", "kill -9 $$"), 128 + 9, "failed: killed by signal 9 (SIGKILL)"),
        (("--", "sh", "-c", "exit 3"), 3, "failed: exit status 3"),
        (("--timeout", "1s", "--", "sleep", "30"), 124, "failed: timed out after 1s"),
    ]
    for words, code, why in cases:
        done = daemon.run("submit", "--wait", *words)
        assert done.returncode == code, (words, done.stderr)
        task_id = int(done.stdout.strip())
        assert _last_line(done.stderr) == f"taskctl: task {task_id} {why}", words
    ok = daemon.run("submit", "--wait", "--", "true")
    assert ok.returncode == 0 and ok.stderr == ""
    killed = daemon.submit("sh", "-c", "kill -9 $$")
    waited = daemon.run("wait", str(killed))
    assert waited.returncode == 137
    assert _last_line(waited.stderr) == f"task {killed} failed: killed by signal 9 (SIGKILL)"


def test_health_never_starts_the_daemon_it_checks(home: Home) -> None:
    done = home.run("health", env={"TASKCTL_NO_AUTOSTART": "0"})
    assert done.returncode == 3, done.stderr
    assert "not running" in done.stderr
    assert home.run("daemon", "status").returncode == 3  # still not running


def test_hold_is_shown_by_health_daemon_status_list_and_status(home: Home) -> None:
    home.config(hold=True)
    home.start()
    assert home.json("health")["hold"] is True
    for command in ("health", "daemon status", "status"):
        assert "hold" in home.ok(*command.split()), command
    task_id = home.submit("true")
    for command in ("list", f"status {task_id}"):
        done = home.run(*command.split())
        assert done.returncode == 0 and "hold = true" in done.stderr, command
    assert home.task(task_id)["state"] == "queued"


def test_no_hold_no_hold_line(daemon: Home) -> None:
    assert daemon.json("health")["hold"] is False
    assert "hold" not in daemon.ok("health")


def test_timeout_0_is_no_timeout_and_clears_a_queue_default(daemon: Home) -> None:
    plain = daemon.json("submit", "--timeout", "0", "--", "sleep", "1.5")
    assert plain["timeout"] is None
    assert daemon.wait_final(plain["id"])["state"] == "succeeded"
    daemon.ok("queue", "set", "short", "--timeout", "1s")
    unlimited = daemon.json("submit", "-q", "short", "--timeout", "none", "--", "sleep", "1.5")
    limited = daemon.json("submit", "-q", "short", "--", "sleep", "30")
    assert unlimited["timeout"] is None and limited["timeout"] == 1
    assert daemon.wait_final(unlimited["id"])["state"] == "succeeded"
    assert daemon.wait_final(limited["id"])["attempts"][-1]["outcome"] == "timeout"
    for cleared in ("0", "none"):
        daemon.ok("queue", "set", "short", "--timeout", "1s")
        queue = daemon.json("queue", "set", "short", "--timeout", cleared)
        assert "timeout" not in queue["defaults"], cleared
    assert daemon.json("submit", "-q", "short", "--", "true")["timeout"] is None


def test_cron_add_takes_the_shells_zone_not_the_daemons(home: Home) -> None:
    home.env["TZ"] = "Asia/Tokyo"  # the daemon's zone
    home.start()
    shell = {"TZ": "America/New_York"}
    schedule = home.json("cron", "add", "-n", "ny", "0 9 * * *", "--", "true", env=shell)
    assert schedule["tz"] == "America/New_York"
    berlin = {"TZ": ":Europe/Berlin"}
    assert home.json("cron", "add", "0 9 * * *", "--", "true", env=berlin)["tz"] == "Europe/Berlin"
    given = home.json("cron", "add", "--tz", "UTC", "0 9 * * *", "--", "true", env=shell)
    assert given["tz"] == "UTC"
    bad = home.run("cron", "add", "0 9 * * *", "--", "true", env={"TZ": "Nowhere/Atlantis"})
    assert bad.returncode == 2 and "--tz" in bad.stderr
    assert json.loads(home.ok("cron", "list", "--json"))[0]["tz"] == "America/New_York"


def test_debounce_is_a_quiet_period_not_a_cap(daemon: Home, tmp_path: Path) -> None:
    """A file written every 0.2 s for 3 s under `--debounce 1s`: one task, about 1 s after the
    last write, listing the file once; the next change is a task of its own."""
    watched = tmp_path / "in"
    watched.mkdir()
    command = ("sh", "-c", 'cat "$TASKCTL_CHANGED_PATHS"')
    daemon.ok("trigger", "add", str(watched), "--debounce", "1s", "--", *command)
    daemon.wait_watching(watched)
    target, due = watched / "notes.md", time.monotonic()
    for n in range(16):
        time.sleep(max(0.0, due - time.monotonic()))  # the writes are the subject: 0.2 s apart
        target.write_text(str(n))
        due += 0.2
    last_write = time.time()
    wait_until(lambda: daemon.api("/v1/tasks"), timeout=10)
    first = daemon.json("list")
    assert len(first) == 1, [t["created_at"] for t in first]
    quiet = rfc3339_to_ms(first[0]["created_at"]) / 1000 - last_write
    figure("--debounce 1s: last write to the task (s)", round(quiet, 3))
    assert 0.9 <= quiet <= 2.0, quiet
    assert daemon.wait_final(first[0]["id"])["state"] == "succeeded"
    assert daemon.ok("logs", str(first[0]["id"])) == f"{target}\n"
    (watched / "later.md").write_text("x")
    wait_until(lambda: len(daemon.api("/v1/tasks")) > 1, 10)
    tasks = daemon.json("list")
    assert len(tasks) == 2
    assert daemon.wait_final(tasks[0]["id"])["state"] == "succeeded"
    assert daemon.ok("logs", str(tasks[0]["id"])) == f"{watched / 'later.md'}\n"


@pytest.mark.sqlite_only  # it moves the schedule back in the SQLite file
def test_catch_up_all_runs_every_missed_time_one_after_another(home: Home) -> None:
    """An hourly schedule (default --overlap skip) whose daemon was down for three of its
    times: all three run, each queued behind the one before; none is skipped. The downtime is
    simulated by moving the schedule's last handled time back while the daemon is stopped."""
    home.start()
    home.ok("cron", "add", "-n", "hourly", "--catch-up", "all", "0 * * * *", "--", "true")
    home.stop()
    hour = 3_600_000
    top = now_ms() - now_ms() % hour
    with contextlib.closing(sqlite3.connect(home.path / "taskctl.db")) as db, db:
        moved = db.execute(
            "UPDATE schedules SET last_due = ?, next_due = ? WHERE name = 'hourly'",
            (top - 3 * hour + 60_000, top - 2 * hour),
        )
        assert moved.rowcount == 1
    home.start()
    wait_until(lambda: len(home.api("/v1/tasks")) >= 3)
    tasks = home.json("list")
    finals = home.wait_all_final(sorted(t["id"] for t in tasks))[:3]  # a 4th: the hour turned
    assert [t["state"] for t in finals] == ["succeeded"] * 3
    assert [rfc3339_to_ms(t["due_at"]) for t in finals] == [top - 2 * hour, top - hour, top]
    ids = {t["id"] for t in finals}
    for before, after in itertools.pairwise(finals):  # one after another
        assert after["started_at"] >= before["finished_at"], (before, after)
    runs = home.json("cron", "show", "hourly")["runs"]
    assert {r["task_id"] for r in runs} >= ids and {r["outcome"] for r in runs} == {"fired"}


RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def test_times_are_local_for_people_and_utc_with_z_in_json(daemon: Home) -> None:
    tokyo = {"TZ": "Asia/Tokyo"}
    add = ("cron", "add", "-n", "b", "--tz", "Europe/Berlin", "30 2 * * *", "--", "true")
    added = daemon.json(*add)
    shown = daemon.json("cron", "show", "b")
    listed = daemon.json("cron", "list")[0]
    for when in (added["next_due"], shown["next_due"], listed["next_due"], shown["created_at"]):
        assert RFC3339_UTC.fullmatch(when), when
    nexts = ("cron", "next", "b", "--from", "2026-03-28T12:00:00Z", "-n", "2")
    assert daemon.json(*nexts) == ["2026-03-29T01:00:00.000Z", "2026-03-30T00:30:00.000Z"]
    assert daemon.ok(*nexts, env=tokyo).splitlines() == [
        "2026-03-29 10:00:00+09:00",
        "2026-03-30 09:30:00+09:00",
    ]
    assert daemon.ok("--utc", *nexts, env=tokyo).splitlines()[0] == "2026-03-29 01:00:00Z"
    task = daemon.wait_final(daemon.submit("true"))
    for key in ("created_at", "started_at", "finished_at"):
        assert RFC3339_UTC.fullmatch(task[key]), task[key]
    assert RFC3339_UTC.fullmatch(task["attempts"][0]["started_at"])
    created = datetime.fromisoformat(task["created_at"].replace("Z", "+00:00"))
    local = created.astimezone(ZoneInfo("Asia/Tokyo")).isoformat(" ", "seconds")
    detail = daemon.ok("status", str(task["id"]), env=tokyo)
    assert f"created     {local} (" in detail, detail
    assert local.endswith("+09:00") and not re.search(r"\d:\d\d(\.\d+)?Z", detail)  # no UTC time
    in_utc = daemon.ok("--utc", "status", str(task["id"]), env=tokyo)
    assert f"created     {created.isoformat(' ', 'seconds').replace('+00:00', 'Z')} (" in in_utc
