"""`taskctl logs`: a task's output, whole, tailed or followed live."""

import codecs
import sys
from collections.abc import Iterator
from typing import Annotated

import typer

from taskctl import render
from taskctl.cli.common import FINAL_STATES, client, die, emit_json, ids
from taskctl.client import Client, path_for
from taskctl.errors import Unavailable, Unreachable


def logs(
    task_id: Annotated[str, typer.Argument(metavar="ID", help="Task id.")],
    follow: Annotated[
        bool,
        typer.Option("-f", "--follow", help="Keep printing new output until the task is final."),
    ] = False,
    attempt: Annotated[
        int | None,
        typer.Option(
            "--attempt", metavar="N", min=1, help="Show this attempt (default: the latest)."
        ),
    ] = None,
    stderr: Annotated[
        bool, typer.Option("--stderr", help="Show standard error instead of standard output.")
    ] = False,
    tail: Annotated[
        int | None, typer.Option("--tail", metavar="N", min=0, help="Only the last N lines.")
    ] = None,
    raw: Annotated[
        bool, typer.Option("--raw", help="Write the bytes as they are, even to a terminal.")
    ] = False,
    json_: Annotated[
        bool,
        typer.Option(
            "--json", help="One JSON object on stdout (with --follow: NDJSON, one per chunk)."
        ),
    ] = False,
) -> None:
    """Print an attempt's output. On a terminal, control sequences are shown escaped so a task
    cannot rewrite your screen; in a pipe (or with --raw) the bytes pass through unchanged.
    With --json: one object with the output decoded as UTF-8 (NDJSON chunks with --follow)."""
    (number,) = ids([task_id])
    c = client()
    response = c.open(
        "GET",
        path_for(
            "tasks", number, "logs",
            stream="stderr" if stderr else "stdout", attempt=attempt, tail=tail,
            follow=follow or None,
        ),
        timeout=None,
    )  # fmt: skip
    stream = "stderr" if stderr else "stdout"
    if json_:
        _write_json(response.iter_chunks(), number, stream, follow)
    else:
        _write(response.iter_chunks(), raw or not sys.stdout.isatty())
    if follow:
        _check_followed_to_the_end(c, number)


def _write(chunks: Iterator[bytes], raw: bool) -> None:
    out = sys.stdout.buffer
    if raw:
        for chunk in chunks:
            out.write(chunk)
            out.flush()
        return
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for chunk in chunks:
        text = decoder.decode(chunk)
        out.write(render.escape_controls(text.encode()).encode())
        out.flush()


def _check_followed_to_the_end(c: Client, task_id: int) -> None:
    """A followed stream also ends when the daemon stops: then say so (exit 3) rather than
    pass for a task that ended."""
    try:
        state = c.call("GET", path_for("tasks", task_id))["state"]
    except (Unreachable, Unavailable):
        state = None
    if state not in FINAL_STATES:
        die(
            f"taskctld stopped while following task {task_id}, which goes on; "
            f"`taskctl logs -f {task_id}` again once the daemon is back",
            Unreachable.exit_code,
        )


def _write_json(chunks: Iterator[bytes], task_id: int, stream: str, follow: bool) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    if follow:
        for chunk in chunks:
            emit_json({"task_id": task_id, "stream": stream, "output": decoder.decode(chunk)})
            sys.stdout.flush()
        return
    text = "".join(decoder.decode(chunk) for chunk in chunks) + decoder.decode(b"", final=True)
    emit_json({"task_id": task_id, "stream": stream, "output": text})
