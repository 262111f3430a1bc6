"""`taskctl submit`: create a task from a command line."""

from typing import Annotated

import typer

from taskctl.cli import options as o
from taskctl.cli.common import JsonOption, client, emit_json, exit_status_of, wait_final
from taskctl.client import path_for


def submit(
    command: o.Command,
    name: o.Name = None,
    queue: o.Queue = "default",
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
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait for the task and exit like it did.")
    ] = False,
    json_: JsonOption = False,
) -> None:
    """Create a task; prints its id (or the task with --json).

    The command line is kept exactly as given; put `--` before it so its options are not
    taken for taskctl's. The current directory and environment are captured.
    """
    spec = o.task_spec(
        command, name=name, queue=queue, priority=priority, shell=shell, cwd=cwd, env=env,
        no_env=no_env, label=label, retries=retries, backoff=backoff, retry_delay=retry_delay,
        max_delay=max_delay, retry_on=retry_on, no_retry_on=no_retry_on, timeout=timeout,
        kill_grace=kill_grace, memory_limit=memory_limit, delay=delay, at=at, after=after,
        after_any=after_any,
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
