"""Reliability: restarts and stops that keep work, bounded output, a full disk, retention, and a
chaos run with the daemon SIGKILLed at random moments."""

from __future__ import annotations

import json
import os
import random
import sqlite3
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import TASKCTL, Home, _alive, figure, wait_until


def _gated(home: Home, code: int) -> int:
    gate = home.path / "go"
    return home.submit("sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.05; done; exit {code}")


def test_restart_replaces_the_daemon_and_running_tasks_finish_with_their_codes(
    daemon: Home,
) -> None:
    daemon.config(concurrency=4)
    daemon.ok("daemon", "stop")
    daemon.start()
    ids = [_gated(daemon, code) for code in (0, 3, 4, 5)]
    wait_until(lambda: all(daemon.api_task(i)["state"] == "running" for i in ids))
    before = daemon.daemon_pid()
    daemon.ok("daemon", "restart")
    assert daemon.daemon_pid() != before
    (daemon.path / "go").touch()
    tasks = [daemon.wait_final(i) for i in ids]
    assert [t["exit_code"] for t in tasks] == [0, 3, 4, 5]
    assert all(len(t["attempts"]) == 1 for t in tasks)  # none was restarted


def test_stop_drain_returns_only_after_running_tasks_finished(daemon: Home) -> None:
    ids = [_gated(daemon, 0), _gated(daemon, 7)]
    wait_until(lambda: {t["state"] for t in daemon.tasks(ids)} == {"running"})
    pids = [t["attempts"][0]["pid"] for t in daemon.tasks(ids)]  # held at the gate till we open
    stop = subprocess.Popen([TASKCTL, "daemon", "stop", "--drain"], env=daemon.env)
    try:
        log = daemon.path / "taskctld.log"
        wait_until(lambda: "waiting for running tasks" in log.read_text())
        assert stop.poll() is None and all(map(_alive, pids))  # it waits for them
        (daemon.path / "go").touch()
        assert stop.wait(timeout=30) == 0
    finally:
        stop.kill()
    assert not daemon.task_processes()
    daemon.start()
    assert [t["exit_code"] for t in daemon.tasks(ids)] == [0, 7]  # they ran to their own ends


def test_stop_kill_ends_tasks_and_queues_them_again_without_counting(daemon: Home) -> None:
    marker = daemon.path / "runs"
    ids = [
        daemon.submit("sh", "-c", f"echo run >> {marker}.{n}; sleep 300 & sleep 300; wait")
        for n in range(2)
    ]
    wait_until(lambda: all(daemon.api_task(i)["state"] == "running" for i in ids))
    wait_until(lambda: len(daemon.task_processes()) >= 6)
    daemon.ok("daemon", "stop", "--kill")
    assert daemon.task_processes() == []  # every process of every task is gone
    for i in ids:
        assert daemon.run("status", str(i)).returncode == 3  # no daemon now
    daemon.start()
    for i in ids:
        task = daemon.task(i)
        assert task["attempts"][0]["outcome"] == "interrupted"
        assert task["retries"] == 0  # no retry allowed, and yet it runs again: not counted
    wait_until(
        lambda: all(
            len((t := daemon.api_task(i))["attempts"]) == 2 and t["state"] == "running" for i in ids
        )
    )
    for i in ids:
        daemon.ok("cancel", str(i))


def _rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total = max(total, int(line.split()[1]))
        except OSError:
            continue
    return total / 1024


def test_a_gigabyte_of_output_is_capped_and_memory_stays_flat(daemon: Home) -> None:
    pids = [
        daemon.daemon_pid(),
        *(int(p.name.split(".")[1]) for p in (daemon.path / "run").glob("supervisor.*.json")),
    ]
    task_id = daemon.submit("sh", "-c", "head -c 1000000000 /dev/zero; echo done >&2")
    peak = 0.0
    while daemon.task(task_id)["state"] not in ("succeeded", "failed"):
        peak = max(peak, _rss_mib(pids))
        time.sleep(0.05)
    assert daemon.task(task_id)["state"] == "succeeded"
    log = daemon.path / "logs" / f"{task_id}.1.out"
    size = log.stat().st_size
    assert 100 << 20 <= size <= (100 << 20) + 200
    with log.open("rb") as f:
        f.seek((100 << 20) - 1)
        assert b"output truncated" in f.read()
    figure(
        "1 GB of output: log size (MiB), daemon+supervisor peak RSS (MiB)",
        (size >> 20, round(peak, 1)),
    )
    assert peak < 100, peak
    assert daemon.ok("logs", "--stderr", str(task_id)) == "done\n"


def test_a_full_disk_refuses_submits_clearly_and_recovers_by_itself(small_home: Home) -> None:
    home = small_home
    long_task = home.submit("sh", "-c", "sleep 1; exit 4")
    filler = home.path / "filler"
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True, check=False
    )
    refused = home.run("submit", "--", "true")
    assert refused.returncode == 6, refused.stderr
    assert "space" in refused.stderr
    assert home.json("daemon", "status")["status"] == "unhealthy"
    filler.unlink()
    assert home.wait_final(long_task)["exit_code"] == 4  # its state was kept
    assert home.run("submit", "--wait", "--", "true").returncode == 0
    assert home.run("health").returncode == 0
    with sqlite3.connect(home.path / "taskctl.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_prune_removes_finished_tasks_and_their_logs_only(daemon: Home) -> None:
    done = [daemon.submit("echo", "x") for _ in range(5)]
    for i in done:
        daemon.wait_final(i)
    running = daemon.submit("sleep", "30")
    assert list((daemon.path / "logs").glob(f"{done[0]}.*"))
    removed = daemon.json("prune", "--older-than", "0s")
    assert removed["tasks"] == 5 and removed["log_files"] == 5
    assert [t["id"] for t in daemon.json("list")] == [running]
    assert not list((daemon.path / "logs").glob(f"{done[0]}.*"))
    assert daemon.run("status", str(done[0])).returncode == 4
    assert {q["name"]: q["counts"] for q in daemon.json("queue", "list")}["default"].get(
        "succeeded", 0
    ) == 0
    daemon.ok("cancel", str(running))


@pytest.mark.sqlite_only  # it measures the SQLite file
def test_the_store_does_not_grow_without_bound(daemon: Home) -> None:
    db = daemon.path / "taskctl.db"

    def churn() -> int:
        subprocess.run(
            ["bash", "-c", f"seq 1500 | sed 's/^/echo /' | {TASKCTL} submit --stdin >/dev/null"],
            env=daemon.env,
            check=True,
        )
        wait_until(
            lambda: daemon.api("/v1/summary")["states"]["succeeded"] >= 1500,
            timeout=120,
            interval=0.5,
        )
        daemon.ok("prune", "--older-than", "0s")
        return db.stat().st_size + (
            db.with_name("taskctl.db-wal").stat().st_size
            if db.with_name("taskctl.db-wal").exists()
            else 0
        )

    first = churn()
    second = churn()
    assert second <= first * 1.2, (first, second)


def test_keep_finished_caps_the_number_of_finished_tasks(home: Home) -> None:
    home.config(keep_finished=3)
    home.start()
    ids = [home.submit("true") for _ in range(6)]
    for i in ids:
        home.wait_final(i)
    home.ok("prune")  # default retention (7 days) keeps them by age; the count does not
    assert sorted(t["id"] for t in home.json("list")) == ids[-3:]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_chaos_kill_the_daemon_at_random_moments(home: Home) -> None:
    """500 tasks of mixed length, some with retries, submitted in batches while the daemon is
    SIGKILLed five times. Then: every acknowledged task is final, none ran more often than its
    policy allows, every exit code is the one its command produced, and the store is sound."""
    seed = int(os.environ.get("CHAOS_SEED", random.randrange(1 << 30)))
    print(f"chaos seed {seed}")
    rng = random.Random(seed)
    home.config(concurrency=8)
    home.start()
    ledger = home.path / "ledger"
    specs, expected = [], {}
    for n in range(500):
        retries = 1 if n % 5 == 0 else 0
        code = 0 if retries else n % 3
        sleep = rng.choice(["0", "0.05", "0.2", "0.5", "1"])
        # A task with a retry fails its first run (which need not be attempt 1: an attempt
        # that a kill stopped before it started is `interrupted`, and the next one is its
        # first run); the others exit with their own code.
        fail_first = '[ "$runs" = 1 ] && exit 9; ' if retries else ""
        script = (
            f'echo "start $TASKCTL_TASK_ID $TASKCTL_ATTEMPT" >> {ledger}; '
            f'runs=$(grep -c "^start $TASKCTL_TASK_ID " {ledger}); '
            f"sleep {sleep}; {fail_first}exit {code}"
        )
        specs.append({"command": [script], "shell": True, "retries": retries, "retry_delay": 0.1})
        expected[n] = (retries, code)
    acked: list[int] = []
    kills = sorted(rng.uniform(0.5, 25) for _ in range(5))
    began = time.monotonic()
    batches = [specs[i : i + 100] for i in range(0, 500, 100)]
    while kills or batches:
        if batches and (not kills or time.monotonic() - began < kills[0]):
            lines = "".join(json.dumps(s) + "\n" for s in batches.pop(0))
            done = home.run("submit", "--stdin", "--json-lines", input=lines)
            assert done.returncode == 0, done.stderr
            acked += [int(x) for x in done.stdout.split()]
        if kills and time.monotonic() - began >= kills[0]:
            kills.pop(0)
            home.kill9()
            home.start()
        elif not batches and kills:
            time.sleep(min(0.1, max(0.0, kills[0] - (time.monotonic() - began))))
    assert len(acked) == 500
    wait_until(
        lambda: (
            (states := home.api("/v1/summary")["states"])["succeeded"] + states["failed"] == 500
        ),
        timeout=150,
        interval=0.5,
    )
    tasks = {t["id"]: t for t in home.json("list", "-n", "1000")}
    assert sorted(tasks) == sorted(acked), "an acknowledged task is missing"
    starts = Counter(int(line.split()[1]) for line in ledger.read_text().splitlines())
    for index, task_id in enumerate(acked):
        retries, code = expected[index]
        task = tasks[task_id]
        assert starts[task_id] <= 1 + retries, (task_id, starts[task_id])
        assert all(a["outcome"] != "lost" for a in task["attempts"]), task
        counted = [a for a in task["attempts"] if a["outcome"] != "interrupted"]
        assert task["exit_code"] == code, task
        assert len(counted) == 1 + retries
    with sqlite3.connect(home.path / "taskctl.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    interrupted = sum(a["outcome"] == "interrupted" for t in tasks.values() for a in t["attempts"])
    figure(
        "chaos: tasks acknowledged, final, attempts cut by the kills",
        (len(acked), len(tasks), interrupted),
    )


def test_connected_clients_do_not_hold_a_stop_and_go_on_with_the_next_daemon(
    daemon: Home,
) -> None:
    """`watch`, `wait` and `logs -f` are connected when the daemon stops: the stop is not held
    up, the task goes on, and watch and wait carry on with the next daemon without starting
    one themselves (autostart is on for them here)."""
    gate = daemon.path / "go"
    task_id = daemon.submit("sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.05; done; exit 7")
    env = {**daemon.env, "TASKCTL_NO_AUTOSTART": "0"}

    def client(*args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [TASKCTL, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    watcher, waiter = client("watch", "--json"), client("wait", str(task_id))
    follower = client("logs", "-f", str(task_id))
    daemon.wait_streams(2)  # watch and logs -f (a wait is a plain request)
    began = time.monotonic()
    assert daemon.run("daemon", "stop").returncode == 0
    took = time.monotonic() - began
    figure("daemon stop with watch, wait and logs -f connected (s)", round(took, 2))
    # Streams end and waits answer at once: uvicorn's 2 s backstop never had to cut one (it
    # logs when it does). The time itself is only bounded loosely: on two shared cores under the
    # suite's load, a stop without any client has taken 2.1 s.
    assert "timeout graceful shutdown exceeded" not in (daemon.path / "taskctld.log").read_text()
    assert took < 5, took
    assert follower.wait(timeout=10) == 3  # it says so rather than pass for the task's end
    assert follower.stderr is not None and "goes on" in follower.stderr.read()
    with pytest.raises(AssertionError):  # the clients that wait on do not start a daemon
        wait_until(lambda: daemon.run("daemon", "status").returncode == 0, timeout=3)
    daemon.start()
    gate.touch()
    assert waiter.wait(timeout=20) == 7
    assert waiter.stderr is not None and "waiting for it to come back" in waiter.stderr.read()
    assert watcher.stdout is not None
    seen = [json.loads(watcher.stdout.readline()) for _ in range(1)]
    assert (seen[0]["task_id"], seen[0]["to_state"]) == (task_id, "failed")
    watcher.kill()
    watcher.wait()
