"""`taskctl watch`: a live view pushed by the daemon, or a stream of events for scripts."""

import json
import sys
import threading
import time
from collections.abc import Iterator
from typing import Annotated, Any

import typer

from taskctl import render
from taskctl.cli.common import JsonOption, client, note, reconnect_pause
from taskctl.client import Client, path_for
from taskctl.errors import TaskctlError, Unreachable


def watch(
    since: Annotated[
        int | None,
        typer.Option(
            "--since",
            metavar="EVENT_ID",
            min=0,
            help="Resume after this event id (0: from the oldest kept).",
        ),
    ] = None,
    queue: Annotated[
        str | None, typer.Option("-q", "--queue", metavar="QUEUE", help="Only this queue's tasks.")
    ] = None,
    task: Annotated[
        int | None, typer.Option("--task", metavar="ID", min=1, help="Only this task.")
    ] = None,
    rows: Annotated[
        int,
        typer.Option("--rows", metavar="N", min=1, max=500, help="Tasks shown in the live view."),
    ] = 20,
    json_: JsonOption = False,
) -> None:
    """Watch tasks change state, as the daemon pushes each change. On a terminal: a live table;
    with --json: NDJSON, one event per state change (`id`, `at`, `task_id`, `from_state`,
    `to_state`, `exit_code`...). Survives the daemon restarting: it reconnects, resumes after
    the last event it printed, and says so on stderr."""
    c = client()
    stream = events(c, since, queue, task)
    if json_:
        for event in stream:
            sys.stdout.write(json.dumps(event) + "\n")
            sys.stdout.flush()
    elif not sys.stdout.isatty():
        for event in stream:
            print(render.event_line(event), flush=True)
    else:
        _live(c, stream, queue, rows)


def events(
    c: Client, since: int | None, queue: str | None, task: int | None
) -> Iterator[dict[str, Any]]:
    """Events forever, reconnecting when the daemon goes away and resuming after the last one
    seen, so none is lost or repeated."""
    last = since if since is not None else _last_event_id(c)
    failures = 0
    while True:
        try:
            response = c.open(
                "GET",
                path_for("events", after=last, follow=True, queue=queue, task=task),
                timeout=None,
            )
            if failures:
                note("taskctl: reconnected to taskctld")
                failures = 0
            for line in response.iter_lines():
                event = json.loads(line)
                last = event["id"]
                yield event
        except (Unreachable, OSError, ValueError) as e:
            if failures == 0:
                note(f"taskctl: lost taskctld ({getattr(e, 'message', e)}); reconnecting...")
        c.autostart = False  # from now on: wait for a daemon, never start one
        time.sleep(reconnect_pause(failures))
        failures += 1


def _last_event_id(c: Client) -> int:
    """Where "from now on" starts."""
    return int(c.call("GET", "/healthz", timeout=10).get("last_event_id") or 0)


def _live(c: Client, stream: Iterator[dict[str, Any]], queue: str | None, rows: int) -> None:
    """Redraw when an event arrives (and once a second, so ages stay true); data is fetched
    only after events, never on a timer."""
    from rich.live import Live

    changed = threading.Event()
    changed.set()
    status = {"text": "watching (Ctrl-C to stop)"}

    def consume() -> None:
        for event in stream:
            status["text"] = f"last: {render.event_line(event)}"
            changed.set()

    threading.Thread(target=consume, daemon=True).start()
    tasks: list[dict[str, Any]] = []
    queues: list[dict[str, Any]] = []
    with Live(auto_refresh=False, console=render.console(), transient=False) as live:
        try:
            while True:
                if changed.wait(timeout=1.0):
                    changed.clear()
                    try:
                        tasks = c.call("GET", path_for("tasks", limit=rows, queue=queue), timeout=5)
                        queues = c.call("GET", path_for("queues"), timeout=5)
                    except TaskctlError as e:
                        status["text"] = f"taskctld unreachable ({e.message}); reconnecting..."
                live.update(render.watch_view(tasks, queues, status["text"]), refresh=True)
        except KeyboardInterrupt:
            return
