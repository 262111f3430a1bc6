"""Only the owner gets in, secrets stay hidden, and no input brings the daemon down."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from taskctl.paths import Paths

from conftest import TASKCTL, TASKCTLD, Home, figure, http_get, need_root, wait_until

NOBODY = 65534


def _as_other_user(action: object) -> tuple[int, str]:
    """Run `action()` in a forked child that became uid 65534; its exit code and output."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 1
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            result = action()  # type: ignore[operator]
            os.write(w, str(result).encode())
            code = 0
        except BaseException as e:
            os.write(w, repr(e).encode())
        finally:
            os._exit(code)
    os.close(w)
    out = b""
    while chunk := os.read(r, 4096):
        out += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    return os.WEXITSTATUS(status), out.decode()


@pytest.fixture
def needs_root() -> None:
    need_root("to change uid")


def _say_once(sock_path: str, message: bytes) -> str:
    """Connect, send `message`, and return what came back first (or the error)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(sock_path)
        with contextlib.suppress(OSError):
            s.sendall(message)
        try:
            return repr(s.recv(65536))
        except OSError as e:
            return f"error {e.errno}"


def test_another_user_is_refused_even_with_open_permissions(daemon: Home, needs_root: None) -> None:
    sock_path = str(daemon.path / "taskctld.sock")
    os.chmod(daemon.path, 0o777)
    os.chmod(sock_path, 0o777)
    request = b"GET /v1/tasks HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    code, out = _as_other_user(lambda: _say_once(sock_path, request))
    assert code == 0, out
    assert "HTTP" not in out  # no answer at all: the connection was dropped
    log = (daemon.path / "taskctld.log").read_text()
    assert f"refused a connection from uid {NOBODY}" in log
    assert daemon.json("health")["status"] == "ok"  # and the owner still gets in


def test_a_socket_planted_by_another_user_is_refused_by_the_cli(
    home: Home, needs_root: None
) -> None:
    os.chmod(home.path, 0o777)
    ready = home.path / "ready"

    def plant() -> str:
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(home.path / "taskctld.sock"))
        server.listen(1)
        ready.touch()
        server.settimeout(10)
        with contextlib.suppress(OSError):
            conn, _ = server.accept()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]")
            conn.recv(1)  # held open until the client hangs up
        return "done"

    planter = threading.Thread(target=lambda: _as_other_user(plant), daemon=True)
    planter.start()
    wait_until(ready.exists)
    done = home.run("list")
    assert done.returncode == 3
    assert "uid 65534" in done.stderr and "planted" in done.stderr
    planter.join(timeout=15)


def test_the_daemon_refuses_a_runtime_folder_owned_by_someone_else(
    home: Home, needs_root: None
) -> None:
    os.chown(home.path, NOBODY, NOBODY)
    done = subprocess.run(
        [TASKCTLD, "--foreground"], env=home.env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 1 and "belongs to uid 65534" in done.stderr
    os.chown(home.path, 0, 0)


def test_the_fallback_folder_in_tmp_resists_a_symlink(tmp_path: Path) -> None:
    runtime = tmp_path / "xdg"  # XDG_RUNTIME_DIR unset uses /tmp/taskctl-UID: same check
    target = tmp_path / "elsewhere"
    target.mkdir()
    runtime.mkdir()
    (runtime / "taskctl").symlink_to(target)
    env = {k: v for k, v in os.environ.items() if k != "TASKCTL_HOME"}
    env.update(
        XDG_RUNTIME_DIR=str(runtime),
        XDG_STATE_HOME=str(tmp_path / "state"),
        XDG_CONFIG_HOME=str(tmp_path / "cfg"),
    )
    done = subprocess.run(
        [TASKCTLD, "--foreground"], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 1 and "symlink" in done.stderr
    assert not list(target.iterdir())


def test_without_taskctl_home_everything_goes_where_xdg_says() -> None:
    """What a user gets: the CLI starts the daemon on first use, socket under the runtime
    folder, database and logs under the state folder, config read from the config folder."""
    root = Path(tempfile.mkdtemp(prefix="tcx", dir="/tmp"))  # short: AF_UNIX paths are short
    runtime, state, config = root / "run", root / "state", root / "config"
    (config / "taskctl").mkdir(parents=True)
    (config / "taskctl" / "config.toml").write_text("concurrency = 3\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TASKCTL_", "XDG_"))}
    env.update(
        HOME=str(root), XDG_RUNTIME_DIR=str(runtime), XDG_STATE_HOME=str(state),
        XDG_CONFIG_HOME=str(config),
    )  # fmt: skip
    try:
        done = subprocess.run(
            [TASKCTL, "submit", "--wait", "--", "sh", "-c", "echo out; echo err >&2"], env=env, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert stat.S_ISSOCK((runtime / "taskctl" / "taskctld.sock").stat().st_mode)
        assert (state / "taskctl" / "taskctl.db").is_file()
        assert {p.suffix for p in (state / "taskctl" / "logs").iterdir()} == {".out", ".err"}
        for folder in (runtime / "taskctl", state / "taskctl"):
            assert folder.stat().st_mode & 0o777 == 0o700, folder
        health = subprocess.run(
            [TASKCTL, "health", "--json"], env=env, capture_output=True, text=True, timeout=60
        )
        assert json.loads(health.stdout)["concurrency"] == 3  # the XDG config was read
    finally:
        subprocess.run([TASKCTL, "daemon", "stop"], env=env, capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def test_without_xdg_the_socket_falls_back_to_a_folder_of_the_user_in_tmp() -> None:
    paths = Paths.from_env({"HOME": "/home/ann"})
    assert paths.socket == Path(f"/tmp/taskctl-{os.getuid()}/taskctld.sock")
    assert paths.database == Path("/home/ann/.local/state/taskctl/taskctl.db")
    assert paths.config_file == Path("/home/ann/.config/taskctl/config.toml")


@pytest.mark.sqlite_only  # the database file is SQLite's
def test_state_files_are_private(daemon: Home) -> None:
    daemon.wait_final(daemon.submit("sh", "-c", "echo out; echo err >&2"))
    for path in [
        daemon.path / "taskctl.db",
        daemon.path / "taskctl.db-wal",
        *(daemon.path / "logs").iterdir(),
    ]:
        assert path.stat().st_mode & 0o077 == 0, path
    for folder in (daemon.path, daemon.path / "logs", daemon.path / "run"):
        assert folder.stat().st_mode & 0o777 == 0o700, folder


def test_secrets_in_the_environment_are_never_shown_unless_asked(daemon: Home) -> None:
    task_id = int(daemon.ok("submit", "--", "true", env={"SECRET": "hunter2"}).strip())
    daemon.wait_final(task_id)
    for args in (
        ["status", str(task_id), "--json"],
        ["list", "--json"],
        ["status", str(task_id)],
        ["list"],
    ):
        assert "hunter2" not in daemon.ok(*args), args
    assert "hunter2" not in (daemon.path / "taskctld.log").read_text()
    shown = daemon.json("status", str(task_id), "--show-env")
    assert shown["env"]["SECRET"] == "hunter2"


def _post(sock_path: str, path: str, body: bytes, extra: str = "") -> tuple[int, dict]:
    head = f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n"
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(sock_path)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(head.encode() + body)  # the daemon may answer (413) and close early
        raw = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                raw += chunk
    head_bytes, _, payload = raw.partition(b"\r\n\r\n")
    return int(head_bytes.split()[1]), json.loads(payload or b"{}")


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b'{"command": ["true"], "timeout": NaN}', "NaN"),
        (b'{"command": ["true"], "priority": Infinity}', "NaN"),
        (b'{"command": ["true"], "labels": ' + b'{"a": ' * 40 + b"1" + b"}" * 40 + b"}", "deeper"),
        (b'{"command": ["\xff\xfe"]}', "UTF-8"),
        (b'{"command": ["true"], "commnd": 1}', "commnd"),
        (b'{"command": ["tr\\u0000ue"]}', "NUL"),
        (b'{"command": ["true"], "name": "a\\u0000b"}', "NUL"),
        (b'{"command": ["true"], "key": "k\\u0000"}', "NUL"),
        (b'{"command": ["true"], "labels": {"a": "\\u0000"}}', "NUL"),
        (b'{"command": ["true"], "cwd": "relative/dir"}', "absolute"),
        (b'{"command": ["x' + b"a" * 200_000 + b'"]}', "bytes"),
        (b"[" * 100_000, "deeper"),
    ],
)
def test_bad_requests_are_refused_with_a_4xx_json_error(
    daemon: Home, body: bytes, words: str
) -> None:
    status, reply = _post(str(daemon.path / "taskctld.sock"), "/v1/tasks", body)
    assert 400 <= status < 500, (status, reply)
    assert words in reply["error"]["message"], reply
    assert daemon.json("list") == []


def test_oversized_bodies_and_unknown_query_parameters_are_refused(daemon: Home) -> None:
    sock = str(daemon.path / "taskctld.sock")
    status, reply = _post(
        sock, "/v1/tasks", b'{"command": ["true"], "name": "' + b"x" * (2 << 20) + b'"}'
    )
    assert status == 413 and reply["error"]["code"] == "too_large"
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(sock)
        s.sendall(b"GET /v1/tasks?limt=5 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    assert raw.split()[1] == b"400" and b"limt" in raw


def test_a_request_over_the_connection_cap_gets_a_json_503_and_the_cli_exits_3(
    home: Home,
) -> None:
    home.config(max_connections=2)
    home.start()
    sock = str(home.path / "taskctld.sock")
    with contextlib.ExitStack() as held:
        for _ in range(2):  # idle connections count against the cap until request_timeout
            s = held.enter_context(socket.socket(socket.AF_UNIX))
            s.connect(sock)
        status, reply = _post(sock, "/v1/tasks", b'{"command": ["true"]}')
        assert status == 503 and reply["error"]["code"] == "unavailable", reply
        assert "max_connections" in reply["error"]["message"]
        done = home.run("list")
    assert done.returncode == 3, done
    assert done.stderr.startswith("taskctl: taskctld is busy") and done.stderr.count("\n") == 1
    assert home.json("list") == []


OUT_OF_RANGE = [
    "0001-01-01T00:00:00",  # naive, so local: before year 1 in UTC east of Greenwich
    "0001-01-01T00:00:00Z",
    "1969-12-31T23:59:59Z",
    "9999-12-31T23:59:59-05:00",  # year 10000 in UTC
]


@pytest.mark.parametrize("moment", OUT_OF_RANGE)
def test_times_out_of_range_are_refused_with_a_4xx_and_store_nothing(
    daemon: Home, moment: str
) -> None:
    sock = str(daemon.path / "taskctld.sock")
    daemon.ok("cron", "add", "-n", "c", "0 0 1 1 *", "--", "true")  # never fires during the test
    task = {"command": ["true"], "run_at": moment}
    for path, body in [
        ("/v1/tasks", task),
        ("/v1/tasks/batch", {"tasks": [{"command": ["true"]}], "defaults": {"run_at": moment}}),
        ("/v1/tasks/batch", {"tasks": [{"command": ["true"]}, task]}),
    ]:
        status, reply = _post(sock, path, json.dumps(body).encode())
        assert status == 400 and "out of range" in reply["error"]["message"], (path, reply)
    status, body = http_get(sock, f"/v1/schedules/c/next?after={moment.replace('+', '%2B')}")
    assert status == 400 and b"out of range" in body, body
    done = daemon.run("submit", "--stdin", "--json-lines", input=json.dumps(task) + "\n")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done
    assert (
        done.stderr.startswith("taskctl: invalid request: line 1: run_at: ")
        and "out of range" in done.stderr
    )
    assert daemon.json("list") == []


def test_cron_next_stops_at_the_end_of_9999(daemon: Home) -> None:
    daemon.ok("cron", "add", "-n", "c", "* * * * *", "--", "true")
    sock = str(daemon.path / "taskctld.sock")
    status, body = http_get(sock, "/v1/schedules/c/next?after=9999-12-31T23:57:30Z&n=5")
    assert status == 200, body
    assert json.loads(body) == ["9999-12-31T23:58:00.000Z", "9999-12-31T23:59:00.000Z"]  # UTC, Z


def test_argv_and_environment_beyond_execve_limits_are_refused(daemon: Home) -> None:
    sock = str(daemon.path / "taskctld.sock")
    status, reply = _post(
        sock, "/v1/tasks", json.dumps({"command": ["echo", "x" * 140_000]}).encode()
    )
    assert status == 400 and "131071" in reply["error"]["message"]
    big_env = {f"V{i}": "y" * 1000 for i in range(2500)}
    status, reply = _post(
        sock,
        "/v1/tasks/batch",
        json.dumps({"tasks": [{"command": ["true"], "cwd": "/", "env": big_env}]}).encode(),
    )
    assert status == 400 and "execve" in reply["error"]["message"]


# -- schemathesis against the real daemon --------------------------------------------------------


class _TcpBridge:
    """127.0.0.1:PORT -> the daemon's Unix socket, for HTTP tools that only speak TCP."""

    def __init__(self, sock_path: str) -> None:
        self.sock_path = sock_path
        self.loop = asyncio.new_event_loop()
        self.port = 0
        started = threading.Event()
        threading.Thread(target=self._run, args=(started,), daemon=True).start()
        started.wait(5)

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._pipe, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        started.set()
        self.loop.run_forever()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(self.sock_path)

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(Exception):
                dst.close()

        await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))

    def close(self) -> None:
        async def end_pipes() -> None:  # cancelled and awaited, so none is destroyed pending
            pipes = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in pipes:
                task.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(end_pipes(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


LONG_POLLS = {"/v1/tasks/{task_id}/wait", "/v1/tasks/{task_id}/logs", "/v1/events"}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_schemathesis_finds_no_server_error_or_schema_violation(home: Home) -> None:
    """Property-based requests from /openapi.json, positive and negative, to every endpoint
    but `daemon/stop`: no 5xx, every status and body as documented, the daemon still healthy."""
    import requests
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    home.config(hold=True)  # accept what it submits, run none of it: the commands are random
    home.start()
    bridge = _TcpBridge(str(home.path / "taskctld.sock"))
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    failures = []
    try:
        schema = schemathesis.openapi.from_url(f"http://127.0.0.1:{bridge.port}/openapi.json")
        for result in schema.exclude(path="/v1/daemon/stop").get_all_operations():
            operation = result.ok()

            @settings(
                max_examples=30,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                database=None,
            )
            @given(operation.as_strategy())
            def check(case: schemathesis.Case) -> None:
                try:
                    case.call_and_validate(checks=checks, timeout=5)
                except (requests.exceptions.Timeout, requests.exceptions.ConnectionError):
                    # wait, logs -f and event streams hold the request by design
                    if case.operation.path not in LONG_POLLS:  # type: ignore[union-attr]
                        raise

            try:
                check()
            except (Exception, BaseExceptionGroup) as e:
                failures.append(f"{operation.method.upper()} {operation.path}: {e}")
    finally:
        bridge.close()
    assert not failures, "\n\n".join(failures)
    assert home.json("health")["status"] == "ok"


# -- a raw-socket fuzz -------------------------------------------------------------------------------


def _malformed(rng: random.Random) -> bytes:
    kind = rng.randrange(8)
    if kind == 0:  # truncated request line or headers
        full = (
            b'POST /v1/tasks HTTP/1.1\r\nHost: t\r\nContent-Length: 20\r\n\r\n{"command": ["true"]}'
        )
        return full[: rng.randrange(1, len(full))]
    if kind == 1:  # garbage
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
    if kind == 2:  # invalid UTF-8 in a JSON body
        body = b'{"command": ["' + bytes(rng.randrange(128, 256) for _ in range(20)) + b'"]}'
        return (
            b"POST /v1/tasks HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
    if kind == 3:  # deeply nested JSON
        depth = rng.randrange(33, 5000)
        body = b"[" * depth + b"]" * depth
        return (
            b"POST /v1/tasks/batch HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body
        )
    if kind == 4:  # a huge header
        return (
            b"GET /v1/tasks HTTP/1.1\r\nHost: t\r\nX-Big: "
            + b"a" * rng.randrange(70_000, 200_000)
            + b"\r\n\r\n"
        )
    if kind == 5:  # a wrong length
        return b"POST /v1/tasks HTTP/1.1\r\nHost: t\r\nContent-Length: -5\r\n\r\n{}"
    if kind == 6:  # random JSON at a random endpoint
        path = rng.choice(
            [b"/v1/tasks", b"/v1/tasks/batch", b"/v1/schedules", b"/v1/queues/x", b"/v1/nowhere"]
        )
        body = json.dumps(
            rng.choice(
                [
                    {},
                    [],
                    {"tasks": 5},
                    {"command": "true"},
                    {"kind": "cron", "task": {}},
                    None,
                    1e308,
                ]
            )
        ).encode()
        return (
            b"POST "
            + path
            + b" HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body
        )
    return b"BREW /v1/tasks HTTP/1.1\r\nHost: t\r\n\r\n"  # a method nobody speaks


def _send_one(sock_path: str, payload: bytes, deadline: float) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(deadline)
        s.connect(sock_path)
        with contextlib.suppress(OSError):
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        reply = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                reply += chunk
        return reply


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ten_thousand_malformed_requests_do_not_hurt_the_daemon(home: Home) -> None:
    home.config(request_timeout="1s", hold=True)
    home.start()
    pid = home.daemon_pid()
    sock = str(home.path / "taskctld.sock")
    rng = random.Random(int(os.environ.get("FUZZ_SEED", "7")))
    _send_one(sock, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n", 5)
    before = _rss_kib(pid)
    statuses: dict[int, int] = {}
    for _ in range(10_000):
        reply = _send_one(sock, _malformed(rng), 5)
        status = int(reply.split()[1]) if reply.startswith(b"HTTP/1.1 ") else 0  # 0: closed
        statuses[status] = statuses.get(status, 0) + 1
    # ten-megabyte bodies and slow writers, a few at once
    big = b"POST /v1/tasks HTTP/1.1\r\nHost: t\r\nContent-Length: 10485760\r\n\r\n" + b"[" * (
        10 << 20
    )
    assert _send_one(sock, big, 10).split()[1] in (b"400", b"413")

    def slow() -> float:
        began = time.monotonic()
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(sock)
            s.sendall(b"POST /v1/tasks HTTP/1.1\r\n")
            with contextlib.suppress(OSError):
                while s.recv(4096):
                    pass
        return time.monotonic() - began

    threads, times = [], []
    for _ in range(5):
        t = threading.Thread(target=lambda: times.append(slow()))
        t.start()
        threads.append(t)
    for t in threads:
        t.join(15)
    assert len(times) == 5 and max(times) < 1 + 1.5, times  # closed at the deadline
    assert not [s for s in statuses if s >= 500], statuses
    assert set(statuses) <= {0, 400, 404, 405, 409, 413, 431}, statuses
    grew = (_rss_kib(pid) - before) / 1024
    figure(
        "10,000 malformed requests: replies by status, RSS growth (MiB)", (statuses, round(grew, 1))
    )
    assert grew < 20, f"RSS grew by {grew:.1f} MiB"
    assert home.json("health")["status"] == "ok"
    assert (
        subprocess.run(
            [TASKCTL, "submit", "--", "true"], env=home.env, capture_output=True
        ).returncode
        == 0
    )


def _until_closed(s: socket.socket) -> tuple[bytes, float]:
    """Everything the daemon sends until it closes the connection, and how long that took."""
    began, reply = time.monotonic(), b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := s.recv(65536):
            reply += chunk
    return reply, time.monotonic() - began


def test_the_request_deadline_cuts_slow_requests_not_slow_answers(home: Home) -> None:
    """`request_timeout` bounds how long a request may take to arrive (a half-sent body, an
    idle kept-alive connection), never how long its answer takes; headers over the limit get
    431 at once."""
    home.config(request_timeout="1s")
    home.start()
    sock = str(home.path / "taskctld.sock")

    def connect() -> socket.socket:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(15)
        s.connect(sock)
        return s

    with connect() as s:  # the head arrived, the body never does
        s.sendall(b'POST /v1/tasks HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{"comm')
        reply, took = _until_closed(s)
        assert reply == b"" and took < 1 + 1.5, (reply, took)

    task_id = home.submit("sleep", "2")
    with connect() as s:  # answered after twice the deadline, then idle until cut
        s.sendall(f"GET /v1/tasks/{task_id}/wait?timeout=10 HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        reply, took = _until_closed(s)
        assert reply.startswith(b"HTTP/1.1 200 ") and b'"succeeded"' in reply, reply
        assert took > 1.5, took

    with connect() as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * (20 << 10) + b"\r\n\r\n")
        reply, _ = _until_closed(s)
        assert reply.startswith(b"HTTP/1.1 431 "), reply[:80]


def _spawn_frame(marker: Path) -> bytes:
    """What a stranger would send the supervisor to have a command run: a `spawn` frame."""
    spec = {
        "task_id": 9999, "attempt": 1, "argv": ["/bin/touch", str(marker)], "cwd": "/",
        "env": {}, "stdout_path": "/dev/null", "stderr_path": "/dev/null",
    }  # fmt: skip
    payload = json.dumps({"op": "spawn", "spec": spec}).encode()
    return len(payload).to_bytes(4, "big") + payload


def _supervisor_socket(home: Home) -> str:
    (info,) = (home.path / "run").glob("supervisor.*.json")
    return str(json.loads(info.read_text())["socket"])


def test_another_user_cannot_reach_the_supervisor(daemon: Home, needs_root: None) -> None:
    sock_path, marker = _supervisor_socket(daemon), daemon.path / "pwned"
    os.chmod(daemon.path, 0o777)
    os.chmod(sock_path, 0o777)
    code, out = _as_other_user(lambda: _say_once(sock_path, _spawn_frame(marker)))
    assert code == 0 and "hello" not in out, out  # nothing: the connection was dropped
    log = daemon.path / "taskctld.log"
    wait_until(lambda: f"refused a connection from uid {NOBODY}" in log.read_text())
    assert daemon.run("submit", "--wait", "--", "true").returncode == 0  # a later turn of its loop
    assert not marker.exists()


def test_a_stray_connection_to_the_supervisor_changes_nothing(daemon: Home) -> None:
    """Same uid, no secret: it neither runs a command nor displaces the daemon's link (which
    once made the running attempt `lost` and run again)."""
    gate, marker = daemon.path / "go", daemon.path / "pwned"
    command = f"echo run >> {daemon.path}/runs; while [ ! -e {gate} ]; do sleep 0.05; done; exit 7"
    task_id = daemon.submit("sh", "-c", command)
    wait_until(lambda: daemon.api_task(task_id)["state"] == "running")
    idle, spawner = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
    with idle, spawner:
        idle.connect(_supervisor_socket(daemon))
        spawner.connect(_supervisor_socket(daemon))
        spawner.sendall(_spawn_frame(marker))
        spawner.settimeout(5)
        assert spawner.recv(65536) == b""  # refused, never a hello
        gate.touch()
        task = daemon.wait_final(task_id)
    assert task["exit_code"] == 7 and [a["outcome"] for a in task["attempts"]] == ["exited"]
    assert (daemon.path / "runs").read_text() == "run\n"
    assert not marker.exists()
    log = (daemon.path / "taskctld.log").read_text()
    assert "did not prove it is the daemon" in log and "supervisor died" not in log
