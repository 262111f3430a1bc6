"""Cron semantics without a clock: golden daylight-saving cases, catch-up plans, overlap, and
exactly-once firing against a real store with a fake `now`."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from taskctl.api import TaskState
from taskctl.errors import InvalidRequest
from taskctld.lifecycle import Lifecycle
from taskctld.scheduler import Burst, Scheduler, next_times, normalize_cron, plan
from taskctld.store import NewSchedule, NewTask, TaskFilter
from taskctld.store.sqlite import SqliteStore


def _iso(expr: str, tz: str, start: str, n: int) -> list[str]:
    begin = datetime.fromisoformat(start).replace(tzinfo=ZoneInfo(tz))
    return [t.isoformat() for t in next_times(expr, tz, int(begin.timestamp() * 1000), n)]


# Golden: the 2026 transitions. cron(8): a fixed time in a skipped hour runs once right after
# the gap; in a repeated hour it runs once; more often than hourly runs on real time.
GOLDEN = [
    ("30 2 * * *", "America/New_York", "2026-03-07T12:00", 3,
     ["2026-03-08T03:00:00-04:00", "2026-03-09T02:30:00-04:00", "2026-03-10T02:30:00-04:00"]),
    ("30 1 * * *", "America/New_York", "2026-10-31T12:00", 3,
     ["2026-11-01T01:30:00-04:00", "2026-11-02T01:30:00-05:00", "2026-11-03T01:30:00-05:00"]),
    ("0 * * * *", "America/New_York", "2026-03-08T00:30", 3,
     ["2026-03-08T01:00:00-05:00", "2026-03-08T03:00:00-04:00", "2026-03-08T04:00:00-04:00"]),
    ("*/30 * * * *", "America/New_York", "2026-11-01T00:45", 4,
     ["2026-11-01T01:00:00-04:00", "2026-11-01T01:30:00-04:00", "2026-11-01T01:00:00-05:00", "2026-11-01T01:30:00-05:00"]),
    ("30 2 * * *", "Europe/Berlin", "2026-03-28T12:00", 2,
     ["2026-03-29T03:00:00+02:00", "2026-03-30T02:30:00+02:00"]),
    ("30 2 * * *", "Europe/Berlin", "2026-10-24T12:00", 3,
     ["2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00", "2026-10-27T02:30:00+01:00"]),
    ("15 2 * * *", "Australia/Lord_Howe", "2026-10-03T12:00", 2,
     ["2026-10-04T02:30:00+11:00", "2026-10-05T02:15:00+11:00"]),
    ("45 1 * * *", "Australia/Lord_Howe", "2026-04-04T12:00", 3,
     ["2026-04-05T01:45:00+11:00", "2026-04-06T01:45:00+10:30", "2026-04-07T01:45:00+10:30"]),
]  # fmt: skip


@pytest.mark.parametrize(("expr", "tz", "start", "n", "expected"), GOLDEN)
def test_daylight_saving_follows_cron8(
    expr: str, tz: str, start: str, n: int, expected: list[str]
) -> None:
    assert _iso(expr, tz, start, n) == expected


def test_aliases_and_bad_expressions() -> None:
    assert normalize_cron("@hourly") == "0 * * * *"
    assert normalize_cron(" */5  *  * * * ") == "*/5 * * * *"
    for bad, words in [
        ("not a cron", "5"),
        ("61 * * * *", "minute"),
        ("* 24 * * *", "hour"),
        ("0 0 31 2 *", "day-of-month"),
        ("* * * 13 *", "month"),
        ("* * * * 8", "day-of-week"),
        ("@fortnightly", "alias"),
    ]:
        with pytest.raises(InvalidRequest, match=words):
            normalize_cron(bad)


MINUTE = 60_000
T0 = 1_796_000_000_000 - 1_796_000_000_000 % MINUTE  # a whole minute


def test_plan_fires_on_time_and_sleeps_until_the_next() -> None:
    p = plan("* * * * *", "UTC", "latest", T0 - 1, T0 + 200)
    assert p.fire == [T0] and p.missed == 0 and p.next_due == T0 + MINUTE


HOURLY_DOWN = T0 - T0 % (60 * MINUTE)  # a whole hour


@pytest.mark.parametrize(
    ("catch_up", "fired"),
    [
        ("none", []),
        ("latest", [HOURLY_DOWN + 3 * 60 * MINUTE]),
        ("all", [HOURLY_DOWN + h * 60 * MINUTE for h in range(1, 4)]),
    ],
)
def test_catch_up_after_downtime(catch_up: str, fired: list[int]) -> None:
    """Down from just after 00:00 until 03:30: the 01:00, 02:00 and 03:00 runs were missed."""
    p = plan("0 * * * *", "UTC", catch_up, HOURLY_DOWN, HOURLY_DOWN + 210 * MINUTE)
    assert p.fire == fired
    assert p.missed == 3 - len(fired)
    assert p.next_due == HOURLY_DOWN + 4 * 60 * MINUTE


def test_a_due_time_within_the_grace_is_on_time_whatever_the_policy() -> None:
    p = plan("* * * * *", "UTC", "none", T0 - 1, T0 + 30_000)
    assert p.fire == [T0]


# A `30 1 * * *` schedule added (or resumed) at 01:10 EST, the second pass of the repeated hour:
# its run of the day was at 01:30 EDT, 40 minutes earlier in real time, so it must not fire now.
INSIDE_REPEAT = int(datetime.fromisoformat("2026-11-01T01:10:00-05:00").timestamp() * 1000)
NEXT_DAY = int(datetime.fromisoformat("2026-11-02T01:30:00-05:00").timestamp() * 1000)


def test_a_schedule_added_in_the_repeated_hour_waits_for_the_next_day() -> None:
    p = plan("30 1 * * *", "America/New_York", "latest", INSIDE_REPEAT, INSIDE_REPEAT + 1000)
    assert p.fire == [] and p.next_due == NEXT_DAY
    shown = next_times("30 1 * * *", "America/New_York", INSIDE_REPEAT, 1)  # `cron next`
    assert [t.isoformat() for t in shown] == ["2026-11-02T01:30:00-05:00"]


def test_catch_up_all_is_bounded() -> None:
    p = plan("* * * * *", "UTC", "all", T0 - 1, T0 + 1000 * MINUTE + 1)
    assert len(p.fire) == 101 and p.fire[-1] == T0 + 1000 * MINUTE  # 100 missed + the on-time one


@pytest.fixture
def store(tmp_path: Path) -> SqliteStore:
    return SqliteStore(tmp_path / "s.db", durability="normal")


def _add(store: SqliteStore, overlap: str = "allow", catch_up: str = "latest") -> int:
    template = json.dumps({"command": ["true"], "cwd": "/"})
    with store.transaction():
        row = store.add_schedule(
            NewSchedule("every", "cron", "* * * * *", "UTC", overlap, catch_up, template, T0),
            T0 - 1,
        )
    return row.id


def _scheduler(store: SqliteStore, tmp_path: Path) -> Scheduler:
    def build(template: dict, now: int) -> NewTask:
        return NewTask(command=template["command"], cwd=template["cwd"])

    return Scheduler(store, build, tmp_path / "changes", lifecycle=Lifecycle(store))


@pytest.mark.parametrize(
    ("catch_up", "overlap", "fired"),
    [("none", "allow", 0), ("latest", "allow", 1), ("all", "allow", 3), ("all", "skip", 3)],
)
def test_fire_due_follows_the_catch_up_policy(
    store: SqliteStore, tmp_path: Path, catch_up: str, overlap: str, fired: int
) -> None:
    """An hourly schedule whose daemon was down from just after 00:00 until 03:30. Catch-up
    `all` runs each missed time, also when the schedule skips overlapping runs: each is queued
    behind the one before."""
    template = json.dumps({"command": ["true"], "cwd": "/"})
    with store.transaction():
        store.add_schedule(
            NewSchedule(
                "hourly",
                "cron",
                "0 * * * *",
                "UTC",
                overlap,
                catch_up,
                template,
                next_due=HOURLY_DOWN + 60 * MINUTE,
            ),
            HOURLY_DOWN,
        )
    with store.transaction():
        _scheduler(store, tmp_path).fire_due(HOURLY_DOWN + 210 * MINUTE)
    tasks = sorted(store.list_tasks(TaskFilter()), key=lambda t: t.id)
    dues = [t.due_at or 0 for t in tasks]
    assert dues == [HOURLY_DOWN + h * 60 * MINUTE for h in range(1, 4)][3 - fired :]
    if overlap == "skip":
        assert [t.state for t in tasks] == [TaskState.QUEUED, TaskState.WAITING, TaskState.WAITING]
    schedule = store.get_schedule("hourly")
    assert schedule is not None and schedule.next_due == HOURLY_DOWN + 4 * 60 * MINUTE


def test_each_due_time_fires_exactly_once(store: SqliteStore, tmp_path: Path) -> None:
    sched_id = _add(store)
    s = _scheduler(store, tmp_path)
    for now in (T0 + 10, T0 + 20, T0 + MINUTE + 5, T0 + MINUTE + 6):  # ticks, some repeated
        with store.transaction():
            s.fire_due(now)
    with store.transaction():
        s.fire(store.get_schedule_by_id(sched_id), T0, T0 + 100)  # type: ignore[arg-type]  # a replay after a crash
    dues = [t.due_at or 0 for t in store.list_tasks(TaskFilter())]
    assert sorted(dues) == [T0, T0 + MINUTE]


def test_a_crash_before_commit_loses_fire_and_task_together(
    store: SqliteStore, tmp_path: Path
) -> None:
    _add(store)
    s = _scheduler(store, tmp_path)
    with pytest.raises(RuntimeError), store.transaction():
        s.fire_due(T0 + 10)
        raise RuntimeError("the daemon dies before the commit")
    assert store.conn.execute("SELECT count(*) FROM tasks").fetchone()[0] == 0
    with store.transaction():
        s.fire_due(T0 + 20)  # the next daemon fires it, once
    assert store.conn.execute("SELECT count(*) FROM fires").fetchone()[0] == 1
    assert store.conn.execute("SELECT count(*) FROM tasks").fetchone()[0] == 1


@pytest.mark.parametrize(
    ("overlap", "tasks", "second_state"),
    [("skip", 1, None), ("queue", 2, TaskState.WAITING), ("allow", 2, TaskState.QUEUED)],
)
def test_overlap_policies(
    store: SqliteStore, tmp_path: Path, overlap: str, tasks: int, second_state: TaskState | None
) -> None:
    _add(store, overlap=overlap)
    s = _scheduler(store, tmp_path)
    with store.transaction():
        s.fire_due(T0 + 10)  # the first run is queued, so unfinished
        s.fire_due(T0 + MINUTE + 10)
    found = sorted(store.list_tasks(TaskFilter()), key=lambda t: t.id)
    assert len(found) == tasks
    if second_state is not None:
        assert found[1].state is second_state
    if overlap == "skip":
        outcomes = [f.outcome for f in store.fires_of(found[0].schedule_id or 0, 10)]
        assert outcomes[0].startswith("skipped")


def test_a_burst_ends_after_its_quiet_period_or_at_its_longest() -> None:
    burst = Burst(quiet=1.0, longest=10.0)
    assert not burst.due(0.0)  # nothing changed: nothing to fire
    for t in (0.0, 0.2, 0.4, 0.6, 0.8):  # a write every 0.2 s keeps the burst open
        burst.add({"/in/notes.md"}, t)
        assert not burst.due(t + 0.9)
    burst.add(set(), 1.5)  # a timeout with no change is not a change
    assert burst.due(1.8) and burst.take() == ["/in/notes.md"] and not burst.due(1.8)
    for n in range(60):  # an endless stream: it still fires, at its longest
        burst.add({f"/in/{n % 3}"}, 2.0 + n * 0.2)
        if burst.due(2.0 + n * 0.2):
            break
    assert n == 50 and burst.take() == ["/in/0", "/in/1", "/in/2"]
    assert Burst(quiet=1.0).longest == 60.0 and Burst(quiet=30.0).longest == 300.0
