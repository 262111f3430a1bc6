"""No process of an attempt outlives it: each attempt runs in a cgroup of its own, and cancel,
timeout, natural end and a dead supervisor end the whole cgroup, whatever its processes did to
their session, process group or environment."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from taskctld import containment

from conftest import Home, need_root, wait_until

# Eight ways for a descendant to get away from its task. Each writes its pid to a file named
# for its kind, then lives for five minutes unless something ends it.
PY = sys.executable
NEW_GROUP = "import os,sys,time; os.setpgid(0,0); open(sys.argv[1],'w').write(str(os.getpid())); time.sleep(300)"
DOUBLE_FORK = (
    "import os,sys\n"
    "if os.fork(): os._exit(0)\n"
    "os.setsid()\n"
    "if os.fork(): os._exit(0)\n"
    "open(sys.argv[1],'w').write(str(os.getpid()))\n"
    "os.execve('/bin/sleep', ['sleep', '300'], {})\n"
)
SPAWNER = f"""
d=$1
sleep 300 & echo $! > $d/same-group
sh -c 'sleep 300 & echo $! > '$d'/grandchild; wait' &
{PY} -c "{NEW_GROUP}" $d/new-group &
setsid -f sh -c 'echo $$ > '$d'/setsid; exec sleep 300'
setsid -f env -i /bin/sh -c 'echo $$ > '$d'/setsid-env-i; exec sleep 300'
env -i {PY} -c "$DOUBLE_FORK" $d/double-fork-empty-env
sh -c 'trap "" TERM; echo $$ > '$d'/subtree-ignoring-term; while :; do sleep 1; done' &
setsid -f sh -c 'trap "" TERM; echo $$ > '$d'/session-ignoring-term; while :; do sleep 1; done'
while [ $(ls $d | wc -l) -lt 8 ]; do sleep 0.01; done
[ "$2" = exit ] && exit 0
exec sleep 300
"""
KINDS = 8


@pytest.fixture
def needs_cgroups() -> None:
    need_root("to make cgroups (or a systemd Delegate=yes unit)")
    if containment.cgroup2_mount() is None:
        pytest.skip("needs a cgroup v2 hierarchy")


def _escapees(home: Home, then: str, *options: str) -> tuple[int, Path]:
    """Submit the spawner; its id and the folder where its descendants write their pids."""
    script, pids = home.path / "spawner.sh", home.path / "pids"
    script.write_text(SPAWNER)
    pids.mkdir()
    command = ("sh", str(script), str(pids), then)
    options = ("-e", f"DOUBLE_FORK={DOUBLE_FORK}", "--kill-grace", "1s", *options)
    task_id = home.submit(*command, options=options)
    wait_until(lambda: len(list(pids.iterdir())) == KINDS, timeout=20)
    wait_until(lambda: all(p.read_text().strip() for p in pids.iterdir()))
    return task_id, pids


def _survivors(pids: Path) -> list[str]:
    """The kinds whose process is still alive (a zombie has ended)."""
    alive = []
    for entry in pids.iterdir():
        pid = int(entry.read_text())
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue
        if state not in ("Z", "X"):
            alive.append(entry.name)
    return sorted(alive)


def _supervisors(home: Home) -> list[int]:
    return [int(p.name.split(".")[1]) for p in (home.path / "run").glob("supervisor.*.json")]


def test_health_says_attempts_are_contained_by_cgroup(daemon: Home, needs_cgroups: None) -> None:
    assert daemon.json("health")["containment"] == "cgroup"
    assert "containment   cgroup" in daemon.ok("daemon", "status")


def test_cancel_leaves_no_descendant_of_any_kind(daemon: Home, needs_cgroups: None) -> None:
    task_id, pids = _escapees(daemon, "stay")
    daemon.ok("cancel", str(task_id))
    task = daemon.wait_final(task_id)
    assert task["attempts"][0]["outcome"] == "cancelled"
    assert _survivors(pids) == []  # already when the end is recorded


def test_timeout_leaves_no_descendant_of_any_kind(daemon: Home, needs_cgroups: None) -> None:
    task_id, pids = _escapees(daemon, "stay", "--timeout", "3s")
    task = daemon.wait_final(task_id, timeout=30)
    assert task["attempts"][0]["outcome"] == "timeout"
    assert _survivors(pids) == []


def test_natural_end_leaves_no_descendant_of_any_kind(daemon: Home, needs_cgroups: None) -> None:
    task_id, pids = _escapees(daemon, "exit")
    task = daemon.wait_final(task_id, timeout=30)
    assert task["state"] == "succeeded" and task["exit_code"] == 0
    assert _survivors(pids) == []


def test_the_next_daemon_ends_what_a_killed_supervisor_ran(
    daemon: Home, needs_cgroups: None
) -> None:
    task_id, pids = _escapees(daemon, "stay")
    (supervisor,) = _supervisors(daemon)
    daemon.kill9()
    os.kill(supervisor, signal.SIGKILL)
    assert len(_survivors(pids)) == KINDS  # orphaned, unsupervised, until a daemon comes
    daemon.start()
    task = daemon.wait_final(task_id)
    assert task["attempts"][0]["outcome"] == "lost"
    assert _survivors(pids) == []
    cgroups = containment.home_path(daemon.path)
    assert cgroups is not None
    assert [p.name for p in cgroups.iterdir() if p.is_dir()] == [f"sup-{_supervisors(daemon)[0]}"]


def test_a_retry_never_overlaps_the_attempt_before_it(daemon: Home, needs_cgroups: None) -> None:
    """Attempt 1 leaves a ticking descendant in a new session; its supervisor is killed. Attempt
    2 starts only once every process of attempt 1 is gone: their ticks never interleave."""
    ticks = daemon.path / "ticks"
    loop = f"while :; do echo $TASKCTL_ATTEMPT >> {ticks}; sleep 0.005; done"
    command = ("sh", "-c", f"setsid -f sh -c '{loop}'; exec sleep 300")
    task_id = daemon.submit(*command, options=("--retries", "1", "--retry-delay", "0s"))
    wait_until(lambda: ticks.exists() and ticks.read_text().count("1\n") >= 5)
    for supervisor in _supervisors(daemon):
        os.kill(supervisor, signal.SIGKILL)
    wait_until(lambda: ticks.read_text().count("2\n") >= 20, timeout=20)
    daemon.ok("cancel", str(task_id))
    seen = ticks.read_text().split()
    first_of_2 = seen.index("2")
    assert "1" not in seen[first_of_2:], "attempt 1 still ticked after attempt 2 started"
    task = daemon.wait_final(task_id)
    assert [a["outcome"] for a in task["attempts"]] == ["lost", "cancelled"]
