"""A command, its arguments, environment and working directory are bytes to the kernel: any bytes
but NUL run exactly as given, and the API carries them losslessly. Text views escape them, and
every control character a task supplies; names and labels are UTF-8 or refused."""

from __future__ import annotations

import base64
import json
import os
import pty
import random
import select
import subprocess
from pathlib import Path

from conftest import TASKCTL, Home, http_get, wait_until

FF = os.fsdecode(b"\xff")  # one byte that is not UTF-8, as sys.argv and os.environ carry it


def _run_bytes(
    home: Home, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """`taskctl ARGS` from inside the home: what its tasks capture as their working directory
    (random shell strings must never run in the checkout)."""
    return subprocess.run(
        [TASKCTL, *args], env={**home.env, **(env or {})}, cwd=home.path, capture_output=True,
        timeout=60, check=False,
    )  # fmt: skip


def _log_bytes(home: Home, task_id: int) -> bytes:
    return _run_bytes(home, "logs", "--raw", str(task_id)).stdout


def test_an_environment_variable_that_is_not_utf8_reaches_the_task(daemon: Home) -> None:
    env = {"ODD": f"a{FF}b"}
    done = _run_bytes(daemon, "submit", "--wait", "--", "sh", "-c", 'printf %s "$ODD"', env=env)
    assert done.returncode == 0, done.stderr
    assert _log_bytes(daemon, 1) == b"a\xffb"


def test_arguments_shell_strings_and_e_values_keep_their_bytes(daemon: Home) -> None:
    argument = _run_bytes(daemon, "submit", "--wait", "--", "printf", "%s", f"x{FF}y")
    shell = _run_bytes(daemon, "submit", "--wait", "--shell", "--", f"printf 'p{FF}q'")
    e_value = _run_bytes(
        daemon, "submit", "--wait", "-e", f"V=v{FF}", "--", "sh", "-c", 'printf %s "$V"'
    )
    assert [r.returncode for r in (argument, shell, e_value)] == [0, 0, 0], shell.stderr
    assert [_log_bytes(daemon, i) for i in (1, 2, 3)] == [b"x\xffy", b"p\xffq", b"v\xff"]
    task = daemon.json("status", "1")
    assert task["command"][2] == {"base64": base64.b64encode(b"x\xffy").decode()}
    assert "'x\\xffy'" in daemon.ok("status", "1")  # shown escaped, never as the raw byte


def test_a_working_directory_whose_name_is_not_utf8(daemon: Home) -> None:
    folder = os.fsencode(daemon.path) + b"/d\xfe"
    os.mkdir(folder)
    done = subprocess.run(
        [TASKCTL, "submit", "--wait", "--", "pwd"], env=daemon.env, cwd=folder,
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert _log_bytes(daemon, 1) == folder + b"\n"


def test_stdin_lines_that_are_not_utf8_run_as_given(daemon: Home) -> None:
    done = subprocess.run(
        [TASKCTL, "submit", "--stdin"], env=daemon.env, input=b"printf 'l\xfd'\n",
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    daemon.wait_final(1)
    assert _log_bytes(daemon, 1) == b"l\xfd"


def test_names_and_labels_must_be_utf8_and_are_refused_whole(daemon: Home) -> None:
    label = _run_bytes(daemon, "submit", "-l", f"k=v{FF}", "--", "true")
    name = _run_bytes(daemon, "submit", "-n", f"n{FF}", "--", "true")
    assert (label.returncode, name.returncode) == (2, 2)
    assert len(label.stderr.strip().splitlines()) == 1
    assert daemon.json("list") == []  # nothing stored half-valid
    status, body = _post(daemon, "/v1/tasks", b'{"command":["true"],"name":"\\udcff"}')
    assert status == 400 and b"lone surrogate" in body
    assert daemon.json("list") == []


def _post(home: Home, path: str, body: bytes) -> tuple[int, bytes]:
    done = subprocess.run(
        ["curl", "-sS", "--unix-socket", str(home.path / "taskctld.sock"), "-w", "\n%{http_code}",
         "-H", "content-type: application/json", "--data-binary", "@-", f"http://taskctl{path}"],
        input=body, capture_output=True, timeout=30, check=True,
    )  # fmt: skip
    answer, _, status = done.stdout.rpartition(b"\n")
    return int(status), answer


def test_the_api_takes_base64_for_bytes(daemon: Home) -> None:
    arg = {"base64": base64.b64encode(b"\x01\xfe\x80").decode()}
    body = json.dumps({"command": ["printf", "%s", arg]}).encode()
    status, answer = _post(daemon, "/v1/tasks", body)
    assert status == 201, answer
    daemon.wait_final(json.loads(answer)["id"])
    assert _log_bytes(daemon, 1) == b"\x01\xfe\x80"
    bad = json.dumps({"command": ["true", {"base64": "not base64!"}]}).encode()
    assert _post(daemon, "/v1/tasks", bad)[0] == 400


ESCAPES = "\x1b[2J\x1b]0;pwned\x07"


def _on_a_terminal(home: Home, *args: str) -> bytes:
    """What `taskctl ARGS` writes to a terminal (a pty), whole."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [TASKCTL, *args], env={**home.env, "COLUMNS": "200"}, stdout=follower, stderr=follower
    )
    os.close(follower)
    out = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 30)
        try:
            chunk = os.read(leader, 65536) if ready else b""
        except OSError:
            chunk = b""
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=30)
    os.close(leader)
    return out


def test_terminal_escapes_in_any_field_never_reach_the_terminal(daemon: Home) -> None:
    options = ("-n", f"n{ESCAPES}", "-l", f"k={ESCAPES}")
    daemon.submit("sh", "-c", f"exit 3 # {ESCAPES}", options=options)
    daemon.submit("printf", f"[bold]{ESCAPES}[/]")
    daemon.wait_all_final([1, 2])
    for args in (("list",), ("status", "1"), ("status", "2"), ("list", "--label", "k")):
        for out in (_on_a_terminal(daemon, *args), _run_bytes(daemon, *args).stdout):
            assert b"\x1b[2J" not in out and b"\x1b]0;" not in out and b"\x07" not in out, args
    assert "^[[2J" in daemon.ok("status", "1")


def test_a_file_name_that_is_not_utf8_does_not_stop_a_trigger(daemon: Home) -> None:
    folder = daemon.path / "in"
    folder.mkdir()
    out = daemon.path / "seen"
    command = f'cat "$TASKCTL_CHANGED_PATHS" >> {out}'
    daemon.ok(
        "trigger",
        "add",
        str(folder),
        "--name",
        "t",
        "--debounce",
        "200ms",
        "--shell",
        "--",
        command,
    )
    daemon.wait_watching(folder)
    Path(os.fsdecode(os.fsencode(folder) + b"/odd\xff.txt")).write_text("x")
    wait_until(lambda: out.exists() and b"odd\xff.txt" in out.read_bytes(), timeout=20)
    (folder / "plain.txt").write_text("y")  # the watcher still works
    wait_until(lambda: b"plain.txt" in out.read_bytes(), timeout=20)
    assert daemon.json("health")["status"] == "ok"
    assert [t.get("problem") for t in daemon.json("trigger", "list")] == [None]


def test_random_bytes_in_every_field_never_break_the_daemon(daemon: Home) -> None:
    """A small fuzz: random bytes (no NUL) in every string a user gives, through the CLI and
    the API. No 500, no traceback in the daemon's log, and everything stored can be listed."""
    rng = random.Random(16_17)

    def junk() -> str:
        raw = bytes(rng.choice(range(1, 256)) for _ in range(rng.randint(1, 12)))
        return os.fsdecode(raw)

    for _ in range(40):
        field = rng.choice(["arg", "env", "name", "label", "shell", "cwd"])
        args = ["submit"]
        env = {}
        if field == "env":
            env["FUZZ"] = junk()
        elif field == "name":
            args += ["-n", junk()]
        elif field == "label":
            args += ["-l", f"k={junk()}"]
        elif field == "cwd":
            args += ["-C", "/" + junk().replace("/", "_")]
        args += ["--shell", "--", junk()] if field == "shell" else ["--", "printf", "%s", junk()]
        done = _run_bytes(daemon, *args, env=env)
        assert done.returncode in (0, 2), (args, done.stderr)
        assert len(done.stderr.splitlines()) <= 1, done.stderr
    for _ in range(40):
        raw = bytes(rng.choice(range(1, 256)) for _ in range(rng.randint(1, 40)))
        status, _ = _post(daemon, "/v1/tasks", b'{"command":["' + raw + b'"]}')
        assert status < 500
    listed = daemon.json("list", "-n", "1000")
    for task in listed:
        assert daemon.run("status", str(task["id"])).returncode == 0
    assert http_get(str(daemon.path / "taskctld.sock"), "/v1/tasks")[0] == 200
    assert "Traceback" not in (daemon.path / "taskctld.log").read_text(errors="replace")


def test_a_big_batch_from_a_folder_whose_name_is_not_utf8(daemon: Home) -> None:
    """A batch over 64 KiB takes the staged path: its tasks keep their bytes there too."""
    folder = os.fsencode(daemon.path) + b"/big\xfe"
    os.mkdir(folder)
    lines = b"".join(b"printf '%%s' 'line %d \xff' > /dev/null\n" % i for i in range(2500))
    assert len(lines) > 64 << 10
    done = subprocess.run(
        [TASKCTL, "submit", "--stdin"], env=daemon.env, cwd=folder, input=lines,
        capture_output=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    task = daemon.json("status", "2500")
    assert task["cwd"] == {"base64": base64.b64encode(folder).decode()}
    assert daemon.task(1)["command"][0] == {
        "base64": base64.b64encode(b"printf '%s' 'line 0 \xff' > /dev/null").decode()
    }
