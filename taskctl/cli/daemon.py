"""`taskctl daemon start|stop|status`: manage taskctld explicitly."""

import os
import time
from typing import Annotated

import typer

from taskctl import render
from taskctl.cli.common import JsonOption, duration, emit_json, note
from taskctl.client import Client, path_for, start_daemon
from taskctl.errors import StorageFull, TaskctlError, Unreachable

app = typer.Typer(help="Start, stop and inspect the daemon.", no_args_is_help=True)

STOP_TIMEOUT = 30.0


def _health(c: Client) -> dict | None:
    try:
        return c.call("GET", "/healthz", timeout=5)
    except TaskctlError:
        return None


@app.command()
def start(json_: JsonOption = False) -> None:
    """Start taskctld in the background (a no-op when it already runs)."""
    c = Client(autostart=False)
    health = _health(c)
    if health is None:
        start_daemon(c.paths)
        health = _health(c)
        if health is None:
            raise Unreachable("taskctld started but does not answer")
        message = f"taskctld started (pid {health['pid']})"
    else:
        message = f"taskctld already running (pid {health['pid']})"
    if json_:
        emit_json(health)
    else:
        note(message)


@app.command()
def stop(
    drain: Annotated[
        bool,
        typer.Option("--drain", help="Start nothing new; exit once running tasks have finished."),
    ] = False,
    kill: Annotated[
        bool,
        typer.Option(
            "--kill",
            help="End running tasks (whole trees); they run again later, attempt not counted.",
        ),
    ] = False,
    timeout: Annotated[
        str | None,
        typer.Option(
            "--timeout",
            metavar="DURATION",
            help="With --drain or --kill: stop waiting after this long.",
        ),
    ] = None,
    json_: JsonOption = False,
) -> None:
    """Stop taskctld. By default running tasks keep running and the next daemon adopts them."""
    if drain and kill:
        raise typer.BadParameter("give --drain or --kill, not both", param_hint="--kill")
    mode = "drain" if drain else "kill" if kill else "leave"
    pid = _stop(Client(autostart=False), mode, duration(timeout, "--timeout"))
    if json_:
        emit_json({"stopped": pid is not None, "pid": pid, "mode": mode})
    elif pid is None:
        note("taskctld is not running")
    else:
        note(f"taskctld stopped (pid {pid})")


@app.command()
def restart(json_: JsonOption = False) -> None:
    """Replace the daemon (after an upgrade, say). Running tasks keep running: the new daemon
    adopts them. While the state folder is out of space a new daemon could not start, so
    the running one is left in place (exit 6)."""
    c = Client(autostart=False)
    running = _health(c)
    if running is not None and running.get("storage_full"):
        raise StorageFull(
            f"the state folder is out of space, so a new daemon could not start: taskctld "
            f"(pid {running['pid']}) keeps running and records what ends once space returns; "
            "free some space, then restart"
        )
    old = _stop(c, "leave", None)
    start_daemon(c.paths)
    health = _health(c)
    if health is None:
        raise Unreachable("taskctld did not come back")
    if json_:
        emit_json({"old_pid": old, **health})
    else:
        note(f"taskctld restarted (pid {old} -> {health['pid']})")


def _stop(c: Client, mode: str, timeout: float | None) -> int | None:
    """Ask the daemon to stop and wait until its process is gone; its pid, or None if it was
    not running."""
    health = _health(c)
    if health is None:
        return None
    body: dict[str, object] = {"mode": mode}
    if timeout is not None:
        body["timeout"] = timeout
    c.call("POST", path_for("daemon", "stop"), body)
    pid = int(health["pid"])
    limit = STOP_TIMEOUT if mode == "leave" else None if timeout is None else timeout + STOP_TIMEOUT
    deadline = None if limit is None else time.monotonic() + limit
    while _alive(pid):
        if deadline is not None and time.monotonic() > deadline:
            raise Unreachable(f"taskctld (pid {pid}) did not exit within {limit:.0f}s")
        time.sleep(0.02)
    return pid


@app.command()
def status(json_: JsonOption = False) -> None:
    """Is taskctld running? Exit 0 if so, 3 if not."""
    health = _health(Client(autostart=False))
    if json_:
        emit_json(health or {"status": "not running"})
    if health is None:
        if not json_:
            note("taskctld is not running")
        raise typer.Exit(3)
    if not json_:
        print(render.health_text(health))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
