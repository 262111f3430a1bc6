"""Process identity from /proc: who is this pid really, and is it still the process we started?

A pid alone is not an identity (pids are reused). An identity is (pid, start time in clock ticks
since boot, boot id): the start time changes when the pid is reused, the boot id when the machine
restarts. Standard library only: the supervisor uses it too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Self


def read_boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # Field 2 (comm) is in parentheses and may hold spaces or ')': split after the last ')'.
    return raw[raw.rindex(b")") + 2 :].decode().split()


@dataclass(frozen=True)
class ProcessId:
    pid: int
    start: int  # clock ticks after boot (field 22 of /proc/PID/stat)
    boot_id: str

    @classmethod
    def of(cls, pid: int, boot_id: str | None = None) -> Self | None:
        fields = _stat_fields(pid)
        if fields is None:
            return None
        return cls(pid=pid, start=int(fields[19]), boot_id=boot_id or read_boot_id())

    def state(self, boot_id: str) -> str:
        """`alive`, `zombie` (exited, not yet reaped: counts as exited) or `gone`.

        `gone` also covers a pid now used by another process, and any pid from an earlier boot.
        """
        if boot_id != self.boot_id:
            return "gone"
        fields = _stat_fields(self.pid)
        if fields is None or int(fields[19]) != self.start:
            return "gone"
        return "zombie" if fields[0] in ("Z", "X") else "alive"


def stopped(pid: int) -> bool:
    """Whether the process is stopped (SIGSTOP, or a tracer): it runs nothing until continued."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] in ("T", "t")


def start_epoch_ms(pid: int) -> int | None:
    """When a process started, in epoch milliseconds (to about a second: the boot time in
    /proc/stat is whole seconds)."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    try:
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    except (OSError, StopIteration, ValueError):
        return None
    return int((btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")) * 1000)


def _parent_map() -> dict[int, list[int]]:
    """pid -> children, from one pass over /proc (kernels without /proc/PID/task/TID/children)."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None:
            kids.setdefault(int(fields[1]), []).append(int(entry))
    return kids


def children_of(pid: int) -> list[int]:
    """Direct children of `pid` (one scan of /proc)."""
    return _parent_map().get(pid, [])


def descendants_of(pid: int) -> list[int]:
    """Every live descendant of `pid`, parents before children (one scan of /proc)."""
    kids = _parent_map()
    found: list[int] = []
    frontier = kids.get(pid, [])
    while frontier:
        found.extend(frontier)
        frontier = [kid for parent in frontier for kid in kids.get(parent, [])]
    return found
