"""`taskctl cron`: schedules that create a task at each due time, like crontab lines with a
queue, retries, timeouts and logs."""

import os
from typing import Annotated, Any

import typer

from taskctl import DEFAULT_QUEUE, render
from taskctl.cli import complete
from taskctl.cli import options as o
from taskctl.cli.common import JsonOption, client, emit_json, note
from taskctl.client import path_for

app = typer.Typer(
    help="Cron schedules: add, list, show, rm, pause, resume, next.", no_args_is_help=True
)

Overlap = Annotated[
    str,
    typer.Option(
        "--overlap",
        metavar="skip|queue|allow",
        help="When the previous run is unfinished: skip this one, queue it behind, or allow both.",
        autocompletion=complete.overlaps,
    ),
]
CatchUp = Annotated[
    str,
    typer.Option(
        "--catch-up",
        metavar="none|latest|all",
        help="Times missed while the daemon was down: none, latest (run the newest once), all (each, one after another).",
        autocompletion=complete.catch_ups,
    ),
]


@app.command(cls=o.CommandAfterDashDash, context_settings={"allow_interspersed_args": False})
def add(
    spec: Annotated[
        str,
        typer.Argument(
            metavar="SPEC",
            help="Five cron fields (quoted), or @hourly, @daily, @weekly, @monthly, @yearly.",
        ),
    ],
    command: o.Command,
    name: Annotated[
        str | None,
        typer.Option("-n", "--name", metavar="NAME", help="The schedule's name (default: cron-N)."),
    ] = None,
    tz: Annotated[
        str | None,
        typer.Option(
            "--tz",
            metavar="ZONE",
            help="IANA time zone (default: the shell's, from TZ or /etc/localtime).",
        ),
    ] = None,
    overlap: Overlap = "skip",
    catch_up: CatchUp = "latest",
    queue: o.Queue = DEFAULT_QUEUE,
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
    json_: JsonOption = False,
) -> None:
    """Add a cron schedule: `taskctl cron add '*/5 * * * *' -- backup.sh`."""
    if command[:1] == ["--"]:  # click keeps the `--` that follows a positional argument
        command = command[1:]
    if not command:
        raise typer.BadParameter("give the command after --", param_hint="COMMAND")
    if tz is not None and not tz.strip():
        raise typer.BadParameter(
            "give a zone such as Europe/Berlin, or leave it out", param_hint="--tz"
        )
    tz = tz or _shell_zone()
    _choice(overlap, ("skip", "queue", "allow"), "--overlap")
    _choice(catch_up, ("none", "latest", "all"), "--catch-up")
    task = o.task_spec(
        command, name=name, queue=queue, priority=priority, shell=shell, cwd=cwd, env=env, no_env=no_env,
        label=label, retries=retries, backoff=backoff, retry_delay=retry_delay, max_delay=max_delay,
        retry_on=retry_on, no_retry_on=no_retry_on, timeout=timeout, kill_grace=kill_grace,
        memory_limit=memory_limit,
    )  # fmt: skip
    body: dict[str, Any] = {
        "kind": "cron",
        "name": name,
        "cron": spec,
        "tz": tz,
        "overlap": overlap,
        "catch_up": catch_up,
        "task": task,
    }
    schedule = client().call(
        "POST", path_for("schedules"), {k: v for k, v in body.items() if v is not None}
    )
    if json_:
        emit_json(schedule)
    else:
        note(f"schedule {schedule['name']}: next run {render.when(schedule['next_due'])}")
        print(schedule["name"])


def _shell_zone() -> str:
    """The shell's zone, as `--at` reads it: a schedule added without --tz follows the clock
    of the shell that added it, not the daemon's."""
    from taskctl.units import local_zone_name

    name = local_zone_name()
    if name is None:
        raise typer.BadParameter(
            f"TZ={os.environ.get('TZ')!r} names no IANA zone: give one, such as Europe/Berlin",
            param_hint="--tz",
        )
    return name


@app.command("list")
def list_(json_: JsonOption = False) -> None:
    """Cron schedules with their next run."""
    schedules = client().call("GET", path_for("schedules", kind="cron"))
    if json_:
        emit_json(schedules)
    else:
        render.print_rows(
            render.SCHEDULE_HEADER, render.schedule_rows(schedules), "no cron schedules"
        )


@app.command()
def show(
    name: Annotated[
        str,
        typer.Argument(metavar="NAME", help="Schedule name.", autocompletion=complete.cron_names),
    ],
    runs: Annotated[
        int,
        typer.Option("--runs", metavar="N", min=0, max=1000, help="How many recent runs to show."),
    ] = 20,
    json_: JsonOption = False,
) -> None:
    """One schedule in detail, with its recent runs."""
    schedule = client().call("GET", path_for("schedules", name, runs=runs))
    if json_:
        emit_json(schedule)
    else:
        print(render.schedule_detail(schedule))


@app.command()
def rm(
    names: Annotated[
        list[str],
        typer.Argument(
            metavar="NAME...", help="Schedule names.", autocompletion=complete.cron_names
        ),
    ],
    json_: JsonOption = False,
) -> None:
    """Remove schedules (the tasks they created stay)."""
    c = client()
    for name in names:
        c.call("DELETE", path_for("schedules", name))
        if not json_:
            note(f"removed {name}")
    if json_:
        emit_json({"removed": names})


@app.command()
def pause(
    name: Annotated[
        str,
        typer.Argument(metavar="NAME", help="Schedule name.", autocompletion=complete.cron_names),
    ],
    json_: JsonOption = False,
) -> None:
    """Stop firing until resumed."""
    _show_one(client().call("POST", path_for("schedules", name, "pause")), json_, "paused")


@app.command()
def resume(
    name: Annotated[
        str,
        typer.Argument(metavar="NAME", help="Schedule name.", autocompletion=complete.cron_names),
    ],
    json_: JsonOption = False,
) -> None:
    """Fire again, from now on (the time spent paused is not caught up)."""
    _show_one(client().call("POST", path_for("schedules", name, "resume")), json_, "resumed")


@app.command("next")
def next_(
    name: Annotated[
        str,
        typer.Argument(metavar="NAME", help="Schedule name.", autocompletion=complete.cron_names),
    ],
    n: Annotated[
        int, typer.Option("-n", metavar="N", min=1, max=1000, help="How many fire times.")
    ] = 5,
    from_: Annotated[
        str | None,
        typer.Option("--from", metavar="TIME", help="From this moment (RFC 3339; default: now)."),
    ] = None,
    json_: JsonOption = False,
) -> None:
    """The next N fire times (in the local zone; --json: RFC 3339 in UTC)."""
    if from_ is not None:
        from taskctl.units import ms_to_rfc3339, parse_at

        try:
            from_ = ms_to_rfc3339(parse_at(from_))
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--from") from None
    times = client().call("GET", path_for("schedules", name, "next", n=n, after=from_))
    if json_:
        emit_json(times)
    else:
        print("\n".join(render.when(t) for t in times))


def _show_one(schedule: dict[str, Any], json_: bool, what: str) -> None:
    if json_:
        emit_json(schedule)
    else:
        note(f"{schedule['name']}: {what}")


def _choice(value: str, allowed: tuple[str, ...], option: str) -> None:
    if value not in allowed:
        raise typer.BadParameter(f"must be one of {', '.join(allowed)}", param_hint=option)
