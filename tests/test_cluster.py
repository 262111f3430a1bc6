"""Several daemons sharing one queue in PostgreSQL: real daemons, each in its own home (socket,
supervisor, cgroups), on the tests' own throwaway PostgreSQL cluster.

What a task did is counted from inside it: each appends a line to a file of the test's, so
"ran exactly once" means one line, whatever the store says.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import TASKCTL, TASKCTLD, Home, figure, need, need_root, socket_get, wait_until

LEASE = 2.0  # seconds: short, so that rescues happen within a test


class Cluster:
    """N homes (nodes a, b, c...) on one database."""

    def __init__(self, url: str, root: Path) -> None:
        self.url = url
        self.root = root
        self.nodes: dict[str, Home] = {}

    def add(self, name: str, *, start: bool = True, **settings: Any) -> Home:
        path = Path(tempfile.mkdtemp(prefix=f"n{name}", dir="/tmp"))
        home = Home(path)
        home.config(store=self.url, node=name, lease=f"{LEASE}s", **settings)
        self.nodes[name] = home
        if start:
            home.start()
        return home

    def __getitem__(self, name: str) -> Home:
        return self.nodes[name]

    def cleanup(self) -> None:
        for home in self.nodes.values():
            home.cleanup()
            shutil.rmtree(home.path, ignore_errors=True)


@pytest.fixture
def cluster(pg_url: str, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(pg_url, tmp_path)
    try:
        yield c
    finally:
        c.cleanup()


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def recorder(out: Path) -> str:
    """A shell command that appends its task id to `out` (one write: atomic with O_APPEND)."""
    return f'echo "$TASKCTL_TASK_ID" >> {out}'


def most_at_once(out: Path) -> int:
    """The most tasks running at once, from the `start NS` and `end NS` lines they wrote."""
    marks = sorted(
        (int(t), +1 if kind == "start" else -1)
        for kind, t in (line.split() for line in out.read_text().splitlines())
    )
    running = most = 0
    for _, change in marks:
        running += change
        most = max(most, running)
    return most


def ran_on(home: Home, task_id: int) -> list[str | None]:
    """The node of each attempt of a task, as `status --json` shows it."""
    return [a.get("node") for a in home.task(task_id)["attempts"]]


# -- nodes ---------------------------------------------------------------------------------------


def test_nodes_show_the_cluster_and_a_drained_node_takes_no_work(cluster: Cluster) -> None:
    a = cluster.add("a", concurrency=2)
    cluster.add("b", concurrency=2)
    listed = {n["name"]: n for n in a.json("nodes")}
    assert set(listed) == {"a", "b"}
    assert listed["a"]["this"] and not listed["b"]["this"]
    assert {n["state"] for n in listed.values()} == {"up"}
    assert all(n["heartbeat_age"] < 2 * LEASE for n in listed.values())
    assert "b" in a.ok("nodes") and "up" in a.ok("nodes")

    a.ok("nodes", "drain", "b")
    assert {n["name"]: n["state"] for n in cluster["b"].json("nodes")}["b"] == "draining"
    ids = [int(i) for i in a.ok("submit", "--stdin", input="true\n" * 12).split()]
    done = a.wait_all_final(ids)
    assert {t["state"] for t in done} == {"succeeded"}
    assert {n for i in ids for n in ran_on(a, i)} == {"a"}

    a.ok("nodes", "resume", "b")
    assert {n["name"]: n["state"] for n in a.json("nodes")}["b"] == "up"
    status, metrics = socket_get(str(a.path / "taskctld.sock"), "/metrics")
    assert status == 200
    samples = [line for line in metrics.decode().splitlines() if line.startswith("taskctl_")]
    assert samples and all('node="a"' in line for line in samples)
    assert 'taskctl_tasks{node="a",queue="default",state="succeeded"} 12.0' in samples
    assert a.run("nodes", "drain", "nosuch").returncode == 4


@pytest.mark.sqlite_only
def test_alone_on_sqlite_the_daemon_is_its_one_node_and_drain_says_how_to_hold(
    daemon: Home,
) -> None:
    (node,) = daemon.json("nodes")
    assert node["this"] and node["state"] == "up" and node["running"] == 0
    refused = daemon.run("nodes", "drain", node["name"])
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "hold = true" in refused.stderr
    elsewhere = daemon.run("submit", "--node", "elsewhere", "--", "true")
    assert elsewhere.returncode == 2 and "no node named 'elsewhere'" in elsewhere.stderr
    assert daemon.json("list") == []


def test_a_pinned_task_runs_on_its_node_and_a_missing_cwd_is_that_nodes_spawn_error(
    cluster: Cluster,
) -> None:
    a = cluster.add("a")
    cluster.add("b")
    ids = [a.submit("true", options=("--node", "b")) for _ in range(6)]
    a.wait_all_final(ids)
    assert {n for i in ids for n in ran_on(a, i)} == {"b"}

    typo = a.run("submit", "--node", "bb", "--", "true")
    assert typo.returncode == 2 and "no node named 'bb' (nodes: a, b)" in typo.stderr

    gone = Path(tempfile.mkdtemp(dir="/tmp"))
    gone.rmdir()  # exists nowhere: the submit is taken, the run fails where it happens
    task = a.submit("true", options=("-C", str(gone), "--node", "b", "--retries", "0"))
    final = a.wait_final(task)
    assert final["state"] == "failed"
    assert final["attempts"][-1]["outcome"] == "spawn_error"
    assert "node b" in a.ok("status", str(task))


# -- claims ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ten_thousand_tasks_on_three_nodes_each_run_exactly_once(cluster: Cluster) -> None:
    out = cluster.root / "ran"
    for name in "abc":
        cluster.add(name, concurrency=4)
    n = 10_000
    started = time.monotonic()
    body = "".join(
        json.dumps({"command": ["sh", "-c", recorder(out)], "retries": 0}) + "\n" for _ in range(n)
    )
    ids = [int(i) for i in cluster["a"].ok("submit", "--stdin", "--json-lines", input=body).split()]
    assert len(ids) == n
    wait_until(lambda: len(lines(out)) >= n, timeout=600, interval=0.5)
    done = cluster["b"].json("list", "--all")
    took = time.monotonic() - started
    figure("10,000 tasks on 3 nodes, seconds", round(took, 1))
    ran = lines(out)
    assert sorted(map(int, ran)) == sorted(ids)  # each exactly once, none twice
    assert len(done) == n and {t["state"] for t in done} == {"succeeded"}
    assert {len(t["attempts"]) for t in done} == {1}  # no claim twice, no rescue
    by_node: dict[str | None, int] = {}
    for t in done:
        by_node[t["attempts"][0]["node"]] = by_node.get(t["attempts"][0]["node"], 0) + 1
    figure("tasks run per node", by_node)
    assert set(by_node) == {"a", "b", "c"}


def test_a_node_serves_only_its_queues_and_keeps_its_own_limit(cluster: Cluster) -> None:
    """b serves only `special`; a serves all, but at most one `default` task at a time."""
    out = cluster.root / "spans"
    a = cluster.add("a", concurrency=4, node_limits={"default": 1})
    b = cluster.add("b", concurrency=4, queues=["special"])
    a.ok("queue", "set", "special")
    script = f"echo start $(date +%s%N) >> {out}; sleep 0.2; echo end $(date +%s%N) >> {out}"
    plain = [b.submit("sh", "-c", script) for _ in range(5)]
    special = [b.submit("true", options=("-q", "special")) for _ in range(4)]
    a.wait_all_final(plain + special, timeout=60)
    assert {n for i in plain for n in ran_on(a, i)} == {"a"}
    most = most_at_once(out)
    assert most == 1


@pytest.mark.slow
def test_three_nodes_finish_300_half_second_tasks_in_under_0_4x_the_time_of_one(
    cluster: Cluster,
) -> None:
    """4 slots a node: one node needs 300 x 0.5 s / 4 = 37.5 s at best, three 12.5 s."""
    body = "sleep 0.5\n" * 300

    def drain(homes: list[Home]) -> float:
        ids = [int(i) for i in homes[0].ok("submit", "--stdin", input=body).split()]
        started = time.monotonic()
        homes[-1].wait_all_final(ids, timeout=240)
        return time.monotonic() - started

    one = drain([cluster.add("a", concurrency=4)])
    three = drain([cluster["a"], cluster.add("b", concurrency=4), cluster.add("c", concurrency=4)])
    figure("300 x sleep 0.5 on 1 node, s", round(one, 1))
    figure("300 x sleep 0.5 on 3 nodes, s", round(three, 1))
    figure("3 nodes / 1 node", round(three / one, 2))
    assert three <= 0.4 * one


def test_a_queue_of_concurrency_two_runs_two_at_most_in_the_whole_cluster(
    cluster: Cluster,
) -> None:
    out = cluster.root / "spans"
    for name in "abc":
        cluster.add(name, concurrency=4)
    cluster["a"].ok("queue", "set", "pair", "--concurrency", "2")
    script = f"echo start $(date +%s%N) >> {out}; sleep 0.3; echo end $(date +%s%N) >> {out}"
    ids = [cluster[n].submit("sh", "-c", script, options=("-q", "pair")) for n in "abcabcabcabc"]
    cluster["a"].wait_all_final(ids, timeout=60)
    most = most_at_once(out)
    figure("most running at once in a queue of concurrency 2 on 3 nodes", most)
    assert most == 2
    nodes = {n for i in ids for n in ran_on(cluster["a"], i)}
    assert len(nodes) >= 2  # the work did spread


def test_one_key_submitted_twenty_times_at_once_over_three_nodes_is_one_task(
    cluster: Cluster,
) -> None:
    for name in "abc":
        cluster.add(name)
    results: list[subprocess.CompletedProcess[str]] = []
    lock = threading.Lock()

    def submit(home: Home) -> None:
        done = home.run("submit", "--key", "the-one", "--", "sleep", "1")
        with lock:
            results.append(done)

    threads = [threading.Thread(target=submit, args=(cluster["abc"[i % 3]],)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    assert len({r.stdout.strip() for r in results}) == 1
    assert len(cluster["b"].json("list", "--all")) == 1


# -- losing a node -----------------------------------------------------------------------------------


def _supervisors(home: Home) -> list[int]:
    return [int(p.name.split(".")[1]) for p in (home.path / "run").glob("supervisor.*.json")]


def test_a_node_killed_with_eight_running_tasks_has_them_rescued_within_the_lease(
    cluster: Cluster,
) -> None:
    a = cluster.add("a", concurrency=8)
    ids = [a.submit("sleep", "300", options=("--retries", "0")) for _ in range(8)]
    wait_until(lambda: all(a.api_task(i)["state"] == "running" for i in ids))
    b = cluster.add("b", concurrency=8)
    killed_at = time.monotonic()
    for pid in [a.daemon_pid(), *_supervisors(a)]:
        os.kill(pid, signal.SIGKILL)
    finals = b.wait_all_final(ids, timeout=LEASE + 10)
    took = time.monotonic() - killed_at
    figure("8 tasks of a killed node final after, seconds", round(took, 2))
    assert took <= LEASE + 10
    assert {t["state"] for t in finals} == {"failed"}
    assert {t["attempts"][-1]["outcome"] for t in finals} == {"lost"}
    assert {n["name"]: n["state"] for n in b.json("nodes")}["a"] == "lost"


def test_a_stopped_node_loses_its_tasks_to_another_and_stops_its_own_copies(
    cluster: Cluster,
) -> None:
    out = cluster.root / "done"
    a = cluster.add("a", concurrency=4)
    work = f"sleep 8; {recorder(out)}"
    ids = [a.submit("sh", "-c", work, options=("--retries", "1")) for _ in range(4)]
    wait_until(lambda: all(a.api_task(i)["state"] == "running" for i in ids))
    b = cluster.add("b", concurrency=4)
    stopped = [a.daemon_pid(), *_supervisors(a)]
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        # b rescues a's attempts (lost; one retry left) and runs them again itself.
        wait_until(
            lambda: all(len(b.api_task(i)["attempts"]) >= 2 for i in ids), timeout=LEASE + 10
        )
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    finals = b.wait_all_final(ids, timeout=30)
    assert {t["state"] for t in finals} == {"succeeded"}
    assert sorted(map(int, lines(out))) == sorted(ids)  # a's copies never finished
    log = (a.path / "taskctld.log").read_text()
    assert "lease lost" in log
    wait_until(lambda: {n["name"]: n["state"] for n in b.json("nodes")}["a"] == "up")


class Netns:
    """A network namespace of the test's own, joined to the host by a veth pair: the host
    end is 10.77.N.1, the namespace's 10.77.N.2. `cut` and `mend` take the link down and up."""

    def __init__(self) -> None:
        n = os.getpid() % 200 + 20
        self.name, self.host_if, self.ns_if = f"tc{n}", f"tch{n}", f"tcn{n}"
        self.host_ip, self.ns_ip = f"10.77.{n}.1", f"10.77.{n}.2"

    def ip(self, *args: str, inside: bool = False) -> None:
        prefix = ["ip", "netns", "exec", self.name] if inside else []
        subprocess.run([*prefix, "ip", *args], check=True, capture_output=True)

    def __enter__(self) -> Netns:
        self.__exit__()
        self.ip("netns", "add", self.name)
        self.ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        self.ip("link", "set", self.ns_if, "netns", self.name)
        self.ip("addr", "add", f"{self.host_ip}/24", "dev", self.host_if)
        self.ip("link", "set", self.host_if, "up")
        self.ip("addr", "add", f"{self.ns_ip}/24", "dev", self.ns_if, inside=True)
        self.ip("link", "set", self.ns_if, "up", inside=True)
        self.ip("link", "set", "lo", "up", inside=True)
        return self

    def cut(self) -> None:
        self.ip("link", "set", self.host_if, "down")

    def mend(self) -> None:
        self.ip("link", "set", self.host_if, "up")

    def __exit__(self, *_: object) -> None:
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)


def test_a_node_cut_off_from_the_database_loses_its_tasks_and_stops_its_copies(
    tmp_path: Path,
) -> None:
    """Node a runs in a network namespace of its own and reaches PostgreSQL over a veth pair;
    the link goes down while it runs 3 tasks. Node b rescues them (lost; one retry each) and
    runs them again; a, cut off for longer than its lease, stops its own copies (they never
    finish) and says so; once the link is back it rejoins."""
    need_root("to make a network namespace")
    need("ip")
    from pgcluster import running_cluster

    out = tmp_path / "done"
    pg_root = Path(tempfile.mkdtemp(prefix="pg", dir="/tmp"))  # the server's user must reach it
    with Netns() as ns, running_cluster(pg_root, listen="*") as pg:
        url = pg.new_database().replace("127.0.0.1", ns.host_ip)
        cluster = Cluster(url, tmp_path)
        try:
            a = cluster.add("a", start=False, concurrency=4)
            started = subprocess.run(
                ["ip", "netns", "exec", ns.name, TASKCTL, "daemon", "start"],
                env=a.env, capture_output=True, text=True, check=False,
            )  # fmt: skip
            assert started.returncode == 0, started.stderr
            work = f"sleep 12; {recorder(out)}"
            ids = [a.submit("sh", "-c", work, options=("--retries", "1")) for _ in range(3)]
            wait_until(lambda: all(a.api_task(i)["state"] == "running" for i in ids))
            b = cluster.add("b", concurrency=4)
            ns.cut()
            cut_at = time.monotonic()
            wait_until(
                lambda: all(len(b.api_task(i)["attempts"]) >= 2 for i in ids),
                timeout=LEASE + 15,
            )
            figure(
                "a cut-off node's tasks running elsewhere after, s",
                round(time.monotonic() - cut_at, 1),
            )
            log = a.path / "taskctld.log"
            wait_until(lambda: "lease lost" in log.read_text(), timeout=LEASE + 15)
            ns.mend()
            finals = b.wait_all_final(ids, timeout=40)
            assert {t["state"] for t in finals} == {"succeeded"}
            assert sorted(map(int, lines(out))) == sorted(ids)  # a's copies never finished
            assert {t["attempts"][-1]["node"] for t in finals} == {"b"}
            wait_until(lambda: {n["name"]: n["state"] for n in b.json("nodes")}["a"] == "up", 30)
        finally:
            cluster.cleanup()


def test_a_node_whose_task_was_rescued_gets_its_slot_back(cluster: Cluster) -> None:
    """a has one slot; its task is rescued by b while a is stopped. The end a hears later is
    stale, and the slot is free all the same: a task pinned to a runs."""
    a = cluster.add("a", concurrency=1)
    first = a.submit("sleep", "300", options=("--retries", "0"))
    wait_until(lambda: a.api_task(first)["state"] == "running")
    b = cluster.add("b")
    stopped = [a.daemon_pid(), *_supervisors(a)]
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        assert b.wait_final(first, timeout=LEASE + 10)["attempts"][0]["outcome"] == "lost"
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    pinned = b.submit("true", options=("--node", "a"))
    assert b.wait_final(pinned, timeout=20)["state"] == "succeeded"
    wait_until(lambda: a.api("/healthz")["running"] == 0)


def test_an_attempt_on_record_that_its_node_never_started_runs_again(cluster: Cluster) -> None:
    """A claim whose commit went through though its answer was lost leaves an attempt on
    record for a node that never started it. Made here by claiming as node a from the test
    (a serves only `default`; the task is in `other`): a finds it at its polls and ends it
    interrupted, so the task is queued again instead of running for ever."""
    from taskctld.lifecycle import Lifecycle
    from taskctld.store.postgres import PostgresStore

    a = cluster.add("a", queues=["default"])
    a.ok("queue", "set", "other")
    task = a.submit("true", options=("-q", "other"))
    ghost = PostgresStore(cluster.url, node="a")
    try:
        with ghost.transaction():
            assert [t.id for t in Lifecycle(ghost).claim({"other": 1}, 1, 1).tasks] == [task]
    finally:
        ghost.close()
    wait_until(lambda: a.api_task(task)["state"] == "queued", timeout=LEASE + 10)
    (attempt,) = a.task(task)["attempts"]
    assert attempt["outcome"] == "interrupted" and "never started" in attempt["error"]


def test_a_cancel_of_a_task_on_a_stopped_node_holds_and_it_never_runs_again(
    cluster: Cluster,
) -> None:
    """The node running the task cannot hear the cancel (stopped); the cancel is kept in the
    store, and the node that rescues it ends it cancelled, not lost: its retries do not run it
    again."""
    a = cluster.add("a")
    task = a.submit("sleep", "300", options=("--retries", "3"))
    wait_until(lambda: a.api_task(task)["state"] == "running")
    b = cluster.add("b")
    stopped = [a.daemon_pid(), *_supervisors(a)]
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        done = b.run("cancel", str(task), timeout=60)
        assert done.returncode == 0, done.stderr
        final = b.task(task)
        assert final["state"] == "cancelled" and len(final["attempts"]) == 1
        assert final["attempts"][0]["outcome"] == "cancelled"
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    wait_until(lambda: "lease lost" in (a.path / "taskctld.log").read_text(), timeout=20)
    wait_until(lambda: not [p for p in a.task_processes() if "sleep" in _cmdline(p)], 20)
    assert b.task(task)["state"] == "cancelled"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


# -- seeing the whole cluster from any node ----------------------------------------------------------


def test_any_node_lists_waits_cancels_and_watches_the_whole_cluster(cluster: Cluster) -> None:
    a = cluster.add("a")
    b = cluster.add("b")
    watch = subprocess.Popen(
        [TASKCTL, "watch", "--json"], env=b.env, stdout=subprocess.PIPE, text=True
    )
    try:
        b.wait_streams()
        long = a.submit("sleep", "300", options=("--node", "a"))
        wait_until(lambda: b.api_task(long)["state"] == "running")
        b.ok("cancel", str(long))  # b asks a to stop it
        assert b.task(long)["state"] == "cancelled"
        quick = a.submit("true", options=("--node", "a"))
        assert b.wait_final(quick)["state"] == "succeeded"
        seen: list[dict[str, Any]] = []

        def saw_both() -> bool:
            assert watch.stdout is not None
            seen.append(json.loads(watch.stdout.readline()))
            ids = {e["task_id"] for e in seen if e["to_state"] in ("cancelled", "succeeded")}
            return {long, quick} <= ids

        wait_until(saw_both, timeout=20)
    finally:
        watch.kill()
        watch.wait()
    # The same events, resumed from the log on the other node: the same ones, in the same
    # (commit) order, as b's live stream gave them.
    ids = [e["id"] for e in seen]
    assert ids == sorted(ids)
    resumed = subprocess.Popen(
        [TASKCTL, "watch", "--json", "--since", str(ids[0] - 1)],
        env=a.env, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert resumed.stdout is not None
        again = [json.loads(resumed.stdout.readline()) for _ in seen]
    finally:
        resumed.kill()
        resumed.wait()
    assert again == seen


def test_the_output_of_a_task_that_ran_on_another_node_is_shown_and_followed(
    cluster: Cluster,
) -> None:
    a = cluster.add("a")
    b = cluster.add("b")
    script = "for i in 1 2 3; do echo line $i; done; printf 'caf\\351' >&2"
    done = a.submit("sh", "-c", script, options=("--node", "a"))
    assert b.wait_final(done)["state"] == "succeeded"
    assert b.ok("logs", str(done)) == "line 1\nline 2\nline 3\n"
    raw = subprocess.run(
        [TASKCTL, "logs", "--raw", "--stderr", str(done)], env=b.env, capture_output=True
    )
    assert raw.stdout == b"caf\xe9"  # the bytes as the task wrote them
    assert b.ok("logs", "--tail", "1", str(done)) == "line 3\n"
    gate = cluster.root / "go"
    slow = a.submit(
        "sh", "-c", f"echo one; while [ ! -e {gate} ]; do sleep 0.05; done; echo two",
        options=("--node", "a"),
    )  # fmt: skip
    follow = subprocess.Popen(
        [TASKCTL, "logs", "-f", str(slow)], env=b.env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert follow.stdout is not None
        assert follow.stdout.readline() == "one\n"  # shipped while it runs
        gate.touch()
        assert follow.stdout.read() == "two\n"
        assert follow.wait(timeout=20) == 0
    finally:
        follow.kill()


def test_a_password_on_taskctlds_command_line_is_refused_and_never_shown(
    cluster: Cluster,
) -> None:
    """`--store` works (a URL without a password), and one with a password is refused: every
    user can read a command line."""
    home = cluster.add("a", start=False)
    home.config(node="a")  # no store in the file: the command line gives it
    url = cluster.url
    secret = url.replace("postgres@", "postgres:s3cr3t-pw@")
    refused = subprocess.run(
        [TASKCTLD, "--store", secret], env=home.env, capture_output=True, text=True, timeout=30
    )
    assert refused.returncode == 2 and "s3cr3t" not in refused.stdout + refused.stderr
    assert "~/.pgpass" in refused.stderr
    started = subprocess.run(
        [TASKCTLD, "--store", url], env=home.env, capture_output=True, text=True, timeout=60
    )
    assert started.returncode == 0, started.stderr
    assert [n["name"] for n in home.json("nodes")] == ["a"]


def test_health_names_a_store_it_cannot_reach_and_never_its_password(tmp_path: Path) -> None:
    from pgcluster import running_cluster

    pg_root = Path(tempfile.mkdtemp(prefix="pg", dir="/tmp"))
    with running_cluster(pg_root) as pg:
        url = pg.new_database().replace("postgres@", "postgres:s3cr3t-pw@")  # trust: ignored
        cluster = Cluster(url, tmp_path)
        try:
            a = cluster.add("a")
            assert a.json("health")["status"] == "ok"
            subprocess.run(
                [str(pg.bindir / "pg_ctl"), "-D", str(pg.data), "-m", "immediate", "stop"],
                user=pg.user, check=True, capture_output=True,
            )  # fmt: skip
            done = a.run("health")
            assert done.returncode != 0
            assert "unreachable" in done.stdout and f"127.0.0.1:{pg.port}" in done.stdout
            shown = done.stdout + done.stderr + a.run("health", "--json").stdout
            shown += (a.path / "taskctld.log").read_text()
            assert "s3cr3t" not in shown
        finally:
            cluster.cleanup()


# -- cron ------------------------------------------------------------------------------------------


def test_a_cron_schedule_on_three_nodes_fires_once_per_due_minute(
    pg_url: str, tmp_path: Path
) -> None:
    """Three nodes' schedulers over one store, on an injected clock: an hour of `* * * * *`,
    each minute's turn taken by all three at once (threads released together). Every due
    minute has one task, whichever node won it; no turn failed for losing."""
    from taskctld.lifecycle import Lifecycle
    from taskctld.scheduler import Scheduler
    from taskctld.store import NewSchedule, NewTask, TaskFilter
    from taskctld.store.postgres import PostgresStore

    t0 = 1_800_000_000_000 - 1_800_000_000_000 % 60_000
    stores = [PostgresStore(pg_url, node=name) for name in "abc"]
    template = json.dumps({"command": ["true"], "cwd": "/"})
    with stores[0].transaction():
        stores[0].add_schedule(
            NewSchedule("every", "cron", "* * * * *", "UTC", "allow", "latest", template, t0),
            t0 - 1,
        )

    def build(template: dict[str, Any], now: int) -> NewTask:
        return NewTask(command=template["command"], cwd=template["cwd"])

    schedulers = [Scheduler(s, build, tmp_path / "changes", lifecycle=Lifecycle(s)) for s in stores]
    minutes = 60
    gate = threading.Barrier(len(stores))
    failures: list[BaseException] = []

    def node(store: PostgresStore, scheduler: Scheduler) -> None:
        for minute in range(minutes):
            now = t0 + minute * 60_000 + 5
            gate.wait()
            try:
                with store.transaction():
                    scheduler.fire_due(now)
            except BaseException as e:
                failures.append(e)

    threads = [
        threading.Thread(target=node, args=pair) for pair in zip(stores, schedulers, strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    tasks = stores[1].list_tasks(TaskFilter(limit=10 * minutes))
    dues = sorted(t.due_at for t in tasks if t.due_at is not None)
    assert dues == [t0 + m * 60_000 for m in range(minutes)]
    for s in stores:
        s.close()
