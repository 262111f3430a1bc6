"""The options that describe a task, shared by `submit`, `cron add` and `trigger add`, and the
function that turns them into the API's task spec."""

import os
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from taskctl import DEFAULT_QUEUE
from taskctl.cli import complete
from taskctl.cli.common import duration, exit_codes, pairs, size, timeout_seconds
from taskctl.environment import minimal_env
from taskctl.errors import InvalidRequest

EXEC = "Execution"
RETRY = "Retries"
WHEN = "Scheduling"


class CommandAfterDashDash(TyperCommand):
    """How `submit`, `cron add` and `trigger add` read their words.

    With a `--`, every word before it is taskctl's, options included, wherever they stand:
    `cron add '30 2 * * *' --tz America/New_York -- ./x` takes the zone; every word after it is
    the command's. Without one, the command starts at the first word that is not an option
    (`taskctl submit make -j4`: `-j4` is make's)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:  # typer's own click Context
        if "--" in args:
            ctx.allow_interspersed_args = True
        return super().parse_args(ctx, args)


Command = Annotated[
    list[str],
    typer.Argument(metavar="COMMAND...", help="The command and its arguments (after --)."),
]
Name = Annotated[
    str | None,
    typer.Option("-n", "--name", metavar="NAME", help="A name to show instead of the command."),
]
Queue = Annotated[
    str,
    typer.Option(
        "-q",
        "--queue",
        metavar="QUEUE",
        help="Queue to run in (one made by `queue set`, or default).",
        autocompletion=complete.queues,
    ),
]
Node = Annotated[
    str | None,
    typer.Option(
        "--node",
        metavar="NODE",
        help="Run only on this node of a cluster (see `taskctl nodes`).",
    ),
]
Priority = Annotated[
    int, typer.Option("-p", "--priority", metavar="N", help="Higher runs first within its queue.")
]
Shell = Annotated[
    bool, typer.Option("--shell", help="Run the command as one string through sh -c.")
]
Cwd = Annotated[
    str | None,
    typer.Option(
        "-C",
        "--cwd",
        metavar="DIR",
        help="Working directory (default: the current one).",
        rich_help_panel=EXEC,
    ),
]
Env = Annotated[
    list[str] | None,
    typer.Option(
        "-e",
        "--env",
        metavar="K=V",
        help="Set K=V in the task's environment (repeatable).",
        rich_help_panel=EXEC,
    ),
]
NoEnv = Annotated[
    bool,
    typer.Option(
        "--no-env",
        help="Do not capture this shell's environment; start from a minimal one.",
        rich_help_panel=EXEC,
    ),
]
Label = Annotated[
    list[str] | None,
    typer.Option("-l", "--label", metavar="K=V", help="Attach a K=V label (repeatable)."),
]
Retries = Annotated[
    int | None,
    typer.Option(
        "--retries",
        metavar="N",
        min=0,
        max=1000,
        help="Attempts after the first when it fails.",
        rich_help_panel=RETRY,
    ),
]
Backoff = Annotated[
    str | None,
    typer.Option(
        "--backoff",
        metavar="fixed|exponential",
        help="fixed or exponential.",
        rich_help_panel=RETRY,
        autocompletion=complete.backoffs,
    ),
]
RetryDelay = Annotated[
    str | None,
    typer.Option(
        "--retry-delay",
        metavar="DURATION",
        help="Delay before a retry (e.g. 5s).",
        rich_help_panel=RETRY,
    ),
]
MaxDelay = Annotated[
    str | None,
    typer.Option(
        "--max-delay",
        metavar="DURATION",
        help="Cap on the exponential delay.",
        rich_help_panel=RETRY,
    ),
]
RetryOn = Annotated[
    str | None,
    typer.Option(
        "--retry-on",
        metavar="CODES",
        help="Retry only these exit codes (e.g. 75,111).",
        rich_help_panel=RETRY,
    ),
]
NoRetryOn = Annotated[
    str | None,
    typer.Option(
        "--no-retry-on",
        metavar="CODES",
        help="Never retry these exit codes.",
        rich_help_panel=RETRY,
    ),
]
Timeout = Annotated[
    str | None,
    typer.Option(
        "--timeout",
        metavar="DURATION",
        help="Kill an attempt after this long (e.g. 30m); 0 or none: no timeout.",
        rich_help_panel=EXEC,
    ),
]
KillGrace = Annotated[
    str | None,
    typer.Option(
        "--kill-grace",
        metavar="DURATION",
        help="SIGTERM to SIGKILL grace on cancel/timeout (default 10s).",
        rich_help_panel=EXEC,
    ),
]
MemoryLimit = Annotated[
    str | None,
    typer.Option(
        "--memory-limit",
        metavar="SIZE",
        help="Address-space limit, e.g. 512M.",
        rich_help_panel=EXEC,
    ),
]
Delay = Annotated[
    str | None,
    typer.Option(
        "--delay",
        metavar="DURATION",
        help="Start after this long (e.g. 10m).",
        rich_help_panel=WHEN,
    ),
]
At = Annotated[
    str | None,
    typer.Option(
        "--at",
        metavar="TIME",
        help="Start at a time: RFC 3339, HH:MM, or a duration.",
        rich_help_panel=WHEN,
    ),
]
After = Annotated[
    list[str] | None,
    typer.Option(
        "--after",
        metavar="ID",
        help="Start once these tasks succeeded (repeatable, or 1,2,3).",
        rich_help_panel=WHEN,
    ),
]
AfterAny = Annotated[
    list[str] | None,
    typer.Option(
        "--after-any",
        metavar="ID",
        help="Start once these tasks are final, however they ended.",
        rich_help_panel=WHEN,
    ),
]


def task_spec(command: list[str], **o: Any) -> dict[str, Any]:
    """The API's task spec from command-line options (absent ones are left to the daemon's
    defaults). Captures the current directory and environment unless told otherwise."""
    if o.get("shell"):
        command = [" ".join(command)]
    spec: dict[str, Any] = {
        "command": command,
        "queue": o.get("queue", DEFAULT_QUEUE),
        "priority": o.get("priority", 0),
        "shell": bool(o.get("shell")),
        "cwd": absolute(o["cwd"]) if o.get("cwd") else current_dir(),
        "env": {
            **(minimal_env() if o.get("no_env") else dict(os.environ)),
            **pairs(o.get("env"), "--env"),
        },
        "labels": pairs(o.get("label"), "--label"),
    }
    if o.get("backoff") is not None and o["backoff"] not in ("fixed", "exponential"):
        raise typer.BadParameter("must be fixed or exponential", param_hint="--backoff")
    if o.get("name") == "":
        raise typer.BadParameter("a name must not be empty", param_hint="--name")
    if o.get("delay") is not None and o.get("at") is not None:
        raise typer.BadParameter("give either --delay or --at", param_hint="--at")
    optional = {
        "name": o.get("name"),
        "node": o.get("node"),
        "retries": o.get("retries"),
        "backoff": o.get("backoff"),
        "retry_delay": duration(o.get("retry_delay"), "--retry-delay"),
        "max_delay": duration(o.get("max_delay"), "--max-delay"),
        "retry_on": exit_codes(o.get("retry_on"), "--retry-on"),
        "no_retry_on": exit_codes(o.get("no_retry_on"), "--no-retry-on"),
        "timeout": timeout_seconds(o.get("timeout")),
        "kill_grace": duration(o.get("kill_grace"), "--kill-grace"),
        "memory_limit": size(o.get("memory_limit"), "--memory-limit"),
        "delay": duration(o.get("delay"), "--delay"),
        "run_at": _run_at(o.get("at")),
        "after": task_ids(o.get("after"), "--after") or None,
        "after_any": task_ids(o.get("after_any"), "--after-any") or None,
    }
    spec.update({k: v for k, v in optional.items() if v is not None})
    return spec


def current_dir() -> str:
    """The shell's current directory; a usage error when it has been deleted under it."""
    try:
        return os.getcwd()
    except FileNotFoundError:
        raise InvalidRequest(
            "the current directory no longer exists: cd to one that does, or give -C DIR"
        ) from None


def absolute(path: str) -> str:
    """As `os.path.abspath`, with `current_dir`'s error."""
    return os.path.normpath(path if os.path.isabs(path) else os.path.join(current_dir(), path))


def task_ids(values: list[str] | None, option: str) -> list[int]:
    """`--after 3 --after 4,5` as [3, 4, 5]."""
    found = []
    for value in values or []:
        for part in value.split(","):
            if not part.strip().isdigit() or int(part) < 1:
                raise typer.BadParameter(f"{part!r} is not a task id", param_hint=option)
            found.append(int(part))
    return found


def _run_at(text: str | None) -> str | None:
    if text is None:
        return None
    from taskctl.units import ms_to_rfc3339, parse_at

    try:
        return ms_to_rfc3339(parse_at(text))
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--at") from None
