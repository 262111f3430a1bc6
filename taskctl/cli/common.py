"""What every command shares: the client, option types, JSON output, exit-code mapping."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any, NoReturn

import typer

from taskctl.client import Client
from taskctl.errors import InvalidRequest, Unavailable, Unreachable
from taskctl.units import duration_text, parse_duration, parse_size

JsonOption = Annotated[
    bool,
    typer.Option("--json", help="Print exactly one JSON document on stdout (the API's fields)."),
]


JsonStreamOption = Annotated[
    bool,
    typer.Option("--json", help="Stream NDJSON on stdout: one JSON object per line, as they come."),
]


def client() -> Client:
    return Client()


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")


def note(message: str) -> None:
    """People-facing text goes to stderr, so stdout stays clean for scripts."""
    print(message, file=sys.stderr)


def duration(value: str | None, option: str) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint=option) from None


def timeout_seconds(value: str | None, option: str = "--timeout") -> float | None:
    """A `--timeout`: a duration, where 0 (or `none`) means no timeout at all."""
    if value is not None and value.strip().lower() == "none":
        return 0.0
    return duration(value, option)


def size(value: str | None, option: str) -> int | None:
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint=option) from None


def pairs(items: list[str] | None, option: str) -> dict[str, str]:
    """`K=V` options (repeatable) as a dict."""
    result: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{item!r} must look like KEY=VALUE", param_hint=option)
        result[key] = value
    return result


def exit_codes(text: str | None, option: str) -> list[int] | None:
    if text is None:
        return None
    try:
        codes = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} must be exit codes like 75,111", param_hint=option
        ) from None
    if not codes or any(not 1 <= c <= 255 for c in codes):
        raise typer.BadParameter(
            "exit codes of a failure are 1-255 (0 is success, never retried)", param_hint=option
        )
    return codes


def ids(values: list[str], what: str = "task id") -> list[int]:
    try:
        parsed = [int(v) for v in values]
    except ValueError:
        raise InvalidRequest(f"{what}s are numbers, got {values!r}") from None
    if any(i < 1 for i in parsed):
        raise InvalidRequest(f"{what}s are positive numbers")
    return parsed


# How `wait` and `submit --wait` report a task, the way a shell reports a command.
EXIT_TIMEOUT = 124
EXIT_WAIT_FAILED = 125
EXIT_CANNOT_RUN = 127
EXIT_CANCELLED = 128 + 15


def exit_status_of(task: dict[str, Any]) -> int:
    """0 if it succeeded; otherwise its exit code, 124 (timeout), 128+N (signal N), 127 (could
    not start), 143 (cancelled), 125 (outcome unknown) or 1 (never ran)."""
    if task["state"] == "succeeded":
        return 0
    attempts = task.get("attempts") or []
    last = attempts[-1] if attempts else {}
    outcome = last.get("outcome")
    if task["state"] == "cancelled":
        return EXIT_CANCELLED
    if outcome == "timeout":
        return EXIT_TIMEOUT
    if outcome == "spawn_error":
        return EXIT_CANNOT_RUN
    if outcome == "lost":
        return EXIT_WAIT_FAILED
    if last.get("signal"):
        return 128 + int(last["signal"])
    if last.get("exit_code") is not None:
        return int(last["exit_code"]) or 1
    return 1


def outcome_text(task: dict[str, Any]) -> str:
    """How a final task ended, in words: `exit status 3`, `killed by signal 9 (SIGKILL)`,
    `timed out after 30s`, `no such program: 'nosuch'`, `cancelled`..."""
    attempts = task.get("attempts") or []
    last = attempts[-1] if attempts else {}
    outcome, error = last.get("outcome"), last.get("error")
    if task["state"] == "cancelled":
        return "cancelled"
    if task.get("reason") == "dependency_failed":
        return "a task it depends on did not succeed"
    if outcome == "timeout":
        limit = task.get("timeout")
        return "timed out" + (f" after {duration_text(limit)}" if limit else "")
    if outcome == "spawn_error":
        return str(error or "it could not start")
    if outcome == "lost":
        return "its outcome is unknown (its supervisor died while it ran)"
    if last.get("signal"):
        text = f"killed by {signal_text(int(last['signal']))}"
    elif last.get("exit_code") is not None:
        text = f"exit status {last['exit_code']}"
    else:
        return "it never ran"
    return f"{text} ({error})" if error and task["state"] != "succeeded" else text


def signal_text(number: int) -> str:
    """`signal 9 (SIGKILL)`; the name is left out for a number the system does not know."""
    import signal

    try:
        return f"signal {number} ({signal.Signals(number).name})"
    except ValueError:
        return f"signal {number}"


def die(message: str, code: int) -> NoReturn:
    note(f"taskctl: {message}")
    raise typer.Exit(code)


FINAL_STATES = ("succeeded", "failed", "cancelled")
_WAIT_SLICE = 30.0
RECONNECT_AFTER = (0.2, 0.5, 1.0, 2.0)  # seconds between tries, then every 2 s


def reconnect_pause(failures: int) -> float:
    return RECONNECT_AFTER[min(failures, len(RECONNECT_AFTER) - 1)]


def wait_final(c: Client, task_id: int, timeout: float | None = None) -> dict[str, Any]:
    """The task once final, or as it is at `timeout`. The daemon holds each request until the
    task changes (no polling here). A daemon that stops or restarts meanwhile does not end the
    wait: the task goes on under its supervisor, so we wait for the next daemon (never
    starting one ourselves) and ask it."""
    import time

    from taskctl.client import path_for

    deadline = None if timeout is None else time.monotonic() + timeout
    task: dict[str, Any] = c.call("GET", path_for("tasks", task_id))  # it exists, and we got in
    c.autostart = False
    failures = 0
    while task["state"] not in FINAL_STATES:
        left = _WAIT_SLICE if deadline is None else min(_WAIT_SLICE, deadline - time.monotonic())
        if left <= 0:
            break
        try:
            task = c.call(
                "GET", path_for("tasks", task_id, "wait", timeout=left), timeout=left + 30
            )
        except (Unreachable, Unavailable) as e:
            if failures == 0:
                note(f"taskctl: lost taskctld ({e.message}); waiting for it to come back...")
            time.sleep(reconnect_pause(failures))
            failures += 1
            continue
        if failures:
            note("taskctl: reconnected to taskctld")
            failures = 0
    return task
