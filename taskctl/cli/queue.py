"""`taskctl queue`: how much runs at once, per queue, and what its tasks get by default."""

from typing import Annotated, Any

import typer

from taskctl import render
from taskctl.cli import complete
from taskctl.cli.common import JsonOption, client, duration, emit_json, note, timeout_seconds
from taskctl.client import path_for

app = typer.Typer(help="Queues: list, set, pause, resume.", no_args_is_help=True)

NameArg = Annotated[
    str, typer.Argument(metavar="NAME", help="Queue name.", autocompletion=complete.queues)
]


@app.command("list")
def list_(json_: JsonOption = False) -> None:
    """Queues with their limit and how many tasks run, wait and are scheduled in each."""
    queues = client().call("GET", path_for("queues"))
    if json_:
        emit_json(queues)
    else:
        render.print_rows(render.QUEUE_HEADER, render.queue_rows(queues), "no queues yet")


@app.command("set")
def set_(
    name: NameArg,
    concurrency: Annotated[
        int | None,
        typer.Option(
            "--concurrency",
            "-c",
            metavar="N",
            min=0,
            help="At most this many at once (0: no limit of its own).",
        ),
    ] = None,
    retries: Annotated[
        int | None,
        typer.Option("--retries", metavar="N", min=0, help="Default retries of its tasks."),
    ] = None,
    backoff: Annotated[
        str | None,
        typer.Option(
            "--backoff",
            metavar="fixed|exponential",
            help="Default backoff: fixed or exponential.",
            autocompletion=complete.backoffs,
        ),
    ] = None,
    retry_delay: Annotated[
        str | None,
        typer.Option("--retry-delay", metavar="DURATION", help="Default delay before a retry."),
    ] = None,
    max_delay: Annotated[
        str | None,
        typer.Option("--max-delay", metavar="DURATION", help="Default cap on exponential delays."),
    ] = None,
    timeout: Annotated[
        str | None,
        typer.Option(
            "--timeout",
            metavar="DURATION",
            help="Default timeout of its tasks; 0 or none clears it.",
        ),
    ] = None,
    kill_grace: Annotated[
        str | None,
        typer.Option("--kill-grace", metavar="DURATION", help="Default SIGTERM to SIGKILL grace."),
    ] = None,
    json_: JsonOption = False,
) -> None:
    """Create or change a queue. Task options given at submit win over these defaults."""
    body: dict[str, Any] = {}
    if concurrency is not None:
        body["concurrency"] = concurrency or None
    if backoff is not None and backoff not in ("fixed", "exponential"):
        raise typer.BadParameter("must be fixed or exponential", param_hint="--backoff")
    for field, value in (
        ("retries", retries),
        ("backoff", backoff),
        ("retry_delay", duration(retry_delay, "--retry-delay")),
        ("max_delay", duration(max_delay, "--max-delay")),
        ("kill_grace", duration(kill_grace, "--kill-grace")),
    ):
        if value is not None:
            body[field] = value
    if timeout is not None:  # 0 or none clears the default: its tasks have no timeout
        body["timeout"] = timeout_seconds(timeout) or None
    queue = client().call("PUT", path_for("queues", name), body)
    if json_:
        emit_json(queue)
    else:
        limit = queue["concurrency"] if queue["concurrency"] is not None else "the global limit"
        note(f"queue {name}: at most {limit} at once")


@app.command()
def pause(name: NameArg, json_: JsonOption = False) -> None:
    """Start nothing new from the queue; running tasks finish."""
    queue = client().call("POST", path_for("queues", name, "pause"))
    emit_json(queue) if json_ else note(f"queue {name}: paused")


@app.command()
def resume(name: NameArg, json_: JsonOption = False) -> None:
    """Start tasks from the queue again."""
    queue = client().call("POST", path_for("queues", name, "resume"))
    emit_json(queue) if json_ else note(f"queue {name}: resumed")
