"""The daemon's layers as tests that fail: HTTP routers call services and never what is below
them; services know nothing of HTTP; `app.py` wires by constructor only. Then the composition
root itself, built on a fake clock: time in every service is the clock it was given."""

from __future__ import annotations

import ast
import asyncio
from collections.abc import Iterator
from pathlib import Path

from clocks import ManualClock

from taskctl.api import ScheduleSpec, TaskSpec, TaskState
from taskctl.paths import Paths
from taskctl.units import ms_to_rfc3339
from taskctld.app import compose
from taskctld.config import Config

ROOT = Path(__file__).resolve().parent.parent
DAEMON = ROOT / "daemon" / "taskctld"
HTTP_MODULES = [*sorted((DAEMON / "http").glob("*.py")), DAEMON / "server.py"]
BELOW_THE_SERVICES = {"store", "hub", "metrics"}  # what a router must not reach for


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def _imports(tree: ast.Module) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"


def test_http_modules_exist() -> None:
    assert len(HTTP_MODULES) > 5, HTTP_MODULES  # the glob above must not go blind


def test_routers_never_import_the_store() -> None:
    for path in HTTP_MODULES:
        bad = {
            name
            for name in _imports(_tree(path))
            if name == "taskctld.store" or name.startswith("taskctld.store.")
        }
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_routers_never_reach_below_the_services() -> None:
    for path in HTTP_MODULES:
        tree = _tree(path)
        reached = [
            f"{_where(path, node)}: .{node.attr}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr in BELOW_THE_SERVICES
        ]
        assert not reached, reached


def test_services_know_nothing_of_http() -> None:
    for path in sorted((DAEMON / "services").glob("*.py")):
        bad = {
            name
            for name in _imports(_tree(path))
            if name.split(".")[0] in ("fastapi", "starlette", "uvicorn")
            or name.startswith(("taskctld.http", "taskctld.server"))
        }
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_the_composition_root_wires_by_constructor_only() -> None:
    """No `runner.report = dispatcher.report` after construction, nor observers appended to
    a built object's list: every collaborator is a constructor argument."""
    path = DAEMON / "app.py"
    wired = []
    for node in ast.walk(_tree(path)):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        wired += [_where(path, node) for t in targets if isinstance(t, ast.Attribute)]
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("append", "extend", "add", "insert")
            and isinstance(node.func.value, ast.Attribute)
        ):
            wired.append(_where(path, node))
    assert not wired, f"attributes set after construction at {wired}"


# -- the composition on a fake clock ----------------------------------------------------------------

T0 = 1_900_000_000_000  # 2030-03-17T17:46:40Z
HOUR = 3_600_000


def test_services_take_time_from_the_clock_they_are_given(tmp_path: Path) -> None:
    """Built by `app.compose` as the daemon builds them, but with no supervisor (nothing
    starts) and a clock the test moves: delays, cancels, cron times and retention all count
    from it."""
    paths = Paths(runtime=tmp_path, state=tmp_path, config_file=tmp_path / "config.toml")
    paths.logs.mkdir()
    clock = ManualClock(T0)

    async def scenario() -> None:
        core, services = compose(paths, Config(retention=3600), 0.0, asyncio.Event(), clock=clock)
        try:
            (done,) = services.submissions.submit([TaskSpec(command=["true"], cwd="/", delay=90)])
            task = services.tasks.task(done.task_id)
            assert (task.state, task.created_at, task.run_at) == (
                TaskState.SCHEDULED,
                T0,
                T0 + 90_000,
            )
            assert (await services.tasks.cancel(task.id)).finished_at == T0

            spec = ScheduleSpec(
                kind="cron", cron="0 * * * *", tz="UTC", task=TaskSpec(command=["true"], cwd="/")
            )
            name = services.schedules.add(spec).name or ""
            first = ms_to_rfc3339(T0 - T0 % HOUR + HOUR)
            assert services.schedules.next_fires(name, 1, None) == [first]

            clock.set(T0 + HOUR - 1)  # not yet older than the retention of an hour
            assert (await services.retention.prune())["tasks"] == 0
            clock.set(T0 + HOUR + 1)
            assert (await services.retention.prune())["tasks"] == 1
        finally:
            core.triggers.close()
            core.store.close()

    asyncio.run(scenario())
