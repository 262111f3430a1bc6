"""The `taskctl` command line: a thin adapter from options to API calls to rendered output.

Start-up time matters (it runs in shell loops), so `main` builds only the command being run:
typer would otherwise inspect every command's signature on every call. The whole app
(`build_app`) serves `--help`, command groups, completions and the man page.

Errors are turned into a message and an exit code here, in one place (see `taskctl.errors`).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import typer

from taskctl import __version__
from taskctl.errors import TaskctlError

HELP = "A task platform for the shell: queue commands, retry them, schedule them, watch them."

# name: (module, function, extra context settings). Order is the order of `--help`.
COMMANDS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "submit": ("taskctl.cli.submit", "submit", {"allow_interspersed_args": False}),
    "list": ("taskctl.cli.tasks", "list_tasks", {}),
    "status": ("taskctl.cli.tasks", "status", {}),
    "logs": ("taskctl.cli.logs", "logs", {}),
    "cancel": ("taskctl.cli.tasks", "cancel", {}),
    "retry": ("taskctl.cli.tasks", "retry", {}),
    "wait": ("taskctl.cli.tasks", "wait", {}),
    "watch": ("taskctl.cli.watch", "watch", {}),
    "health": ("taskctl.cli.health", "health", {}),
    "metrics": ("taskctl.cli.metrics", "metrics", {}),
    "prune": ("taskctl.cli.prune", "prune", {}),
}
GROUPS: dict[str, str] = {
    "cron": "taskctl.cli.cron",
    "trigger": "taskctl.cli.trigger",
    "queue": "taskctl.cli.queue",
    "nodes": "taskctl.cli.nodes",
    "daemon": "taskctl.cli.daemon",
}
_CONTEXT = {"help_option_names": ["-h", "--help"]}


def _function(name: str) -> Callable[..., Any]:
    module, attr, _ = COMMANDS[name]
    function: Callable[..., Any] = getattr(importlib.import_module(module), attr)
    return function


def _class(name: str) -> Any:
    """`submit` reads its words as `cron add` and `trigger add` do (see CommandAfterDashDash)."""
    if name != "submit":
        return None
    from taskctl.cli.options import CommandAfterDashDash

    return CommandAfterDashDash


def _prose(doc: str | None) -> str | None:
    """A docstring as help: paragraphs kept, the line breaks inside each one dropped (typer
    keeps those of all but the first paragraph, which breaks sentences mid-line)."""
    if not doc:
        return None
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(" ".join(p.split()) for p in paragraphs)


def _with_prose_help(app: typer.Typer) -> typer.Typer:
    for info in app.registered_commands:
        if info.help is None and info.callback is not None:
            info.help = _prose(info.callback.__doc__)
    for group in app.registered_groups:
        if group.typer_instance is not None:
            _with_prose_help(group.typer_instance)
    return app


def _version(value: bool) -> None:
    if value:
        print(f"taskctl {__version__}")
        raise typer.Exit()


def build_app() -> typer.Typer:
    """Every command and group: for help, completions and the man page."""
    app = typer.Typer(
        name="taskctl",
        help=HELP,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        context_settings=_CONTEXT,
    )
    for name, (_, _, settings) in COMMANDS.items():
        function = _function(name)
        app.command(
            name, cls=_class(name), context_settings=settings or None, help=_prose(function.__doc__)
        )(function)
    for name, module in GROUPS.items():
        app.add_typer(_with_prose_help(importlib.import_module(module).app), name=name)

    @app.callback()
    def _root(
        version: bool = typer.Option(
            False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
        utc: bool = typer.Option(
            False, "--utc", help="Show times in UTC, not the local zone (--json is always UTC)."
        ),
    ) -> None:
        """A task platform for the shell."""

    return app


def _single_command_app(name: str) -> typer.Typer:
    app = typer.Typer(
        add_completion=False, pretty_exceptions_enable=False, context_settings=_CONTEXT
    )
    function = _function(name)
    app.command(
        name,
        cls=_class(name),
        context_settings=COMMANDS[name][2] or None,
        help=_prose(function.__doc__),
    )(function)
    return app


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["--utc"]:  # before the command, so that its own app need not know it
        from taskctl import render

        render.UTC_TIMES = True
        args = args[1:]
    if "_TASKCTL_COMPLETE" in os.environ:  # a shell asking for completions (or their script)
        from typer.completion import completion_init

        completion_init()
    try:
        if args and args[0] in COMMANDS:
            app, prog = _single_command_app(args[0]), f"taskctl {args[0]}"
            status = app(args=args[1:], prog_name=prog, standalone_mode=False)
        else:
            status = build_app()(args=args, prog_name="taskctl", standalone_mode=False)
    except TaskctlError as e:
        print(f"taskctl: {e.message}", file=sys.stderr)
        sys.exit(e.exit_code)
    except typer.TyperException as e:  # click's usage errors, and ours raised as BadParameter
        _report_usage_error(e)
    except (KeyboardInterrupt, typer.Abort):
        sys.exit(130)
    except BrokenPipeError:
        sys.stderr.close()
        sys.exit(141)
    sys.exit(status if isinstance(status, int) else 0)


def _report_usage_error(e: typer.TyperException) -> NoReturn:
    """One line, as every other error: `taskctl: what is wrong; see taskctl CMD --help`, exit 2
    (typer would draw a box around it, beside the one-line errors of everything else)."""
    if type(e).__name__ == "NoArgsIsHelpError":  # a bare `taskctl cron`: its help is the answer
        print(e.format_message(), file=sys.stderr)
        sys.exit(2)
    lines = [line.strip().rstrip(".") for line in e.format_message().splitlines()]
    message = "; ".join(line for line in lines if line)
    message = message[:1].lower() + message[1:] if message[1:2].islower() else message
    ctx = getattr(e, "ctx", None)
    hint = f"; see {ctx.command_path} --help" if ctx is not None else ""
    print(f"taskctl: {message}{hint}", file=sys.stderr)
    sys.exit(getattr(e, "exit_code", 2))
