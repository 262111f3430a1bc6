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
