"""Write man/taskctl.1 and man/taskctld.8 from the CLI itself (`make man`).

Every command, option and help text comes from the typer app, so the page cannot drift from the
CLI without tests/test_docs.py noticing. The prose around it (exit status, environment, files,
examples) is here.
"""

from __future__ import annotations

import re
import sys
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "daemon")]

import typer.main  # noqa: E402

from taskctl import __version__  # noqa: E402
from taskctl.cli import build_app  # noqa: E402

DATE = "DATE"  # a placeholder in the pages' text, filled in by `dated`


def esc(text: str) -> str:
    """Escape for roff: backslashes, leading dots and quotes, and hyphens in options."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    lines = [("\\&" + line) if line.startswith((".", "'")) else line for line in text.splitlines()]
    return "\n".join(lines)


def paragraphs(text: str | None) -> str:
    if not text:
        return ""
    blocks = [" ".join(block.split()) for block in text.strip().split("\n\n")]
    return "\n.PP\n".join(esc(b) for b in blocks if b)


def option_lines(command: Any) -> list[str]:
    out: list[str] = []
    for param in command.params:
        if param.param_type_name != "option" or param.hidden:
            continue
        names = ", ".join(f"\\fB{esc(o)}\\fR" for o in [*param.opts, *param.secondary_opts])
        metavar = "" if param.is_flag else f" \\fI{esc(param.metavar or param.name.upper())}\\fR"
        out += [".TP", names + metavar, esc(" ".join((param.help or "").split()))]
    return out


def synopsis(path: str, command: Any) -> str:
    args = " ".join(
        _argument(p.human_readable_name, p.nargs == -1)
        for p in command.params
        if p.param_type_name == "argument"
    )
    return f"\\fBtaskctl {esc(path)}\\fR [\\fIOPTIONS\\fR] {args}".rstrip()


def _argument(name: str, many: bool) -> str:
    """`ID...`: the ellipsis once, whether or not the metavar already has it."""
    dots = "..." if many or name.endswith("...") else ""
    return f"\\fI{esc(name.removesuffix('...'))}\\fR{dots}"


def command_section(path: str, command: Any) -> list[str]:
    out = [f'.SS "{esc(path)}"', synopsis(path, command), ".PP", paragraphs(command.help)]
    options = option_lines(command)
    if options:
        out += [".PP", "Options:", ".RS", *options, ".RE"]
    return out


def walk(group: Any, prefix: str = "") -> list[tuple[str, Any]]:
    found = []
    for name in group.list_commands(None):  # type: ignore[arg-type]
        command = group.get_command(None, name)  # type: ignore[arg-type]
        path = f"{prefix}{name}"
        if hasattr(command, "list_commands"):
            found += walk(command, path + " ")
        else:
            found.append((path, command))
    return found


def taskctl_page() -> str:
    root = typer.main.get_command(build_app())
    commands = walk(root)
    out = [
        f'.TH TASKCTL 1 "{DATE}" "taskctl {__version__}" "User Commands"',
        ".SH NAME",
        "taskctl \\- a task platform for the shell: queue, retry, schedule and watch commands",
        ".SH SYNOPSIS",
        "\\fBtaskctl\\fR \\fICOMMAND\\fR [\\fIOPTIONS\\fR] [\\fB\\-\\-\\fR \\fICMD\\fR [\\fIARG\\fR...]]",
        ".SH DESCRIPTION",
        paragraphs(
            """taskctl talks to taskctld, a daemon that keeps every task in SQLite and runs each
            attempt under supervision: its own process group, stdin from /dev/null, output to log
            files as bytes, with retry policies, timeouts and memory limits. Tasks survive the
            daemon being killed; the next daemon adopts them and records their real exit codes.

            The daemon starts on first use unless TASKCTL_NO_AUTOSTART is set. Every command
            takes --json and then prints exactly one JSON document (NDJSON for streams) on
            standard output; messages for people go to standard error.

            Times for people are shown in the local zone (TZ, else /etc/localtime), as
            2026-11-30 17:22:46+01:00; taskctl --utc COMMAND shows them in UTC. In JSON every time
            is RFC 3339 in UTC with a Z (2026-11-30T16:22:46.123Z), next_due and cron next
            included."""
        ),
        ".SH COMMANDS",
    ]
    for path, command in commands:
        out += command_section(path, command)
    out += [
        ".SH DURATIONS AND SIZES",
        paragraphs(
            "Durations read like 500ms, 30s, 5m, 1h30m, 2d (a bare number is seconds). Sizes read like 512k, 100M, 2G (binary multiples)."
        ),
        ".SH EXIT STATUS",
        ".TP\n0\nSuccess.",
        ".TP\n1\nA task failed (wait, submit \\-\\-wait), or the daemon is unhealthy (health).",
        ".TP\n2\nUsage error or invalid input (a missing working directory, a queue that does not exist, an invalid config.toml when the daemon starts); nothing was changed.",
        ".TP\n3\nThe daemon is not running (health and daemon status say so too) or not reachable, or busy (as many connections as max_connections allows), or it stopped while logs \\-\\-follow followed a task.",
        ".TP\n4\nNo such task, schedule or queue as the object of a command (status 99, queue pause nosuch).",
        ".TP\n5\nConflict: the object's state does not allow it, or an idempotency key belongs to another request.",
        ".TP\n6\nThe state folder is out of space (also from daemon start, and from daemon restart, which then leaves the running daemon in place).",
        ".PP",
        paragraphs(
            """wait and submit --wait exit like the task, as a shell would report it: its exit code,
            124 if it timed out, 128+N if signal N ended it, 127 if it could not start, 143 if it was
            cancelled, 1 if it never ran because a dependency failed, 125 if the wait itself gave up
            (wait --timeout). When a task does not succeed they say why on standard error, one line
            each: "task 7 failed: killed by signal 9 (SIGKILL)", "exit status 3", "timed out after
            30s", "no such program: 'nosuch'". wait and watch carry on across a daemon restart: they
            reconnect to the next daemon and never start one themselves. health never starts the
            daemon: against a stopped one it exits 3."""
        ),
        ".SH ENVIRONMENT",
        ".TP\nTASKCTL_HOME\nPut the socket, database, logs and config in this one folder.",
        ".TP\nTASKCTL_NO_AUTOSTART\nIf set to 1, never start the daemon implicitly.",
        ".TP\nNO_COLOR\nNo colours on a terminal.",
        ".TP\nXDG_RUNTIME_DIR, XDG_STATE_HOME, XDG_CONFIG_HOME\nWhere the socket, state and config live (see FILES).",
        ".PP",
        paragraphs(
            "Each task sees TASKCTL_TASK_ID, TASKCTL_ATTEMPT and TASKCTL_QUEUE; a task fired by a file trigger also sees TASKCTL_CHANGED_PATHS."
        ),
        ".SH FILES",
        ".TP\n$XDG_RUNTIME_DIR/taskctl/taskctld.sock\nThe API socket (fallback /tmp/taskctl\\-$UID/).",
        ".TP\n$XDG_STATE_HOME/taskctl/\nThe database (taskctl.db), task logs (logs/), the daemon log (taskctld.log).",
        ".TP\n$XDG_CONFIG_HOME/taskctl/config.toml\nThe daemon's settings; see taskctld(8).",
        ".SH EXAMPLES",
        ".nf",
        esc(
            """taskctl submit -- make build
taskctl submit --wait --retries 3 --backoff exponential -- ./flaky.sh
taskctl submit --timeout 30m --memory-limit 2G -- ./convert.sh big.mov
taskctl cron add -n backup --tz Europe/Berlin '30 2 * * *' -- ./backup.sh
taskctl trigger add ~/notes --glob '*.md' -- make site
seq 100 | sed 's/^/echo /' | taskctl submit --stdin -q bulk
taskctl list --all --json | jq '.[] | select(.state == "failed") | .id'
taskctl logs -f 42"""
        ),
        ".fi",
        ".SH SEE ALSO",
        "\\fBtaskctld\\fR(8), \\fBcrontab\\fR(5)",
        "",
    ]
    return "\n".join(line for line in out if line is not None)


def taskctld_page() -> str:
    from taskctld.config import Config

    settings = []
    for name, field in Config.model_fields.items():
        line = (Config.__doc__ or "").split(f"    {name} =", 1)
        comment = (
            line[1].splitlines()[0].split("#", 1)[1].strip()
            if len(line) > 1 and "#" in line[1].splitlines()[0]
            else ""
        )
        settings += [".TP", f"\\fB{esc(name)}\\fR", esc(comment or (field.description or ""))]
    out = [
        f'.TH TASKCTLD 8 "{DATE}" "taskctl {__version__}" "System Administration"',
        ".SH NAME",
        "taskctld \\- the taskctl daemon",
        ".SH SYNOPSIS",
        "\\fBtaskctld\\fR [\\fB\\-\\-foreground\\fR] [\\fB\\-\\-version\\fR]",
        ".SH DESCRIPTION",
        paragraphs(
            """taskctld keeps tasks in SQLite (WAL mode), serves a REST API (HTTP/1.1, JSON, /v1) on
            a Unix socket that only its owner may use, and runs each attempt under a supervisor
            process that outlives the daemon: after a crash or a restart the next daemon adopts the
            running tasks and records their real exit codes. Without --foreground it detaches, and
            its first process exits once it is ready (or says why not).

            Endpoints: /v1/tasks, /v1/tasks/batch, /v1/events (NDJSON), /v1/queues, /v1/schedules,
            /v1/summary, /healthz, /readyz, /metrics (Prometheus text), /openapi.json."""
        ),
        ".SH OPTIONS",
        ".TP\n\\fB\\-\\-foreground\\fR\nStay attached and log to standard error (for systemd).",
        ".TP\n\\fB\\-\\-version\\fR\nPrint the version.",
        ".SH CONFIGURATION",
        paragraphs(
            "config.toml (in TASKCTL_HOME, or $XDG_CONFIG_HOME/taskctl/); every key is optional:"
        ),
        *settings,
        ".SH SIGNALS",
        ".TP\nSIGTERM, SIGINT\nStop: running tasks go on and are adopted by the next daemon. A second one forces.",
        ".SH FILES",
        ".TP\ntaskctl.db, taskctl.db\\-wal\nThe store.",
        ".TP\nlogs/TASK.ATTEMPT.out, .err\nTask output, as bytes, capped per attempt.",
        ".TP\nrun/\nSupervisors' identities and journals.",
        ".TP\ntaskctld.log\nThe daemon's log.",
        ".SH SEE ALSO",
        "\\fBtaskctl\\fR(1)",
        "",
    ]
    return "\n".join(out)


def dated(page: str, path: Path) -> str:
    """The page with the date of its last change in `.TH` ("December 7, 2026", a form mandoc
    and groff both parse): the date already in `path` while the rest of the page is the same,
    so regenerating an unchanged page changes nothing, and today's date when it differs."""
    old = path.read_text() if path.exists() else ""
    head = re.compile(r'^(\.TH \S+ \d) "([^"]*)"')
    found = head.match(old)
    kept = found and re.fullmatch(r"[A-Z][a-z]+ \d{1,2}, \d{4}", found.group(2))
    unchanged = kept and head.sub(rf'\1 "{DATE}"', old, count=1) == page
    when = found.group(2) if found and unchanged else _today()
    return head.sub(rf'\1 "{when}"', page, count=1)


def _today() -> str:
    today = date.today()
    return f"{today:%B} {today.day}, {today.year}"


def main() -> int:
    for name, page in (("taskctl.1", taskctl_page()), ("taskctld.8", taskctld_page())):
        path = ROOT / "man" / name
        path.write_text(dated(page, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
