"""`taskctl health`: is the daemon healthy, and if not, why."""

import typer

from taskctl import render
from taskctl.cli.common import JsonOption, emit_json, note
from taskctl.client import Client


def health(json_: JsonOption = False) -> None:
    """Daemon version, uptime, store and disk; exits 1 and names the reason when unhealthy, 3
    when it is not running (a probe never starts the daemon it checks)."""
    report = Client(autostart=False).call("GET", "/healthz")
    if json_:
        emit_json(report)
    else:
        print(render.health_text(report))
    if report["status"] != "ok":
        note("taskctl: unhealthy: " + "; ".join(report.get("reasons", [])))
        raise typer.Exit(1)
