"""The foundation, end to end: a real daemon driven through the real `taskctl` executable."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections import Counter

import pytest

from conftest import FINAL, TASKCTL, TASKCTLD, Home, http_get, wait_until


def test_failed_task_keeps_exit_code_and_both_streams(daemon: Home) -> None:
    task_id = daemon.submit("sh", "-c", "echo hi; echo oops >&2; exit 3")
    task = daemon.wait_final(task_id)
    assert task["state"] == "failed"
    assert task["exit_code"] == 3
    assert task["reason"] == "exit_code"
    assert [a["outcome"] for a in task["attempts"]] == ["exited"]
    assert daemon.ok("logs", str(task_id)) == "hi\n"
    assert daemon.ok("logs", str(task_id), "--stderr") == "oops\n"


def test_submit_wait_exits_like_the_task(daemon: Home) -> None:
    assert daemon.run("submit", "--wait", "--", "sh", "-c", "exit 7").returncode == 7
    assert daemon.run("submit", "--wait", "--", "true").returncode == 0
    killed = daemon.run("submit", "--wait", "--", "sh", "-c", "kill -9 $$")
    assert killed.returncode == 128 + 9


def test_wait_exit_codes_say_how_a_task_ended_that_never_exited(daemon: Home) -> None:
    """127: it could not start; 143: cancelled; 1: it never ran (a dependency failed)."""
    assert daemon.run("submit", "--wait", "--", "/no/such/program").returncode == 127
    failing = daemon.submit("false")
    dependent = daemon.submit("true", options=("--after", str(failing)))
    assert daemon.run("wait", str(dependent)).returncode == 1
    assert daemon.task(dependent)["attempts"] == []
    slow = daemon.submit("sleep", "60")
    waiter = subprocess.Popen(
        [TASKCTL, "wait", str(slow)], env=daemon.env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(lambda: daemon.api_task(slow)["state"] == "running")
        daemon.ok("cancel", str(slow))
        assert waiter.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        waiter.kill()


def test_submit_wait_json_prints_the_final_task(daemon: Home) -> None:
    done = daemon.run("submit", "--wait", "--json", "--", "sh", "-c", "exit 4")
    assert done.returncode == 4
    task = json.loads(done.stdout)
    assert task["state"] == "failed" and task["exit_code"] == 4


def test_a_submit_to_a_free_slot_is_claimed_by_its_own_commit(daemon: Home) -> None:
    """With a slot free, the submit's transaction also claims the task: one commit between a
    submit and its start, not one for the submit and another for the claim. Its answer shows
    it already running; once the slots are taken, a submit stays queued."""
    daemon.ok("queue", "set", "default", "--concurrency", "1")
    first = daemon.json("submit", "--", "sleep", "30")
    assert first["state"] == "running"
    second = daemon.json("submit", "--", "sleep", "30")
    assert second["state"] == "queued"
    daemon.ok("queue", "set", "fast")
    daemon.ok("queue", "pause", "fast")
    paused = daemon.json("submit", "--queue", "fast", "--", "true")
    assert paused["state"] == "queued"
    for task in (first, second, paused):
        daemon.ok("cancel", str(task["id"]))


@pytest.mark.slow
@pytest.mark.timeout(300)  # hundreds of processes: minutes on a loaded 2-core machine
def test_300_tasks_from_a_shell_loop_all_finish_once(daemon: Home) -> None:
    script = f'for i in $(seq 300); do "{TASKCTL}" submit -- true || exit 1; done'
    loop = subprocess.run(
        ["bash", "-c", script], env=daemon.env, capture_output=True, text=True, timeout=300
    )
    assert loop.returncode == 0, loop.stderr
    submitted = [int(line) for line in loop.stdout.split()]
    assert len(submitted) == 300 and len(set(submitted)) == 300

    def all_final() -> bool:
        return all(t["state"] in FINAL for t in daemon.api("/v1/tasks?limit=1000"))

    wait_until(all_final, timeout=120, interval=0.5)
    tasks = daemon.json("list", "--limit", "1000")
    assert all(t["state"] in FINAL for t in tasks)
    assert sorted(t["id"] for t in tasks) == sorted(submitted)
    assert Counter(t["state"] for t in tasks) == {"succeeded": 300}
    assert all(len(t["attempts"]) == 1 for t in tasks)


def test_curl_on_the_socket_sees_what_list_json_sees(daemon: Home) -> None:
    ids = [daemon.submit("sh", "-c", f"exit {n}") for n in range(3)]
    for task_id in ids:
        daemon.wait_final(task_id)
    status, body = http_get(str(daemon.path / "taskctld.sock"), "/v1/tasks")
    assert status == 200
    assert json.loads(body) == daemon.json("list")


def test_a_program_that_does_not_exist_is_a_spawn_error(daemon: Home) -> None:
    task = daemon.wait_final(daemon.submit("/no/such/program"))
    assert task["state"] == "failed"
    (attempt,) = task["attempts"]
    assert attempt["outcome"] == "spawn_error"
    assert "/no/such/program" in attempt["error"]
    assert daemon.run("submit", "--wait", "--", "true").returncode == 0  # still serving


def test_unknown_task_id_exits_4_with_one_line(daemon: Home) -> None:
    for command in (["status", "424242"], ["logs", "424242"], ["cancel", "424242"]):
        done = daemon.run(*command)
        assert done.returncode == 4, command
        assert done.stderr.strip().count("\n") == 0 and "424242" in done.stderr
        assert done.stderr.count("424242") == 1, done.stderr  # said once, not "task N: task N"


def test_daemon_down_with_autostart_off_exits_3_and_says_how_to_start(home: Home) -> None:
    done = home.run("list")
    assert done.returncode == 3
    assert "taskctl daemon start" in done.stderr


def test_autostart_starts_the_daemon_on_first_use(home: Home) -> None:
    done = home.run("submit", "--wait", "--", "true", env={"TASKCTL_NO_AUTOSTART": "0"})
    assert done.returncode == 0, done.stderr
    assert home.json("daemon", "status")["status"] == "ok"


def test_fifty_queued_tasks_survive_sigkill_of_the_daemon(home: Home) -> None:
    home.config(concurrency=1)
    home.start()
    gate = home.path / "go"
    blocker = home.submit("sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.05; done")
    queued = [int(x) for x in home.ok("submit", "--stdin", input="true\n" * 50).split()]
    assert {t["state"] for t in home.tasks(queued)} == {"queued"}
    home.kill9()
    home.start()
    gate.touch()
    for task in home.wait_all_final([blocker, *queued]):
        assert task["state"] == "succeeded", task
        assert len(task["attempts"]) == 1


def test_cancel_ends_the_whole_process_group(daemon: Home) -> None:
    marker = f"sleep 300{os.getpid() % 7}"  # unique argv, so we only count our own sleeps
    task_id = daemon.submit("sh", "-c", f"{marker} & {marker}; wait")

    def sleeps() -> list[int]:
        return [p for p in daemon.task_processes() if _cmdline(p).startswith(marker.split()[0])]

    wait_until(lambda: len(sleeps()) == 2)
    daemon.ok("cancel", str(task_id))
    assert daemon.task(task_id)["state"] == "cancelled"
    wait_until(lambda: not sleeps(), timeout=5)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def test_cancel_a_queued_task_never_runs_it(home: Home) -> None:
    home.config(concurrency=1)
    home.start()
    blocker = home.submit("sleep", "30")
    waiting = home.submit("touch", str(home.path / "ran"))
    assert home.json("cancel", str(waiting))["state"] == "cancelled"
    home.ok("cancel", str(blocker))
    assert home.task(blocker)["state"] == "cancelled"
    assert not (home.path / "ran").exists()
    assert home.run("cancel", str(waiting)).returncode == 5  # already final


def test_environment_and_cwd_are_captured_at_submit(daemon: Home, tmp_path) -> None:
    task_id = int(
        daemon.ok(
            "submit", "-e", "EXTRA=1", "--", "sh", "-c", 'echo "$PWD $EXTRA $CAPTURED $TASKCTL_TASK_ID"',
            env={"CAPTURED": "yes"},
        ).strip()
    )  # fmt: skip
    daemon.wait_final(task_id)
    pwd, *rest = daemon.ok("logs", str(task_id)).split()
    assert os.path.samefile(pwd, os.getcwd())  # $PWD may name it through a symlink
    assert rest == ["1", "yes", str(task_id)]
    bare = daemon.submit(
        "sh", "-c", 'echo "${CAPTURED:-unset} $PATH"', options=("--no-env", "-C", str(tmp_path))
    )
    daemon.wait_final(bare)
    assert daemon.ok("logs", str(bare)) == "unset /usr/local/bin:/usr/bin:/bin\n"
    assert daemon.task(bare)["cwd"] == str(tmp_path)


def test_a_relative_program_is_found_from_the_task_cwd(daemon: Home, tmp_path) -> None:
    (tmp_path / "tools").mkdir()
    script = tmp_path / "tools" / "hello"
    script.write_text("#!/bin/sh\necho hello from $PWD\n")
    script.chmod(0o755)
    daemon.wait_final(daemon.submit("true", options=("-C", "/")))  # the supervisor is in /
    on_path = daemon.submit(
        "hello", options=("-C", str(tmp_path), "-e", "PATH=tools:/usr/bin:/bin")
    )
    relative = daemon.submit("./tools/hello", options=("-C", str(tmp_path)))
    for task_id in (on_path, relative):  # the PATH entry `tools` is looked up from -C
        assert daemon.wait_final(task_id)["state"] == "succeeded", daemon.task(task_id)
        assert daemon.ok("logs", str(task_id)) == f"hello from {tmp_path}\n"


def test_shell_runs_one_string_through_sh(daemon: Home) -> None:
    task_id = daemon.submit("echo a | tr a b; exit 5", options=("--shell",))
    task = daemon.wait_final(task_id)
    assert task["command"] == ["echo a | tr a b; exit 5"] and task["shell"] is True
    assert task["exit_code"] == 5
    assert daemon.ok("logs", str(task_id)) == "b\n"


def test_argv_is_kept_exactly(daemon: Home) -> None:
    weird = ["printf", "%s|", "two words", "", "$HOME", "-n", "*"]
    task_id = daemon.submit(*weird)
    assert daemon.wait_final(task_id)["command"] == weird
    assert daemon.ok("logs", str(task_id)) == "two words||$HOME|-n|*|"


@pytest.mark.sqlite_only  # on a cluster the node that runs it says (spawn_error, on node ...)
def test_missing_cwd_is_refused_and_creates_nothing(daemon: Home) -> None:
    done = daemon.run("submit", "-C", "/no/such/dir", "--", "true")
    assert done.returncode == 2
    assert "/no/such/dir" in done.stderr and "does not exist" in done.stderr
    batch = daemon.run("submit", "--stdin", "-C", "/no/such/dir", input="true\ntrue\n")
    assert batch.returncode == 2 and "does not exist" in batch.stderr
    assert "line" not in batch.stderr  # every line has that cwd: the error blames none
    one_bad = daemon.run(
        "submit", "--stdin", "--json-lines",
        input='{"command": ["true"]}\n{"command": ["true"], "cwd": "/no/such/dir"}\n',
    )  # fmt: skip
    assert one_bad.returncode == 2 and "line 2" in one_bad.stderr  # one line's own: named
    assert daemon.json("list") == []


def test_bad_options_are_usage_errors(daemon: Home) -> None:
    for args in (
        ["submit", "-p", "high", "--", "true"],
        ["submit", "-p", "99999999", "--", "true"],
        ["submit", "-q", "bad queue!", "--", "true"],
        ["submit", "-l", "novalue", "--", "true"],
        ["submit", "--timeout", "soon", "--", "true"],
        ["list", "--state", "sleeping"],
    ):
        done = daemon.run(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.strip(), args
    assert daemon.json("list") == []


def test_list_filters_and_plain_output_in_a_pipe(daemon: Home) -> None:
    for queue in ("alpha", "beta"):
        daemon.ok("queue", "set", queue)
    ok = daemon.submit("true", options=("-q", "alpha", "-l", "team=blue", "-n", "first"))
    bad = daemon.submit("false", options=("-q", "beta"))
    daemon.wait_final(ok)
    daemon.wait_final(bad)
    assert [t["id"] for t in daemon.json("list", "--state", "failed")] == [bad]
    assert [t["id"] for t in daemon.json("list", "-q", "alpha")] == [ok]
    assert [t["id"] for t in daemon.json("list", "-l", "team=blue")] == [ok]
    text = daemon.ok("list")
    lines = text.splitlines()
    assert lines[0].split() == ["ID", "STATE", "QUEUE", "EXIT", "TRIES", "AGE", "TIME", "COMMAND"]
    assert lines[1].split()[:4] == [str(bad), "failed", "beta", "1"]
    assert lines[2].split()[-1] == "first"
    assert "\x1b[" not in text  # no colour codes in a pipe


def test_every_json_output_is_one_document(daemon: Home) -> None:
    task_id = daemon.submit("true")
    daemon.wait_final(task_id)
    for args in (["list"], ["status"], ["status", str(task_id)], ["health"], ["daemon", "status"]):
        out = daemon.ok(*args, "--json")
        json.loads(out)  # raises if there is anything else on stdout
    both = daemon.json("status", str(task_id), str(task_id))
    assert isinstance(both, list) and len(both) == 2


def test_status_without_id_summarises(daemon: Home) -> None:
    daemon.wait_final(daemon.submit("false"))
    summary = daemon.json("status")
    assert summary["states"]["failed"] == 1
    assert summary["health"]["status"] == "ok"
    assert "failed 1" in daemon.ok("status")


def test_daemon_start_stop_status(home: Home) -> None:
    assert home.run("daemon", "status").returncode == 3
    pid = home.start()
    assert home.start() == pid  # starting twice is a no-op
    home.ok("daemon", "stop")
    assert home.run("daemon", "status").returncode == 3
    assert not (home.path / "taskctld.sock").exists()


def test_second_daemon_process_refuses_to_run(daemon: Home) -> None:
    done = subprocess.run(
        [TASKCTLD, "--foreground"], env=daemon.env, capture_output=True, text=True, timeout=30
    )
    assert "already running" in done.stderr
    assert daemon.json("daemon", "status")["status"] == "ok"


@pytest.mark.sqlite_only  # the database file is SQLite's
def test_socket_and_state_files_are_private(daemon: Home) -> None:
    daemon.wait_final(daemon.submit("echo", "x"))
    assert (daemon.path / "taskctld.sock").stat().st_mode & 0o777 == 0o600
    for name in ("taskctl.db", "logs", "run"):
        mode = (daemon.path / name).stat().st_mode & 0o777
        assert mode & 0o077 == 0, (name, oct(mode))
    for log in (daemon.path / "logs").iterdir():
        assert log.stat().st_mode & 0o077 == 0


def test_sigterm_stops_the_daemon_gracefully(daemon: Home) -> None:
    pid = daemon.daemon_pid()
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: daemon.run("daemon", "status").returncode == 3)


def test_logs_json_and_tail(daemon: Home) -> None:
    task_id = daemon.submit("sh", "-c", "for i in 1 2 3 4 5; do echo line$i; done")
    daemon.wait_final(task_id)
    assert daemon.json("logs", str(task_id)) == {
        "task_id": task_id,
        "stream": "stdout",
        "output": "line1\nline2\nline3\nline4\nline5\n",
    }
    assert daemon.ok("logs", "--tail", "2", str(task_id)) == "line4\nline5\n"
    assert daemon.ok("logs", "--tail", "0", str(task_id)) == ""


def _run_in_terminal(home: Home, *args: str, env: dict[str, str] | None = None) -> str:
    """Run taskctl with a pseudo-terminal as stdout; return what it drew."""
    import pty

    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [TASKCTL, *args],
        env={**home.env, "COLUMNS": "100", **(env or {})},
        stdout=follower,
        stderr=subprocess.PIPE,
    )
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    assert proc.wait(timeout=30) == 0, proc.stderr.read() if proc.stderr else ""
    return out.decode()


def test_terminal_output_is_a_coloured_table_unless_no_color(daemon: Home) -> None:
    task_id = daemon.submit("false", options=("-n", "colourful"))
    daemon.wait_final(task_id)
    drawn = _run_in_terminal(daemon, "list")
    assert "colourful" in drawn and "failed" in drawn and "\x1b[" in drawn
    plain = _run_in_terminal(daemon, "list", env={"NO_COLOR": "1"})
    assert "colourful" in plain and "\x1b[3" not in plain  # no colour codes
    assert "failed" in _run_in_terminal(daemon, "status", str(task_id))


def test_stdin_is_dev_null(daemon: Home) -> None:
    task_id = daemon.submit("sh", "-c", "cat; readlink /proc/self/fd/0")
    assert daemon.wait_final(task_id)["state"] == "succeeded"
    assert daemon.ok("logs", str(task_id)) == "/dev/null\n"


def test_a_cwd_removed_before_the_start_is_a_spawn_error(home: Home) -> None:
    home.config(concurrency=1)
    home.start()
    gate, workdir = home.path / "go", home.path / "gone"
    workdir.mkdir()
    blocker = home.submit("sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.05; done")
    doomed = home.submit("true", options=("-C", str(workdir)))
    workdir.rmdir()
    gate.touch()
    home.wait_final(blocker)
    task = home.wait_final(doomed)
    assert task["state"] == "failed" and task["attempts"][0]["outcome"] == "spawn_error"
    assert str(workdir) in task["attempts"][0]["error"]


def _raw_request(sock_path: str, request: bytes) -> tuple[int, dict]:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(sock_path)
        s.sendall(request)
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_bad_requests_get_a_json_error_with_a_machine_code(daemon: Home) -> None:
    sock = str(daemon.path / "taskctld.sock")

    def post(body: bytes, path: str = "/v1/tasks") -> tuple[int, dict]:
        head = f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        return _raw_request(sock, head.encode() + body)

    status, body = post(b'{"command": ["true"')
    assert status == 400 and body["error"]["code"] == "invalid"
    status, body = post(b'{"command": ["true"], "colour": "blue"}')
    assert status == 400 and "colour" in body["error"]["message"]
    status, body = post(b'{"command": []}')
    assert status == 400 and "command" in body["error"]["message"]
    status, body = post(b'{"command": ["true"], "priority": "high"}')
    assert status == 400 and "priority" in body["error"]["message"]
    status, body = _raw_request(
        sock, b"GET /v2/tasks HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    assert status == 404 and body["error"]["code"] == "not_found"
    assert daemon.json("list") == []


def test_output_is_kept_as_bytes_whatever_the_encoding_and_line_length(daemon: Home) -> None:
    """Invalid UTF-8, NUL bytes and a 1 MB line without a newline come back byte for byte."""
    expected = bytes(range(256)) * 4 + b"x" * 1_000_000
    script = "import sys; sys.stdout.buffer.write(bytes(range(256)) * 4 + b'x' * 1_000_000)"
    task_id = daemon.submit(sys.executable, "-c", script)
    assert daemon.wait_final(task_id)["state"] == "succeeded"
    shown = subprocess.run(
        [TASKCTL, "logs", str(task_id)], env=daemon.env, capture_output=True, timeout=30, check=True
    ).stdout
    assert shown == expected
    assert (daemon.path / "logs" / f"{task_id}.1.out").read_bytes() == expected
