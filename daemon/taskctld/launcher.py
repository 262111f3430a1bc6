"""The launcher: a small single-threaded process that forks one worker per attempt.

The daemon forks the launcher first thing, before it imports its web stack, opens the database
or starts a thread, so the launcher is small and forking it is cheap (well under a millisecond)
and safe. Forking the daemon itself would copy an open SQLite connection and other threads'
locks. The daemon sends attempt specs over a stream socket (4-byte length, then JSON); the
launcher forks a worker for each and forgets it: workers report to the daemon directly through
the notify socket, and the kernel reaps them (SIGCHLD is ignored here).

The launcher dies with its daemon (PR_SET_PDEATHSIG), so no attempt can start after the daemon
that claimed it is gone; workers already started live on and are adopted by the next daemon.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import struct
import sys
from dataclasses import dataclass

from taskctld.procfs import read_boot_id
from taskctld.worker import AttemptSpec, Notifier, Worker

PR_SET_PDEATHSIG = 1
_HEADER = struct.Struct("!I")


@dataclass
class LauncherHandle:
    """The daemon's end of the launcher."""

    pid: int
    sock: socket.socket

    def send(self, spec: AttemptSpec) -> None:
        payload = spec.to_json()
        self.sock.sendall(_HEADER.pack(len(payload)) + payload)

    def close(self) -> None:
        self.sock.close()


def start_launcher(close_fds: tuple[int, ...] = ()) -> LauncherHandle:
    """Fork the launcher. Call before any thread starts and before the database is opened."""
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    daemon_pid = os.getpid()
    pid = os.fork()
    if pid == 0:  # the launcher
        code = 1
        try:
            parent_sock.close()
            for fd in close_fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            code = _launcher_main(child_sock, daemon_pid)
        finally:
            os._exit(code)
    child_sock.close()
    return LauncherHandle(pid=pid, sock=parent_sock)


def _launcher_main(sock: socket.socket, daemon_pid: int) -> int:
    _die_with_parent()
    if os.getppid() != daemon_pid:
        return 0
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps workers
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C on a foreground daemon: not ours
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    boot_id = read_boot_id()
    while True:
        header = _recv_exact(sock, _HEADER.size)
        payload = _recv_exact(sock, _HEADER.unpack(header)[0]) if header else b""
        if not payload:
            return 0  # the daemon is gone
        _fork_worker(AttemptSpec.from_json(payload), sock, boot_id)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    """n bytes, or b"" at end of stream."""
    parts, got = [], 0
    while got < n:
        part = sock.recv(n - got)
        if not part:
            return b""
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _fork_worker(spec: AttemptSpec, launcher_sock: socket.socket, boot_id: str) -> None:
    launcher_pid = os.getpid()
    try:
        pid = os.fork()
    except OSError as e:
        Notifier(spec.notify_path).send(
            {
                "type": "done",
                "task_id": spec.task_id,
                "attempt": spec.attempt,
                "outcome": "not_started",
                "error": f"cannot fork a worker: {e.strerror}",
            }
        )
        return
    if pid != 0:
        return
    code = 1
    try:
        launcher_sock.close()
        os.setsid()  # no controlling terminal, no signals meant for the daemon's group
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        code = Worker(spec, launcher_pid=launcher_pid, boot_id=boot_id).run()
    except BaseException as e:  # a broken worker must never fall back into the launcher's loop
        print(f"taskctl worker for task {spec.task_id}: {e!r}", file=sys.stderr)
    finally:
        os._exit(code)


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
