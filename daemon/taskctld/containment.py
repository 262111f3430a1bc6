"""Containment: what holds every process of an attempt together, so that ending it ends all of it.

Where the daemon can make cgroups (cgroup v2, as root or in a systemd unit with `Delegate=yes`),
each attempt runs in a cgroup of its own, `<home>/sup-<supervisor pid>/<task>.<attempt>`, where
`<home>` is a folder named for the daemon's state folder inside the cgroup the daemon was
started in. A process cannot leave its cgroup without write access to the cgroups above it, so
a descendant that starts a new session, a new process group, double-forks or scrubs its
environment is still there: `cgroup.kill` ends them all at once, `cgroup.events` says when the
last one is gone, and `cgroup.freeze` can pause them. The next daemon finds the cgroups of a
supervisor that died by their names and ends them: no pid is trusted, so pid reuse cannot fool it.

The supervisor puts a command into its cgroup by moving itself there for the moment of the
spawn (the child is born inside; moving it afterwards would race with its first fork), then
back.

Elsewhere the fallback is the process group plus the supervisor as child subreaper. Its limits:
a descendant that leaves the process group is found only by the task id in its environment
while the attempt runs, and only once it is orphaned onto the supervisor after it ends; one that
also scrubs its environment survives the attempt.

Standard library only: the supervisor imports this module.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import select
import signal
import time
from collections.abc import Iterator
from pathlib import Path

CGROUP = "cgroup"
PROCESS_GROUP = "process-group"


def cgroup2_mount(mountinfo: str = "/proc/self/mountinfo") -> Path | None:
    """Where the unified (v2) hierarchy is mounted, if it is."""
    try:
        with open(mountinfo) as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    return Path(left.split()[4])
    except OSError:
        pass
    return None


def own_cgroup(pid: int | str = "self") -> str | None:
    """The process's cgroup in the unified hierarchy, as a path from its root."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        pass
    return None


def home_path(state_dir: Path) -> Path | None:
    """Where this process would keep the cgroups of a daemon with this state folder: named for
    the folder, so that daemons of different homes never touch each other's."""
    mount, mine = cgroup2_mount(), own_cgroup()
    if mount is None or mine is None:
        return None
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:12]
    return mount / mine.lstrip("/") / f"taskctl-{digest}"


def home_for(state_dir: Path) -> tuple[Path | None, str]:
    """The cgroup folder this daemon's attempts live under, created if missing; or None and why
    it cannot be had (then containment falls back to process groups)."""
    home = home_path(state_dir)
    if home is None:
        return None, "no cgroup v2 hierarchy"
    try:
        home.mkdir(exist_ok=True)
    except OSError as e:
        return None, f"cannot create a cgroup in {home.parent}: {e.strerror}"
    return home, ""


def _write(path: Path | str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def populated(cgroup: Path) -> bool:
    """Whether any live process is in the cgroup or below it (zombies do not count). A
    cgroup that does not exist holds nobody."""
    try:
        fd = os.open(f"{cgroup}/cgroup.events", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        return b"populated 1" in os.read(fd, 256)
    finally:
        os.close(fd)


def members(cgroup: Path) -> list[int]:
    """The live processes directly in the cgroup."""
    try:
        with open(cgroup / "cgroup.procs", "rb") as f:
            return [int(pid) for pid in f.read().split()]
    except (FileNotFoundError, ValueError):
        return []


def signal_members(cgroup: Path, sig: int) -> None:
    """`sig` to every process of the cgroup; SIGKILL through `cgroup.kill`, which no process
    can slip past by forking meanwhile."""
    if sig == signal.SIGKILL:
        with contextlib.suppress(FileNotFoundError):
            _write(cgroup / "cgroup.kill", b"1")
        return
    for pid in members(cgroup):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def wait_empty(cgroup: Path, timeout: float) -> bool:
    """Block until the cgroup holds no live process (the kernel wakes `poll` when
    `cgroup.events` changes); False at the deadline."""
    deadline = time.monotonic() + timeout
    try:
        fd = os.open(cgroup / "cgroup.events", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLPRI | select.POLLERR)
        while b"populated 1" in os.pread(fd, 256, 0):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            poller.poll(left * 1000)
        return True
    finally:
        os.close(fd)


def remove(cgroup: Path) -> bool:
    """Remove an empty cgroup and the empty ones below it; False if some process is left.
    A leaf (an attempt's cgroup) is one rmdir: listing a cgroup costs a stat per control file."""
    try:
        os.rmdir(cgroup)
        return True
    except FileNotFoundError:
        return True
    except OSError as e:
        if e.errno not in (errno.EBUSY, errno.ENOTEMPTY):
            raise
    ok = True
    for entry in os.scandir(cgroup):  # cgroups below it, or processes in it
        if entry.is_dir(follow_symlinks=False):
            ok = remove(Path(entry.path)) and ok
    try:
        os.rmdir(cgroup)
    except FileNotFoundError:
        pass
    except OSError as e:
        if e.errno not in (errno.EBUSY, errno.ENOTEMPTY):
            raise
        return False
    return ok


def end(cgroup: Path, timeout: float = 5.0) -> bool:
    """Kill everything in the cgroup and below, wait until it is gone, remove the cgroups.
    True when nothing is left."""
    signal_members(cgroup, signal.SIGKILL)
    gone = wait_empty(cgroup, timeout)
    with contextlib.suppress(OSError):
        remove(cgroup)
    return gone


def leftover_supervisors(home: Path, alive: set[int]) -> list[Path]:
    """The `sup-PID` cgroups in `home` of supervisors not in `alive` (dead ones: their
    attempts run unsupervised, if any do)."""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for child in home.iterdir():
            name = child.name
            if name.startswith("sup-") and name[4:].isdigit() and int(name[4:]) not in alive:
                found.append(child)
    return found


class Cgroups:
    """The supervisor's cgroups: its own folder under the daemon's home, one child per running
    attempt, and the descriptor it returns through after each spawn. An attempt's cgroup, once
    empty, is kept for the next attempt (an mkdir and an rmdir less per task); which cgroup an
    attempt ran in is in the journal, and all of them are under the supervisor's folder."""

    def __init__(self, home: Path, pid: int) -> None:
        mount, mine = cgroup2_mount(), own_cgroup()
        if mount is None or mine is None:
            raise OSError(errno.ENOENT, "no cgroup v2 hierarchy")
        self.root = home / f"sup-{pid}"
        self.root.mkdir(parents=True, exist_ok=True)
        self.free: list[Path] = []  # empty cgroups, ready for the next attempt
        self.made = 0
        self.back = os.open(mount / mine.lstrip("/") / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
        try:  # prove that we may move ourselves there and back before any attempt relies on it
            probe = self.make("probe")
            with self.inside(probe):
                pass
            remove(probe)
        except OSError:
            os.close(self.back)
            remove(self.root)
            raise

    def make(self, name: str) -> Path:
        path = self.root / name
        with contextlib.suppress(FileExistsError):
            os.mkdir(path)
        return path

    def take(self) -> Path:
        """An empty cgroup for an attempt."""
        if self.free:
            return self.free.pop()
        self.made += 1
        return self.make(f"a{self.made}")

    def give_back(self, cgroup: Path) -> None:
        """An attempt's cgroup, for the next attempt. The caller has seen it empty: an attempt
        ends only once its cgroup is, and one that could not start never had a process."""
        self.free.append(cgroup)

    @contextlib.contextmanager
    def inside(self, cgroup: Path) -> Iterator[None]:
        """Run the body with this process in `cgroup`: what it spawns is born there."""
        _write(f"{cgroup}/cgroup.procs", b"0")
        try:
            yield
        finally:
            os.write(self.back, b"0")

    def close(self) -> None:
        os.close(self.back)
        with contextlib.suppress(OSError):
            remove(self.root)
        with contextlib.suppress(OSError):
            self.root.parent.rmdir()  # the home, when no other supervisor uses it
