"""`taskctl trigger`: run a task when files change (what systemd path units, incron and entr do),
with the same queue, policies and logs as any task."""

import sys
from typing import Annotated, Any

import typer

from taskctl import DEFAULT_QUEUE, render
from taskctl.cli import complete
from taskctl.cli import options as o
from taskctl.cli.common import JsonOption, client, duration, emit_json, note
from taskctl.client import path_for
from taskctl.errors import InvalidRequest

app = typer.Typer(help="File triggers: add, list, rm, pause, resume.", no_args_is_help=True)


@app.command(cls=o.CommandAfterDashDash, context_settings={"allow_interspersed_args": True})
def add(
    words: Annotated[
        list[str], typer.Argument(help="PATH... -- COMMAND [ARG...]", metavar="PATH... -- CMD...")
    ],
    name: Annotated[
        str | None,
        typer.Option(
            "-n", "--name", metavar="NAME", help="The trigger's name (default: trigger-N)."
        ),
    ] = None,
    glob: Annotated[
        str | None,
        typer.Option(
            "--glob",
            metavar="PATTERN",
            help="Only changes to files matching this pattern (e.g. '*.md').",
        ),
    ] = None,
    recursive: Annotated[
        bool, typer.Option("--recursive", "-r", help="Watch folders recursively.")
    ] = False,
    debounce: Annotated[
        str,
        typer.Option(
            "--debounce",
            metavar="DURATION",
            help="A burst of changes ends after this much quiet (or a minute after it began).",
        ),
    ] = "500ms",
    overlap: Annotated[
        str,
        typer.Option(
            "--overlap",
            metavar="skip|queue|allow",
            help="While the previous run is unfinished: skip, queue or allow.",
        ),
    ] = "queue",
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
    timeout: o.Timeout = None,
    kill_grace: o.KillGrace = None,
    memory_limit: o.MemoryLimit = None,
    json_: JsonOption = False,
) -> None:
    """Run a task for each burst of changes under PATHs. The task finds the changed paths, one
    per line, in the file named by $TASKCTL_CHANGED_PATHS."""
    paths, command = _split(words)
    if overlap not in ("skip", "queue", "allow"):
        raise typer.BadParameter("must be one of skip, queue, allow", param_hint="--overlap")
    task = o.task_spec(
        command, name=name, queue=queue, priority=priority, shell=shell, cwd=cwd, env=env, no_env=no_env,
        label=label, retries=retries, backoff=backoff, retry_delay=retry_delay, timeout=timeout,
        kill_grace=kill_grace, memory_limit=memory_limit,
    )  # fmt: skip
    body: dict[str, Any] = {
        "kind": "trigger", "name": name, "paths": [o.absolute(p) for p in paths], "glob": glob,
        "recursive": recursive, "debounce": duration(debounce, "--debounce"), "overlap": overlap, "task": task,
    }  # fmt: skip
    trigger = client().call(
        "POST", path_for("schedules"), {k: v for k, v in body.items() if v is not None}
    )
    if json_:
        emit_json(trigger)
    else:
        note(f"trigger {trigger['name']}: watching {', '.join(trigger['paths'])}")
        print(trigger["name"])


def _split(words: list[str]) -> tuple[list[str], list[str]]:
    """Paths, then the command after `--` (click hands both over as one list)."""
    argv = sys.argv
    if "--" not in argv:
        raise InvalidRequest(
            "put -- between the paths and the command: trigger add DIR -- make docs"
        )
    tail = len(argv) - argv.index("--") - 1
    paths, command = words[: len(words) - tail], words[len(words) - tail :]
    if not paths or not command:
        raise InvalidRequest("give at least one path before -- and a command after it")
    return paths, command


@app.command("list")
def list_(json_: JsonOption = False) -> None:
    """File triggers."""
    triggers = client().call("GET", path_for("schedules", kind="trigger"))
    if json_:
        emit_json(triggers)
    else:
        render.print_rows(render.TRIGGER_HEADER, render.trigger_rows(triggers), "no triggers")


@app.command()
def rm(
    names: Annotated[
        list[str],
        typer.Argument(
            metavar="NAME...", help="Trigger names.", autocompletion=complete.trigger_names
        ),
    ],
    json_: JsonOption = False,
) -> None:
    """Remove triggers (the tasks they created stay)."""
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
        typer.Argument(metavar="NAME", help="Trigger name.", autocompletion=complete.trigger_names),
    ],
    json_: JsonOption = False,
) -> None:
    """Stop watching until resumed."""
    found = client().call("POST", path_for("schedules", name, "pause"))
    emit_json(found) if json_ else note(f"{name}: paused")


@app.command()
def resume(
    name: Annotated[
        str,
        typer.Argument(metavar="NAME", help="Trigger name.", autocompletion=complete.trigger_names),
    ],
    json_: JsonOption = False,
) -> None:
    """Watch again (changes made while paused do not fire)."""
    found = client().call("POST", path_for("schedules", name, "resume"))
    emit_json(found) if json_ else note(f"{name}: resumed")
