"""Generated files stay in step with the CLI, and load where they are meant to."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
import typer.main

from taskctl.cli import build_app

from conftest import TASKCTL, need

ROOT = Path(__file__).resolve().parent.parent
SHELLS = ("bash", "zsh", "fish")


def _commands() -> list[str]:
    root = typer.main.get_command(build_app())
    found = []
    for name in root.list_commands(None):  # type: ignore[attr-defined]
        command = root.get_command(None, name)  # type: ignore[attr-defined]
        subs = command.list_commands(None) if hasattr(command, "list_commands") else []
        found += [f"{name} {sub}" for sub in subs] or [name]
    return found


def _leaf_commands() -> Iterator[tuple[str, click.Command]]:
    """Each command a user runs (`cron add`, `list`), with its click object."""
    root = typer.main.get_command(build_app())
    for path in _commands():
        command = root
        for word in path.split():
            command = command.get_command(None, word)  # type: ignore[attr-defined]
        yield path, command


def test_completion_scripts_match_the_cli(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "completions" / "generate.py"), tmp_path], check=True
    )
    for shell in SHELLS:
        fresh = (tmp_path / f"taskctl.{shell}").read_text()
        assert (ROOT / "completions" / f"taskctl.{shell}").read_text() == fresh, (
            "run `make completions`"
        )
        assert fresh.startswith("#compdef taskctl\n") or shell != "zsh"


def test_zsh_completion_installed_as_the_readme_says_completes(tmp_path: Path) -> None:
    """README: copy it to a folder on $fpath as `_taskctl`, then compinit. compinit registers it
    only when `#compdef` is its first line, and the first TAB runs the file's body."""
    need("zsh")
    (tmp_path / "_taskctl").write_text((ROOT / "completions" / "taskctl.zsh").read_text())
    stubs = "".join(f"{f}() {{ print -r -- $@; }}; " for f in ("_arguments", "_describe"))
    done = subprocess.run(
        [
            "zsh", "-fc",
            f"fpath=({tmp_path} $fpath); autoload -Uz compinit; compinit -u -D; "
            "print -r -- registered=${_comps[taskctl]}; "
            f"words=(taskctl cr); CURRENT=2; {stubs} _taskctl",
        ],
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "registered=_taskctl" in done.stdout.splitlines()
    assert '"cron"' in done.stdout  # completed on the first TAB


def test_completion_completes_the_current_commands() -> None:
    def complete(words: str) -> list[str]:
        env = {
            **os.environ,
            "COMP_WORDS": words,
            "COMP_CWORD": str(len(words.split(" ")) - 1),
            "_TASKCTL_COMPLETE": "complete_bash",
        }
        return subprocess.run(
            [TASKCTL], env=env, capture_output=True, text=True, check=True
        ).stdout.split()

    assert complete("taskctl cr") == ["cron"]
    assert "--retry-on" in complete("taskctl submit --retry")
    assert set(complete("taskctl queue ")) >= {"list", "set", "pause", "resume"}


@pytest.mark.parametrize(
    ("shell", "load"),
    [
        ("bash", "source completions/taskctl.bash; complete -p taskctl"),
        (
            "zsh",
            "autoload -Uz compinit; compinit -u; source completions/taskctl.zsh; print -r -- ${_comps[taskctl]}",
        ),
        (
            "fish",
            "source completions/taskctl.fish; complete --do-complete 'taskctl cr' >/dev/null; complete -c taskctl",
        ),
    ],
)
def test_completion_scripts_load_in_their_shells(shell: str, load: str) -> None:
    need(shell)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "HOME": str(ROOT / ".venv"),
    }
    done = subprocess.run(
        [shell, "-c", load], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "taskctl" in done.stdout


def test_man_pages_match_the_cli(tmp_path: Path) -> None:
    before = {p: (ROOT / "man" / p).read_text() for p in ("taskctl.1", "taskctld.8")}
    subprocess.run([sys.executable, str(ROOT / "man" / "generate.py")], check=True)
    after = {p: (ROOT / "man" / p).read_text() for p in before}
    assert before == after, "run `make man`"


def test_mandoc_lint_finds_nothing_to_warn_about() -> None:
    need("mandoc")
    pages = [str(ROOT / "man" / p) for p in ("taskctl.1", "taskctld.8")]
    done = subprocess.run(
        ["mandoc", "-T", "lint", "-W", "warning", *pages], capture_output=True, text=True
    )
    assert done.stdout + done.stderr == "", done.stdout + done.stderr


def test_the_man_page_renders_every_command() -> None:
    need("man")
    rendered = subprocess.run(
        ["man", "-l", str(ROOT / "man" / "taskctl.1")],
        capture_output=True,
        text=True,
        env={**os.environ, "MANWIDTH": "100"},
        check=True,
    ).stdout
    headings = set(re.findall(r"^   ([a-z][a-z ]+)$", rendered, re.MULTILINE))
    assert set(_commands()) <= headings, set(_commands()) - headings
    for section in ("EXIT STATUS", "ENVIRONMENT", "FILES", "EXAMPLES"):
        assert section in rendered
    daemon_page = subprocess.run(
        ["man", "-l", str(ROOT / "man" / "taskctld.8")], capture_output=True, text=True, check=True
    ).stdout
    assert "concurrency" in daemon_page and "--foreground" in daemon_page


def test_every_command_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    for command in {c.split()[0] for c in _commands()}:
        assert f"taskctl {command}" in readme, command


def test_every_command_has_help() -> None:
    for path, command in _leaf_commands():
        assert command.help and len(command.help) > 10, path


def test_every_command_has_json() -> None:
    """DESIGN: every command has --json (exactly one JSON document on stdout)."""
    missing = [
        path
        for path, command in _leaf_commands()
        if not any("--json" in param.opts for param in command.params)
    ]
    assert not missing, f"no --json: {missing}"


def test_every_option_and_argument_names_what_it_takes() -> None:
    """Help and the man page show `--timeout DURATION`, `ID...`, never a bare type like `<str>`."""
    missing = []
    for path, command in _leaf_commands():
        for param in command.params:
            is_flag = getattr(param, "is_flag", False) or getattr(param, "count", False)
            if not is_flag and param.name != "help" and not param.metavar:
                missing.append(f"{path} {param.opts[-1]}")
    assert not missing, f"no metavar: {missing}"


def test_the_readme_pipelines_into_submit_stdin_make_commands() -> None:
    """`seq 1000 | sed ... | taskctl submit --stdin`: what feeds taskctl runs and gives lines."""
    readme = (ROOT / "README.md").read_text()
    feeds = [
        line.split("| taskctl submit --stdin")[0].rpartition(";")[2].strip()
        for line in readme.splitlines()
        if "| taskctl submit --stdin" in line
    ]
    assert feeds
    for feed in feeds:
        done = subprocess.run(["bash", "-c", feed], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0 and not done.stderr, (feed, done.stderr)
        assert done.stdout and all(line.strip() for line in done.stdout.splitlines()), feed
