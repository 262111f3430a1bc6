"""`taskctl daemon start|stop|status`: manage taskctld explicitly."""

import os
import time
from typing import Annotated

import typer

from taskctl import render
from taskctl.cli.common import JsonOption, emit_json, note
from taskctl.client import Client, path_for, start_daemon
from taskctl.errors import TaskctlError, Unreachable

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
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds to wait for it to exit.")
    ] = STOP_TIMEOUT,
    json_: JsonOption = False,
) -> None:
    """Stop taskctld. Running tasks keep running; the next daemon adopts them."""
    c = Client(autostart=False)
    health = _health(c)
    if health is None:
        if json_:
            emit_json({"stopped": False, "running": False})
        else:
            note("taskctld is not running")
        return
    c.call("POST", path_for("daemon", "stop"), {"mode": "leave"})
    pid = int(health["pid"])
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            raise Unreachable(f"taskctld (pid {pid}) did not exit within {timeout:.0f}s")
        time.sleep(0.02)
    if json_:
        emit_json({"stopped": True, "pid": pid})
    else:
        note(f"taskctld stopped (pid {pid})")


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
