"""`taskctl watch`: a live view pushed by the daemon, or a stream of events for scripts."""

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import typer

from taskctl import render
from taskctl.cli import complete
from taskctl.cli.common import JsonStreamOption, client, note, reconnect_pause
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
        str | None,
        typer.Option(
            "-q",
            "--queue",
            metavar="QUEUE",
            help="Only this queue's tasks.",
            autocompletion=complete.queues,
        ),
    ] = None,
    task: Annotated[
        int | None, typer.Option("--task", metavar="ID", min=1, help="Only this task.")
    ] = None,
    rows: Annotated[
        int,
        typer.Option("--rows", metavar="N", min=1, max=500, help="Tasks shown in the live view."),
    ] = 20,
    json_: JsonStreamOption = False,
) -> None:
    """Watch tasks change state, as the daemon pushes each change. On a terminal: a live table
    (q or Ctrl-C quits); with --json: NDJSON, one event per state change (`id`, `at`, `task_id`,
    `from_state`, `to_state`, `exit_code`...). Survives the daemon restarting: it reconnects,
    resumes after the last event it printed, and says so (on stderr, or in the live view)."""
    c = client()
    if json_:
        for event in events(c, since, queue, task):
            sys.stdout.write(json.dumps(event) + "\n")
            sys.stdout.flush()
    elif not sys.stdout.isatty():
        for event in events(c, since, queue, task):
            print(render.event_line(event), flush=True)
    else:
        _live(c, since, queue, task, rows)


def events(
    c: Client,
    since: int | None,
    queue: str | None,
    task: int | None,
    say: Callable[[str], None] = note,
) -> Iterator[dict[str, Any]]:
    """Events forever, reconnecting when the daemon goes away and resuming after the last one
    seen, so none is lost or repeated. `say` hears when the daemon is lost and when it is back."""
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
                say("taskctl: reconnected to taskctld")
                failures = 0
            for line in response.iter_lines():
                event = json.loads(line)
                last = event["id"]
                yield event
            reason = "it ended the stream"
        except (Unreachable, OSError, ValueError) as e:
            reason = str(getattr(e, "message", e))
        if failures == 0:
            say(f"taskctl: lost taskctld ({reason}); reconnecting...")
        c.autostart = False  # from now on: wait for a daemon, never start one
        time.sleep(reconnect_pause(failures))
        failures += 1


def _last_event_id(c: Client) -> int:
    """Where "from now on" starts."""
    return int(c.call("GET", "/healthz", timeout=10).get("last_event_id") or 0)


def _live(c: Client, since: int | None, queue: str | None, task: int | None, rows: int) -> None:
    """Redraw when an event arrives (and once a second, so ages stay true); data is fetched
    only after events, never on a timer. The status line says when the daemon is lost."""
    from rich.live import Live

    changed, stop = threading.Event(), threading.Event()
    changed.set()
    status = {"text": "watching (q or Ctrl-C to stop)"}

    def say(text: str) -> None:
        status["text"] = text.removeprefix("taskctl: ")
        changed.set()

    def consume() -> None:
        for event in events(c, since, queue, task, say):
            say(f"last: {render.event_line(event)}")

    threading.Thread(target=consume, daemon=True).start()
    tasks: list[dict[str, Any]] = []
    queues: list[dict[str, Any]] = []
    with (
        _quit_on_q(stop, changed),
        Live(auto_refresh=False, console=render.console(), transient=False) as live,
    ):
        try:
            while not stop.is_set():
                if changed.wait(timeout=1.0):
                    changed.clear()
                    try:
                        tasks = c.call("GET", path_for("tasks", limit=rows, queue=queue), timeout=5)
                        queues = c.call("GET", path_for("queues"), timeout=5)
                    except TaskctlError as e:
                        status["text"] = f"lost taskctld ({e.message}); reconnecting..."
                live.update(render.watch_view(tasks, queues, status["text"]), refresh=True)
        except KeyboardInterrupt:
            return


@contextlib.contextmanager
def _quit_on_q(stop: threading.Event, wake: threading.Event) -> Iterator[None]:
    """`q` quits, as in top and less: the terminal in cbreak mode (no echo, no Enter needed),
    read by a thread, and restored on the way out."""
    if not sys.stdin.isatty():
        yield
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    def read() -> None:
        while os.read(fd, 1) not in (b"q", b"Q", b""):
            pass
        stop.set()
        wake.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
