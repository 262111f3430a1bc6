"""What dead supervisors' journals say: an open attempt that no live supervisor knows is settled
from the journal of the one that ran it. Its final record if it has one; `lost` if it started
and its supervisor is gone (its command, if still alive, is killed first: nothing runs
unsupervised); `interrupted` (not counted) if it never started."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import Any

from taskctld import containment
from taskctld.launcher import Ended, Key
from taskctld.procfs import ProcessId, read_boot_id, start_epoch_ms
from taskctld.runner import translate
from taskctld.supervisor import messages as wire
from taskctld.supervisor import read_journal


class DeadJournals:
    """The records of supervisors that died, read once each, kept until the dispatcher has
    committed what they settled (`committed`), then deleted with their files."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.orphaned: dict[Key, dict[str, Any]] = {}  # attempt -> its records, by kind
        self.paths: list[Path] = []  # to delete once their outcomes are committed

    def read(self, alive: set[int]) -> None:
        """Read the journal of every supervisor not in `alive` (pids) that is not read yet."""
        for path in self.run_dir.glob("supervisor.*.journal"):
            pid = path.name.split(".")[1]
            if pid.isdigit() and int(pid) not in alive and path not in self.paths:
                self.orphaned.update(read_journal(path))
                self.paths.append(path)

    def knows(self, key: Key) -> bool:
        """Whether a dead supervisor's journal has a record of the attempt."""
        return key in self.orphaned

    def unknown_to(self, known: set[Key]) -> list[Key]:
        """The attempts the journals have records of, but not in `known`."""
        return [key for key in self.orphaned if key not in known]

    def settle(self, key: Key) -> Ended:
        """The end of an attempt whose supervisor is gone, from that supervisor's journal."""
        records = self.orphaned.get(key, {})
        if "final" in records:
            return translate.ended_from_final(wire.Final.from_wire(records["final"]))
        if "started" not in records:
            return translate.interrupted(
                key, "never started: the daemon stopped before its command ran"
            )
        kill_orphan(records["started"], records.get("ident"))
        return translate.lost(key)

    def committed(self) -> None:
        """What the journals settled is in the store now: they can go."""
        for path in self.paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self.paths.clear()
        self.orphaned.clear()


def kill_orphan(started: dict[str, Any], ident: dict[str, Any] | None) -> None:
    """A command whose supervisor died is unsupervised: end its process group, if that pid is
    still the same process. Identity is the start time in ticks when the journal has it (after
    a second of running), else a start within two seconds of when the supervisor started it."""
    pid, boot_id = int(started["pid"]), str(started.get("boot_id"))
    if boot_id != read_boot_id():
        return
    if started.get("cgroup"):  # no pid to trust: the cgroup holds exactly its processes
        containment.end(Path(started["cgroup"]))
        return
    if ident is not None:
        same = ProcessId(pid, int(ident["start"]), boot_id).state(boot_id) == "alive"
    else:
        began = start_epoch_ms(pid)
        same = began is not None and abs(began - int(started["started_at"])) <= 2000
    if same:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
