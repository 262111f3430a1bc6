"""`taskctld`: the daemon's entry point. Folders, lock, daemonizing, then `app.run`.

1. the folders are created and checked, and the single-instance lock is taken (a `flock` on
   `taskctld.lock`, not a pid check: the kernel drops it when the holder dies);
2. without `--foreground`, the process detaches; its first process exits only once the daemon
   is ready (or says why it failed), so `taskctl daemon start` can report the truth;
3. the daemon proper starts (`taskctld.app`): the heavy imports come only now, so a second
   daemon or a bad folder is refused fast.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import os
import stat
import sys

from taskctl import __version__
from taskctl.environment import TASK_MARKERS
from taskctl.paths import Paths


class StartupError(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="taskctld", description="The taskctl daemon.")
    parser.add_argument(
        "--foreground", action="store_true", help="stay attached and log to stderr (for systemd)"
    )
    parser.add_argument(
        "--store",
        metavar="URL",
        help="share a queue with other nodes in PostgreSQL (postgresql://...); "
        "else TASKCTL_STORE, else config.toml's store, else SQLite in the home",
    )
    parser.add_argument("--version", action="version", version=f"taskctld {__version__}")
    args = parser.parse_args(argv)
    forget_task_markers()
    paths = Paths.from_env()
    os.umask(0o077)
    try:
        prepare_folders(paths)
        lock_fd = take_lock(paths)
    except StartupError as e:
        print(f"taskctld: {e}", file=sys.stderr)
        return 1
    if lock_fd is None:
        print("taskctld: already running", file=sys.stderr)
        return 0
    ready_fd = None if args.foreground else daemonize(paths)
    write_pid(lock_fd)
    from taskctld import app

    return app.run(paths, ready_fd=ready_fd, lock_fd=lock_fd, store=args.store)


def forget_task_markers() -> None:
    """Drop the variables that mark a task's processes, in case a task started this daemon.

    The supervisor finds a task's escaped descendants by TASKCTL_TASK_ID in their environment; a
    daemon that inherited one would look like an escapee of that task.
    """
    for name in TASK_MARKERS:
        os.environ.pop(name, None)


def prepare_folders(paths: Paths) -> None:
    """Create the folders (mode 0700) and refuse ones that others could tamper with."""
    for folder in (paths.runtime, paths.state, paths.logs, paths.run):
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise StartupError(f"cannot create {folder}: {e.strerror}") from None
    check_private_folder(paths.runtime)
    if paths.state != paths.runtime:
        check_private_folder(paths.state)


def check_private_folder(folder: os.PathLike[str] | str) -> None:
    """The folder must be a real directory owned by us and closed to group and others."""
    st = os.lstat(folder)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise StartupError(f"{folder} is not a directory (a symlink?); refusing to use it")
    if st.st_uid != os.getuid():
        raise StartupError(f"{folder} belongs to uid {st.st_uid}, not to you; refusing to use it")
    if st.st_mode & 0o077:
        os.chmod(folder, 0o700)


def take_lock(paths: Paths) -> int | None:
    """The single-instance lock; None when another daemon holds it."""
    fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise StartupError(f"cannot lock {paths.lock}: {e.strerror}") from None
    return fd


def write_pid(lock_fd: int) -> None:
    """The lock file names the daemon's pid (for people and tools; the lock is what counts)."""
    os.ftruncate(lock_fd, 0)
    os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)


def daemonize(paths: Paths) -> int:
    """Detach; the calling process waits for the daemon's word and exits with it.

    Returns the write end of the readiness pipe (in the daemon)."""
    r, w = os.pipe()
    if os.fork() > 0:
        os.close(w)
        sys.exit(_await_readiness(r))
    os.close(r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)  # the daemon can never reacquire a controlling terminal
    from taskctld import logfile
    from taskctld.config import Config

    logfile.attach(paths.daemon_log, Config.log_size_of(paths.config_file))
    return w


def _await_readiness(r: int) -> int:
    """The daemon's word (see `app._tell_starter`): 0 when it is ready, else the exit code it
    gave (6: the state folder is out of space), after printing why on one line."""
    message = b""
    while chunk := os.read(r, 4096):
        message += chunk
    if message.startswith(b"ok"):
        return 0
    code, colon, text = message.decode(errors="replace").partition(":")
    if not (colon and code.isdigit()):
        code, text = "1", message.decode(errors="replace")
    text = text.strip() or "exited before it was ready (see its log)"
    print(f"taskctld: {text}", file=sys.stderr)
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
