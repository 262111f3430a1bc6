"""`taskctl prune`: remove finished tasks, their logs and old events now."""

from typing import Annotated

import typer

from taskctl.cli.common import JsonOption, client, duration, emit_json, note
from taskctl.client import path_for


def prune(
    older_than: Annotated[
        str | None,
        typer.Option(
            "--older-than",
            metavar="DURATION",
            help="Finished more than this long ago (default: the daemon's retention, 7d).",
        ),
    ] = None,
    json_: JsonOption = False,
) -> None:
    """Remove finished tasks, their logs and events older than the retention. The daemon also
    does this every hour, and keeps at most `keep_finished` finished tasks."""
    body = {} if older_than is None else {"older_than": duration(older_than, "--older-than")}
    removed = client().call("POST", path_for("prune"), body, timeout=None)
    if json_:
        emit_json(removed)
    else:
        note(
            f"removed {removed['tasks']} task(s), {removed['log_files']} log file(s), {removed['events']} event(s)"
        )
