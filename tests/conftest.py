"""Test harness: a real taskctld in a temporary TASKCTL_HOME, driven through the real `taskctl`.

Homes live directly under /tmp with short names: a Unix socket path must fit in about 100 bytes.
Nothing here sleeps for a fixed time: `wait_until` polls a condition against a deadline.
Teardown kills the daemon and every process that carries the home in its environment (tasks
inherit it), so one test's leftovers never leak into the next.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from taskctld import containment
from taskctld.store import TaskRow

import pgcluster

BIN = Path(sys.executable).parent
TASKCTL = str(BIN / "taskctl")
TASKCTLD = str(BIN / "taskctld")
FINAL = ("succeeded", "failed", "cancelled")


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Return the first truthy value of `predicate()`; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        time.sleep(interval)


def need(*tools: str) -> None:
    """Skip the calling test when a program it drives is not installed, with one line naming it
    (pytest folds the skips of every test that lacks it into that line). `make test` installs
    nothing; `.ci/run` installs them all (`.ci/tools`) and fails when any test was skipped."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (.ci/tools installs it)")


def need_root(purpose: str) -> None:
    """Skip the calling test when it does not run as root, with one line naming what root is
    for (`purpose`: "to mount a tmpfs", say). An ordinary user's `make test` skips these;
    `.ci/run` runs as root and fails when any test was skipped, so CI still runs them all."""
    if os.geteuid() != 0:
        pytest.skip(f"needs root {purpose} (.ci/run runs as root)")


class ScriptedRunner:
    """The dispatcher's runner (`dispatcher.Launcher`) for unit tests, without a supervisor:
    records what the dispatcher asked of it; the test scripts the supervisor's reports. `up`
    False: no supervisor takes work."""

    def __init__(self) -> None:
        self.asked: list[tuple[object, ...]] = []
        self.up = True

    def ready(self) -> bool:
        return self.up

    def runs_on_current(self, key: tuple[int, int]) -> bool:
        return True

    def start(self, task: TaskRow, env: object) -> None:
        self.asked.append(("start", task.id))

    def hold(self, task: TaskRow, env: object, after: tuple[int, int], token: int) -> bool:
        self.asked.append(("hold", task.id, after))
        return True

    def unhold(self, key: tuple[int, int], token: int) -> None:
        self.asked.append(("unhold", *key))

    def stop(self, task_id: int, attempt: int, kind: str) -> bool:
        self.asked.append(("stop", task_id, attempt, kind))
        return True

    def committed(self) -> None:
        pass

    def forget(self, task_id: int, attempt: int) -> None:
        pass

    def started(self) -> list[object]:
        """The task ids handed over to start, in order."""
        return [asked[1] for asked in self.asked if asked[0] == "start"]


def http_get(sock_path: str, path: str) -> tuple[int, bytes]:
    """A plain HTTP/1.1 GET over the Unix socket: curl when installed, else a raw socket."""
    if shutil.which("curl"):
        out = subprocess.run(
            [
                "curl",
                "-sS",
                "--unix-socket",
                sock_path,
                "-w",
                "\n%{http_code}",
                f"http://taskctl{path}",
            ],
            capture_output=True,
            timeout=30,
            check=True,
        ).stdout
        body, _, status = out.rpartition(b"\n")
        return int(status), body
    return socket_get(sock_path, path)


def socket_get(sock_path: str, path: str) -> tuple[int, bytes]:
    """A GET over the Unix socket from this process (no program started)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(sock_path)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        body = _unchunk(body)
    return int(head.split()[1]), body


def _unchunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, body = out + body[:size], body[size + 2 :]
    return out


def figure(label: str, value: Any) -> None:
    """Print a measured figure (`pytest -s -p no:xdist -k ...` shows them): closing notes quote
    what the tests measured, not only that they passed."""
    print(f"figure: {label}: {value}")


def processes_with_env(key: str, value: str) -> list[int]:
    """Pids whose environment has key=value (ours only; unreadable ones are skipped)."""
    needle = f"{key}={value}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in env and state != "Z":
            found.append(int(entry))
    return found


# The store every `home` fixture's daemon uses: SQLite in the home, or with
# TASKCTL_TEST_BACKEND=postgresql (`make test-postgresql`) a fresh database of the tests' own
# PostgreSQL, so that the end-to-end suite runs once per backend.
BACKEND = os.environ.get("TASKCTL_TEST_BACKEND", "sqlite")


class Home:
    """One isolated taskctl installation: a folder, its daemon, and a CLI bound to it.
    `base`: config.toml settings that every `config` call keeps (the store to use)."""

    def __init__(self, path: Path, base: dict[str, Any] | None = None) -> None:
        self.path = path
        self.base = dict(base or {})
        self.env = {**os.environ, "TASKCTL_HOME": str(path), "TASKCTL_NO_AUTOSTART": "1"}
        self.env.pop("NO_COLOR", None)

    # -- the CLI ----------------------------------------------------------------------------

    def run(
        self,
        *args: str,
        input: str | None = None,
        timeout: float = 60,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [TASKCTL, *args],
            env={**self.env, **(env or {})},
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def ok(self, *args: str, **kw: Any) -> str:
        done = self.run(*args, **kw)
        assert done.returncode == 0, f"taskctl {' '.join(args)} -> {done.returncode}: {done.stderr}"
        return done.stdout

    def json(self, *args: str, **kw: Any) -> Any:
        """Run with --json (placed before a `--`, so it is not taken for the command's)."""
        words = list(args)
        at = words.index("--") if "--" in words else len(words)
        return json.loads(self.ok(*words[:at], "--json", *words[at:], **kw))

    # -- the API, for waiting ---------------------------------------------------------------

    def api(self, path: str) -> Any:
        """GET `path` (JSON) from the daemon's socket, in this process. For the conditions a
        test waits on: a poll through the CLI costs a Python start each look (0.2 s of CPU),
        and what a test checks is still read through the CLI once the wait is over."""
        status, body = socket_get(str(self.path / "taskctld.sock"), path)
        assert status == 200, (path, status, body[:200])
        return json.loads(body)

    def api_task(self, task_id: int) -> dict[str, Any]:
        """The task as `status --json` shows it, read from the socket (for waiting)."""
        task: dict[str, Any] = self.api(f"/v1/tasks/{task_id}")
        return task

    def submit(self, *command: str, options: tuple[str, ...] = ()) -> int:
        return int(self.ok("submit", *options, "--", *command).strip())

    def task(self, task_id: int) -> dict[str, Any]:
        return self.json("status", str(task_id))

    def tasks(self, ids: list[int]) -> list[dict[str, Any]]:
        """Several tasks by id, in that order, read with one `list` (not one `status` each)."""
        listed = {t["id"]: t for t in self.json("list", "-n", "100000")}
        return [listed[i] for i in ids]

    def wait_final(self, task_id: int, timeout: float = 20) -> dict[str, Any]:
        return self.wait_all_final([task_id], timeout)[0]

    def wait_all_final(self, ids: list[int], timeout: float = 60) -> list[dict[str, Any]]:
        """Until every one of `ids` is final; then them, in that order. One `taskctl wait`
        (the daemon answers when a task changes), not a `status` poll each."""
        words = ("wait", "--json", "--timeout", f"{timeout}s", *map(str, ids))
        done = self.run(*words, timeout=timeout + 30)  # its exit code says how they ended
        assert done.stdout, f"taskctl wait -> {done.returncode}: {done.stderr}"
        answer = json.loads(done.stdout)
        tasks = answer if isinstance(answer, list) else [answer]
        states = [t["state"] for t in tasks]
        assert len(tasks) == len(ids) and set(states) <= set(FINAL), (states, timeout)
        return tasks

    def wait_streams(self, n: int = 1) -> None:
        """Until `n` watch or logs --follow streams are connected to the daemon."""
        wait_until(lambda: self.api("/healthz")["streams"] >= n)

    def wait_watching(self, folder: Path, watches: int = 1) -> None:
        """Until the daemon holds `watches` inotify watches on `folder` (1: a file trigger is
        armed; 0: it let go)."""
        needle = f"ino:{folder.stat().st_ino:x} "
        fdinfo = Path(f"/proc/{self.daemon_pid()}/fdinfo")

        def count() -> int:
            found = 0
            for entry in fdinfo.iterdir():
                with contextlib.suppress(OSError):
                    found += entry.read_text().count(needle)
            return found

        wait_until(lambda: count() == watches)

    def config(self, **settings: Any) -> None:
        lines = [f"{k} = {_toml(v)}" for k, v in {**self.base, **settings}.items()]
        (self.path / "config.toml").write_text("\n".join(lines) + "\n")

    # -- the daemon -------------------------------------------------------------------------

    def start(self) -> int:
        self.ok("daemon", "start")
        return self.daemon_pid()

    def daemon_pid(self) -> int:
        return int(self.json("daemon", "status")["pid"])

    def kill9(self) -> None:
        pid = self.daemon_pid()
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not _alive(pid), 10)

    def stop(self) -> None:
        self.run("daemon", "stop")

    def task_processes(self) -> list[int]:
        return processes_with_env("TASKCTL_HOME", str(self.path))

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            lock = (self.path / "taskctld.lock").read_text().strip()
            if lock:
                os.kill(int(lock), signal.SIGKILL)
        for pid in self.task_processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        cgroups = containment.home_path(self.path)
        if cgroups is not None and cgroups.is_dir():
            containment.end(cgroups)


def _toml(value: Any) -> str:
    """A config value as TOML: JSON's form, but a table inline as TOML writes it."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


@contextlib.contextmanager
def small_disk(home: Home, size: str = "16m") -> Iterator[None]:
    """The home's folder on a small tmpfs of its own, so that a test can fill it; skipped
    (one line) without root, which mounting needs. Unmounted after the home's cleanup."""
    need_root("to mount a tmpfs as the home")
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(home.path)]
    subprocess.run(mount, check=True)
    try:
        yield
    finally:
        home.cleanup()
        subprocess.run(["umount", "-l", str(home.path)], check=False)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return False


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes minutes of real time (runs first)")
    config.addinivalue_line(
        "markers", "sqlite_only: about the SQLite store itself (not run on PostgreSQL)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow tests first, so that with several workers they overlap with everything else. With
    TASKCTL_TEST_BACKEND=postgresql, only the tests that start a daemon (the end-to-end suite)
    run, less those about SQLite itself (`sqlite_only`): deselected, not skipped."""
    if BACKEND == "postgresql":
        keep = [
            item
            for item in items
            if "home" in getattr(item, "fixturenames", ())
            and item.get_closest_marker("sqlite_only") is None
        ]
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def pg_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pgcluster.Cluster]:
    """A throwaway PostgreSQL server for this test process (each xdist worker has its own);
    the tests that need one are skipped, with a line naming what to install, where the
    machine has no PostgreSQL server binaries."""
    if pgcluster.server_bindir() is None:
        pytest.skip(f"needs {pgcluster.INSTALL}")
    root = Path(tempfile.mkdtemp(prefix="pg", dir="/tmp"))
    with pgcluster.running_cluster(root) as cluster:
        yield cluster


@pytest.fixture
def pg_url(pg_cluster: pgcluster.Cluster) -> str:
    """A fresh, empty database on the tests' own cluster."""
    return pg_cluster.new_database()


@pytest.fixture
def home(request: pytest.FixtureRequest) -> Iterator[Home]:
    """A fresh home with no daemon running yet (on the backend `BACKEND` says)."""
    path = Path(tempfile.mkdtemp(prefix="tc", dir="/tmp"))
    h = Home(path)
    if BACKEND == "postgresql":
        cluster: pgcluster.Cluster = request.getfixturevalue("pg_cluster")
        h = Home(path, base={"store": cluster.new_database(), "node": "n1"})
        h.config()
    try:
        yield h
    finally:
        h.cleanup()
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(home: Home) -> Home:
    """A home with its daemon started."""
    home.start()
    return home


@pytest.fixture
def small_home(home: Home) -> Iterator[Home]:
    """A home on a 16 MiB tmpfs (see `small_disk`), its daemon started."""
    with small_disk(home):
        home.start()
        yield home
