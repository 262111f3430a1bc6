"""The daemon's own log, `taskctld.log` in the state folder, when it runs detached: its stdout and
stderr (and its supervisor's) point at it. It is rotated to `taskctld.log.1` (one generation
kept) once it passes `log_size`: at start, and while the daemon runs, looked at every few
seconds. A supervisor started before a rotation goes on writing to `taskctld.log.1` until it is
replaced (it holds the file, not its name).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

CHECK_EVERY = 5.0  # seconds between looks at the log's size (a stat: nothing when idle)


def attach(log: Path, limit: int) -> None:
    """Point stdin at /dev/null and stdout and stderr at the log, rotating it first if it is
    over `limit` bytes."""
    rotate_if_big(log, limit, reopen=False)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    _point_stdio_at(log)


def rotate_if_big(log: Path, limit: int, *, reopen: bool = True) -> bool:
    """Move the log to `.1` when it is over `limit` and (with `reopen`) write on in a new one."""
    try:
        if log.stat().st_size <= limit:
            return False
        log.replace(log.with_name(log.name + ".1"))
    except OSError:
        return False
    if reopen:
        _point_stdio_at(log)
    return True


def _point_stdio_at(log: Path) -> None:
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)


async def keep_rotating(log: Path, limit: int) -> None:
    """Rotate the log whenever it passes `limit`, for as long as the daemon runs."""
    while True:
        await asyncio.sleep(CHECK_EVERY)
        with contextlib.suppress(OSError):
            rotate_if_big(log, limit)
