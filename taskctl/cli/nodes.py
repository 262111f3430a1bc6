"""`taskctl nodes`: the daemons that share one queue in PostgreSQL, and draining one."""

from typing import Annotated

import typer

from taskctl import render
from taskctl.cli.common import JsonOption, client, emit_json, note
from taskctl.client import path_for

app = typer.Typer(help="Nodes sharing the queue: list, drain, resume.", invoke_without_command=True)

NameArg = Annotated[str, typer.Argument(metavar="NAME", help="Node name (see `taskctl nodes`).")]


@app.callback()
def nodes(ctx: typer.Context, json_: JsonOption = False) -> None:
    """Every node: its state (up, draining, lost), heartbeat age, running/slots, queues."""
    if ctx.invoked_subcommand is None:
        list_(json_)


@app.command("list")
def list_(json_: JsonOption = False) -> None:
    """Every node: its state (up, draining, lost), heartbeat age, running/slots, queues."""
    found = client().call("GET", path_for("nodes"))
    if json_:
        emit_json(found)
    else:
        render.print_rows(render.NODE_HEADER, render.node_rows(found), "no nodes")


@app.command()
def drain(name: NameArg, json_: JsonOption = False) -> None:
    """The node takes no new work; what it runs finishes there."""
    node = client().call("POST", path_for("nodes", name, "drain"))
    emit_json(node) if json_ else note(f"node {name}: draining")


@app.command()
def resume(name: NameArg, json_: JsonOption = False) -> None:
    """The node takes work again."""
    node = client().call("POST", path_for("nodes", name, "resume"))
    emit_json(node) if json_ else note(f"node {name}: up")
