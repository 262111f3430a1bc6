"""Tasks outlive their daemon: the next daemon adopts them and records their real outcome."""

from __future__ import annotations

import os
import signal

from conftest import Home, wait_until


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _supervisors(home: Home) -> list[int]:
    return [int(p.name.split(".")[1]) for p in (home.path / "run").glob("supervisor.*.json")]


def test_a_task_running_across_a_daemon_kill_keeps_its_exit_code(daemon: Home) -> None:
    gate = daemon.path / "go"
    task_id = daemon.submit("sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.05; done; exit 42")
    wait_until(lambda: daemon.task(task_id)["state"] == "running")
    daemon.kill9()
    daemon.start()
    assert daemon.task(task_id)["state"] == "running"  # adopted, not lost
    gate.touch()
    task = daemon.wait_final(task_id)
    assert task["state"] == "failed" and task["exit_code"] == 42
    assert [a["outcome"] for a in task["attempts"]] == ["exited"]


def test_a_task_that_ended_while_no_daemon_ran_keeps_its_exit_code(daemon: Home) -> None:
    gate = daemon.path / "go"
    task_id = daemon.submit("sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.05; done; exit 42")
    wait_until(lambda: daemon.task(task_id)["state"] == "running")
    daemon.kill9()
    gate.touch()
    wait_until(
        lambda: not [p for p in daemon.task_processes() if p not in _supervisors(daemon)],
        timeout=10,
    )
    daemon.start()
    task = daemon.wait_final(task_id)
    assert task["state"] == "failed" and task["exit_code"] == 42


def test_daemon_stop_leaves_tasks_running_and_the_next_daemon_finishes_them(daemon: Home) -> None:
    gate = daemon.path / "go"
    ids = [
        daemon.submit("sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.05; done; exit {n}")
        for n in (3, 4)
    ]
    wait_until(lambda: all(daemon.task(i)["state"] == "running" for i in ids))
    daemon.ok("daemon", "stop")
    gate.touch()
    daemon.start()
    assert [daemon.wait_final(i)["exit_code"] for i in ids] == [3, 4]


def test_a_dead_supervisor_means_lost_and_no_orphan(daemon: Home) -> None:
    task_id = daemon.submit("sleep", "300")
    wait_until(lambda: daemon.task(task_id)["attempts"][0]["pid"])
    pid = daemon.task(task_id)["attempts"][0]["pid"]
    for sup in _supervisors(daemon):
        os.kill(sup, signal.SIGKILL)
    task = daemon.wait_final(task_id)
    assert task["state"] == "failed" and task["attempts"][0]["outcome"] == "lost"
    wait_until(lambda: not _alive(pid))
    # and the daemon goes on with a new supervisor
    assert daemon.run("submit", "--wait", "--", "true").returncode == 0
