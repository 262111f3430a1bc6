"""The shape of the code: which way imports point, and what the CLI's start-up pulls in."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_cli_package_never_imports_the_daemon() -> None:
    for path in (ROOT / "taskctl").rglob("*.py"):
        bad = {name for name in _imports(path) if name.split(".")[0] == "taskctld"}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_only_the_store_speaks_sql() -> None:
    for path in (ROOT / "daemon" / "taskctld").rglob("*.py"):
        if "store" in path.parts:
            continue
        bad = {name for name in _imports(path) if name in ("sqlite3", "sqlite_utils", "psycopg")}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_submit_does_not_load_pydantic_rich_or_an_http_library() -> None:
    code = (
        "import sys; sys.argv = ['taskctl', 'submit', '--help'];"
        "from taskctl.cli import _single_command_app;"
        "app = _single_command_app('submit');"
        "import typer.main; typer.main.get_command(app);"
        "print(' '.join(sorted(m for m in sys.modules)))"
    )
    loaded = set(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.split()
    )
    heavy = {
        "pydantic",
        "rich",
        "fastapi",
        "http.client",
        "email",
        "asyncio",
        "taskctl.api",
        "taskctl.render",
    }
    assert not heavy & loaded, heavy & loaded
