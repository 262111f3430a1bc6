"""`taskctl health`: is the daemon healthy, and if not, why."""

import typer

from taskctl import render
from taskctl.cli.common import JsonOption, client, emit_json, note


def health(json_: JsonOption = False) -> None:
    """Daemon version, uptime, store and disk; exits 1 and names the reason when unhealthy."""
    report = client().call("GET", "/healthz")
    if json_:
        emit_json(report)
    else:
        print(render.health_text(report))
    if report["status"] != "ok":
        note("taskctl: unhealthy: " + "; ".join(report.get("reasons", [])))
        raise typer.Exit(1)
