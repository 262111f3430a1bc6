"""The supervisor's journal: what a later daemon needs if the supervisor dies.

`run/supervisor.PID.journal` holds JSON lines, each `{kind: record}` and appended with one
`write` on an O_APPEND descriptor:
  {"started": {task_id, attempt, pid, boot_id, started_at, cgroup?}}   once a command runs
  {"ident": {task_id, attempt, start}}     its start time in ticks, for identity (after 1 s)
  {"final": {task_id, attempt, outcome, exit_code, ...}}      once it and its tree are gone
(the records of `messages`). A daemon reads it only when the supervisor is dead. It is
rewritten, keeping what is still needed, once it passes JOURNAL_COMPACT_AT.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from taskctld.supervisor.messages import Final, Ident, StartedRecord
from taskctld.supervisor.say import say

JOURNAL_COMPACT_AT = 4 << 20
Record = StartedRecord | Ident | Final
KINDS: dict[type, str] = {StartedRecord: "started", Ident: "ident", Final: "final"}


def journal_line(record: Record) -> bytes:
    return (
        json.dumps({KINDS[type(record)]: record.to_wire()}, separators=(",", ":")).encode() + b"\n"
    )


class Journal:
    """An append-only JSON-lines file; each record is one write() on an O_APPEND descriptor."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self.size = os.fstat(self.fd).st_size
        self.compact_at = JOURNAL_COMPACT_AT
        self.torn = False  # the last append failed: the file may end in part of a line

    def append(self, record: Record) -> bool:
        """Best effort: False when the record could not be written (a full disk). The
        connected daemon gets it anyway; the journal only matters if both die, and a final
        record that is not in it keeps the supervisor alive until a daemon has it (see
        `Supervisor.unjournaled`)."""
        line = journal_line(record)
        if self.torn:  # end the part of a line a failed write may have left (readers skip it)
            line = b"\n" + line
        try:
            written = os.write(self.fd, line)
        except OSError as e:
            self.torn = True
            say(f"cannot append to {self.path}: {e.strerror}")
            return False
        self.size += written
        self.torn = written < len(line)
        return not self.torn

    def rewrite(self, records: list[Record]) -> None:
        """Replace the journal with just `records` (atomic: a new file renamed over it). When
        that fails (a full disk), the old journal stays in use and the next try waits until it
        has grown by another JOURNAL_COMPACT_AT."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                for record in records:
                    f.write(journal_line(record))
            os.chmod(tmp, 0o600)
            tmp.replace(self.path)
        except OSError as e:
            say(f"cannot compact {self.path}: {e.strerror}")
            with contextlib.suppress(OSError):
                tmp.unlink()
            self.compact_at = self.size + JOURNAL_COMPACT_AT
            return
        try:  # never leave self.fd closed (a reused descriptor number would take our appends)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        except OSError as e:
            say(f"cannot reopen {self.path}: {e.strerror}")
            self.compact_at = self.size + JOURNAL_COMPACT_AT
            return
        os.close(self.fd)
        self.fd = fd
        self.size = os.fstat(self.fd).st_size
        # Many long-running attempts can keep even the compacted journal big: compact again
        # only once it has doubled, not on every record.
        self.compact_at = max(JOURNAL_COMPACT_AT, 2 * self.size)

    def wants_compacting(self) -> bool:
        return self.size > self.compact_at


def read_journal(path: Path) -> dict[tuple[int, int], dict[str, Any]]:
    """A journal as {(task_id, attempt): {"started": ..., "ident": ..., "final": ...}}, each
    the wire form of its record (decode with `messages`); torn or foreign lines are skipped."""
    attempts: dict[tuple[int, int], dict[str, Any]] = {}
    try:
        lines = path.read_bytes().split(b"\n")
    except FileNotFoundError:
        return attempts
    for line in lines:
        try:
            record = json.loads(line)
            ((kind, body),) = record.items()
            key = (int(body["task_id"]), int(body["attempt"]))
        except (ValueError, TypeError, KeyError, AttributeError):
            continue
        attempts.setdefault(key, {})[kind] = body
    return attempts
