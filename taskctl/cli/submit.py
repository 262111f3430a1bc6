"""`taskctl submit`: create a task from a command line."""

import os
from typing import Annotated, Any

import typer

from taskctl.cli.common import (
    JsonOption,
    client,
    duration,
    emit_json,
    exit_codes,
    exit_status_of,
    pairs,
    size,
    wait_final,
)
from taskctl.client import path_for
from taskctl.environment import minimal_env

EXEC = "Execution"
RETRY = "Retries"
WHEN = "Scheduling"


def submit(
    command: Annotated[list[str], typer.Argument(help="The command and its arguments (after --).")],
    name: Annotated[
        str | None, typer.Option("-n", "--name", help="A name to show instead of the command.")
    ] = None,
    queue: Annotated[str, typer.Option("-q", "--queue", help="Queue to run in.")] = "default",
    priority: Annotated[
        int, typer.Option("-p", "--priority", help="Higher runs first within its queue.")
    ] = 0,
    shell: Annotated[
        bool, typer.Option("--shell", help="Run the command as one string through sh -c.")
    ] = False,
    cwd: Annotated[
        str | None,
        typer.Option(
            "-C",
            "--cwd",
            help="Working directory (default: the current one).",
            rich_help_panel=EXEC,
        ),
    ] = None,
    env: Annotated[
        list[str] | None,
        typer.Option(
            "-e",
            "--env",
            help="Set K=V in the task's environment (repeatable).",
            rich_help_panel=EXEC,
        ),
    ] = None,
    no_env: Annotated[
        bool,
        typer.Option(
            "--no-env",
            help="Do not capture this shell's environment; start from a minimal one.",
            rich_help_panel=EXEC,
        ),
    ] = False,
    label: Annotated[
        list[str] | None, typer.Option("-l", "--label", help="Attach a K=V label (repeatable).")
    ] = None,
    retries: Annotated[
        int | None,
        typer.Option(
            "--retries",
            min=0,
            max=1000,
            help="Attempts after the first when it fails.",
            rich_help_panel=RETRY,
        ),
    ] = None,
    backoff: Annotated[
        str | None, typer.Option("--backoff", help="fixed or exponential.", rich_help_panel=RETRY)
    ] = None,
    retry_delay: Annotated[
        str | None,
        typer.Option(
            "--retry-delay", help="Delay before a retry (e.g. 5s).", rich_help_panel=RETRY
        ),
    ] = None,
    max_delay: Annotated[
        str | None,
        typer.Option("--max-delay", help="Cap on the exponential delay.", rich_help_panel=RETRY),
    ] = None,
    retry_on: Annotated[
        str | None,
        typer.Option(
            "--retry-on", help="Retry only these exit codes (e.g. 75,111).", rich_help_panel=RETRY
        ),
    ] = None,
    no_retry_on: Annotated[
        str | None,
        typer.Option("--no-retry-on", help="Never retry these exit codes.", rich_help_panel=RETRY),
    ] = None,
    timeout: Annotated[
        str | None,
        typer.Option(
            "--timeout", help="Kill an attempt after this long (e.g. 30m).", rich_help_panel=EXEC
        ),
    ] = None,
    kill_grace: Annotated[
        str | None,
        typer.Option(
            "--kill-grace",
            help="SIGTERM to SIGKILL grace on cancel/timeout (default 10s).",
            rich_help_panel=EXEC,
        ),
    ] = None,
    memory_limit: Annotated[
        str | None,
        typer.Option(
            "--memory-limit", help="Address-space limit, e.g. 512M.", rich_help_panel=EXEC
        ),
    ] = None,
    delay: Annotated[
        str | None,
        typer.Option("--delay", help="Start after this long (e.g. 10m).", rich_help_panel=WHEN),
    ] = None,
    at: Annotated[
        str | None,
        typer.Option(
            "--at", help="Start at a time: RFC 3339, HH:MM, or a duration.", rich_help_panel=WHEN
        ),
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait for the task and exit like it did.")
    ] = False,
    json_: JsonOption = False,
) -> None:
    """Create a task; prints its id (or the task with --json).

    The command line is kept exactly as given; put `--` before it so its options are not
    taken for taskctl's. The current directory and environment are captured.
    """
    spec = build_spec(
        command, name=name, queue=queue, priority=priority, shell=shell, cwd=cwd, env=env,
        no_env=no_env, label=label, retries=retries, backoff=backoff, retry_delay=retry_delay,
        max_delay=max_delay, retry_on=retry_on, no_retry_on=no_retry_on, timeout=timeout,
        kill_grace=kill_grace, memory_limit=memory_limit, delay=delay, at=at,
    )  # fmt: skip
    c = client()
    task = c.call("POST", path_for("tasks"), spec)
    if not wait:
        if json_:
            emit_json(task)
        else:
            print(task["id"])
        return
    if not json_:
        print(task["id"])
    final = wait_final(c, task["id"])
    if json_:
        emit_json(final)
    raise typer.Exit(exit_status_of(final))


def build_spec(command: list[str], **o: Any) -> dict[str, Any]:
    """The API request for one submit, from the command line's options."""
    if o["shell"]:
        command = [" ".join(command)]
    spec: dict[str, Any] = {
        "command": command,
        "queue": o["queue"],
        "priority": o["priority"],
        "shell": o["shell"],
        "cwd": os.path.abspath(o["cwd"]) if o["cwd"] else os.getcwd(),
        "env": {**(minimal_env() if o["no_env"] else dict(os.environ)), **pairs(o["env"], "--env")},
        "labels": pairs(o["label"], "--label"),
    }
    if o["backoff"] is not None and o["backoff"] not in ("fixed", "exponential"):
        raise typer.BadParameter("must be fixed or exponential", param_hint="--backoff")
    if o["delay"] is not None and o["at"] is not None:
        raise typer.BadParameter("give either --delay or --at", param_hint="--at")
    optional = {
        "name": o["name"],
        "retries": o["retries"],
        "backoff": o["backoff"],
        "retry_delay": duration(o["retry_delay"], "--retry-delay"),
        "max_delay": duration(o["max_delay"], "--max-delay"),
        "retry_on": exit_codes(o["retry_on"], "--retry-on"),
        "no_retry_on": exit_codes(o["no_retry_on"], "--no-retry-on"),
        "timeout": duration(o["timeout"], "--timeout"),
        "kill_grace": duration(o["kill_grace"], "--kill-grace"),
        "memory_limit": size(o["memory_limit"], "--memory-limit"),
        "delay": duration(o["delay"], "--delay"),
        "run_at": _run_at(o["at"]),
    }
    spec.update({k: v for k, v in optional.items() if v is not None})
    return spec


def _run_at(text: str | None) -> str | None:
    if text is None:
        return None
    from taskctl.units import ms_to_rfc3339, parse_at

    try:
        return ms_to_rfc3339(parse_at(text))
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--at") from None
