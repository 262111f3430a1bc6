"""A full state folder (issue 16): what ends while it is full is recorded once space returns,
`wait` then answers with the task's code, a restart or start says why it cannot happen (exit
6) instead of hanging or half-starting, and nothing is left behind.

The integration tests put the home on a small tmpfs (root only: they mount it) and fill it
with a filler file; on tmpfs even a file's first byte needs a free page, so "full" is full.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from taskctld.supervisor import (
    EXIT_NO_SPACE,
    AttemptSpec,
    Final,
    Journal,
    Supervisor,
    launch_supervisor,
    read_journal,
)

from conftest import TASKCTL, Home, _alive, figure, wait_until

EXPECTED = {"taskctl.db", "taskctld.lock", "taskctld.log", "logs", "run", "go"}


def _fill(home: Home) -> Path:
    """Take every free page of the home's file system; the filler, to remove later."""
    filler = home.path / "filler"
    for block in ("64k", "4k"):
        subprocess.run(
            ["dd", "if=/dev/zero", f"of={filler}", f"bs={block}", "oflag=append", "conv=notrunc"],
            capture_output=True,
            check=False,
        )
    assert shutil.disk_usage(home.path).free == 0
    return filler


def _gated_running(home: Home, code: int) -> tuple[int, int]:
    """A task that exits with `code` once the file `go` exists; (its id, its pid) once it runs."""
    gate = home.path / "go"
    task_id = home.submit("sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.05; done; exit {code}")
    wait_until(lambda: home.api_task(task_id)["state"] == "running")
    return task_id, home.task(task_id)["attempts"][0]["pid"]


def _end_while_full(home: Home, pid: int) -> None:
    """Open the gate (an empty file needs no free page) and wait until the command is gone."""
    (home.path / "go").touch()
    wait_until(lambda: not _alive(pid))


def _one_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def _stop_and_check_nothing_is_left(home: Home) -> None:
    """Stop the daemon, let its supervisor exit (nothing runs), and compare what is in the
    home with what belongs there: no probes, sockets or half-written files."""
    home.ok("daemon", "stop")
    run = home.path / "run"
    wait_until(lambda: not list(run.glob("supervisor.*.json")))
    wait_until(lambda: not list(home.path.glob("sup.*.sock")))
    assert {p.name for p in home.path.iterdir()} <= EXPECTED
    assert list(run.iterdir()) == []
    assert [p.name for p in (home.path / "logs").iterdir() if p.name.startswith(".")] == []


def _health(home: Home) -> dict[str, Any]:
    done = home.run("health", "--json")
    assert done.returncode == 1, done.stderr  # unhealthy
    return dict(json.loads(done.stdout))


def test_an_end_while_full_is_recorded_once_space_returns(small_home: Home) -> None:
    home = small_home
    task_id, pid = _gated_running(home, 7)
    waiter = subprocess.Popen(
        [TASKCTL, "wait", str(task_id)],
        env=home.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        filler = _fill(home)
        health = _health(home)
        assert health["storage_full"] and not health["store_writable"], health
        _end_while_full(home, pid)
        assert home.task(task_id)["state"] == "running"  # the store cannot take its end yet
        assert waiter.poll() is None
        filler.unlink()
        freed = time.monotonic()
        assert waiter.wait(timeout=20) == 7, waiter.stderr
        took = time.monotonic() - freed
    finally:
        waiter.kill()
        waiter.wait()
    figure("end recorded and wait answered after space returned (s)", round(took, 2))
    assert took < 3, took
    (attempt,) = home.task(task_id)["attempts"]
    assert (attempt["outcome"], attempt["exit_code"]) == ("exited", 7)
    assert home.run("health").returncode == 0
    _stop_and_check_nothing_is_left(home)


def test_a_restart_while_full_says_why_and_keeps_the_daemon(small_home: Home) -> None:
    home = small_home
    before = home.daemon_pid()
    task_id, pid = _gated_running(home, 9)
    filler = _fill(home)
    began = time.monotonic()
    refused = home.run("daemon", "restart", timeout=30)
    figure("restart refused while full (s)", round(time.monotonic() - began, 2))
    assert refused.returncode == 6, refused.stderr
    assert "out of space" in _one_line(refused)
    assert home.daemon_pid() == before  # the daemon was left running, not half-replaced
    _end_while_full(home, pid)
    filler.unlink()
    assert home.run("wait", str(task_id), timeout=30).returncode == 9
    home.ok("daemon", "restart")  # with space, a restart works
    assert home.daemon_pid() != before
    _stop_and_check_nothing_is_left(home)


def test_a_start_while_full_fails_in_one_line_and_leaves_nothing(small_home: Home) -> None:
    home = small_home
    task_id, pid = _gated_running(home, 11)
    filler = _fill(home)
    home.ok("daemon", "stop")  # the task goes on under its supervisor
    began = time.monotonic()
    refused = home.run("daemon", "start", timeout=60)
    figure("start refused while full (s)", round(time.monotonic() - began, 2))
    assert refused.returncode == 6, refused.stderr
    assert "out of space" in _one_line(refused)
    assert home.run("daemon", "status").returncode == 3  # nothing half-started
    (supervisor,) = home.path.glob("sup.*.sock")  # the old daemon's, still running the task
    assert not list(home.path.glob(".*")) and not list(home.path.glob("run/.*"))
    _end_while_full(home, pid)
    filler.unlink()
    home.ok("daemon", "start")  # at once: the failed start does not hold the lock
    assert home.run("wait", str(task_id), timeout=30).returncode == 11
    assert not supervisor.exists()  # it gave its end to the new daemon and retired
    _stop_and_check_nothing_is_left(home)


def test_a_supervisor_that_cannot_write_its_identity_leaves_nothing(small_home: Home) -> None:
    """What a daemon would see if the disk filled between its check and its supervisor's
    start: the supervisor exits with 6 and removes its socket and its half-written file."""
    home = small_home
    _fill(home)
    run, sock_path = home.path / "run", home.path / "sup.test.sock"
    before = set(run.iterdir())
    process, _ = launch_supervisor(run, sock_path, None)
    assert process.wait(timeout=30) == EXIT_NO_SPACE
    assert set(run.iterdir()) == before and not sock_path.exists()


def test_an_end_the_journal_cannot_take_keeps_the_supervisor_until_acknowledged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no daemon connected and the journal on a full disk (here /dev/full, as is its
    stderr), the supervisor must not exit: it alone knows the end. Once the journal takes
    it, it may."""
    monkeypatch.setattr(sys, "stderr", open("/dev/full", "w"))  # noqa: SIM115
    journal = Journal(Path("/dev/full"))
    with socket.socket(socket.AF_UNIX) as listener:
        supervisor = Supervisor(listener, journal, "boot", "secret", None, "process-group")
        supervisor.ever_attached = True  # its daemon has gone: idle, it would exit now
        assert supervisor._finished()
        spec = AttemptSpec(1, 1, ["true"], "/", {}, "/dev/null", "/dev/null")
        supervisor.attempts.record_final(spec, Final(1, 1, "exited", exit_code=7, ended_at=1))
        assert not supervisor._finished()
        supervisor.attempts.upkeep.rejournal()  # still full: it stays
        assert not supervisor._finished()
        journal.path = tmp_path / "journal"
        journal.fd = os.open(journal.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        supervisor.attempts.upkeep.rejournal()
        assert supervisor._finished()
        assert read_journal(journal.path)[(1, 1)]["final"]["exit_code"] == 7
