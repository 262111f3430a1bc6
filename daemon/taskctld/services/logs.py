"""An attempt's output, as bytes: read whole, from its last lines (`tail`), or followed as it
grows (`logs --follow`), across attempts until the task is final.

Log files are written by the supervisor; this only reads them, from the path an attempt's
output has by its task id and number, and polls a file being followed (FOLLOW_POLL) only
while a follower is connected. On a cluster, an attempt that ran on another node is read from
the store, where that node ships its output (`cluster.Shipper`), polled every REMOTE_POLL."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from taskctl.api import FINAL_STATES
from taskctl.errors import Conflict, NotFound, Unavailable
from taskctld.events import EventHub
from taskctld.services.streams import Streams
from taskctld.services.tasks import TaskService
from taskctld.store import TaskRow

FOLLOW_POLL = 0.05  # seconds between reads of a log file being followed (only while following)
REMOTE_POLL = 0.25  # seconds between reads of another node's shipped output
REMOTE_SETTLE = 10.0  # seconds an ended attempt's last output may take to arrive from its node
TAIL_BLOCK = 1 << 16
READ_BLOCK = 65536


class Shipped(Protocol):
    """Output that other nodes shipped to the store."""

    def output_of(
        self, task_id: int, attempt: int, stream: str, start: int, limit: int
    ) -> tuple[bytes, bool]: ...


@dataclass
class LogService:
    tasks: TaskService
    hub: EventHub
    folder: Path  # where the supervisors write attempts' output
    streams: Streams
    shipped: Shipped | None = None  # on a cluster: the output of other nodes' attempts
    node: str | None = None  # on a cluster: this node

    async def output(
        self, task_id: int, stream: str, attempt: int | None, tail: int | None, follow: bool
    ) -> AsyncIterator[bytes] | None:
        """An attempt's `stream` (`stdout` or `stderr`; default attempt: the latest), from its
        last `tail` lines if given. With `follow`, it waits for the task to start and goes on
        until the task is final, across attempts unless one was named. None: the task ended
        without running, so there is no output at all."""
        task = self.tasks.task(task_id)
        if follow and task.attempts == 0:
            task = await self.tasks.wait_started(task_id)
        if task.attempts == 0 and task.state in FINAL_STATES:
            return None
        number, path = self.path(task, attempt, stream)
        if self._elsewhere(task_id, number):
            return self._remote(task_id, number, stream, tail, follow, across=attempt is None)
        start = 0 if tail is None else await asyncio.to_thread(tail_offset, path, tail)
        if follow:
            return self._follow(task_id, number, stream, start, across=attempt is None)
        return _read(path, start)

    def _elsewhere(self, task_id: int, number: int) -> bool:
        """Whether the attempt ran on another node of a cluster (its output is in the store)."""
        if self.shipped is None:
            return False
        ran_on = self.tasks.attempt_node(task_id, number)
        return ran_on is not None and ran_on != self.node

    async def _remote(
        self, task_id: int, number: int, stream: str, tail: int | None, follow: bool, across: bool
    ) -> AsyncIterator[bytes]:
        """Another node's attempt, from the store: whole or its last `tail` lines, or followed
        (then on to later attempts, wherever they run, as `_follow` does)."""
        if tail is not None:
            whole = b"".join([chunk async for chunk in self._shipped(task_id, number, stream, 0)])
            start = _tail_start(whole, tail)
            yield whole[start:]
            if not follow:
                return
            offset = len(whole)
        else:
            offset = 0
        if not follow:
            async for chunk in self._shipped(task_id, number, stream, offset):
                yield chunk
            return
        async for chunk in self._follow(task_id, number, stream, offset, across=across):
            yield chunk

    async def _shipped(
        self, task_id: int, number: int, stream: str, offset: int, *, follow: bool = False
    ) -> AsyncIterator[bytes]:
        """A shipped stream from `offset` until it is whole; an attempt that ended is given
        REMOTE_SETTLE for its last bytes to arrive, one that runs as long as `follow`."""
        assert self.shipped is not None
        settle = time.monotonic() + REMOTE_SETTLE
        while True:
            data, whole = self.shipped.output_of(task_id, number, stream, offset, READ_BLOCK * 16)
            if data:
                offset += len(data)
                yield data
                continue
            if whole or self.hub.closed:
                return
            if self.tasks.attempt_open(task_id, number):
                if not follow:
                    return  # what it has shipped so far
                settle = time.monotonic() + REMOTE_SETTLE
            elif time.monotonic() > settle:
                return
            await asyncio.sleep(REMOTE_POLL)

    def path(self, task: TaskRow, attempt: int | None, stream: str) -> tuple[int, Path]:
        """The log file of one attempt (default: the latest) and its number."""
        if task.attempts == 0:
            raise Conflict(f"task {task.id} has not started yet: no output")
        number = task.attempts if attempt is None else attempt
        if not 1 <= number <= task.attempts:
            raise NotFound(f"task {task.id} has no attempt {number} (it has {task.attempts})")
        suffix = "out" if stream == "stdout" else "err"
        return number, self.folder / f"{task.id}.{number}.{suffix}"

    async def _follow(
        self, task_id: int, number: int, stream: str, start: int, *, across: bool
    ) -> AsyncIterator[bytes]:
        """Stream one attempt's log as it grows; with `across`, move on to later attempts
        until the task is final."""
        self.streams.followers += 1
        try:
            async for chunk in self._follow_attempts(task_id, number, stream, start, across):
                yield chunk
        finally:
            self.streams.followers -= 1

    async def _follow_attempts(
        self, task_id: int, number: int, stream: str, offset: int, across: bool
    ) -> AsyncIterator[bytes]:
        while not self.hub.closed:  # stopping: the CLI finds the task not final and says so
            if self._elsewhere(task_id, number):
                async for chunk in self._shipped(task_id, number, stream, offset, follow=True):
                    offset += len(chunk)
                    yield chunk
            else:
                _, path = self.path(self.tasks.task(task_id), number, stream)
                async for chunk in _read(path, offset):
                    offset += len(chunk)
                    yield chunk
                if self.tasks.attempt_open(task_id, number):
                    await asyncio.sleep(FOLLOW_POLL)
                    continue
                async for chunk in _read(path, offset):  # what it wrote just before the end
                    offset += len(chunk)
                    yield chunk
            task = self.tasks.task(task_id)
            if across and task.attempts > number:  # a later attempt (perhaps already over)
                number, offset = number + 1, 0
            elif not across or task.state in FINAL_STATES:
                return
            else:
                with contextlib.suppress(Unavailable):  # stopping: the loop ends
                    await self.hub.wait_change(task_id, 1.0)


def _tail_start(data: bytes, lines: int) -> int:
    """Where the last `lines` lines of `data` start (as `tail_offset`, in memory)."""
    if lines == 0:
        return len(data)
    end = len(data) - 1 if data.endswith(b"\n") else len(data)
    while lines and end > 0:
        end = data.rfind(b"\n", 0, end)
        if end < 0:
            return 0
        lines -= 1
    return end + 1 if lines == 0 else 0


def tail_offset(path: Path, lines: int, block: int = TAIL_BLOCK) -> int:
    """Offset where the last `lines` lines start (a last line without a newline counts as one;
    fewer lines than asked: 0). Reads backwards in blocks and stops at the newline it needs,
    so the cost is what the tail returns plus one block. Blocking I/O: call it in a thread."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return 0
    with f:
        size = os.fstat(f.fileno()).st_size
        if lines == 0:
            return size
        f.seek(max(0, size - 1))
        pos = size - 1 if f.read(1) == b"\n" else size  # a final newline starts no line
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk, found = f.read(pos - start), pos - start
            while (found := chunk.rfind(b"\n", 0, found)) >= 0:
                lines -= 1
                if lines == 0:
                    return start + found + 1
            pos = start
    return 0


async def _read(path: Path, start: int) -> AsyncIterator[bytes]:
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return
    with f:
        f.seek(start)
        while chunk := f.read(READ_BLOCK):
            yield chunk
