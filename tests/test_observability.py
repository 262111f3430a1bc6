"""watch, live logs, terminal safety, metrics and health, against a real daemon."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from taskctl.paths import Paths
from taskctl.units import now_ms, rfc3339_to_ms

from conftest import TASKCTL, Home, figure, http_get, need, wait_until


def _watch(home: Home, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [TASKCTL, "watch", "--json", *args],
        env=home.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _lines(proc: subprocess.Popen[str], n: int) -> list[dict]:
    assert proc.stdout is not None
    got = [json.loads(proc.stdout.readline()) for _ in range(n)]
    proc.kill()
    proc.wait()
    return got


def test_watch_json_streams_each_change_in_order_and_resumes_without_loss(daemon: Home) -> None:
    watcher = _watch(daemon)
    daemon.wait_streams()  # the watcher is connected before the tasks exist
    a = daemon.submit("true")
    daemon.wait_final(a)
    b = daemon.submit("true")
    events = _lines(watcher, 6)
    assert [(e["task_id"], e["from_state"], e["to_state"]) for e in events] == [
        (a, None, "queued"), (a, "queued", "running"), (a, "running", "succeeded"),
        (b, None, "queued"), (b, "queued", "running"), (b, "running", "succeeded"),
    ]  # fmt: skip
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)
    assert events[2]["exit_code"] == 0 and all(rfc3339_to_ms(e["at"]) for e in events)
    resumed = _lines(_watch(daemon, "--since", str(events[2]["id"])), 3)
    assert resumed == events[3:]


def test_watch_reconnects_when_the_daemon_restarts(daemon: Home) -> None:
    watcher = _watch(daemon)
    daemon.wait_streams()
    first = daemon.submit("true")
    daemon.wait_final(first)
    daemon.kill9()
    daemon.start()
    second = daemon.submit("true")
    events = _lines(watcher, 6)
    assert [e["task_id"] for e in events] == [first] * 3 + [second] * 3
    assert watcher.stderr is not None and "reconnect" in watcher.stderr.read()


def test_watch_in_a_terminal_updates_without_a_keypress(daemon: Home) -> None:
    need("tmux")
    session = f"tc{uuid.uuid4().hex[:8]}"
    env = {**daemon.env, "TERM": "xterm"}
    subprocess.run(
        ["tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "40", TASKCTL, "watch"],
        env=env,
        check=True,
    )
    try:
        gate = daemon.path / "go"
        task_id = daemon.submit(
            "sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.05; done", options=("-n", "watched")
        )

        def screen() -> str:
            return subprocess.run(
                ["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True
            ).stdout

        def row() -> str:
            return next((line for line in screen().splitlines() if "watched" in line), "")

        wait_until(lambda: "running" in row(), timeout=5)
        gate.touch()
        ended = time.monotonic()
        daemon.wait_final(task_id)
        wait_until(lambda: "succeeded" in row(), timeout=5)
        figure(
            "watch in tmux: end to 'succeeded' on screen (s)", round(time.monotonic() - ended, 3)
        )
        assert time.monotonic() - ended < 1.0 + 0.5
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)


def _follow(home: Home, task_id: int) -> subprocess.Popen[str]:
    """`taskctl logs -f`, given a moment to connect before the task (held by a gate) writes."""
    proc = subprocess.Popen(
        [TASKCTL, "logs", "-f", str(task_id)], env=home.env, stdout=subprocess.PIPE, text=True
    )
    home.wait_streams()
    (home.path / "go").touch()
    return proc


def test_logs_follow_shows_lines_as_they_are_written_and_returns_at_the_end(daemon: Home) -> None:
    gate = daemon.path / "go"
    script = f"while [ ! -e {gate} ]; do sleep 0.02; done; for i in $(seq 10); do echo line$i $(date +%s.%N); sleep 0.1; done"
    proc = _follow(daemon, daemon.submit("sh", "-c", script))
    assert proc.stdout is not None
    delays = [time.time() - float(line.split()[1]) for line in proc.stdout]
    assert proc.wait(timeout=10) == 0
    assert len(delays) == 10
    figure("logs -f: line written to line shown, max of 10 (s)", round(max(delays), 3))
    assert max(delays) < 0.3, delays


def test_logs_follow_spans_attempts(daemon: Home) -> None:
    gate = daemon.path / "go"
    script = f'while [ ! -e {gate} ]; do sleep 0.02; done; echo "try $TASKCTL_ATTEMPT"; exit 1'
    proc = _follow(
        daemon,
        daemon.submit(script, options=("--shell", "--retries", "1", "--retry-delay", "300ms")),
    )
    out, _ = proc.communicate(timeout=20)
    assert out == "try 1\ntry 2\n"


def _in_terminal(home: Home, *args: str) -> bytes:
    import pty

    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [TASKCTL, *args], env=home.env, stdout=follower, stderr=subprocess.DEVNULL
    )
    os.close(follower)
    out = b""
    with contextlib.suppress(OSError):
        while chunk := os.read(leader, 65536):
            out += chunk
    os.close(leader)
    proc.wait(timeout=10)
    return out


def test_a_task_cannot_rewrite_the_terminal_through_logs(daemon: Home) -> None:
    task_id = daemon.submit("printf", "before\\033]0;pwned\\007\\033[2Jafter\\n")
    daemon.wait_final(task_id)
    shown = _in_terminal(daemon, "logs", str(task_id))
    assert b"\x1b" not in shown and b"\x07" not in shown
    assert b"before^[]0;pwned^G^[[2Jafter" in shown
    raw = daemon.run("logs", "--raw", str(task_id)).stdout
    assert "\x1b]0;pwned\x07" in raw  # --raw (and pipes) keep the bytes


def test_metrics_parse_and_count_what_list_shows(daemon: Home) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    commands = [["true"], ["false"], ["sh", "-c", "kill -9 $$"], ["/no/such/program"]]
    lines = "".join(json.dumps({"command": c}) + "\n" for c in commands * 25)
    daemon.ok("submit", "--stdin", "--json-lines", input=lines)
    wait_until(
        lambda: all(
            t["state"] in ("succeeded", "failed") for t in daemon.api("/v1/tasks?limit=200")
        ),
        timeout=60,
    )
    tasks = daemon.json("list", "-n", "200")
    status, body = http_get(str(daemon.path / "taskctld.sock"), "/metrics")
    assert status == 200
    text = body.decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    by_state = Counter(t["state"] for t in tasks)
    gauge = {
        s.labels["state"]: s.value
        for s in families["taskctl_tasks"].samples
        if s.labels["queue"] == "default"
    }
    assert (
        gauge["succeeded"] == by_state["succeeded"] == 25
        and gauge["failed"] == by_state["failed"] == 75
    )
    outcomes = Counter(a["outcome"] for t in tasks for a in t["attempts"])
    finished = {
        s.labels["outcome"]: s.value
        for s in families["taskctl_attempts_finished"].samples
        if s.name.endswith("_total")
    }
    assert {k: v for k, v in finished.items() if v} == dict(outcomes)
    submitted = next(
        s.value for s in families["taskctl_tasks_submitted"].samples if s.name.endswith("_total")
    )
    assert submitted == 100
    assert all("task_id" not in s.labels for f in families.values() for s in f.samples)
    assert (
        "taskctl_attempt_duration_seconds" in families
        and "taskctl_queue_oldest_age_seconds" in families
    )
    assert daemon.ok("metrics") == text or "taskctl_tasks" in daemon.ok("metrics")


def _unwritable(folder: Path) -> contextlib.AbstractContextManager[None]:
    """Make a folder refuse new files, even to root (immutable), else by its mode."""

    @contextlib.contextmanager
    def manage() -> object:
        if os.geteuid() == 0 and shutil.which("chattr"):
            subprocess.run(["chattr", "+i", str(folder)], check=True)
            try:
                yield
            finally:
                subprocess.run(["chattr", "-i", str(folder)], check=True)
        else:
            folder.chmod(0o500)
            try:
                yield
            finally:
                folder.chmod(0o700)

    return manage()  # type: ignore[return-value]


def test_health_is_unhealthy_and_says_why_when_the_logs_folder_is_not_writable(
    daemon: Home,
) -> None:
    assert daemon.run("health").returncode == 0
    assert _readyz(daemon) == (200, [])
    with _unwritable(daemon.path / "logs"):
        done = daemon.run("health")
        assert done.returncode == 1
        assert "logs" in done.stderr and "not writable" in done.stderr
        assert daemon.json("daemon", "status")["status"] == "unhealthy"
        status, reasons = _readyz(daemon)  # what a load balancer or systemd probe reads
        assert status == 503 and any("not writable" in r for r in reasons), reasons
    assert daemon.run("health").returncode == 0
    assert _readyz(daemon) == (200, [])


@pytest.mark.sqlite_only  # it holds the task back in the SQLite file
def test_health_says_the_daemon_is_behind_when_a_delayed_task_is_not_queued_in_time(
    daemon: Home,
) -> None:
    """A stalled timer, simulated: the task's start time is moved to a minute ago behind the
    daemon's back, so the timer armed for it stays asleep. (Its once-a-minute look at the
    clock could catch it first; then the move is made again.)"""
    task_id = daemon.json("submit", "--delay", "1h", "--", "true")["id"]
    assert _readyz(daemon) == (200, [])
    for _ in range(3):
        with contextlib.closing(sqlite3.connect(daemon.path / "taskctl.db")) as db, db:
            db.execute("UPDATE tasks SET run_at = ? WHERE id = ?", (now_ms() - 60_000, task_id))
        status, reasons = _readyz(daemon)
        if daemon.task(task_id)["state"] == "scheduled":
            break
    assert status == 503 and reasons == ["scheduler behind: 1 scheduled task(s) past due"]
    assert daemon.run("health").returncode == 1
    daemon.ok("cancel", str(task_id))
    assert _readyz(daemon) == (200, [])


def _readyz(home: Home) -> tuple[int, list[str]]:
    """GET /readyz as a probe would: its status and the reasons it gives."""
    status, body = http_get(str(Paths.from_env(home.env).socket), "/readyz")
    return status, json.loads(body)["reasons"]


def test_health_json_has_what_monitors_need(daemon: Home) -> None:
    report = daemon.json("health")
    for field in (
        "status",
        "version",
        "uptime",
        "store_writable",
        "wal_size",
        "disk_free",
        "disk_free_logs",
        "running",
        "queued",
    ):
        assert field in report, field


def test_the_daemon_log_is_rotated_while_it_runs(home: Home) -> None:
    """Past `log_size`, taskctld.log moves to taskctld.log.1 and the daemon writes on in a new
    one, without a restart."""
    home.config(log_size="64K")
    home.start()
    log, old = home.path / "taskctld.log", home.path / "taskctld.log.1"
    with log.open("a") as f:
        f.write("filler line\n" * 8000)  # about 96 KiB
    wait_until(lambda: old.exists() and "filler line" in old.read_text(), timeout=30)
    home.stop()
    fresh = log.read_text()
    assert "filler line" not in fresh and "stopping" in fresh
