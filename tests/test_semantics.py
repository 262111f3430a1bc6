"""What a demanding shell user expects, checked from the CLI against a real daemon: a failure
says why, a probe starts nothing, a hold is visible, a timeout of 0 is none, a schedule takes
the shell's zone, a debounce is a quiet period, catch-up `all` runs all, and times are local
for people and UTC for scripts."""

from __future__ import annotations

from conftest import Home


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_a_failed_wait_says_why_on_stderr_and_exits_like_the_task(daemon: Home) -> None:
    cases = [
        (("--", "nosuch-h17"), 127, "failed: no such program: 'nosuch-h17'"),
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
