"""What a demanding shell user hits (issue 17): completion values, help that reads as prose,
`watch` on a terminal, options after the positional argument, one error style, and `list` that
never truncates in silence. Every test drives the real `taskctl`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid

import pytest
import typer.main
from typer.testing import CliRunner

from taskctl.cli import build_app

from conftest import TASKCTL, Home, need, wait_until


def complete(home: Home, words: str) -> subprocess.CompletedProcess[str]:
    """What bash gets for TAB after `words` (a trailing space: a new word)."""
    env = {
        **home.env,
        "COMP_WORDS": words,
        "COMP_CWORD": str(len(words.split(" ")) - 1),
        "_TASKCTL_COMPLETE": "complete_bash",
    }
    env.pop("TASKCTL_NO_AUTOSTART")  # completion must not start a daemon even when it may
    return subprocess.run([TASKCTL], env=env, capture_output=True, text=True, timeout=30)


# -- completion -------------------------------------------------------------------------------


def test_completion_offers_states_backoff_kinds_and_policies(home: Home) -> None:
    assert complete(home, "taskctl list --state f").stdout.split() == ["failed"]
    assert complete(home, "taskctl submit --backoff ").stdout.split() == ["fixed", "exponential"]
    assert complete(home, "taskctl cron add --overlap s").stdout.split() == ["skip"]
    assert complete(home, "taskctl cron add --catch-up l").stdout.split() == ["latest"]


def test_completion_offers_queue_and_schedule_names_from_the_daemon(daemon: Home) -> None:
    daemon.ok("queue", "set", "gpu")
    daemon.ok("cron", "add", "-n", "nightly", "0 3 * * *", "--", "true")
    (daemon.path / "w").mkdir()
    daemon.ok("trigger", "add", "-n", "notes", str(daemon.path / "w"), "--", "true")
    assert complete(daemon, "taskctl submit -q g").stdout.split() == ["gpu"]
    assert set(complete(daemon, "taskctl list --queue ").stdout.split()) == {"default", "gpu"}
    assert complete(daemon, "taskctl queue pause g").stdout.split() == ["gpu"]
    assert complete(daemon, "taskctl cron rm n").stdout.split() == ["nightly"]
    assert complete(daemon, "taskctl trigger pause ").stdout.split() == ["notes"]


def test_completion_without_a_daemon_is_silent_fast_and_starts_none(home: Home) -> None:
    began = time.monotonic()
    done = complete(home, "taskctl submit -q ")
    took = time.monotonic() - began
    assert (done.returncode, done.stdout.strip(), done.stderr) == (0, "", "")
    assert took < 2, took
    assert not (home.path / "taskctld.sock").exists()


# -- help -------------------------------------------------------------------------------------


def _leaf_commands() -> list[list[str]]:
    root = typer.main.get_command(build_app())
    found = []
    for name in root.list_commands(None):  # type: ignore[attr-defined]
        command = root.get_command(None, name)  # type: ignore[attr-defined]
        subs = command.list_commands(None) if hasattr(command, "list_commands") else []
        found += [[name, sub] for sub in subs] or [[name]]
    return found


def test_help_paragraphs_are_not_broken_mid_sentence() -> None:
    """On a wide terminal, each paragraph of a command's help is one line."""
    runner = CliRunner()
    broken = []
    for words in _leaf_commands():
        out = runner.invoke(build_app(), [*words, "--help"], env={"COLUMNS": "1000"}).output
        lines = [" ".join(line.split()) for line in out.splitlines()]
        for line in lines:
            # a help line that ends inside a sentence and goes on lower-case on the next line
            at = lines.index(line)
            follows = lines[at + 1] if at + 1 < len(lines) else ""
            if line and not line.endswith((".", ":", ")")) and re.match(r"[a-z`(]", follows):
                broken.append((" ".join(words), line))
    assert not broken, broken


def test_help_says_what_json_prints() -> None:
    runner = CliRunner()
    metrics = runner.invoke(build_app(), ["metrics", "--help"], env={"COLUMNS": "200"}).output
    assert "{name: }" not in metrics and "samples" in metrics
    watch = runner.invoke(build_app(), ["watch", "--help"], env={"COLUMNS": "200"}).output
    json_line = next(line for line in watch.splitlines() if "--json" in line)
    assert "NDJSON" in json_line and "exactly one" not in json_line


# -- watch on a terminal ----------------------------------------------------------------------


def _tmux_watch(home: Home) -> str:
    need("tmux")
    session = f"tc{uuid.uuid4().hex[:8]}"
    # The command gets its environment from `env`: a tmux server already running (another
    # test's) would otherwise hand it the server's environment, not this home's.
    command = ["env", "TERM=xterm", f"TASKCTL_HOME={home.path}", "TASKCTL_NO_AUTOSTART=1"]
    subprocess.run(
        ["tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "40", *command, TASKCTL,
         "watch"],
        check=True,
    )  # fmt: skip
    return session


def _screen(session: str) -> str:
    return subprocess.run(
        ["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True
    ).stdout


def _alive(session: str) -> bool:
    return (
        subprocess.run(["tmux", "has-session", "-t", session], capture_output=True).returncode == 0
    )


def test_q_quits_watch_on_a_terminal(daemon: Home) -> None:
    session = _tmux_watch(daemon)
    try:
        wait_until(lambda: "watching" in _screen(session), timeout=10)
        subprocess.run(["tmux", "send-keys", "-t", session, "q"], check=True)
        wait_until(lambda: not _alive(session), timeout=5)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def test_watch_on_a_terminal_says_when_the_daemon_is_down(daemon: Home) -> None:
    session = _tmux_watch(daemon)
    try:
        wait_until(lambda: "watching" in _screen(session), timeout=10)
        daemon.stop()  # a clean stop ends the event stream without an error
        wait_until(lambda: "lost taskctld" in _screen(session), timeout=5)
        daemon.start()
        wait_until(lambda: "reconnected" in _screen(session), timeout=10)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


# -- one error style --------------------------------------------------------------------------


def _one_line_error(done: subprocess.CompletedProcess[str], code: int) -> str:
    """The error, after checking it is the one style: exit `code`, one `taskctl:` line."""
    assert done.returncode == code, (done.returncode, done.stderr)
    assert done.stderr.startswith("taskctl: ") and done.stderr.count("\n") == 1, done.stderr
    for leak in ("Traceback", "╭", "String should", "Input should", "pattern", "Broken pipe"):
        assert leak not in done.stderr, done.stderr
    return done.stderr


@pytest.mark.parametrize(
    ("args", "hint"),
    [
        (("submit", "--retries", "x", "--", "true"), "taskctl submit --help"),
        (("list", "--bogus"), "taskctl list --help"),
        (("list", "-n", "0"), "taskctl list --help"),
        (("cron", "add"), "taskctl cron add --help"),
        (("nosuch",), "taskctl --help"),
        (("submit", "--backoff", "soon", "--", "true"), "taskctl submit --help"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(home: Home, args: tuple[str, ...], hint: str) -> None:
    assert f"see {hint}" in _one_line_error(home.run(*args), 2)


def test_validation_errors_are_in_plain_words(daemon: Home) -> None:
    error = _one_line_error(daemon.run("submit", "-q", "bad name", "--", "true"), 2)
    assert "'bad name' is not a valid name" in error
    error = _one_line_error(daemon.run("submit", "--memory-limit", "1k", "--", "true"), 2)
    assert "memory_limit: must be at least 1M" in error
    assert daemon.json("list") == []


@pytest.mark.parametrize(
    "args",
    [
        ("submit", "--retry-on", "0", "--", "true"),
        ("submit", "-n", "", "--", "true"),
        ("cron", "add", "--tz", "", "0 3 * * *", "--", "true"),
        ("cron", "add", "-n", "", "0 3 * * *", "--", "true"),
    ],
)
def test_empty_or_meaningless_values_are_refused(daemon: Home, args: tuple[str, ...]) -> None:
    _one_line_error(daemon.run(*args), 2)
    assert daemon.json("list") == [] and daemon.json("cron", "list") == []


def test_a_config_error_is_a_usage_error(home: Home) -> None:
    home.config(concurrency="lots")
    error = _one_line_error(home.run("daemon", "start"), 2)
    assert "concurrency: must be a whole number" in error


def test_a_request_over_the_size_limit_is_reported_as_such(daemon: Home) -> None:
    """1.2 MB of environment, captured by submit: the daemon answers 413 before reading it all."""
    big = {f"BIG{n}": "x" * 120_000 for n in range(10)}
    error = _one_line_error(daemon.run("submit", "--", "true", env=big), 2)
    assert "over the limit" in error
    assert daemon.json("list") == []


def test_a_deleted_current_directory_is_one_line(daemon: Home, tmp_path) -> None:
    gone = tmp_path / "gone"
    gone.mkdir()
    done = subprocess.run(
        ["sh", "-c", f'cd {gone} && rmdir {gone} && exec "{TASKCTL}" submit -- true'],
        env=daemon.env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert "current directory no longer exists" in _one_line_error(done, 2)


def test_taskctl_home_that_is_a_file_is_one_line(tmp_path) -> None:
    (tmp_path / "file").write_text("")
    for autostart in ("0", "1"):
        env = {**os.environ, "TASKCTL_HOME": str(tmp_path / "file")}
        env["TASKCTL_NO_AUTOSTART"] = "" if autostart == "1" else "1"
        done = subprocess.run([TASKCTL, "list"], env=env, capture_output=True, text=True)
        assert "is not a folder" in _one_line_error(done, 2)


def test_cancel_counts_dependents_failed_by_its_own_cascade_as_done(daemon: Home) -> None:
    first = daemon.submit("sleep", "60")
    second = daemon.submit("true", options=("--after", str(first)))
    third = daemon.submit("true", options=("--after", str(second)))
    done = daemon.run("cancel", str(first), str(second), str(third))
    assert done.returncode == 0, done.stderr
    assert "already failed" in done.stderr
    finished = daemon.submit("true")
    daemon.wait_final(finished)
    assert daemon.run("cancel", str(finished)).returncode == 5  # succeeded: not cancellable


# -- options after the positional argument ----------------------------------------------------


def test_with_a_double_dash_options_after_the_positional_are_taskctls(daemon: Home) -> None:
    """The issue's own line: the zone and the name were stored as the command."""
    daemon.ok("cron", "add", "30 2 * * *", "--tz", "America/New_York", "--name", "spring",
              "--", "./x")  # fmt: skip
    schedule = daemon.json("cron", "show", "spring")
    assert (schedule["tz"], schedule["command"]) == ("America/New_York", ["./x"])
    task_id = int(daemon.ok("submit", "echo", "--name", "greet", "--", "hi", "--name").strip())
    task = daemon.task(task_id)
    assert (task["name"], task["command"]) == ("greet", ["echo", "hi", "--name"])
    (daemon.path / "w").mkdir()
    daemon.ok("trigger", "add", str(daemon.path / "w"), "-n", "docs", "--", "make", "-n", "x")
    (trigger,) = daemon.json("trigger", "list")
    assert (trigger["name"], trigger["command"]) == ("docs", ["make", "-n", "x"])


def test_without_a_double_dash_the_command_starts_at_its_first_word(daemon: Home) -> None:
    """`taskctl submit make build` and `submit echo -n hi`: the options after the command's
    first word are the command's."""
    for words in (["make", "build"], ["echo", "-n", "hi"], ["ls", "--name", "x"]):
        task = daemon.task(int(daemon.ok("submit", *words).strip()))
        assert task["command"] == words and task["name"] is None, task


# -- list never truncates in silence ----------------------------------------------------------


def test_list_says_when_more_tasks_match_than_it_shows(daemon: Home) -> None:
    """The README's `list --json | jq 'select(.state == "failed")'` found 0 of 6 failed tasks:
    the 6 were older than the newest 100, and nothing said so."""
    lines = ["exit 1"] * 6 + ["true"] * 100
    ids = [int(i) for i in daemon.ok("submit", "--stdin", input="\n".join(lines) + "\n").split()]
    daemon.wait_all_final(ids)
    done = daemon.run("list", "--json")
    assert len(json.loads(done.stdout)) == 100  # stdout: still exactly one JSON array
    assert "6 more tasks match than the 100 shown" in done.stderr
    assert "--limit 106" in done.stderr and "--all" in done.stderr
    assert "6 more" in daemon.run("list").stderr  # the same for people
    every = daemon.json("list", "--all")
    assert len(every) == 106 and sum(t["state"] == "failed" for t in every) == 6
    quiet = daemon.run("list", "--state", "failed", "--json")
    assert len(json.loads(quiet.stdout)) == 6 and quiet.stderr == ""
    assert daemon.run("list", "-n", "106").stderr == ""
