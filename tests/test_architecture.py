"""The shape of the code: which way imports point, and what the CLI's start-up pulls in."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from taskctl.api import TaskState

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


# -- no state decided in the store ----------------------------------------------------------------

_STATE_VALUES = "|".join(sorted(s.value for s in TaskState))
_STATE_LITERAL = re.compile(rf"""['"]({_STATE_VALUES})['"]""")
_WRITE = re.compile(r"\b(UPDATE|INSERT)\b", re.IGNORECASE)
_WRITE_TASKS = re.compile(r"\b(UPDATE|INSERT\s+(OR\s+\w+\s+)?INTO)\s+tasks\b", re.IGNORECASE)
_HOLE = "\x00"  # stands for an interpolated value of an f-string


def _text(node: ast.expr) -> str | None:
    """The text of a string expression: a literal, an f-string (a `TaskState` inside one counts
    as a state literal), or a `+` of those; None for anything else."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts = []
        for value in node.values:
            if isinstance(value, ast.Constant):
                parts.append(str(value.value))
            elif "TaskState" in ast.unparse(value):
                parts.append(f"'{TaskState.QUEUED.value}'")
            else:
                parts.append(_HOLE)
        return "".join(parts)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _text(node.left), _text(node.right)
        if left is not None or right is not None:
            return (left or _HOLE) + (right or _HOLE)
    return None


def _strings(scope: ast.AST) -> list[tuple[int, str]]:
    """Every maximal string expression in `scope`, not counting nested functions."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                continue
            text = _text(child) if isinstance(child, ast.expr) else None
            if text is not None:
                found.append((child.lineno, text))
            else:
                visit(child)

    visit(scope)
    return found


def state_writes(source: str) -> list[str]:
    """Where `source` decides a task's state in SQL outside a function named `move`: a task
    state literal in the text of an UPDATE or INSERT statement (its WHERE and its SELECT
    included), or anywhere in a function that writes the tasks table (a state chosen in one
    string and spliced into the statement's). The schema's own statements (a partial index on
    a state) are not writes."""
    tree = ast.parse(source)
    scopes: list[tuple[str, ast.AST]] = [("<module>", tree)]
    scopes += [
        (node.name, node)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    ]
    found = []
    for name, scope in scopes:
        if name == "move":
            continue
        strings = _strings(scope)
        writes_tasks = name != "<module>" and any(_WRITE_TASKS.search(t) for _, t in strings)
        for line, text in strings:
            for statement in text.split(";"):
                literal = _STATE_LITERAL.search(statement)
                if literal and (writes_tasks or _WRITE.search(statement)):
                    found.append(f"line {line}, in {name}: {literal[0]} in {statement.strip()!r}")
    return found


def test_no_task_state_is_written_in_sql_outside_move() -> None:
    """The store carries out state changes; the lifecycle decides them. So the only SQL that
    names a state when writing is `move`'s (and it names none: the states are parameters)."""
    modules = sorted((ROOT / "daemon" / "taskctld" / "store").rglob("*.py"))
    assert modules
    moves = 0
    for path in modules:
        source = path.read_text()
        moves += source.count("def move(")
        found = state_writes(source)
        assert not found, f"{path.relative_to(ROOT)}: " + "; ".join(found)
    assert moves >= 1  # the check looked where the state changes are


def test_the_state_write_check_sees_a_conditional_update() -> None:
    """The check itself, on the shape it is there to catch: a conditional UPDATE on a state
    outside `move` (the store's `record_stray_start` before the lifecycle took it over)."""
    source = """
def record_stray_start(self, task_id, attempt, pid, started_at):
    if not self.conn.execute(
        "UPDATE tasks SET attempts = ? WHERE id = ? AND state = 'cancelled' AND attempts = ?",
        (attempt, task_id, attempt - 1),
    ).rowcount:
        return False

def move(self, task_id, old, new):
    self.conn.execute("UPDATE tasks SET state = 'queued' WHERE id = ?", (task_id,))

def promote(self, now):
    due = self.conn.execute("SELECT id FROM tasks WHERE state = 'scheduled'").fetchall()
    self.conn.execute("UPDATE tasks SET run_at = ? WHERE id = ?", (now, due[0]))

def publish(self, conn):
    state = f"CASE WHEN run_at > :now THEN '{TaskState.SCHEDULED.value}' ELSE ? END"
    conn.execute("INSERT INTO tasks (state) SELECT " + state + " FROM staging")

def read(self):
    return self.conn.execute("SELECT count(*) FROM tasks WHERE state = 'queued'")
"""
    found = state_writes(source)
    assert [f.split(":")[0] for f in found] == [
        "line 4, in record_stray_start",
        "line 13, in promote",
        "line 17, in publish",
    ], found
