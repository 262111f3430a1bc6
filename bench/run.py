"""`make bench`: taskctl measured side by side with its floors and with task-spooler.

Every figure is measured in the same run as what it is compared with, interleaved where that
is possible, because this machine is shared and noisy: read the ratios, not the absolute times.
Prints one table and writes `bench/results.json` (figures plus the machine's facts).

    python bench/run.py            # the full suite (about 7 minutes)
    python bench/run.py --quick    # smaller counts (under two minutes)

On a machine too slow for the full suite to end within ten minutes, the steps that would not
fit run their quick form, and the report names them.

It starts its own daemons in throwaway homes, its own task-spooler server on a private socket
and its own PostgreSQL server (`tests/pgcluster.py`, for the PostgreSQL rows, which are skipped
where no server binaries are installed), and kills only those.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import Process
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "daemon")]

from taskctl.client import Client, path_for  # noqa: E402
from taskctl.paths import Paths  # noqa: E402

BIN = Path(sys.executable).parent
TASKCTL = str(BIN / "taskctl")
FINAL = ("succeeded", "failed", "cancelled")


@dataclass
class Row:
    figure: str
    value: float
    unit: str
    compared_with: str = ""
    comparison: float | None = None
    ratio: float | None = None
    target: str = ""
    met: bool | None = None
    peer: str = ""
    peer_value: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start


# -- the things being measured ------------------------------------------------------------------


class Home:
    """A throwaway taskctl home with its own daemon."""

    def __init__(self, **config: Any) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="tcb", dir="/tmp"))
        lines = [f"{k} = {json.dumps(v)}" for k, v in config.items()]
        (self.path / "config.toml").write_text("\n".join(lines) + "\n")
        self.env = {**os.environ, "TASKCTL_HOME": str(self.path), "TASKCTL_NO_AUTOSTART": "1"}
        self.client = Client(Paths.from_env(self.env), autostart=False)

    def start(self) -> None:
        subprocess.run([TASKCTL, "daemon", "start"], env=self.env, check=True, capture_output=True)

    def stop(self) -> None:
        subprocess.run([TASKCTL, "daemon", "stop"], env=self.env, check=False, capture_output=True)

    def daemon_pids(self) -> list[int]:
        health = self.client.call("GET", "/healthz")
        pids = [int(health["pid"])]
        pids += [int(p.name.split(".")[1]) for p in (self.path / "run").glob("supervisor.*.json")]
        return pids

    def destroy(self) -> None:
        """Stop the daemon and everything it started. Tasks outlive a plain stop by design, so
        `--kill` ends them; any left after that are found by the TASKCTL_HOME their environment
        carries (those submitted through the CLI)."""
        subprocess.run(
            [TASKCTL, "daemon", "stop", "--kill"], env=self.env, check=False, capture_output=True
        )
        needle = f"TASKCTL_HOME={self.path}".encode()
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != os.getpid():
                with contextlib.suppress(OSError):
                    if needle in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                        os.kill(int(entry), signal.SIGKILL)
        with contextlib.suppress(Exception):
            pid = int((self.path / "taskctld.lock").read_text().strip() or 0)
            if pid:
                os.kill(pid, signal.SIGKILL)
        for sup in (self.path / "run").glob("supervisor.*.json"):
            with contextlib.suppress(Exception):
                os.kill(int(sup.name.split(".")[1]), signal.SIGKILL)
        shutil.rmtree(self.path, ignore_errors=True)

    def batch(self, n: int, command: list[str] | None = None) -> list[int]:
        specs = [{"command": command or ["true"], "cwd": "/tmp"} for _ in range(n)]
        tasks = self.client.call("POST", path_for("tasks", "batch"), {"tasks": specs}, timeout=600)
        return [t["id"] for t in tasks]

    def wait_all(self, ids: list[int], stream: Any) -> None:
        pending = set(ids)
        for line in stream.iter_lines():
            event = json.loads(line)
            if event["to_state"] in FINAL:
                pending.discard(event["task_id"])
                if not pending:
                    return

    def events(self) -> Any:
        return self.client.open("GET", path_for("events", follow=True), timeout=None)


@contextlib.contextmanager
def home(**config: Any) -> Iterator[Home]:
    h = Home(**config)
    try:
        h.start()
        yield h
    finally:
        h.destroy()


class Spooler:
    """A private task-spooler server (TS_SOCKET and TMPDIR of our own)."""

    def __init__(self, slots: int = 1) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tsb", dir="/tmp"))
        self.env = {
            **os.environ,
            "TS_SOCKET": str(self.dir / "socket"),
            "TMPDIR": str(self.dir),
            "TS_SLOTS": str(slots),
            "TS_MAXFINISHED": "100000",
        }

    def run(self, *args: str) -> str:
        return subprocess.run(
            ["tsp", *args], env=self.env, capture_output=True, text=True, check=False
        ).stdout

    def close(self) -> None:
        self.run("-K")
        for pid in self.processes(jobs=True):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)

    def processes(self, jobs: bool = False) -> list[int]:
        """The tsp processes of this spooler (server and one client per queued job); with
        `jobs`, the jobs they started too."""
        needle = f"TS_SOCKET={self.env['TS_SOCKET']}".encode()
        candidates = (
            os.listdir("/proc")
            if jobs
            else subprocess.run(
                ["pgrep", "-x", "tsp"], capture_output=True, text=True
            ).stdout.split()
        )
        found = []
        for pid in candidates:
            with contextlib.suppress(OSError, ValueError):
                if int(pid) != os.getpid() and needle in Path(
                    f"/proc/{pid}/environ"
                ).read_bytes().split(b"\0"):
                    found.append(int(pid))
        return found

    def server_pid(self) -> int | None:
        """The server holds the listening socket plus one per client: the most sockets."""

        def sockets(pid: int) -> int:
            with contextlib.suppress(OSError):
                return sum(
                    os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
                    for fd in os.listdir(f"/proc/{pid}/fd")
                )
            return 0

        pids = self.processes()
        return max(pids, key=sockets) if pids else None

    def wait_idle(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            listing = self.run("-l")
            if " queued " not in listing and " running " not in listing:
                return
            time.sleep(0.02)
        raise TimeoutError("task-spooler did not finish")


def ensure_tsp() -> str | None:
    """task-spooler's `tsp`, installed from Debian when missing and allowed; else why not."""
    if shutil.which("tsp"):
        return None
    if shutil.which("apt-get") and os.geteuid() == 0:
        done = subprocess.run(
            ["apt-get", "install", "-y", "-q", "task-spooler"], capture_output=True, text=True
        )
        if done.returncode == 0 and shutil.which("tsp"):
            return None
        return f"apt-get install task-spooler failed: {done.stderr.strip().splitlines()[-1:]}"
    return "tsp is not installed and this user cannot install Debian packages"


# -- the rows -----------------------------------------------------------------------------------


def bench_cli_submit(n: int, tsp_missing: str | None) -> list[Row]:
    """Sequential `taskctl submit -- true`, interleaved with the framework floor and tsp."""
    floor, ours, theirs = [], [], []
    spooler = None if tsp_missing else Spooler(slots=2)
    with home() as h:
        timed([TASKCTL, "submit", "--", "true"], h.env)  # warm caches
        for _ in range(n):
            floor.append(timed([sys.executable, "-c", "import typer"]))
            ours.append(timed([TASKCTL, "submit", "--", "true"], h.env))
            if spooler:
                theirs.append(timed(["tsp", "-n", "true"], spooler.env))
    if spooler:
        spooler.close()
    value, base = median(ours) * 1000, median(floor) * 1000
    return [
        Row(
            "CLI submit latency", value, "ms", "python -c 'import typer'", base, value / base, "<= 1.3x floor",
            value / base <= 1.3, "tsp true", median(theirs) * 1000 if theirs else None, tsp_missing or "",
            {"runs": n, "p95_ms": pct(ours, 0.95) * 1000},
        )
    ]  # fmt: skip


def fill_finished(h: Home, n: int) -> None:
    """Put n finished tasks straight into a stopped daemon's database (bulk SQL)."""
    from taskctld.lifecycle import Lifecycle
    from taskctld.store import NewTask
    from taskctld.store.sqlite import SqliteStore

    h.stop()
    store = SqliteStore(h.path / "taskctl.db", durability="normal")
    lifecycle = Lifecycle(store)
    now = int(time.time() * 1000) - 86_400_000
    chunk = 10_000
    for start in range(0, n, chunk):
        with store.transaction():
            ids = lifecycle.submit(
                [NewTask(command=["true"], cwd="/tmp") for _ in range(min(chunk, n - start))], now
            )
            store.conn.executemany(
                "UPDATE tasks SET state = 'succeeded', attempts = 1, tries = 1, exit_code = 0, "
                "started_at = ?, finished_at = ? WHERE id = ?",
                [(now, now, i) for i in ids],
            )
            store.conn.executemany(
                "INSERT INTO attempts (task_id, number, outcome, exit_code, started_at, ended_at) "
                "VALUES (?, 1, 'exited', 0, ?, ?)",
                [(i, now, now) for i in ids],
            )
    store.close()
    h.start()


def bench_submit_growth(n: int, rows: int) -> list[Row]:
    """The same submits against an empty store and one with `rows` finished tasks, interleaved."""
    empty, full = [], []
    with home() as a, home() as b:
        fill_finished(b, rows)
        for h in (a, b):
            timed([TASKCTL, "submit", "--", "true"], h.env)
        for _ in range(n):
            empty.append(timed([TASKCTL, "submit", "--", "true"], a.env))
            full.append(timed([TASKCTL, "submit", "--", "true"], b.env))
    v0, v1 = median(empty) * 1000, median(full) * 1000
    return [
        Row(
            f"CLI submit with {rows:,} finished tasks", v1, "ms", "the same with 0 tasks", v0, v1 / v0,
            "<= 1.1x", v1 / v0 <= 1.1, note="pueue: 4.6 -> 24.5 ms per add as its queue grows",
        )
    ]  # fmt: skip


def _spawn_floor_worker(n: int) -> None:
    for _ in range(n):
        os.waitpid(os.posix_spawn("/bin/true", ["true"], {}), 0)


def spawn_floor(n: int, parallel: int, cpu: list[float] | None = None) -> float:
    """Tasks per second of Python's own posix_spawn + wait of /bin/true, `parallel` at a time;
    appends to `cpu` the CPU milliseconds per task of the spawners and their `true`s."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    procs = [Process(target=_spawn_floor_worker, args=(n // parallel,)) for _ in range(parallel)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    took = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if cpu is not None:
        used = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        cpu.append(used * 1000 / n)
    return n / took


def drain_in(h: Home, n: int) -> float:
    """Seconds from submitting `n` `true` tasks as one batch to the last one final."""
    stream = h.events()
    start = time.perf_counter()
    h.wait_all(h.batch(n), stream)
    took = time.perf_counter() - start
    stream.close()
    return took


def drain_ours(n: int, parallel: int, cpu: list[dict[str, float]] | None = None) -> float:
    """Tasks per second; appends to `cpu` the CPU milliseconds per task of the daemon, of its
    supervisor and of the commands (which the supervisor reaps)."""
    with home(concurrency=parallel) as h:
        daemon, supervisor = h.daemon_pids()[:2]
        before = _process_cpu(daemon), _process_cpu(supervisor)
        rate = n / drain_in(h, n)
        after = _process_cpu(daemon), _process_cpu(supervisor)
    if cpu is not None:
        cpu.append(
            {
                "daemon": (after[0][0] - before[0][0]) * 1000 / n,
                "supervisor": (after[1][0] - before[1][0]) * 1000 / n,
                "commands": (after[1][1] - before[1][1]) * 1000 / n,
            }
        )
    return rate


def _process_cpu(pid: int) -> tuple[float, float]:
    """Seconds of CPU of a process itself, and of the children it has reaped."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, (int(fields[13]) + int(fields[14])) / tick


def drain_tsp(n: int, parallel: int) -> float:
    spooler = Spooler(slots=parallel)
    try:
        start = time.perf_counter()
        for _ in range(n):
            spooler.run("-n", "true")
        spooler.wait_idle()
        return n / (time.perf_counter() - start)
    finally:
        spooler.close()


def bench_drain(n: int, repeats: int, tsp_missing: str | None) -> list[Row]:
    rows = []
    for parallel in (2, 4):
        ours, floor, theirs = [], [], []
        cpu_ours: list[dict[str, float]] = []
        cpu_floor: list[float] = []
        for _ in range(repeats):
            floor.append(spawn_floor(n, parallel, cpu_floor))
            ours.append(drain_ours(n, parallel, cpu_ours))
            if not tsp_missing:
                theirs.append(drain_tsp(n, parallel))
        value, base = median(ours), median(floor)
        peer = median(theirs) if theirs else None
        met = value / base >= 0.7 and (peer is None or value >= peer)
        rows.append(
            Row(
                f"drain {n:,} true, concurrency {parallel}", value, "tasks/s", f"posix_spawn+wait x{parallel}",
                base, value / base, ">= 0.7x floor and >= tsp", met, f"tsp -S {parallel}", peer,
                tsp_missing or "submitted as one API batch; tsp one CLI call per job",
                {"runs": repeats, "all": ours},
            )
        )  # fmt: skip
        if parallel == 2:
            rows.append(_drain_cpu_row(n, cpu_ours, cpu_floor))
    return rows


def _drain_cpu_row(n: int, ours: list[dict[str, float]], floor: list[float]) -> Row:
    """Where a drain's CPU goes, per task, against the floor's: on two cores this bounds the
    drain more than any latency does."""
    parts = {k: median([c[k] for c in ours]) for k in ("daemon", "supervisor", "commands")}
    total, base = sum(parts.values()), median(floor)
    split = ", ".join(f"{k} {v:.2f}" for k, v in parts.items())
    return Row(
        f"CPU per task, drain of {n:,} at concurrency 2", total, "ms", "posix_spawn+wait x2 (all processes)",
        base, total / base, note=f"{split} ms; the floor's spawners and their true: {base:.2f} ms",
        extra=parts,
    )  # fmt: skip


def bench_dispatch(probes: int, tsp_missing: str | None) -> list[Row]:
    """Idle daemon: submit through the API; time until the command started (it writes to a
    FIFO we block on) and until the API reports it final."""
    fifo_dir = Path(tempfile.mkdtemp(prefix="tcf", dir="/tmp"))
    fifo = fifo_dir / "f"
    os.mkfifo(fifo)
    started, finished = [], []
    with home() as h:
        for i in range(probes + 3):
            time.sleep(0.2)  # idle in between
            t0 = time.perf_counter()
            task = h.client.call(
                "POST",
                path_for("tasks"),
                {"command": ["sh", "-c", f"echo x > {fifo}"], "cwd": "/tmp"},
            )
            with open(fifo) as f:
                f.read()
            t1 = time.perf_counter()
            h.client.call("GET", path_for("tasks", task["id"], "wait", timeout=10))
            t2 = time.perf_counter()
            if i >= 3:
                started.append((t1 - t0) * 1000)
                finished.append((t2 - t0) * 1000)
    peer_started: list[float] = []
    if not tsp_missing:
        spooler = Spooler(slots=1)
        for i in range(probes + 3):
            time.sleep(0.2)
            t0 = time.perf_counter()
            spooler.run("-n", "sh", "-c", f"echo x > {fifo}")
            with open(fifo) as f:
                f.read()
            if i >= 3:
                peer_started.append((time.perf_counter() - t0) * 1000)
        spooler.close()
    shutil.rmtree(fifo_dir, ignore_errors=True)
    p50, p95 = median(started), pct(started, 0.95)
    return [
        Row(
            "dispatch latency to start, p50", p50, "ms", "", None, None, "< 5 ms", p50 < 5,
            "tsp (its CLI)", median(peer_started) if peer_started else None, tsp_missing,
        ),
        Row(
            "dispatch latency to start, p95", p95, "ms", "", None, None, "< 20 ms", p95 < 20,
            "tsp (its CLI)", pct(peer_started, 0.95) if peer_started else None, tsp_missing,
        ),
        Row("dispatch latency to final, p50", median(finished), "ms", note=f"{probes} probes", extra={"p95": pct(finished, 0.95)}),
    ]  # fmt: skip


def bench_durability(n: int) -> list[Row]:
    """The cost of durability=full (every acknowledged submit fsynced) against normal (a power
    loss may drop the last ones; a crash of the daemon loses nothing): API submits, interleaved."""
    full, normal = [], []
    spec = {"command": ["true"], "cwd": "/tmp", "delay": "1h"}
    with home(durability="full") as f, home(durability="normal") as nml:
        for _ in range(n):
            for h, out in ((f, full), (nml, normal)):
                start = time.perf_counter()
                h.client.call("POST", path_for("tasks"), spec)
                out.append(time.perf_counter() - start)
    v_full, v_normal = median(full) * 1000, median(normal) * 1000
    return [
        Row(
            "API submit, durability=full", v_full, "ms", "durability=normal", v_normal, v_full / v_normal,
            note=f"{n} sequential submits each; normal may lose the last acknowledged submits on power loss",
        )
    ]  # fmt: skip


def sqlite_insert_floor(n: int, synchronous: str) -> float:
    """Rows per second of a bare insert loop in one transaction, same durability."""
    folder = Path(tempfile.mkdtemp(prefix="tcs", dir="/tmp"))
    try:
        conn = sqlite3.connect(folder / "floor.db", isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        conn.execute(
            "CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, command TEXT, cwd TEXT, state TEXT, created_at INTEGER)"
        )
        start = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        for _ in range(n):
            conn.execute(
                "INSERT INTO t (command, cwd, state, created_at) VALUES (?, ?, ?, ?)",
                ('["true"]', "/tmp", "queued", 1),
            )
        conn.execute("COMMIT")
        rate = n / (time.perf_counter() - start)
        conn.close()
        return rate
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def bench_batch(n: int) -> list[Row]:
    # The tasks are scheduled far ahead so that none runs while the batch is being accepted.
    specs = [{"command": ["true"], "cwd": "/tmp", "delay": "1h"} for _ in range(n)]
    with home() as h:
        start = time.perf_counter()
        h.client.call("POST", path_for("tasks", "batch"), {"tasks": specs}, timeout=600)
        rate = n / (time.perf_counter() - start)
    floor = sqlite_insert_floor(n, "FULL")
    return [
        Row(
            f"batch submit of {n:,} through the API", rate, "tasks/s", "bare SQLite insert loop (FULL)",
            floor, rate / floor, ">= 5,000 tasks/s", rate >= 5000,
        )
    ]  # fmt: skip


def claim_cost(rows: int, n: int) -> float:
    """Seconds to claim and finish n queued tasks (two per transaction, like a busy
    dispatcher) in a store that also holds `rows` finished tasks."""
    from taskctl.api import Outcome, TaskState
    from taskctld.lifecycle import Lifecycle
    from taskctld.store import AttemptEnd, NewTask
    from taskctld.store.sqlite import SqliteStore

    folder = Path(tempfile.mkdtemp(prefix="tcc", dir="/tmp"))
    try:
        store = SqliteStore(folder / "c.db", durability="full")
        lifecycle = Lifecycle(store)
        now = 1_000
        for start in range(0, rows, 20_000):
            with store.transaction():
                ids = lifecycle.submit(
                    [NewTask(command=["true"], cwd="/") for _ in range(min(20_000, rows - start))],
                    now,
                )
                store.conn.executemany(
                    "UPDATE tasks SET state = 'succeeded', finished_at = 1 WHERE id = ?",
                    [(i,) for i in ids],
                )
        with store.transaction():
            lifecycle.submit([NewTask(command=["true"], cwd="/") for _ in range(n)], now)
        begin = time.perf_counter()
        for _ in range(n // 2):
            with store.transaction():
                for task in lifecycle.claim({"default": 2}, 2, now).tasks:
                    store.end_attempt(
                        AttemptEnd(task.id, task.attempts, Outcome.EXITED, now, exit_code=0)
                    )
                    store.move(
                        task.id,
                        TaskState.RUNNING,
                        TaskState.SUCCEEDED,
                        now,
                        fence=task.attempts,
                        finished_at=now,
                    )
        took = time.perf_counter() - begin
        store.close()
        return took
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def bench_claim_scale(big: int) -> list[Row]:
    small_t, big_t = [], []
    for _ in range(3):
        small_t.append(claim_cost(1_000, 1_000))
        big_t.append(claim_cost(big, 1_000))
    v0, v1 = median(small_t), median(big_t)
    return [
        Row(
            f"claim+finish 1,000 with {big:,} rows", v1 * 1000, "ms", "the same with 1,000 rows", v0 * 1000,
            v1 / v0, "<= 1.5x", v1 / v0 <= 1.5,
        )
    ]  # fmt: skip


def drain_nodes(url: str, n: int, nodes: int, parallel: int) -> float:
    """Tasks per second of `nodes` daemons (a, b, c...) sharing the store at `url`, each with
    `parallel` slots, draining `n` `true` submitted as one batch on the first (`drain_in`).
    The daemons start and stop side by side: a second each, of a step that should stay short."""
    homes = [Home(store=url, node=name, concurrency=parallel) for name in "abcdefgh"[:nodes]]
    with ThreadPoolExecutor(nodes) as pool:
        try:
            list(pool.map(Home.start, homes))
            return n / drain_in(homes[0], n)
        finally:
            list(pool.map(Home.destroy, homes))


def bench_postgres(n: int, batch: int, drained: int, repeats: int) -> list[Row]:
    """The PostgreSQL store on one throwaway server: claims and finishes of `n` tasks against
    PgQueuer's dequeue and ack of `n` jobs (`bench/pg.py`), 1 and 3 consumers; then real
    daemons (1 node, 3 nodes) draining `drained` `true`, against the SQLite drain and the spawn
    floor, at concurrency = cores. Each side interleaved with what it is compared with."""
    import pg

    reason = pg.missing()
    if reason:
        print(f"PostgreSQL rows skipped: {reason}", file=sys.stderr)
        return [Row("PostgreSQL rows", float("nan"), "", note=f"skipped: {reason}")]
    peer_missing = pg.peer_missing()
    if peer_missing:
        print(f"PgQueuer comparison skipped: {peer_missing}", file=sys.stderr)
    cores = os.cpu_count() or 1
    ours: dict[int, list[float]] = {1: [], 3: []}
    theirs: dict[int, list[float]] = {1: [], 3: []}
    drains: dict[str, list[float]] = {"floor": [], "sqlite": [], "1": [], "3": []}
    with pg.cluster() as cluster:
        for _ in range(repeats):
            for consumers in (1, 3):
                ours[consumers].append(pg.ours(cluster, n, batch, consumers))
                if not peer_missing:
                    theirs[consumers].append(pg.peer(cluster, n, batch, consumers))
            drains["floor"].append(spawn_floor(drained, cores))
            drains["sqlite"].append(drain_ours(drained, cores))
            for nodes in (1, 3):
                rate = drain_nodes(cluster.new_database(), drained, nodes, cores)
                drains[str(nodes)].append(rate)
    return [
        *(_claim_row(n, batch, c, ours[c], theirs[c], peer_missing) for c in (1, 3)),
        *(_pg_drain_row(drained, nodes, cores, drains) for nodes in (1, 3)),
    ]


def _claim_row(
    n: int, batch: int, consumers: int, ours: list[float], theirs: list[float], missing: str | None
) -> Row:
    value = median(ours)
    peer = median(theirs) if theirs else None
    ratio = value / peer if peer else None
    who = "1 process" if consumers == 1 else f"{consumers} processes"
    return Row(
        f"PostgreSQL claim+finish, {who}", value, "tasks/s", "PgQueuer dequeue+ack, same server",
        peer, ratio, ">= 1.0x PgQueuer", None if ratio is None else ratio >= 1.0,
        note=missing or f"{n:,} tasks of true, {batch} a turn, one transaction a turn (starts, ends, claim)",
        extra={"runs": len(ours), "all": ours, "peer_all": theirs, "batch": batch},
    )  # fmt: skip


def _pg_drain_row(n: int, nodes: int, cores: int, drains: dict[str, list[float]]) -> Row:
    value, sqlite, floor = (
        median(drains[str(nodes)]),
        median(drains["sqlite"]),
        median(drains["floor"]),
    )
    who = "1 node" if nodes == 1 else f"{nodes} nodes"
    return Row(
        f"drain {n:,} true on PostgreSQL, {who}", value, "tasks/s", f"SQLite drain, concurrency {cores}",
        sqlite, value / sqlite,
        note=f"{value / floor:.2f}x posix_spawn+wait x{cores} ({floor:,.0f}/s); each node concurrency {cores}, submitted as one API batch on node a",
        extra={"runs": len(drains[str(nodes)]), "all": drains[str(nodes)], "sqlite": sqlite, "floor": floor, "floor_ratio": value / floor},
    )  # fmt: skip


def bench_cron_lateness(schedules: int, minutes: int) -> list[Row]:
    """`schedules` cron schedules `* * * * *` over `minutes` minute boundaries: how late each
    task started after its due time (enough slots that none waits for one)."""
    from taskctl.units import rfc3339_to_ms

    with home(concurrency=schedules) as h:
        for n in range(schedules):
            body = {
                "kind": "cron",
                "name": f"c{n}",
                "cron": "* * * * *",
                "task": {"command": ["true"], "cwd": "/tmp"},
            }
            h.client.call("POST", path_for("schedules"), body)
        deadline = time.monotonic() + 60 * minutes + 75
        while time.monotonic() < deadline:
            tasks = h.client.call("GET", path_for("tasks", limit=10_000))
            if len(tasks) >= schedules * minutes and all(t["state"] in FINAL for t in tasks):
                break
            time.sleep(1)
        late = [
            (rfc3339_to_ms(t["attempts"][0]["started_at"]) - rfc3339_to_ms(t["due_at"])) / 1000
            for t in tasks
            if t["attempts"] and t["attempts"][0]["started_at"]
        ]
    p99 = pct(late, 0.99)
    return [
        Row(
            "cron lateness (start - due), p99", p99 * 1000, "ms", target="< 1 s", met=p99 < 1,
            note=f"{len(late)} fires of {schedules} schedules over {minutes} minute(s); p50 {median(late) * 1000:.0f} ms",
        )
    ]  # fmt: skip


def cpu_and_rss(pids: list[int]) -> tuple[float, float]:
    cpu = rss = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cpu += (int(fields[11]) + int(fields[12])) / tick
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1]) / 1024
    return cpu, rss


def _watch(pids: list[int], seconds: float) -> tuple[float, float]:
    """CPU milliseconds used over `seconds` and the RSS (MiB) at the end."""
    cpu0, _ = cpu_and_rss(pids)
    time.sleep(seconds)
    cpu1, rss = cpu_and_rss(pids)
    return (cpu1 - cpu0) * 1000, rss


def bench_footprint(seconds: float, queued: int, tsp_missing: str | None) -> list[Row]:
    with home(concurrency=1) as h:
        time.sleep(1)  # let start-up settle
        pids = h.daemon_pids()
        idle_cpu, idle_rss = _watch(pids, seconds)
        _, daemon_rss = cpu_and_rss(pids[:1])
        h.batch(1, ["sleep", "3600"])
        h.batch(queued)
        busy_cpu, busy_rss = _watch(pids, seconds)
    peer_idle = peer_busy = None
    peer_queued = min(queued, 900)  # task-spooler refuses more than 1,000 connections
    if not tsp_missing:
        spooler = Spooler(slots=1)
        spooler.run("-n", "true")
        spooler.wait_idle()
        pid = spooler.server_pid()
        if pid:
            _, peer_idle = _watch([pid], 1)
            spooler.run("-n", "sleep", "3600")
            for _ in range(peer_queued):
                spooler.run("-n", "true")
            _, peer_busy = _watch(spooler.processes(), 1)
        spooler.close()
    per_second = idle_cpu / seconds
    return [
        Row(
            f"idle daemon CPU over {seconds:.0f} s", idle_cpu, "ms", note="daemon + supervisor",
            target="no busy polling (< 1% CPU)", met=per_second < 10,
        ),
        Row(
            "idle daemon RSS", daemon_rss, "MiB", target="< 60 MiB", met=daemon_rss < 60, peer="tsp server",
            peer_value=peer_idle, note=tsp_missing or f"with its supervisor process: {idle_rss:.1f} MiB",
        ),
        Row(
            f"RSS with {queued:,} queued tasks", busy_rss, "MiB", peer=f"tsp with {peer_queued} queued (one process each)",
            peer_value=peer_busy, note=f"CPU over {seconds:.0f} s: {busy_cpu:.0f} ms",
        ),
    ]  # fmt: skip


# -- the report ---------------------------------------------------------------------------------


def machine_facts() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "kernel": platform.release(),
        "load_average": os.getloadavg(),
        "taskctl_commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def fmt(v: float | None, unit: str = "") -> str:
    if v is None or v != v:
        return "-"
    if unit == "x":
        return f"{v:.2f}x"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def table(rows: list[Row]) -> str:
    header = (
        "figure",
        "taskctl",
        "unit",
        "compared with",
        "value",
        "ratio",
        "tsp",
        "target",
        "met",
    )
    lines = [
        (
            r.figure, fmt(r.value), r.unit, r.compared_with, fmt(r.comparison), fmt(r.ratio, "x"),
            fmt(r.peer_value), r.target, {True: "yes", False: "NO", None: ""}[r.met],
        )
        for r in rows
    ]  # fmt: skip
    widths = [max(len(str(x[i])) for x in [header, *lines]) for i in range(len(header))]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"]
    out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    out += [
        "| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)) + " |"
        for line in lines
    ]
    notes = [f"- {r.figure}: {r.note}" for r in rows if r.note]
    return "\n".join(out + (["", *notes] if notes else []))


BUDGET = 570.0  # seconds: a full `make bench` ends within ten minutes, with room for make and pip


@dataclass
class Step:
    name: str
    full: Callable[[], list[Row]]
    quick: Callable[[], list[Row]]
    seconds: tuple[float, float]  # what its full and quick forms took on a quiet day
    scales: bool = True  # False: it mostly waits on the clock (cron minutes, idle windows)


def run_plan(plan: list[Step], *, quick: bool, began: float) -> tuple[list[Row], list[str]]:
    """Run every step, the full form unless `quick`. On a machine slow enough that the full
    forms would overrun BUDGET, a step runs its full form only if the steps after it still fit
    in their quick forms; the others run quick (their rows name their counts) and are returned
    as reduced: a bounded run with smaller samples beats one that is killed. `began`: when the
    run started (installing task-spooler counts too)."""
    rows: list[Row] = []
    reduced: list[str] = []
    quiet = slow = 0.0  # seconds the steps run so far took on a quiet day, and here

    def cost(step: Step, form: int, pace: float) -> float:
        return step.seconds[form] * (pace if step.scales else 1.0)

    for i, step in enumerate(plan):
        pace = max(1.0, slow / quiet) if quiet else 1.0
        rest = sum(cost(s, 1, pace) for s in plan[i + 1 :])
        full = not quick and time.monotonic() - began + cost(step, 0, pace) + rest <= BUDGET
        if not quick and not full:
            reduced.append(step.name)
        print(
            f"... {step.name}{'' if full or quick else ' (reduced)'}", file=sys.stderr, flush=True
        )
        t = time.monotonic()
        rows += (step.full if full else step.quick)()
        took = time.monotonic() - t
        print(f"    {took:.0f}s", file=sys.stderr, flush=True)
        if step.scales:
            quiet, slow = quiet + step.seconds[0 if full else 1], slow + took
    return rows, reduced


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller counts, under two minutes")
    parser.add_argument("--only", action="append", help="run only these rows (by function suffix)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results.json"))
    args = parser.parse_args()
    q = args.quick
    began = time.monotonic()
    tsp_missing = ensure_tsp()
    if tsp_missing:
        print(f"task-spooler column skipped: {tsp_missing}", file=sys.stderr)
    plan: list[Step] = [  # seconds: a full run of 2026-12-01 (411 s) and a quick one (106 s)
        Step("cli_submit", lambda: bench_cli_submit(200, tsp_missing),
             lambda: bench_cli_submit(40, tsp_missing), (27, 6)),
        Step("submit_growth", lambda: bench_submit_growth(200, 100_000),
             lambda: bench_submit_growth(30, 10_000), (34, 7)),
        Step("drain", lambda: bench_drain(1000, 3, tsp_missing),
             lambda: bench_drain(500, 1, tsp_missing), (28, 6)),
        Step("dispatch", lambda: bench_dispatch(100, tsp_missing),
             lambda: bench_dispatch(30, tsp_missing), (43, 14)),
        Step("batch", lambda: bench_batch(10_000), lambda: bench_batch(10_000), (2, 2)),
        Step("durability", lambda: bench_durability(300), lambda: bench_durability(50), (2, 2)),
        Step("claim_scale", lambda: bench_claim_scale(1_000_000),
             lambda: bench_claim_scale(100_000), (90, 10)),
        Step("postgres", lambda: bench_postgres(3000, 10, 1000, 2),
             lambda: bench_postgres(1000, 10, 500, 1), (45, 16)),
        Step("footprint", lambda: bench_footprint(30, 10_000, tsp_missing),
             lambda: bench_footprint(5, 2_000, tsp_missing), (68, 17), scales=False),
        Step("cron", lambda: bench_cron_lateness(10, 2), lambda: bench_cron_lateness(10, 1),
             (121, 61), scales=False),  # at worst: it waits for 2 (or 1) minute boundaries
    ]  # fmt: skip
    plan = [step for step in plan if not args.only or step.name in args.only]
    rows, reduced = run_plan(plan, quick=q, began=began)
    report = table(rows)
    print(report)
    if reduced:
        print(f"\nreduced to quick counts, to stay within the time budget: {', '.join(reduced)}")
    print(
        f"\n({'quick' if q else 'full'} run, {time.monotonic() - began:.0f}s, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f})"
    )
    results = {
        "machine": machine_facts(), "quick": q, "reduced": reduced, "rows": [asdict(r) for r in rows]
    }  # fmt: skip
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
