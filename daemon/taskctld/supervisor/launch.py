"""Starting a supervisor, finding the ones earlier daemons left, and its `main`."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from taskctld import containment
from taskctld.containment import Cgroups
from taskctld.procfs import ProcessId, read_boot_id
from taskctld.supervisor.journal import Journal
from taskctld.supervisor.loop import Supervisor, _prctl
from taskctld.supervisor.say import say

PR_SET_NAME = 15
EXIT_NO_SPACE = 6  # our exit status when the run folder is out of space (as taskctl's)


@dataclass
class SupervisorInfo:
    """A supervisor's identity file, `run/supervisor.PID.json` (0600: it holds the secret)."""

    pid: int
    start: int
    boot_id: str
    socket: str
    token: str = ""  # what the daemon proves itself with ("": a supervisor from before auth)

    def path_in(self, run_dir: Path) -> Path:
        return run_dir / f"supervisor.{self.pid}.json"


def launch_supervisor(
    run_dir: Path, socket_path: Path, cgroup_home: Path | None
) -> tuple[subprocess.Popen[bytes], SupervisorInfo]:
    """Start a supervisor listening on `socket_path`, as a fresh process in its own session,
    with a new secret (on its stdin) that only this daemon and the next can prove.

    The socket is bound here, before the process starts, so the caller can connect at once
    (the connection waits in the backlog until the supervisor accepts it)."""
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()
    token = os.urandom(24).hex()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(socket_path))
    os.chmod(socket_path, 0o600)
    listener.listen(4)
    argv = [str(listener.fileno()), str(run_dir), str(socket_path), str(cgroup_home or "")]
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "taskctld.supervisor", *argv],
            pass_fds=(listener.fileno(),),
            stdin=subprocess.PIPE,
            start_new_session=True,
        )
    finally:
        listener.close()
    assert proc.stdin is not None
    with contextlib.suppress(BrokenPipeError), proc.stdin:
        proc.stdin.write(token.encode() + b"\n")
    ident = ProcessId.of(proc.pid)
    start = ident.start if ident else 0
    info = SupervisorInfo(proc.pid, start, read_boot_id(), str(socket_path), token)
    return proc, info


def known_supervisors(run_dir: Path) -> list[SupervisorInfo]:
    """Supervisors that recorded themselves in the run folder and are still alive; the
    identity files of dead ones are deleted."""
    boot_id = read_boot_id()
    alive = []
    for path in run_dir.glob("supervisor.*.json"):
        try:
            info = SupervisorInfo(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if ProcessId(info.pid, info.start, info.boot_id).state(boot_id) == "alive":
            alive.append(info)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
    return alive


def main(argv: list[str]) -> int:
    """`python -m taskctld.supervisor FD RUN_DIR SOCKET CGROUP_HOME`, the daemon's secret on
    stdin: run one supervisor until it has nothing left to do."""
    fd, run_dir, socket_path = int(argv[0]), Path(argv[1]), argv[2]
    home = argv[3] if len(argv) > 3 else ""
    os.set_inheritable(fd, False)  # it came through pass_fds; commands must not inherit it
    token = sys.stdin.buffer.readline().strip().decode()
    listener = socket.socket(fileno=fd)
    _prctl(PR_SET_NAME, b"taskctld-sup")
    boot_id = read_boot_id()
    me = ProcessId.of(os.getpid(), boot_id)
    info = SupervisorInfo(os.getpid(), me.start if me else 0, boot_id, socket_path, token)
    try:
        _announce(info, run_dir)
    except OSError as e:  # a full disk, say: leave nothing behind, and say why
        with contextlib.suppress(OSError):
            os.unlink(socket_path)
        say(f"cannot write {info.path_in(run_dir)}: {e.strerror}")
        return EXIT_NO_SPACE if e.errno in (errno.ENOSPC, errno.EDQUOT) else 1
    journal = Journal(run_dir / f"supervisor.{info.pid}.journal")
    cgroups, contained_by = _contain(home, info.pid)
    supervisor = Supervisor(listener, journal, boot_id, token, cgroups, contained_by)
    code = supervisor.serve()
    if cgroups is not None:
        cgroups.close()
    # Outcomes no daemon acknowledged stay in the journal for the next daemon; without them
    # the journal holds nothing anyone needs.
    leftovers = [info.path_in(run_dir), Path(socket_path)]
    if not supervisor.attempts.done:
        leftovers.append(journal.path)
    for leftover in leftovers:
        with contextlib.suppress(OSError):
            leftover.unlink()
    return code


def _contain(home: str, pid: int) -> tuple[Cgroups | None, str]:
    """Our cgroups, or None and the containment we fall back to (with why)."""
    if not home:
        return None, containment.PROCESS_GROUP
    try:
        return Cgroups(Path(home), pid), containment.CGROUP
    except OSError as e:
        why = e.strerror or str(e)
        say(f"cannot run attempts in cgroups ({why}); containing them by process group")
        return None, f"{containment.PROCESS_GROUP} (no cgroup: {why})"


def _announce(info: SupervisorInfo, run_dir: Path) -> None:
    """Write our identity file (0600: it holds our secret) atomically; when that fails, no
    partial file is left."""
    tmp = run_dir / f".supervisor.{info.pid}.tmp"
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(json.dumps(asdict(info)))
        tmp.replace(info.path_in(run_dir))
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
