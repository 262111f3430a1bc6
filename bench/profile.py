"""`make bench-profile`: where a drain's time goes, in the daemon and in its supervisor.

Drains `true` tasks at concurrency 2 twice: once plain, to count CPU time per task of each
process (read from /proc, so nothing perturbs it), and once under py-spy (sampling, without
pausing the process), to say which functions and lines that CPU time is spent in.

    python bench/profile.py              # 3,000 tasks
    python bench/profile.py -n 500 --top 20
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# bench/run.py: the same throwaway daemons, drain and CPU reading as `make bench`
from run import BIN, cpu_and_rss, drain_in, home

PY_SPY = shutil.which("py-spy", path=str(BIN)) or shutil.which("py-spy")


@dataclass
class Profile:
    samples: int
    self_by_line: Counter[str]
    inclusive_by_function: Counter[str]


def cpu_per_task(n: int) -> dict[str, float]:
    """Milliseconds of CPU per task of the daemon and its supervisor, and the drain's rate."""
    with home(concurrency=2) as h:
        daemon, supervisor = h.daemon_pids()[:2]
        before = cpu_and_rss([daemon])[0], cpu_and_rss([supervisor])[0]
        seconds = drain_in(h, n)
        after = cpu_and_rss([daemon])[0], cpu_and_rss([supervisor])[0]
    return {
        "tasks_per_s": n / seconds,
        "daemon_ms": (after[0] - before[0]) * 1000 / n,
        "supervisor_ms": (after[1] - before[1]) * 1000 / n,
    }


def sampled(n: int, rate: int) -> dict[str, Profile]:
    assert PY_SPY, "py-spy is missing: `make bench-profile` installs it"
    with home(concurrency=2) as h, tempfile.TemporaryDirectory() as tmp:
        pids = dict(zip(("daemon", "supervisor"), h.daemon_pids(), strict=False))
        spies = {
            name: subprocess.Popen(
                [PY_SPY, "record", "--pid", str(pid), "--rate", str(rate), "--nonblocking",
                 "--format", "raw", "--output", f"{tmp}/{name}.txt"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )
            for name, pid in pids.items()
        }  # fmt: skip
        time.sleep(1.0)  # py-spy attaches (nothing to wait on: it prints nothing until the end)
        drain_in(h, n)
        for spy in spies.values():
            spy.send_signal(signal.SIGINT)
        for name, spy in spies.items():
            _, err = spy.communicate(timeout=60)
            if spy.returncode not in (0, -signal.SIGINT):
                raise SystemExit(f"py-spy on the {name} failed: {err.decode(errors='replace')}")
        return {name: read_raw(Path(f"{tmp}/{name}.txt")) for name in pids}


def read_raw(path: Path) -> Profile:
    """py-spy's raw format: one collapsed stack per line (`frame;frame;... count`), idle
    stacks left out, so every sample is CPU spent."""
    self_by_line: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [f for f in stack.split(";") if f]
        if not frames or not count.isdigit():
            continue
        k = int(count)
        total += k
        self_by_line[_short(frames[-1])] += k
        for function in {_function(f) for f in frames}:
            inclusive[function] += k
    return Profile(total, self_by_line, inclusive)


def _short(frame: str) -> str:
    """`commit (taskctld/store/sqlite/base.py:120)`, from py-spy's frame with its full path."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("/daemon/", "/site-packages/", "/lib/python"):
        if marker in where:
            where = where.split(marker, 1)[1]
            break
    return f"{name} ({where})"


def _function(frame: str) -> str:
    short = _short(frame)
    return short.rsplit(":", 1)[0] + ")" if ":" in short else short


def report(costs: dict[str, float], profiles: dict[str, Profile], n: int, top: int) -> str:
    out = [
        f"drain of {n:,} `true` at concurrency 2: {costs['tasks_per_s']:,.0f} tasks/s; CPU per "
        f"task: daemon {costs['daemon_ms']:.2f} ms, supervisor {costs['supervisor_ms']:.2f} ms",
    ]
    for name, p in profiles.items():
        out += ["", f"{name}: {p.samples:,} busy samples", "  most time in (self):"]
        out += [
            f"    {100 * c / p.samples:5.1f} %  {f}" for f, c in p.self_by_line.most_common(top)
        ]
        out += ["  functions (inclusive):"]
        ranked = [
            (f, c)
            for f, c in p.inclusive_by_function.most_common()
            if "taskctld/" in f and c < 0.9 * p.samples  # not the entry points: all pass there
        ]
        out += [f"    {100 * c / p.samples:5.1f} %  {f}" for f, c in ranked[:top]]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=3000, help="tasks per drain")
    parser.add_argument("--top", type=int, default=15, help="lines shown per list")
    parser.add_argument("--rate", type=int, default=1000, help="py-spy samples per second")
    args = parser.parse_args()
    costs = cpu_per_task(args.n)
    profiles = sampled(args.n, args.rate)
    print(report(costs, profiles, args.n, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
