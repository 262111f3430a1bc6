"""Commands about existing tasks: list, status, cancel, wait."""

from typing import Annotated, Any

import typer

from taskctl import render
from taskctl.cli import complete
from taskctl.cli.common import (
    EXIT_WAIT_FAILED,
    FINAL_STATES,
    JsonOption,
    client,
    die,
    duration,
    emit_json,
    exit_status_of,
    ids,
    note,
    outcome_text,
    wait_final,
)
from taskctl.client import Client, path_for
from taskctl.errors import Conflict, TaskctlError


def list_tasks(
    state: Annotated[
        list[str] | None,
        typer.Option(
            "-s",
            "--state",
            metavar="STATE",
            help="Only tasks in this state (repeatable).",
            autocompletion=complete.states,
        ),
    ] = None,
    queue: Annotated[
        str | None,
        typer.Option(
            "-q",
            "--queue",
            metavar="QUEUE",
            help="Only tasks of this queue.",
            autocompletion=complete.queues,
        ),
    ] = None,
    label: Annotated[
        list[str] | None,
        typer.Option(
            "-l", "--label", metavar="K=V", help="Only tasks with label K=V (repeatable)."
        ),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(
            "-n",
            "--limit",
            metavar="N",
            min=1,
            max=100_000,
            help="At most this many (default 100).",
        ),
    ] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every task that matches.")] = False,
    show_env: Annotated[
        bool, typer.Option("--show-env", help="Include environments in --json.")
    ] = False,
    json_: JsonOption = False,
) -> None:
    """Tasks, newest first: the newest 100 unless told otherwise. When more match, a notice on
    stderr says how many and how to see them (stdout stays the list, or one JSON array)."""
    for s in state or []:
        if s not in complete.STATES:
            raise typer.BadParameter(
                f"{s!r} is not one of {', '.join(complete.STATES)}", param_hint="--state"
            )
    if all_ and limit is not None:
        raise typer.BadParameter("give --limit or --all, not both", param_hint="--all")
    query = {"state": state, "queue": queue, "label": label, "show_env": show_env or None}
    c = client()
    tasks, total = _fetch_tasks(c, query, None if all_ else limit or 100)
    if json_:
        emit_json(tasks)
    else:
        render.print_task_list(tasks)
    _say_if_held(c, tasks)
    if total > len(tasks):
        note(
            f"taskctl: {total - len(tasks)} more tasks match than the {len(tasks)} shown; "
            f"see them with --limit {min(total, 100_000)} or --all"
        )


_PAGE = 10_000


def _fetch_tasks(c: Client, query: dict[str, Any], limit: int | None) -> tuple[list[Any], int]:
    """The newest `limit` tasks that match (None: all, a page at a time) and how many match in
    all (the daemon's X-Total-Count; a daemon without it: as many as it gave)."""
    tasks: list[Any] = []
    total = None
    while True:
        size = _PAGE if limit is None else limit
        before = tasks[-1]["id"] if tasks else None
        response = c.open("GET", path_for("tasks", **query, limit=size, before=before))
        if total is None:
            total = int(response.headers.get("x-total-count", 0))
        page = response.json()
        tasks += page
        if limit is not None or len(page) < size:
            return tasks, max(total, len(tasks))


def status(
    task_ids: Annotated[
        list[str] | None,
        typer.Argument(metavar="ID...", help="Task ids; none gives a summary.", show_default=False),
    ] = None,
    show_env: Annotated[
        bool, typer.Option("--show-env", help="Show the captured environment (may hold secrets).")
    ] = False,
    json_: JsonOption = False,
) -> None:
    """One task in detail (attempts, exit codes); no id: a summary of the daemon."""
    c = client()
    if not task_ids:
        summary = c.call("GET", path_for("summary"))
        if json_:
            emit_json(summary)
        else:
            print(render.summary_text(summary))
        return
    tasks = [c.call("GET", path_for("tasks", i, show_env=show_env or None)) for i in ids(task_ids)]
    if json_:
        emit_json(tasks[0] if len(tasks) == 1 else tasks)
    else:
        for n, task in enumerate(tasks):
            if n:
                print()
            render.print_task_detail(task)
    _say_if_held(c, tasks)


def _say_if_held(c: Client, tasks: list[dict[str, Any]]) -> None:
    """A queued task that never starts because the daemon is on hold: say so on stderr."""
    if any(t["state"] == "queued" for t in tasks) and c.call("GET", "/healthz").get("hold"):
        note(f"taskctl: queued tasks do not start: {render.HOLD_WHY}")


def retry(
    task_ids: Annotated[list[str], typer.Argument(metavar="ID...", help="Task ids.")],
    json_: JsonOption = False,
) -> None:
    """Run finished tasks again, each as a new attempt; their history is kept."""
    _each(task_ids, "retry", json_)


def _each(task_ids: list[str], action: str, json_: bool) -> None:
    """POST `action` to each task; report each result; exit with the first failure's code."""
    c = client()
    results: list[Any] = []
    failure: TaskctlError | None = None
    for task_id in ids(task_ids):
        try:
            task = c.call("POST", path_for("tasks", task_id, action), timeout=None)
            said = task["state"]
        except TaskctlError as e:
            done = _already_cancelled(c, task_id) if isinstance(e, Conflict) else None
            if done is None:
                named = str(task_id) in e.message.split()  # most messages name the task already
                note(f"taskctl: {e.message}" if named else f"taskctl: task {task_id}: {e.message}")
                failure = failure or e
                continue
            task, said = done
        results.append(task)
        if not json_:
            note(f"task {task_id}: {said}")
    if json_:
        emit_json(results[0] if len(task_ids) == 1 and results else results)
    if failure is not None:
        raise typer.Exit(failure.exit_code)


def _already_cancelled(c: Client, task_id: int) -> tuple[dict[str, Any], str] | None:
    """For a cancel the daemon refused: the task and what to say, if it failed because a task it
    depends on did not succeed, as when this same `cancel` has just cancelled that one and the
    cascade got there first. It never ran and never will, which is all cancel asks, so that is
    not a conflict. Any other final task is (exit 5), a cancelled one included."""
    task: dict[str, Any] = c.call("GET", path_for("tasks", task_id))
    if task["state"] == "failed" and task.get("reason") == "dependency_failed":
        return task, "already failed (a task it depends on did not succeed)"
    return None


def cancel(
    task_ids: Annotated[list[str], typer.Argument(metavar="ID...", help="Task ids.")],
    json_: JsonOption = False,
) -> None:
    """Cancel tasks; running ones are stopped with their whole process tree (SIGTERM, then
    SIGKILL after their grace period).

    A task already failed because a task it depends on did not succeed counts as done (as when
    the cancel of that one reached it first); any other finished task is a conflict (exit 5)."""
    _each(task_ids, "cancel", json_)


def wait(
    task_ids: Annotated[list[str], typer.Argument(metavar="ID...", help="Task ids.")],
    timeout: Annotated[
        str | None,
        typer.Option("--timeout", metavar="DURATION", help="Give up after this long (exit 125)."),
    ] = None,
    json_: JsonOption = False,
) -> None:
    """Wait until the tasks are final; exit like the last one that failed (0 if none did)."""
    import time

    c = client()
    limit = duration(timeout, "--timeout")
    deadline = None if limit is None else time.monotonic() + limit
    finals: list[dict[str, Any]] = []
    for task_id in ids(task_ids):
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        task = wait_final(c, task_id, left)
        if task["state"] not in FINAL_STATES:
            if json_:
                emit_json([*finals, task])
            die(f"timed out waiting for task {task_id} (still {task['state']})", EXIT_WAIT_FAILED)
        finals.append(task)
        if not json_:
            note(f"task {task_id} {task['state']}: {outcome_text(task)}")
    if json_:
        emit_json(finals[0] if len(finals) == 1 else finals)
    failed = [exit_status_of(t) for t in finals if exit_status_of(t) != 0]
    raise typer.Exit(failed[-1] if failed else 0)
