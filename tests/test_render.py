"""`taskctl/render.py` against golden text: each case renders wire-shaped data (as the daemon
sends it) at a fixed moment and compares with `tests/golden/<case>.txt`.

After a deliberate change to what the CLI prints, regenerate the files and review the diff:

    UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_render.py
    git diff tests/golden/

A case with no golden file fails (it is never written silently). Every golden file must be free
of control characters other than newline and tab, since a task's text must never reach the
terminal raw.
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from taskctl import render

GOLDEN = Path(__file__).parent / "golden"
NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _people_in_tokyo(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Times for people are in the local zone: fix it, so the golden text is the same on
    every machine (and not UTC, so a lost conversion shows)."""
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def _b64(raw: bytes) -> dict[str, str]:
    """A value in its wire form for bytes that are not UTF-8."""
    return {"base64": base64.b64encode(raw).decode()}


def _task(task_id: int, state: str, command: list[Any], **fields: Any) -> dict[str, Any]:
    """A task as `GET /v1/tasks/ID` sends it, with what a test does not care about left empty."""
    task: dict[str, Any] = {
        "id": task_id, "name": None, "state": state, "reason": None, "queue": "default",
        "priority": 0, "command": command, "shell": False, "cwd": "/srv/app", "labels": {},
        "created_at": "2026-03-01T11:58:30.000Z", "run_at": "2026-03-01T11:58:30.000Z",
        "started_at": None, "finished_at": None, "exit_code": None, "attempts": [],
        "retries": 0, "backoff": "fixed", "retry_delay": 1.0, "max_delay": None, "retry_on": None,
        "no_retry_on": None, "timeout": None, "kill_grace": 10.0, "memory_limit": None,
        "key": None, "after": [], "after_any": [], "schedule": None, "due_at": None,
    }  # fmt: skip
    task.update(fields)
    return task


def _attempt(number: int, outcome: str | None, **fields: Any) -> dict[str, Any]:
    attempt: dict[str, Any] = {
        "number": number, "outcome": outcome, "exit_code": None, "signal": None, "error": None,
        "started_at": "2026-03-01T11:58:31.000Z", "ended_at": None, "pid": 4242,
        "max_rss": None, "cpu_user": None, "cpu_system": None,
    }  # fmt: skip
    attempt.update(fields)
    return attempt


LONG = ["python3", "-c", "print('" + "x" * 150 + "')", "--flag", "a value with spaces"]

SUCCEEDED = _task(
    1, "succeeded", ["make", "-C", "build", "all"],
    started_at="2026-03-01T11:58:31.000Z", finished_at="2026-03-01T11:59:03.500Z", exit_code=0,
    attempts=[_attempt(1, "exited", exit_code=0, ended_at="2026-03-01T11:59:03.500Z",
                       max_rss=52_428_800, cpu_user=12.25, cpu_system=1.5)],
)  # fmt: skip
KILLED = _task(
    2, "failed", ["sleep", "600"], reason="signaled", exit_code=None,
    started_at="2026-03-01T10:00:00.000Z", finished_at="2026-03-01T11:00:00.000Z",
    retries=2, backoff="exponential", retry_delay=5.0, timeout=3600.0, memory_limit=536_870_912,
    attempts=[
        _attempt(1, "timeout", signal=15, started_at="2026-03-01T09:00:00.000Z",
                 ended_at="2026-03-01T10:00:00.000Z", max_rss=2048, cpu_user=0.01),
        _attempt(2, "signaled", signal=9, started_at="2026-03-01T10:00:00.000Z",
                 ended_at="2026-03-01T11:00:00.000Z", max_rss=4096, cpu_system=0.02),
    ],
)  # fmt: skip
HOSTILE = _task(
    3, "failed", ["printf", "\x1b]0;owned\x07\x1b[2J", "line\nbreak\ttab"],
    name="deploy\x1b[31m red\u009b\x7f", reason="spawn_error\x1b[K", exit_code=127,
    cwd=_b64(b"/srv/caf\xe9"), labels={"team": "ops\nroot", "env": "prod"},
    started_at="2026-03-01T11:59:00.000Z", finished_at="2026-03-01T11:59:00.010Z",
    attempts=[_attempt(1, "spawn_error", exit_code=127, started_at="2026-03-01T11:59:00.000Z",
                       ended_at="2026-03-01T11:59:00.010Z",
                       error="No such file\x1b[2J or directory: 'printf\n'")],
    env={"PATH": "/usr/bin", "RAW": _b64(b"\xff\xfe"), "ESC": "\x1b[1m"},
)  # fmt: skip
NOT_UTF8 = _task(
    4, "queued", ["cat", _b64(b"r\xe9sum\xe9.txt"), _b64(b"\xff")], created_at="2026-02-27T08:00:00.000Z"
)  # fmt: skip
SHELL = _task(
    5, "scheduled", ["for i in 1 2 3; do echo $i; done | tee 'out file'"], shell=True,
    priority=-3, queue="batch", run_at="2026-03-01T12:30:00.000Z", retries=3,
    attempts=[_attempt(1, "exited", exit_code=1, ended_at="2026-03-01T11:58:40.000Z")],
    exit_code=1, reason="exit 1, retrying",
)  # fmt: skip
RUNNING = _task(
    6, "running", LONG, name=None, queue="io", started_at="2026-03-01T11:00:00.000Z",
    attempts=[_attempt(1, None, started_at="2026-03-01T11:00:00.000Z")],
)  # fmt: skip
TASKS = [SUCCEEDED, KILLED, HOSTILE, NOT_UTF8, SHELL, RUNNING]

CRON = {
    "kind": "cron", "name": "nightly", "cron": "0 3 * * *", "tz": "Europe/Paris",
    "next_due": "2026-03-02T02:00:00.000Z", "overlap": "skip", "catch_up": "latest",
    "paused": False, "command": ["backup", "--to", _b64(b"/mnt/\xe9t\xe9")], "shell": False,
    "queue": "default",
    "options": {"timeout": 7200.0, "retry_delay": 1.5, "memory_limit": 268_435_456,
                "labels": {"kind": "backup\x1b[0m"}, "retry_on": [1, 75], "priority": 2},
    "runs": [
        {"due_at": "2026-03-01T02:00:00.000Z", "task_id": 40, "state": "succeeded",
         "exit_code": 0, "outcome": "fired"},
        {"due_at": "2026-02-28T02:00:00.000Z", "task_id": None, "state": None,
         "exit_code": None, "outcome": "skipped_overlap"},
    ],
}  # fmt: skip
CRON_PAUSED = {
    "kind": "cron", "name": "hourly-report", "cron": "@hourly", "tz": "UTC", "next_due": None,
    "overlap": "queue", "catch_up": "none", "paused": True, "shell": True, "queue": "reports",
    "command": ["./report.sh > /tmp/report.$(date +%H)\necho done"], "options": {}, "runs": [],
}  # fmt: skip
TRIGGER = {
    "kind": "trigger", "name": "on-upload", "paths": ["/srv/in\tbox", "/srv/other"],
    "recursive": True, "glob": "*.csv", "debounce": 0.5, "overlap": "queue", "paused": False,
    "problem": None, "command": ["import", "--dir", "/srv/in"], "shell": False,
    "queue": "default", "options": {"kill_grace": 30.0}, "runs": [],
}  # fmt: skip
TRIGGER_BROKEN = {
    "kind": "trigger", "name": "gone", "paths": ["/nowhere"], "recursive": False, "glob": None,
    "debounce": 2.0, "overlap": "skip", "paused": True, "problem": "no such folder",
    "command": ["true"], "shell": False, "queue": "default", "options": {}, "runs": [],
}  # fmt: skip
QUEUES = [
    {"name": "default", "concurrency": None, "paused": False,
     "counts": {"running": 2, "queued": 14}, "defaults": {}},
    {"name": "batch", "concurrency": 4, "paused": True,
     "counts": {"running": 0, "queued": 3, "scheduled": 1, "waiting": 7},
     "defaults": {"timeout": 5400.0, "memory_limit": 1_073_741_824, "retries": 2,
                  "kill_grace": 0.25}},
    {"name": "io", "concurrency": 1, "paused": False, "counts": {}, "defaults": None},
]  # fmt: skip
HEALTH_MINIMAL = {
    "status": "ok", "version": "0.9.0", "api": 1, "pid": 1234, "uptime": 42.0,
    "store_writable": True, "running": 0, "concurrency": 4, "queued": 0,
}  # fmt: skip
HEALTH_FULL = {
    **HEALTH_MINIMAL, "status": "degraded", "uptime": 200_000.0, "store_writable": False,
    "running": 4, "queued": 120, "held": 8, "streams": 3, "containment": "cgroup v2",
    "database_size": 10_485_760, "wal_size": 4_194_304, "disk_free": 123_456_789,
    "disk_free_logs": 99_999, "scheduler_heartbeat_age": 75.0,
    "reasons": ["store is not writable: disk full", "cannot start a supervisor"],
}  # fmt: skip
EVENTS = [
    {"id": 1, "at": "2026-03-01T11:58:30.123Z", "task_id": 7, "queue": "default",
     "from_state": None, "to_state": "queued", "attempt": None, "exit_code": None,
     "reason": None},
    {"id": 2, "at": "2026-03-01T11:58:31.000Z", "task_id": 7, "queue": "default",
     "from_state": "queued", "to_state": "running", "attempt": 1, "exit_code": None,
     "reason": None},
    {"id": 3, "at": "2026-03-01T11:59:00.000Z", "task_id": 7, "queue": "default",
     "from_state": "running", "to_state": "succeeded", "attempt": 1, "exit_code": 0,
     "reason": "exit 0"},
    {"id": 4, "at": "2026-03-01T23:59:59.999Z", "task_id": 8, "queue": "batch",
     "from_state": "running", "to_state": "scheduled", "attempt": 2, "exit_code": 3,
     "reason": "exit 3, retry\x1b[2J in 4s\n"},
    {"id": 5, "at": "2026-03-02T00:00:00.000Z", "task_id": 9, "from_state": "waiting",
     "to_state": "failed", "attempt": None, "exit_code": None, "reason": "dependency_failed"},
]  # fmt: skip
SAFE_INPUTS: list[object] = [
    "plain text",
    "",
    "tab\there, newline\nthere, CR\rthere",
    "\x1b]0;title\x07\x1b[2J\x1b[H",
    "C1 \u0085 \u009b and DEL \x7f",
    "caf\u00e9 \u2603 \U0001f680",
    _b64(b"caf\xe9 \xff\xfe"),
    _b64(b"\x1b[31m\xc3"),
    {"not": "a wire value"},
    42,
]
COMMANDS = [
    _task(1, "queued", ["echo", "hello world", "it's", "$HOME", ""]),
    _task(1, "queued", ["ls", _b64(b"/tmp/\xff"), "-la"]),
    _task(1, "queued", ["echo $((1+1)) && ls\n| wc -l"], shell=True),
    _task(1, "queued", ["printf", "\x1b[2Jgone"]),
    _task(1, "queued", LONG),
]
OUTPUT = (
    b"plain line\n"
    b"crlf line\r\n"
    b"tab\tseparated\n"
    b"\x1b[31mred\x1b[0m and \x1b]0;title\x07\n"
    b"bell\x07 backspace\x08 del\x7f nul\x00\n"
    b"invalid \xff\xfe utf-8, C1 \xc2\x9b, snowman \xe2\x98\x83\n"
    b"bare cr\rover"
)


CASES: dict[str, Callable[[], str]] = {
    "task_list": lambda: render.plain_table(render.LIST_HEADER, render.task_rows(TASKS, NOW)),
    "task_list_empty": lambda: render.plain_table(render.LIST_HEADER, render.task_rows([], NOW)),
    "task_detail_succeeded": lambda: render.task_detail(SUCCEEDED, NOW),
    "task_detail_signals": lambda: render.task_detail(KILLED, NOW),
    "task_detail_hostile": lambda: render.task_detail(HOSTILE, NOW),
    "task_detail_not_utf8": lambda: render.task_detail(NOT_UTF8, NOW),
    "task_detail_shell_scheduled": lambda: render.task_detail(SHELL, NOW),
    "task_detail_running_long": lambda: render.task_detail(RUNNING, NOW),
    "schedule_list": lambda: render.plain_table(
        render.SCHEDULE_HEADER, render.schedule_rows([CRON, CRON_PAUSED])
    ),
    "schedule_list_empty": lambda: render.plain_table(
        render.SCHEDULE_HEADER, render.schedule_rows([])
    ),
    "trigger_list": lambda: render.plain_table(
        render.TRIGGER_HEADER, render.trigger_rows([TRIGGER, TRIGGER_BROKEN])
    ),
    "schedule_detail_cron": lambda: render.schedule_detail(CRON),
    "schedule_detail_cron_paused_shell": lambda: render.schedule_detail(CRON_PAUSED),
    "schedule_detail_trigger": lambda: render.schedule_detail(TRIGGER),
    "queue_list": lambda: render.plain_table(render.QUEUE_HEADER, render.queue_rows(QUEUES)),
    "queue_list_empty": lambda: render.plain_table(render.QUEUE_HEADER, render.queue_rows([])),
    "health_minimal": lambda: render.health_text(HEALTH_MINIMAL),
    "health_full": lambda: render.health_text(HEALTH_FULL),
    "summary": lambda: render.summary_text(
        {
            "health": HEALTH_FULL,
            "states": {"queued": 120, "running": 4, "failed": 0},
            "queues": QUEUES,
        }
    ),
    "summary_empty": lambda: render.summary_text(
        {"health": HEALTH_MINIMAL, "states": {"queued": 0}, "queues": []}
    ),
    "event_lines": lambda: "\n".join(render.event_line(e, tz=UTC) for e in EVENTS),
    "escape_controls": lambda: render.escape_controls(OUTPUT),
    "safe": lambda: "\n".join(f"{v!r} -> {render.safe(v)}" for v in SAFE_INPUTS),
    "command_text": lambda: "\n".join(render.command_text(t) for t in COMMANDS),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_render_matches_golden(case: str) -> None:
    text = CASES[case]() + "\n"
    path = GOLDEN / f"{case}.txt"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return
    assert path.exists(), f"no {path.name}: run with UPDATE_GOLDEN=1 and review it"
    assert text == path.read_text(encoding="utf-8")


def test_every_golden_file_has_a_case() -> None:
    assert sorted(p.stem for p in GOLDEN.glob("*.txt")) == sorted(CASES)


def test_no_golden_text_carries_a_control_character() -> None:
    """What reaches a terminal: only newline and tab below space, no DEL, no C1."""
    for path in sorted(GOLDEN.glob("*.txt")):
        text = path.read_text(encoding="utf-8")
        bad = {c for c in text if (c < " " and c not in "\n\t") or "\x7f" <= c <= "\x9f"}
        assert not bad, f"{path.name}: {sorted(bad)}"


def test_event_times_follow_the_zone_given() -> None:
    event = EVENTS[2]
    assert render.event_line(event, tz=UTC).startswith("11:59:00 ")
    local = datetime(2026, 3, 1, 11, 59, tzinfo=UTC).astimezone().tzinfo  # the default
    assert render.event_line(event) == render.event_line(event, tz=local)
