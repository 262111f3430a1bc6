"""`taskctl submit`: create a task from a command line."""

import io
import json
import re
import sys
from typing import Annotated, Any

import typer

from taskctl import DEFAULT_QUEUE
from taskctl.cli import options as o
from taskctl.cli.common import (
    JsonOption,
    client,
    emit_json,
    exit_status_of,
    note,
    outcome_text,
    wait_final,
)
from taskctl.client import Client, path_for
from taskctl.errors import InvalidRequest


def submit(
    command: Annotated[
        list[str] | None,
        typer.Argument(metavar="COMMAND...", help="The command and its arguments (after --)."),
    ] = None,
    name: o.Name = None,
    queue: o.Queue = DEFAULT_QUEUE,
    node: o.Node = None,
    priority: o.Priority = 0,
    shell: o.Shell = False,
    cwd: o.Cwd = None,
    env: o.Env = None,
    no_env: o.NoEnv = False,
    label: o.Label = None,
    retries: o.Retries = None,
    backoff: o.Backoff = None,
    retry_delay: o.RetryDelay = None,
    max_delay: o.MaxDelay = None,
    retry_on: o.RetryOn = None,
    no_retry_on: o.NoRetryOn = None,
    timeout: o.Timeout = None,
    kill_grace: o.KillGrace = None,
    memory_limit: o.MemoryLimit = None,
    delay: o.Delay = None,
    at: o.At = None,
    after: o.After = None,
    after_any: o.AfterAny = None,
    key: Annotated[
        str | None,
        typer.Option(
            "--key",
            metavar="KEY",
            help="Idempotency key: submitting it again gives back the same task.",
        ),
    ] = None,
    stdin: Annotated[
        bool,
        typer.Option(
            "--stdin", help="Submit one task per line of standard input (a shell command each)."
        ),
    ] = False,
    json_lines: Annotated[
        bool,
        typer.Option(
            "--json-lines", help="With --stdin: each line is a JSON task (the API's fields)."
        ),
    ] = False,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait for the task and exit like it did.")
    ] = False,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow", help="With --wait: print its output as it runs (to stderr with --json)."
        ),
    ] = False,
    json_: JsonOption = False,
) -> None:
    """Create a task; prints its id (or the task with --json).

    The command line is kept exactly as given; put `--` before it so its options are not
    taken for taskctl's. With a `--`, every word before it is taskctl's, options included;
    without one, the command starts at its first word that is not an option. The current
    directory and environment are captured.
    """
    wait = wait or follow
    if stdin == bool(command):
        raise typer.BadParameter(
            "give a command after --, or --stdin (not both)", param_hint="COMMAND"
        )
    if json_lines and not stdin:
        raise typer.BadParameter(
            "--json-lines reads standard input: add --stdin", param_hint="--json-lines"
        )
    spec = o.task_spec(
        command or ["-"], name=name, queue=queue, node=node, priority=priority, shell=shell, cwd=cwd, env=env,
        no_env=no_env, label=label, retries=retries, backoff=backoff, retry_delay=retry_delay,
        max_delay=max_delay, retry_on=retry_on, no_retry_on=no_retry_on, timeout=timeout,
        kill_grace=kill_grace, memory_limit=memory_limit, delay=delay, at=at, after=after,
        after_any=after_any,
    )  # fmt: skip
    if key is not None:
        spec["key"] = key
    c = client()
    if stdin:
        _submit_lines(c, spec, json_lines, json_)
        return
    task = c.call("POST", path_for("tasks"), spec)
    if task.get("deduplicated") and not json_:
        note(f"task {task['id']} already exists for key {key!r}")
    if not wait:
        if json_:
            emit_json(task)
        else:
            print(task["id"])
        return
    if not json_:
        print(task["id"], flush=True)
    if follow:  # with --json, stdout holds only the final task: the output goes to stderr
        _follow(c, task["id"], sys.stderr.buffer if json_ else sys.stdout.buffer)
    final = wait_final(c, task["id"])
    if json_:
        emit_json(final)
    status = exit_status_of(final)
    if status:
        note(f"taskctl: task {task['id']} {final['state']}: {outcome_text(final)}")
    raise typer.Exit(status)


def _submit_lines(c: Client, spec: dict[str, Any], json_lines: bool, json_: bool) -> None:
    """One batch, one transaction: every line is accepted, or none and the error names the
    line."""
    defaults = {k: v for k, v in spec.items() if k not in ("command", "key")}
    tasks, lines = [], []
    # Lines are bytes (a shell's), whatever the locale: ones that are not UTF-8 keep their bytes.
    text = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="surrogateescape")
    for number, line in enumerate(text, start=1):
        if not line.strip():
            continue
        if json_lines:
            try:
                task = json.loads(line)
            except ValueError as e:
                raise InvalidRequest(f"line {number}: not valid JSON: {e}") from None
            if not isinstance(task, dict):
                raise InvalidRequest(f"line {number}: a task is a JSON object")
        else:
            task = {"command": [line.rstrip("\n")], "shell": True}
        tasks.append(task)
        lines.append(number)
    if not tasks:
        raise InvalidRequest("standard input has no tasks")
    if not json_lines:
        defaults.pop("shell", None)
    try:
        created = c.call(
            "POST", path_for("tasks", "batch"), {"defaults": defaults, "tasks": tasks}, timeout=600
        )
    except InvalidRequest as e:
        raise InvalidRequest(_line_of(e.message, lines)) from None
    if json_:
        emit_json(created)
    else:
        sys.stdout.write("".join(f"{t['id']}\n" for t in created))


def _line_of(message: str, lines: list[int]) -> str:
    """The daemon names the nth task; people want the line."""
    found = re.search(r"task (\d+): ", message)
    if not found or not 0 < int(found.group(1)) <= len(lines):
        return message
    return message.replace(found.group(0), f"line {lines[int(found.group(1)) - 1]}: ", 1)


def _follow(c: Client, task_id: int, stdout: Any) -> None:
    """Print the task's stdout (to `stdout`) and stderr (to stderr) as they come, until it is
    final."""
    import threading

    def pump(stream: str, out: Any) -> None:
        response = c.open(
            "GET", path_for("tasks", task_id, "logs", stream=stream, follow=True), timeout=None
        )
        for chunk in response.iter_chunks():
            out.write(chunk)
            out.flush()

    err = threading.Thread(target=pump, args=("stderr", sys.stderr.buffer), daemon=True)
    err.start()
    pump("stdout", stdout)
    err.join(timeout=5)
