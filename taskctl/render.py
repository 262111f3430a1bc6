"""Rendering: rich tables for people at a terminal, plain aligned text in a pipe, JSON for scripts.

Every function here is pure (data in, text out), so output can be tested against golden text.
`rich` is imported only when a terminal asks for it: the CLI's start-up stays light in shell
loops and pipes. `NO_COLOR` is honoured.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from datetime import UTC, datetime, tzinfo
from typing import Any

from taskctl.units import duration_text, format_duration, format_size
from taskctl.wire import shown

STATE_STYLE = {
    "waiting": "magenta",
    "scheduled": "cyan",
    "queued": "blue",
    "running": "yellow",
    "succeeded": "green",
    "failed": "red",
    "cancelled": "bright_black",
}


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False)


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


UTC_TIMES = False  # `taskctl --utc`: times for people in UTC rather than the local zone


def when(text: str | None) -> str:
    """A time from the wire (RFC 3339, UTC) for people: `2026-11-30 17:22:46+01:00` in the
    local zone (TZ, else /etc/localtime), or `2026-11-30 16:22:46Z` with `--utc`."""
    moment = parse_time(text)
    if moment is None:
        return "-"
    if UTC_TIMES:
        return moment.astimezone(UTC).isoformat(" ", "seconds").replace("+00:00", "Z")
    return moment.astimezone().isoformat(" ", "seconds")


def ago(text: str | None, now: datetime | None = None) -> str:
    when = parse_time(text)
    if when is None:
        return "-"
    now = now or datetime.now(UTC)
    return format_duration(max(0.0, (now - when).total_seconds()))


def elapsed(start: str | None, end: str | None, now: datetime | None = None) -> float | None:
    begin = parse_time(start)
    if begin is None:
        return None
    finish = parse_time(end) or now or datetime.now(UTC)
    return max(0.0, (finish - begin).total_seconds())


def safe(value: object) -> str:
    """Task-supplied text (a name, a label, an argument, a path, an error) made safe to print
    on one line of a terminal: bytes that are not UTF-8 as \\xNN, control characters (newlines
    and tabs too) in caret notation, so no field can move the cursor or retitle the window."""
    return shown(value).translate(_ONE_LINE)


def command_text(task: dict[str, Any]) -> str:
    if task.get("shell"):
        return safe(task["command"][0])
    return safe(shlex.join(shown(arg) for arg in task["command"]))


def shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: max(1, width - 1)] + "…"


def exit_text(task: dict[str, Any]) -> str:
    attempts = task.get("attempts") or []
    last = attempts[-1] if attempts else {}
    if last.get("signal"):
        return f"sig{last['signal']}"
    if task.get("exit_code") is not None:
        return str(task["exit_code"])
    return "-"


# -- task lists -----------------------------------------------------------------------------------

LIST_HEADER = ("ID", "STATE", "QUEUE", "EXIT", "TRIES", "AGE", "TIME", "COMMAND")


def task_rows(tasks: list[dict[str, Any]], now: datetime | None = None) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for t in tasks:
        attempts = t.get("attempts") or []
        duration = elapsed(t.get("started_at"), t.get("finished_at"), now)
        label = safe(t["name"]) if t.get("name") else command_text(t)
        rows.append(
            (
                str(t["id"]),
                t["state"],
                t["queue"],
                exit_text(t),
                str(len(attempts)),
                ago(t.get("created_at"), now),
                format_duration(duration),
                label,
            )
        )
    return rows


def plain_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """Columns aligned with spaces; the last column is never padded or cut (stable for awk)."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for row in [header, *rows]:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


def print_task_list(tasks: list[dict[str, Any]]) -> None:
    rows = task_rows(tasks)
    if not sys.stdout.isatty():
        if rows:
            print(plain_table(LIST_HEADER, rows))
        return
    console = _console()
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, header_style="bold", pad_edge=False)
    for name in LIST_HEADER:
        table.add_column(name, no_wrap=name != "COMMAND", overflow="ellipsis")
    for row in rows:  # cells as Text: a task's name is never read as rich markup
        state = row[1]
        table.add_row(row[0], Text(state, style=STATE_STYLE.get(state, "")), *map(Text, row[2:]))
    if rows:
        console.print(table)
    else:
        console.print("no tasks", style="dim")


def print_rows(header: tuple[str, ...], rows: list[tuple[str, ...]], empty: str) -> None:
    """Any listing: a rich table on a terminal, aligned plain text in a pipe."""
    if not sys.stdout.isatty():
        if rows:
            print(plain_table(header, rows))
        return
    from rich.table import Table
    from rich.text import Text

    console = _console()
    if not rows:
        console.print(empty, style="dim")
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for name in header:
        table.add_column(name, no_wrap=name != header[-1], overflow="ellipsis")
    for row in rows:
        table.add_row(*map(Text, row))
    console.print(table)


_DURATIONS = {"timeout", "kill_grace", "retry_delay", "max_delay"}


def _option_text(key: str, value: Any) -> str:
    if isinstance(value, dict):  # labels
        return " ".join(f"{key[:-1]}:{k}={v}" for k, v in value.items())
    if isinstance(value, list):
        return f"{key}={','.join(map(str, value))}"
    return f"{key}={_default_value(key, value)}"


def _default_value(key: str, value: Any) -> str:
    """A queue default as it would be typed: 2h rather than 7200.0, 512MiB rather than bytes."""
    if key in _DURATIONS and isinstance(value, int | float):
        return duration_text(value)
    if key == "memory_limit" and isinstance(value, int):
        return format_size(value)
    return str(value)


QUEUE_HEADER = ("QUEUE", "LIMIT", "STATE", "RUNNING", "QUEUED", "SCHEDULED", "WAITING", "DEFAULTS")


NODE_HEADER = ("NODE", "STATE", "HEARTBEAT", "RUNNING", "QUEUES", "VERSION")


def node_rows(nodes: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """One row per node; the one that answered is marked with a `*`."""
    return [
        (
            safe(n["name"]) + (" *" if n.get("this") else ""),
            n["state"],
            f"{n['heartbeat_age']:.1f}s ago",
            f"{n['running']}/{n['slots']}",
            ",".join(map(safe, n["queues"])) if n.get("queues") is not None else "all",
            safe(n["version"]),
        )
        for n in nodes
    ]


def queue_rows(queues: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for q in queues:
        c = q.get("counts") or {}
        defaults = " ".join(
            f"{k}={_default_value(k, v)}" for k, v in sorted((q.get("defaults") or {}).items())
        )
        rows.append(
            (
                q["name"], "-" if q.get("concurrency") is None else str(q["concurrency"]),
                "paused" if q.get("paused") else "active",
                *(str(c.get(s, 0)) for s in ("running", "queued", "scheduled", "waiting")), defaults,
            )
        )  # fmt: skip
    return rows


# -- schedules --------------------------------------------------------------------------------------

SCHEDULE_HEADER = ("NAME", "CRON", "ZONE", "NEXT", "OVERLAP", "STATE", "COMMAND")
TRIGGER_HEADER = ("NAME", "PATHS", "GLOB", "DEBOUNCE", "OVERLAP", "STATE", "COMMAND")


def _schedule_command(s: dict[str, Any]) -> str:
    return command_text(s)


def schedule_rows(schedules: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    return [
        (
            s["name"], s["cron"], s["tz"], when(s.get("next_due")), s["overlap"],
            "paused" if s["paused"] else "active", _schedule_command(s),
        )
        for s in schedules
    ]  # fmt: skip


def trigger_rows(triggers: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    return [
        (
            t["name"], safe(" ".join(t["paths"])) + (" (recursive)" if t.get("recursive") else ""), safe(t.get("glob") or "*"),
            format_duration(t.get("debounce")), t["overlap"],
            "failed" if t.get("problem") else "paused" if t["paused"] else "active",
            _schedule_command(t),
        )
        for t in triggers
    ]  # fmt: skip


def schedule_detail(s: dict[str, Any]) -> str:
    lines = [f"{s['kind']} {s['name']}  {'paused' if s['paused'] else 'active'}"]
    if s["kind"] == "cron":
        lines += [
            f"  {'cron':<12}{s['cron']}  ({s['tz']})",
            f"  {'next run':<12}{when(s.get('next_due'))}",
        ]
        lines.append(f"  {'catch-up':<12}{s['catch_up']}")
    else:
        lines.append(f"  {'paths':<12}{safe(' '.join(s['paths']))}")
    lines += [
        f"  {'overlap':<12}{s['overlap']}",
        f"  {'command':<12}{_schedule_command(s)}",
        f"  {'queue':<12}{s['queue']}",
    ]
    options = s.get("options") or {}
    if options:
        text = " ".join(_option_text(k, v) for k, v in options.items())
        lines.append(f"  {'options':<12}{safe(text)}")
    runs = s.get("runs") or []
    if runs:
        lines.append("  recent runs")
        header = ("DUE", "TASK", "STATE", "EXIT", "NOTE")
        rows: list[tuple[str, ...]] = [
            (
                when(r["due_at"]),
                str(r["task_id"] or "-"),
                r.get("state") or "-",
                "-" if r.get("exit_code") is None else str(r["exit_code"]),
                "" if r["outcome"] == "fired" else r["outcome"],
            )
            for r in runs
        ]
        lines += ["    " + line for line in plain_table(header, rows).splitlines()]
    return "\n".join(lines)


# -- one task -------------------------------------------------------------------------------------


def task_detail(task: dict[str, Any], now: datetime | None = None) -> str:
    """A task in detail, as plain text (rich adds colour on a terminal)."""
    lines = [
        f"task {task['id']}  {task['state']}"
        + (f" ({safe(task['reason'])})" if task.get("reason") else "")
    ]

    def field(name: str, value: Any) -> None:
        if value not in (None, "", [], {}):
            lines.append(f"  {name:<12}{value}")

    field("name", safe(task["name"]) if task.get("name") else None)
    field("command", command_text(task) + ("   (via sh -c)" if task.get("shell") else ""))
    field("queue", f"{task['queue']}   priority {task['priority']}")
    field("node", safe(task["node"]) + " only" if task.get("node") else None)
    field("cwd", safe(task["cwd"]) if task.get("cwd") else None)
    field("labels", safe(" ".join(f"{k}={v}" for k, v in (task.get("labels") or {}).items())))
    field("created", f"{when(task['created_at'])} ({ago(task['created_at'], now)} ago)")
    if task["state"] == "scheduled":
        field("next run", when(task.get("run_at")))
    field("started", task.get("started_at") and when(task["started_at"]))
    field("finished", task.get("finished_at") and when(task["finished_at"]))
    field("exit code", task.get("exit_code"))
    policy = f"{task.get('retries', 0)} retries"
    if task.get("retries"):
        policy += f", {task.get('backoff')} backoff from {format_duration(task.get('retry_delay'))}"
    if task.get("timeout"):
        policy += f"; timeout {format_duration(task['timeout'])}"
    if task.get("memory_limit"):
        policy += f"; memory limit {format_size(task['memory_limit'])}"
    field("policy", policy)
    if task.get("env") is not None:
        for key, value in sorted(task["env"].items()):
            field("env", safe(f"{key}={shown(value)}"))
    attempts = task.get("attempts") or []
    if attempts:
        lines.append("  attempts")
        header: tuple[str, ...] = ("#", "OUTCOME", "EXIT", "STARTED", "TIME", "MAX RSS", "CPU")
        on_nodes = any(a.get("node") for a in attempts)  # a cluster's: where each ran
        header += ("NODE", "ERROR") if on_nodes else ("ERROR",)
        rows: list[tuple[str, ...]] = []
        for a in attempts:
            where = (safe(a.get("node") or "-"),) if on_nodes else ()
            cpu = (a.get("cpu_user") or 0) + (a.get("cpu_system") or 0)
            exit_ = f"sig{a['signal']}" if a.get("signal") else a.get("exit_code")
            rows.append(
                (
                    str(a["number"]),
                    a.get("outcome") or "running",
                    "-" if exit_ is None else str(exit_),
                    when(a.get("started_at")),
                    format_duration(elapsed(a.get("started_at"), a.get("ended_at"), now)),
                    format_size(a.get("max_rss")),
                    format_duration(cpu) if a.get("outcome") else "-",
                    *where,
                    safe(a.get("error") or ""),
                )
            )
        lines.extend("    " + line for line in plain_table(header, rows).splitlines())
    return "\n".join(lines)


def print_task_detail(task: dict[str, Any]) -> None:
    text = task_detail(task)
    if not sys.stdout.isatty():
        print(text)
        return
    from rich.text import Text

    rendered = Text(text)
    rendered.highlight_words([task["state"]], style=STATE_STYLE.get(task["state"], ""))
    _console().print(rendered)


# -- summary and health ---------------------------------------------------------------------------


HOLD_WHY = "tasks are accepted, none starts (hold = true in config.toml)"


def summary_text(summary: dict[str, Any]) -> str:
    h = summary["health"]
    lines = [
        f"taskctld {h['version']}  {h['status']}  pid {h['pid']}  up {format_duration(h['uptime'])}",
        f"running {h['running']}/{h['concurrency']}  queued {h['queued']}",
    ]
    if h.get("hold"):
        lines.append(f"  hold: {HOLD_WHY}")
    lines += [f"  ! {reason}" for reason in h.get("reasons", [])]
    states = "  ".join(f"{k} {v}" for k, v in summary["states"].items() if v)
    lines.append(f"tasks: {states or 'none'}")
    for q in summary.get("queues", []):
        counts = "  ".join(f"{k} {v}" for k, v in sorted(q["counts"].items()))
        extra = (" (paused)" if q.get("paused") else "") + (
            f" limit {q['concurrency']}" if q.get("concurrency") else ""
        )
        lines.append(f"  queue {q['name']}{extra}: {counts or 'empty'}")
    return "\n".join(lines)


def health_text(h: dict[str, Any]) -> str:
    lines = [
        f"status        {h['status']}",
        f"version       {h['version']} (api {h['api']})",
        f"pid           {h['pid']}",
        f"uptime        {format_duration(h['uptime'])}",
        f"store         {'writable' if h['store_writable'] else 'NOT writable'}"
        + (f" ({safe(h['store'])})" if h.get("store") not in (None, "sqlite") else ""),
        *([f"node          {safe(h['node'])}"] if h.get("node") else []),
        f"running       {h['running']} of {h['concurrency']}",
        *([f"hold          on: {HOLD_WHY}"] if h.get("hold") else []),
        f"queued        {h['queued']}"
        + (f" ({h['held']} held by the supervisor, to start next)" if h.get("held") else ""),
        f"streams       {h.get('streams', 0)} connected (watch, logs --follow)",
    ]
    if h.get("containment"):
        lines.append(f"containment   {h['containment']}")
    if h.get("database_size") is not None:
        lines.append(
            f"database      {format_size(h['database_size'])} (WAL {format_size(h.get('wal_size'))})"
        )
    if h.get("disk_free") is not None:
        lines.append(
            f"disk free     {format_size(h['disk_free'])} (logs: {format_size(h.get('disk_free_logs'))})"
        )
    if h.get("scheduler_heartbeat_age") is not None:
        lines.append(f"scheduler     last ran {format_duration(h['scheduler_heartbeat_age'])} ago")
    lines += [f"problem       {reason}" for reason in h.get("reasons", [])]
    return "\n".join(lines)


# -- task output ----------------------------------------------------------------------------------


def _control_table() -> dict[int, str]:
    table = {code: "^" + chr(code + 0x40) for code in range(0x20) if chr(code) not in "\n\t"}
    table[0x7F] = "^?"
    table.update({code: f"\\u{code:04x}" for code in range(0x80, 0xA0)})
    return table


_CONTROLS = _control_table()
_ONE_LINE = {**_CONTROLS, ord("\n"): "^J", ord("\t"): "^I"}


def escape_controls(data: bytes) -> str:
    """Task output made safe for a terminal: decoded (invalid bytes replaced) with control
    characters shown as `^[`-style caret notation, so a task can never move the cursor, clear
    the screen or retitle the terminal. Newlines and tabs pass through; CRLF stays a newline."""
    return data.decode("utf-8", errors="replace").replace("\r\n", "\n").translate(_CONTROLS)


# -- watch --------------------------------------------------------------------------------------------


def event_line(e: dict[str, Any], tz: tzinfo | None = None) -> str:
    """`18:02:11 task 42 running -> succeeded (exit 0)`, the time in `tz` (default: local, or
    UTC under `--utc`)."""
    moment = parse_time(e["at"]) or datetime.now(UTC)
    clock = moment.astimezone(tz or (UTC if UTC_TIMES else None)).strftime("%H:%M:%S")
    change = (
        f"{e['from_state']} -> {e['to_state']}"
        if e.get("from_state")
        else f"submitted, {e['to_state']}"
    )
    extra = []
    if e.get("exit_code") is not None:
        extra.append(f"exit {e['exit_code']}")
    if e.get("reason") and e["to_state"] != "succeeded":
        extra.append(safe(e["reason"]))
    return f"{clock} task {e['task_id']} [{e.get('queue', '')}] {change}" + (
        f" ({', '.join(extra)})" if extra else ""
    )


def watch_view(tasks: list[dict[str, Any]], queues: list[dict[str, Any]], status: str) -> Any:
    """The live view: recent tasks, queues, and a status line."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, header_style="bold", pad_edge=False, expand=True)
    for name in LIST_HEADER:
        table.add_column(name, no_wrap=name != "COMMAND", overflow="ellipsis")
    for row in task_rows(tasks):
        table.add_row(row[0], Text(row[1], style=STATE_STYLE.get(row[1], "")), *map(Text, row[2:]))
    queue_table = Table(box=None, header_style="bold", pad_edge=False)
    for name in QUEUE_HEADER[:-1]:
        queue_table.add_column(name)
    for row in queue_rows(queues):
        queue_table.add_row(*map(Text, row[:-1]))
    return Group(table, Text(""), queue_table, Text(status, style="dim"))


def console() -> Any:
    return _console()


def _console() -> Any:
    from rich.console import Console

    return Console(no_color=bool(os.environ.get("NO_COLOR")), highlight=False)
