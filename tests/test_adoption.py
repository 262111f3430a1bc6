"""Tasks outlive their daemon: the next daemon adopts them and records their real outcome."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

import pytest

from taskctl.units import now_ms
from taskctld.procfs import ProcessId, read_boot_id
from taskctld.runner.journals import kill_orphan

from conftest import Home, need, need_root, wait_until


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
    wait_until(lambda: daemon.api_task(task_id)["state"] == "running")
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
    wait_until(lambda: daemon.api_task(task_id)["state"] == "running")
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
    wait_until(lambda: all(daemon.api_task(i)["state"] == "running" for i in ids))
    daemon.ok("daemon", "stop")
    gate.touch()
    daemon.start()
    assert [daemon.wait_final(i)["exit_code"] for i in ids] == [3, 4]


def test_a_dead_supervisor_means_lost_and_no_orphan(daemon: Home) -> None:
    task_id = daemon.submit("sleep", "300")
    wait_until(lambda: daemon.api_task(task_id)["attempts"][0]["pid"])
    pid = daemon.task(task_id)["attempts"][0]["pid"]
    for sup in _supervisors(daemon):
        os.kill(sup, signal.SIGKILL)
    task = daemon.wait_final(task_id)
    assert task["state"] == "failed" and task["attempts"][0]["outcome"] == "lost"
    wait_until(lambda: not _alive(pid))
    # and the daemon goes on with a new supervisor
    assert daemon.run("submit", "--wait", "--", "true").returncode == 0


def test_a_daemon_started_from_a_task_does_not_pass_on_its_markers(home: Home) -> None:
    """The supervisor finds a task's strays by TASKCTL_TASK_ID: it must not carry one itself."""
    markers = {"TASKCTL_TASK_ID": "1", "TASKCTL_ATTEMPT": "1", "TASKCTL_QUEUE": "default"}
    home.ok("daemon", "start", env=markers)
    task = home.wait_final(home.submit("sh", "-c", "sleep 30 & echo $TASKCTL_TASK_ID"))
    assert task["id"] == 1 and home.ok("logs", "1") == "1\n"
    (supervisor,) = wait_until(lambda: _supervisors(home))
    with open(f"/proc/{supervisor}/environ", "rb") as f:
        environ = f.read().split(b"\0")
    assert not [e for e in environ if e.startswith(b"TASKCTL_TASK_ID=")]
    assert _alive(supervisor) and home.run("health").returncode == 0


def test_a_reused_pid_is_never_taken_for_an_orphaned_task() -> None:
    """A command whose supervisor died is killed by pid only while that pid is still the same
    process: same boot, same start time (in ticks once journaled, else to two seconds)."""
    other = subprocess.Popen(["sleep", "60"], process_group=0)
    try:
        ident = ProcessId.of(other.pid)
        assert ident is not None
        started = {"pid": other.pid, "boot_id": read_boot_id(), "started_at": now_ms()}
        kill_orphan(started, {"start": ident.start + 1})  # the pid was taken since
        kill_orphan({**started, "boot_id": "an-earlier-boot"}, {"start": ident.start})
        kill_orphan({**started, "started_at": now_ms() - 60_000}, None)  # no ticks journaled
        with pytest.raises(subprocess.TimeoutExpired):
            other.wait(timeout=0.5)  # none of those was it
        kill_orphan(started, None)  # it is: started when the journal says
        assert other.wait(timeout=5) == -signal.SIGKILL
    finally:
        other.kill()
        other.wait()


def test_no_supervisor_means_nothing_is_claimed_until_a_new_one_starts(daemon: Home) -> None:
    """Our supervisor dies and a new one cannot start (its socket cannot be made here): health
    says why, tasks wait queued rather than `running` with no process, and the daemon keeps
    trying, so they run once it can."""
    need("chattr")
    need_root("to make a folder immutable (chattr +i)")
    subprocess.run(["chattr", "+i", str(daemon.path)], check=True)
    try:
        for sup in _supervisors(daemon):
            os.kill(sup, signal.SIGKILL)
        sick = wait_until(lambda: (h := daemon.run("health")).returncode == 1 and h)
        assert "cannot start a supervisor" in sick.stderr
        task_id = daemon.submit("true")
        assert daemon.task(task_id)["state"] == "queued"
    finally:
        subprocess.run(["chattr", "-i", str(daemon.path)], check=True)
    assert daemon.wait_final(task_id)["state"] == "succeeded"
    wait_until(lambda: daemon.run("health").returncode == 0)


def test_a_stopped_supervisor_is_continued_not_killed_and_nothing_runs_twice(
    daemon: Home,
) -> None:
    """SIGSTOP the supervisor: health says so. A command that ends meanwhile cannot be reaped;
    `daemon restart` then continues the supervisor rather than killing it (which would lose
    the exit status and run the task again), and the attempt keeps its real exit code."""
    gate, runs = daemon.path / "go", daemon.path / "runs"
    command = f"echo run >> {runs}; while [ ! -e {gate} ]; do sleep 0.05; done; exit 0"
    task_id = daemon.submit("sh", "-c", command, options=("--retries", "1"))
    pid = wait_until(lambda: daemon.task(task_id)["attempts"][0]["pid"])
    (stuck,) = _supervisors(daemon)
    os.kill(stuck, signal.SIGSTOP)
    try:
        sick = wait_until(lambda: (h := daemon.run("health")).returncode == 1 and h)
        assert f"the supervisor (pid {stuck}) does not answer (it is stopped)" in sick.stderr
        gate.touch()
        wait_until(lambda: not _alive(pid))  # ended, but nobody can reap it yet
        restarted = daemon.run("daemon", "restart")
        assert restarted.returncode == 0, restarted.stderr
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stuck, signal.SIGCONT)
    task = daemon.wait_final(task_id)
    assert task["state"] == "succeeded" and task["exit_code"] == 0
    assert [a["outcome"] for a in task["attempts"]] == ["exited"]
    assert runs.read_text() == "run\n"
    assert "is stopped; continuing it" in (daemon.path / "taskctld.log").read_text()
    wait_until(lambda: daemon.run("health").returncode == 0)
