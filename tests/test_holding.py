"""Holding ahead: short tasks handed to the supervisor before a slot is free, so that the next
one starts the moment the last ends. A held task must stay `queued` until it starts, run once,
be taken back by cancel and pause, and be recorded when it started while no daemon listened."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from taskctl.environment import minimal_env
from taskctl.units import rfc3339_to_ms
from taskctld.dispatcher import HOLD_AHEAD
from taskctld.supervisor import AttemptSpec, FrameReader, encode_frame, launch_supervisor

from conftest import Home, _alive, wait_until

# Holding ahead is off on a shared store (a held task would still be queued for every node).
pytestmark = pytest.mark.sqlite_only

# -- the supervisor's side, over its wire --------------------------------------------------------


class Wire:
    """A daemon's end of one supervisor connection, for the protocol tests."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.proc, self.info = launch_supervisor(folder, folder / "s.sock", None)
        self.connect()

    def connect(self) -> dict[str, Any]:
        """Connect (again, as the next daemon would); returns the supervisor's hello."""
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(self.info.socket)
        self.send(op="auth", token=self.info.token)
        self.reader = FrameReader()
        self.frames: list[dict[str, Any]] = []
        hello = self.next_frame()
        assert hello["op"] == "hello"
        return hello

    def next_frame(self) -> dict[str, Any]:
        while not self.frames:
            data = self.sock.recv(65536)
            assert data, "the supervisor closed the connection"
            self.frames += self.reader.feed(data)
        return self.frames.pop(0)

    def until(self, op: str, task_id: int) -> list[dict[str, Any]]:
        """Frames up to and including `op` about `task_id`."""
        seen = []
        while not seen or (seen[-1]["op"], seen[-1].get("task_id")) != (op, task_id):
            seen.append(self.next_frame())
        return seen

    def spawn(self, task_id: int, argv: list[str], after: int | None = None) -> None:
        spec = AttemptSpec(
            task_id, 1, argv, str(self.folder), minimal_env(),
            str(self.folder / f"{task_id}.out"), str(self.folder / f"{task_id}.err"),
        )  # fmt: skip
        message: dict[str, Any] = {"op": "spawn", "spec": spec.__dict__}
        if after is not None:
            message["after"], message["hold"] = [after, 1], 100 + task_id
        self.sock.sendall(encode_frame(message))

    def send(self, **message: Any) -> None:
        self.sock.sendall(encode_frame(message))


@pytest.fixture
def wire() -> Iterator[Wire]:
    folder = Path(tempfile.mkdtemp(prefix="tw", dir="/tmp"))
    w = Wire(folder)
    try:
        yield w
    finally:
        w.sock.close()
        w.proc.kill()
        w.proc.wait()
        shutil.rmtree(folder, ignore_errors=True)


def _gate(folder: Path, name: str = "gate") -> Path:
    """A FIFO: `cat` on it runs until the test opens and closes its write end."""
    path = folder / name
    os.mkfifo(path)
    return path


def _open_gate(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY))


def test_a_held_spawn_starts_when_the_one_before_it_ends(wire: Wire) -> None:
    gate = _gate(wire.folder)
    wire.spawn(1, ["cat", str(gate)])
    assert wire.until("started", 1)[-1]["op"] == "started"
    wire.spawn(2, ["true"], after=1)
    wire.spawn(3, ["true"], after=2)  # a chain: 3 waits for 2, which waits for 1
    wire.spawn(4, ["true"], after=1)  # 1 is followed already: given back
    wire.spawn(5, ["true"], after=99)  # nothing such runs: given back
    assert [(f["op"], f["task_id"], f["hold"]) for f in wire.until("released", 5)] == [
        ("released", 4, 104),  # the hold's token comes back with it
        ("released", 5, 105),
    ]
    threading.Thread(target=_open_gate, args=(gate,)).start()
    frames = wire.until("done", 3)  # no message from us in between: the supervisor went on
    ends = {f["task_id"]: f for f in frames if f["op"] == "done"}
    assert ends[1]["next"] == [2, 1] and ends[2]["next"] == [3, 1] and ends[3]["next"] is None
    assert [f["task_id"] for f in frames if f["op"] == "started"] == [2, 3]
    assert {f["exit_code"] for f in ends.values()} == {0}


def test_unhold_and_a_lost_daemon_keep_held_spawns_from_starting(wire: Wire) -> None:
    gate = _gate(wire.folder)
    wire.spawn(1, ["cat", str(gate)])
    wire.until("started", 1)
    wire.spawn(2, ["touch", "ran-2"], after=1)
    wire.spawn(3, ["touch", "ran-3"], after=2)
    wire.send(op="unhold", task_id=2, attempt=1, hold=102)
    assert wire.until("unheld", 2)[-2:] == [
        {"op": "released", "task_id": 3, "attempt": 1, "hold": 103},  # what waited after it
        {"op": "unheld", "task_id": 2, "attempt": 1, "taken": True, "hold": 102},  # never starts
    ]
    threading.Thread(target=_open_gate, args=(gate,)).start()
    assert wire.until("done", 1)[-1]["next"] is None
    wire.spawn(9, ["true"])  # anything started in 1's slot would be reported before 9's end
    frames = wire.until("done", 9)
    assert [f["task_id"] for f in frames if f["op"] == "started"] == [9]
    # A held spawn is its daemon's: when the next daemon connects, what the last one held is
    # gone (by its hello, the supervisor has dropped it).
    gate2 = _gate(wire.folder, "gate2")
    wire.spawn(10, ["cat", str(gate2)])
    wire.until("started", 10)
    wire.spawn(11, ["touch", "ran-11"], after=10)
    wire.sock.close()
    assert [r["task_id"] for r in wire.connect()["running"]] == [10]
    _open_gate(gate2)
    assert wire.until("done", 10)[-1]["next"] is None
    wire.spawn(12, ["true"])
    assert [f["task_id"] for f in wire.until("done", 12) if f["op"] == "started"] == [12]
    assert not [p.name for p in wire.folder.glob("ran-*")]


def test_unhold_says_when_the_held_spawn_had_started_already(wire: Wire) -> None:
    gate = _gate(wire.folder)
    wire.spawn(1, ["cat", str(gate)])
    wire.until("started", 1)
    wire.spawn(2, ["sleep", "30"], after=1)
    threading.Thread(target=_open_gate, args=(gate,)).start()
    wire.until("started", 2)  # it started in 1's slot before the daemon could take it back
    wire.send(op="unhold", task_id=2, attempt=1, hold=102)
    assert wire.until("unheld", 2)[-1] == {
        "op": "unheld", "task_id": 2, "attempt": 1, "taken": False, "hold": 102
    }  # fmt: skip
    wire.send(op="signal", task_id=2, attempt=1, kind="cancel")
    assert wire.until("done", 2)[-1]["outcome"] == "cancelled"


# -- through the daemon ---------------------------------------------------------------------------


def _warm(daemon: Home, queue: str = "default") -> None:
    """A few short tasks, so that the daemon knows this queue's tasks are short."""
    ids = [daemon.submit("true", options=("-q", queue)) for _ in range(3)]
    for task_id in ids:
        daemon.wait_final(task_id)


def _gated(daemon: Home, gate: Path) -> int:
    task_id = daemon.submit("cat", str(gate))
    wait_until(lambda: daemon.api_task(task_id)["state"] == "running")
    return task_id


def _recording(daemon: Home, runs: Path, codes: tuple[int, ...]) -> list[int]:
    """Tasks that append their id to `runs` (one line per time they ran), one per exit code."""
    return [
        daemon.submit("sh", "-c", f'echo "$TASKCTL_TASK_ID" >> {runs}; exit {c}') for c in codes
    ]


def _behind_a_gate(
    home: Home, *codes: int, queues: tuple[str, ...] = ()
) -> tuple[Path, Path, int, list[int]]:
    """Concurrency 1, a task that runs until its gate opens, and tasks (exiting with `codes`)
    held behind it: (gate, their record of runs, the gated task, the held ones). `queues` are
    made first (making one takes back what is held)."""
    home.config(concurrency=1)
    home.start()
    for queue in queues:
        home.ok("queue", "set", queue)
    _warm(home)
    gate, runs = _gate(home.path), home.path / "runs"
    first = _gated(home, gate)
    held = _recording(home, runs, codes)
    wait_until(lambda: home.api("/healthz")["held"] == len(codes))
    return gate, runs, first, held


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _runs(runs: Path) -> list[int]:
    return [int(x) for x in runs.read_text().split()] if runs.exists() else []


def test_short_tasks_never_run_more_at_once_than_the_concurrency(home: Home) -> None:
    home.config(concurrency=2)
    home.start()
    done = home.run("submit", "--stdin", input="true\n" * 400)
    ids = [int(x) for x in done.stdout.split()]
    tasks = home.wait_all_final(ids, timeout=120)
    assert {(t["state"], len(t["attempts"])) for t in tasks} == {("succeeded", 1)}
    edges = []
    for t in tasks:
        a = t["attempts"][0]
        edges += [(rfc3339_to_ms(a["started_at"]), 1), (rfc3339_to_ms(a["ended_at"]), -1)]
    # An end and a start in the same millisecond: the end counts first (the slot passed on).
    peak = max(itertools.accumulate(step for _, step in sorted(edges)))
    assert peak <= 2


def test_a_held_task_is_listed_queued_and_cancel_takes_it_back(home: Home) -> None:
    gate, runs, first, held = _behind_a_gate(home, 0, 0, 0)
    pid, began, cpu = home.daemon_pid(), time.monotonic(), _cpu_seconds(home.daemon_pid())
    for _ in range(4):
        assert [home.task(i)["state"] for i in held] == ["queued"] * 3
    # Holding is settled, not a loop of handing over and taking back: the daemon is idle but
    # for these requests (a loop would take most of a core).
    assert _cpu_seconds(pid) - cpu < 0.5 * (time.monotonic() - began)
    assert home.json("cancel", str(held[0]))["state"] == "cancelled"
    # The cancel answered once its supervisor said the task would not start (not at a timeout).
    assert "no answer about held task" not in (home.path / "taskctld.log").read_text()
    _open_gate(gate)
    assert home.wait_final(first)["state"] == "succeeded"
    assert [home.wait_final(i)["state"] for i in held[1:]] == ["succeeded"] * 2
    assert _runs(runs) == held[1:]  # the cancelled one never ran
    assert home.task(held[0])["attempts"] == []


def test_pausing_a_queue_takes_its_held_tasks_back(home: Home) -> None:
    gate, runs, first, held = _behind_a_gate(home, 0, 0, 0, queues=("other",))
    home.ok("queue", "pause", "default")
    _open_gate(gate)
    assert home.wait_final(first)["state"] == "succeeded"
    # A task in another queue runs to the end: had anything held started in the freed slot,
    # its start would have been reported before this task's.
    assert home.run("submit", "--wait", "-q", "other", "--", "true").returncode == 0
    assert [home.task(i)["state"] for i in held] == ["queued"] * 3 and _runs(runs) == []
    home.ok("queue", "resume", "default")
    assert [home.wait_final(i)["state"] for i in held] == ["succeeded"] * 3
    assert _runs(runs) == held


def test_held_tasks_that_ran_while_the_daemon_was_frozen_are_recorded_once(home: Home) -> None:
    gate, runs, first, held = _behind_a_gate(home, 3, 0, 0, 0, 0)
    failing, passing = held[:1], held[1:]
    pid = home.daemon_pid()
    os.kill(pid, signal.SIGSTOP)  # the daemon hears nothing from now on
    try:
        _open_gate(gate)
        wait_until(lambda: len(_runs(runs)) == 5)  # held tasks started without it
        os.kill(pid, signal.SIGKILL)
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_until(lambda: not _alive(pid))
    home.start()
    assert home.wait_final(first)["state"] == "succeeded"
    failed = home.wait_final(failing[0])
    assert (failed["state"], failed["exit_code"], len(failed["attempts"])) == ("failed", 3, 1)
    for task_id in passing:
        task = home.wait_final(task_id)
        assert (task["state"], len(task["attempts"])) == ("succeeded", 1)
    assert sorted(_runs(runs)) == failing + passing  # each ran exactly once


def test_a_higher_priority_task_of_another_queue_waits_at_most_the_held_lines(home: Home) -> None:
    home.config(concurrency=2)
    home.start()
    home.ok("queue", "set", "urgent")
    _warm(home)
    gate = _gate(home.path)
    gated = [_gated(home, gate) for _ in range(2)]  # both slots, each with a line behind it
    backlog = [int(x) for x in home.ok("submit", "--stdin", input="true\n" * 100).split()]
    wait_until(lambda: home.api("/healthz")["held"] == 2 * HOLD_AHEAD)
    urgent = home.submit("true", options=("-q", "urgent", "-p", "10"))
    _open_gate(gate)
    began = rfc3339_to_ms(home.wait_final(urgent)["attempts"][0]["started_at"])
    tasks = home.wait_all_final([*gated, *backlog])
    assert {t["state"] for t in tasks} == {"succeeded"}
    before = [t["id"] for t in tasks[2:] if rfc3339_to_ms(t["started_at"]) <= began]
    assert len(before) <= 2 * HOLD_AHEAD, before  # the lines already held, not the backlog


def test_held_tasks_run_once_when_the_supervisor_dies(home: Home) -> None:
    _, runs, first, held = _behind_a_gate(home, 0, 0, 0)
    (supervisor,) = (
        int(p.name.split(".")[1]) for p in (home.path / "run").glob("supervisor.*.json")
    )
    os.kill(supervisor, signal.SIGKILL)
    assert home.wait_final(first)["attempts"][0]["outcome"] == "lost"
    for task_id in held:
        task = home.wait_final(task_id)
        assert (task["state"], len(task["attempts"])) == ("succeeded", 1)
    assert _runs(runs) == held
