"""Cron schedules and file triggers: what creates tasks by itself.

Cron times come from cronsim, which follows Debian's cron(8) across daylight-saving changes: a
fixed-time job whose time falls in a skipped hour runs once right after the gap, one in a
repeated hour runs once, and jobs that run more often than hourly run on real time. (croniter
7.0 fires `30 1 * * *` twice on a fall-back day; the golden tests pin the behaviour.)

Firing is exactly once per due time: each fire is a row keyed by (schedule, due time) inserted
in the same transaction as the task it creates, so a crash either loses both or keeps both, and
a repeated attempt to fire the same due time changes nothing.

`plan` decides what a schedule does at a given moment: a pure function of the schedule, its
last handled due time and `now`, tested without a clock or a database.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fnmatch
import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from taskctl import units
from taskctl.errors import InvalidRequest, StorageFull, TaskctlError
from taskctl.wire import is_text
from taskctld.lifecycle import Lifecycle
from taskctld.store import FINAL_VALUES, NewTask, ScheduleRow, Store

log = logging.getLogger("taskctld.scheduler")

ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
FIELDS = "minute hour day-of-month month day-of-week"
BEHIND_AFTER_MS = 5_000  # past due by more than this, it is late: health says the daemon is behind
LATE_GRACE_MS = 60_000  # a due time later than this when we get to it counts as missed
MAX_CATCH_UP = 100  # `--catch-up all` runs at most this many missed times (the newest)
MAX_SCAN = 100_000  # due times examined at most after a long downtime


# -- cron expressions ---------------------------------------------------------------------------


def normalize_cron(expr: str) -> str:
    """The expression in five fields (aliases expanded); InvalidRequest naming what is wrong."""
    text = " ".join(expr.split())
    text = ALIASES.get(text.lower(), text)
    if text.startswith("@"):
        raise InvalidRequest(
            f"invalid cron expression {expr!r}: unknown alias (use one of {', '.join(ALIASES)})"
        )
    if len(text.split()) != 5:
        raise InvalidRequest(
            f"invalid cron expression {expr!r}: it has {len(text.split())} fields, cron needs 5 ({FIELDS})"
        )
    try:
        next(CronSim(text, datetime(2000, 1, 1, tzinfo=UTC)))
    except CronSimError as e:
        raise InvalidRequest(
            f"invalid cron expression {expr!r}: {_field_message(str(e))}"
        ) from None
    except StopIteration:
        raise InvalidRequest(f"invalid cron expression {expr!r}: it never fires") from None
    return text


def _field_message(message: str) -> str:
    """cronsim says `Bad minute`; say which field and what it accepts."""
    ranges = {
        "minute": "0-59",
        "hour": "0-23",
        "day-of-month": "1-31, and a date that exists",
        "month": "1-12 or jan-dec",
        "day-of-week": "0-7 or sun-sat",
    }
    for name, allowed in ranges.items():
        if name in message.lower():
            return f"bad {name} field (allowed: {allowed})"
    return message[:1].lower() + message[1:]


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidRequest(
            f"unknown time zone {name!r}: use an IANA name like Europe/Berlin"
        ) from None


def local_zone_name() -> str:
    """The daemon's IANA zone (TZ, else /etc/localtime), or UTC: the zone of a schedule
    whose request names none (the CLI always sends the shell's)."""
    return units.local_zone_name() or "UTC"


def _due_after(expr: str, tz: str, after_ms: int) -> Iterator[datetime]:
    """Due times strictly after `after_ms`, as aware datetimes in the schedule's zone. cronsim
    reads its start as wall-clock time: from inside a repeated hour (the second pass, 01:10
    EST) it gives that hour's first-pass time (01:30 EDT), which is earlier in real time. That
    run belonged to the first pass (cron(8) runs it once), so it is passed over here."""
    start = datetime.fromtimestamp(after_ms / 1000, tz=zone(tz))
    with contextlib.suppress(OverflowError):  # past the end of 9999: there are no more
        for due in CronSim(expr, start):
            if due.timestamp() * 1000 > after_ms:
                yield due


def times_after(expr: str, tz: str, after_ms: int) -> Iterator[int]:
    """Due times strictly after `after_ms`, as epoch milliseconds, in order."""
    for due in _due_after(expr, tz, after_ms):
        yield int(due.timestamp() * 1000)


def next_times(expr: str, tz: str, after_ms: int, n: int) -> list[datetime]:
    """The next n due times after a moment, as aware datetimes in the schedule's zone."""
    return list(itertools.islice(_due_after(expr, tz, after_ms), n))


# -- what to do at a moment --------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    fire: list[int]  # due times to fire now, oldest first
    missed: int  # due times passed over (catch-up policy)
    next_due: int | None  # the first due time after now


def plan(expr: str, tz: str, catch_up: str, last_due: int, now: int) -> Plan:
    """What a cron schedule does at `now`, given the newest due time it already handled.

    Due times in (last_due, now] that are at most LATE_GRACE_MS old are on time and fire. Older
    ones were missed (the daemon was down): `none` skips them, `latest` runs only the newest due
    time, `all` runs each (the newest MAX_CATCH_UP; `fire_due` queues them one behind the
    other)."""
    due: list[int] = []
    next_due = None
    for t in times_after(expr, tz, last_due):
        if t > now:
            next_due = t
            break
        due.append(t)
        if len(due) > MAX_SCAN:
            due = due[-MAX_CATCH_UP:]
    on_time = [t for t in due if now - t <= LATE_GRACE_MS]
    missed = [t for t in due if now - t > LATE_GRACE_MS]
    if catch_up == "all":
        fire = missed[-MAX_CATCH_UP:] + on_time
    elif catch_up == "latest":
        fire = due[-1:]
    else:
        fire = on_time
    return Plan(fire=fire, missed=len(due) - len(fire), next_due=next_due)


# -- firing --------------------------------------------------------------------------------------


class Scheduler:
    """Fires due schedules through the store, inside the dispatcher's transaction."""

    def __init__(
        self,
        store: Store,
        build: Callable[[dict[str, Any], int], NewTask],
        changes_dir: Path,
        *,
        lifecycle: Lifecycle,
        on_fire: Sequence[Callable[[int], None]] = (),
    ) -> None:
        self.store = store
        self.lifecycle = lifecycle
        self.build = build  # a stored task template (API fields) -> the task to insert
        self.changes_dir = changes_dir
        self.last_tick = 0
        self.on_fire = list(on_fire)  # told the lateness (ms) of each cron fire

    def fire_due(self, now: int) -> None:
        """Fire every cron schedule that is due (call inside a transaction)."""
        self.last_tick = now
        for schedule in self.store.due_schedules(now):
            p = plan(
                schedule.spec,
                schedule.tz or "UTC",
                schedule.catch_up,
                schedule.last_due or schedule.created_at,
                now,
            )
            firing = _catching_up(schedule, len(p.fire))
            for due in p.fire:
                if self.fire_safely(firing, due, now) is not None:
                    for observer in self.on_fire:
                        observer(now - due)
            if p.missed:
                log.info(
                    "schedule %s: %d missed time(s) passed over (catch-up %s)",
                    schedule.name,
                    p.missed,
                    schedule.catch_up,
                )
            self.store.update_schedule(
                schedule.id, last_due=now, next_due=p.next_due, updated_at=now
            )

    def fire_safely(
        self, schedule: ScheduleRow, due: int, now: int, extra_env: dict[str, str] | None = None
    ) -> int | None:
        """`fire` in a savepoint: a schedule whose task cannot be created (its directory
        vanished, say) records the failed fire and moves on; it never takes the dispatcher's
        transaction, and so everything else, down with it."""
        try:
            with self.store.savepoint():
                return self.fire(schedule, due, now, extra_env)
        except StorageFull:
            raise  # transient: the whole turn is retried, the fire with it
        except (TaskctlError, ValueError, KeyError, TypeError) as e:
            message = e.message if isinstance(e, TaskctlError) else str(e)
            log.error("schedule %s: cannot create its task for %d: %s", schedule.name, due, message)
            self.store.record_fire(schedule.id, due, now, None, f"error: {message}"[:500])
            return None

    def fire(
        self, schedule: ScheduleRow, due: int, now: int, extra_env: dict[str, str] | None = None
    ) -> int | None:
        """Create the task for one due time, unless it exists already or the overlap policy
        says no. Returns the task id (None when skipped)."""
        if not self.store.claim_fire(schedule.id, due, now):
            return None  # fired already, here or by another node
        previous = self.store.latest_task_of(schedule.id)
        running = previous is not None and previous[1] not in FINAL_VALUES
        if running and schedule.overlap == "skip":
            self.store.set_fire_task(
                schedule.id, due, None, "skipped: the previous run is still going"
            )
            return None
        template = json.loads(schedule.template)
        if extra_env:
            template["env"] = {**(template.get("env") or {}), **extra_env}
        task = self.build(template, now)
        task.schedule_id, task.due_at = schedule.id, due
        if running and schedule.overlap == "queue" and previous is not None:
            task.after_any = [previous[0]]
        (task_id,) = self.lifecycle.submit([task], now)
        self.store.set_fire_task(schedule.id, due, task_id, "fired")
        return task_id

    def fire_trigger(self, schedule_id: int, changed: list[str], now: int) -> int | None:
        """A burst of file changes: one task, which finds the paths (one per line) in the file
        named by TASKCTL_CHANGED_PATHS."""
        schedule = self.store.get_schedule_by_id(schedule_id)
        if schedule is None or schedule.paused:
            return None
        self.changes_dir.mkdir(mode=0o700, exist_ok=True)
        listing = self.changes_dir / f"{schedule_id}-{now}.txt"
        listing.write_bytes(b"".join(os.fsencode(p) + b"\n" for p in sorted(changed)))
        return self.fire_safely(schedule, now, now, {"TASKCTL_CHANGED_PATHS": str(listing)})

    def overdue(self, now: int) -> list[str]:
        """What is more than a few seconds past its due time: active cron schedules (by name),
        and scheduled tasks (delayed ones, retries after their backoff), which the dispatcher's
        timer should have queued. Either means the daemon's timers are not keeping up."""
        late = [s.name or "" for s in self.store.due_schedules(now - BEHIND_AFTER_MS)]
        tasks = self.store.count_due(now - BEHIND_AFTER_MS)
        if tasks:
            late.append(f"{tasks} scheduled task(s)")
        return late


def _catching_up(schedule: ScheduleRow, fires: int) -> ScheduleRow:
    """The schedule as it fires `fires` due times at once. Catch-up `all` runs every missed
    time, so they queue one behind the other: with `skip`, each would be skipped because the
    one fired a moment before it is still going."""
    if schedule.catch_up == "all" and fires > 1 and schedule.overlap == "skip":
        return dataclasses.replace(schedule, overlap="queue")
    return schedule


# -- file triggers ------------------------------------------------------------------------------


@dataclass
class TriggerSpec:
    paths: list[str]
    glob: str | None
    recursive: bool
    debounce: float  # seconds of quiet that end a burst
    node: str | None = None  # on a cluster, the node that watches it (where the paths are)

    @classmethod
    def parse(cls, raw: str) -> TriggerSpec:
        return cls(**json.loads(raw))


BURST_LONGEST = 60.0  # s: a burst fires this long after its first change (or 10 quiet periods)
WATCH_RETRY = (1.0, 2.0, 5.0, 10.0, 30.0)  # seconds before a failed watcher is started again


class Triggers:
    """One watchfiles watcher per active trigger; each burst of changes becomes one fire: a
    burst ends after the trigger's debounce of quiet (see `Burst`).

    A watcher that fails is started again (after a growing pause), and meanwhile `failures`
    says why, for `trigger list` and `health`. watchfiles cannot name a file whose name is not
    UTF-8 (its Rust side gives up on the whole burst): then the watched folders are searched for
    such names, which are reported as the burst, and the watcher goes on."""

    def __init__(self, on_burst: Callable[[int, list[str]], None]) -> None:
        self.on_burst = on_burst
        self.watchers: dict[int, tuple[asyncio.Task[None], asyncio.Event]] = {}
        self.failures: dict[int, str] = {}  # schedule id -> why its watcher is not running

    def arm(self, schedule: ScheduleRow) -> None:
        self.disarm(schedule.id)
        stop = asyncio.Event()
        task = asyncio.get_running_loop().create_task(
            self._watch(schedule.id, TriggerSpec.parse(schedule.spec), stop)
        )
        self.watchers[schedule.id] = (task, stop)

    def disarm(self, schedule_id: int) -> None:
        self.failures.pop(schedule_id, None)
        found = self.watchers.pop(schedule_id, None)
        if found is not None:
            found[1].set()
            found[0].cancel()

    def close(self) -> None:
        for schedule_id in list(self.watchers):
            self.disarm(schedule_id)

    async def _watch(self, schedule_id: int, spec: TriggerSpec, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            try:
                await self._watch_once(schedule_id, spec, stop)
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if _undecodable_path(e):  # a file whose name is not UTF-8 changed
                    self._fire(schedule_id, _undecodable_names(spec))
                    continue
                pause = WATCH_RETRY[min(failures, len(WATCH_RETRY) - 1)]
                failures += 1
                self.failures[schedule_id] = f"its watcher failed ({e}); retrying"
                log.exception(
                    "the watcher of trigger %d stopped; retrying in %.0fs", schedule_id, pause
                )
                await asyncio.sleep(pause)

    def _fire(self, schedule_id: int, paths: list[str]) -> None:
        try:
            self.on_burst(schedule_id, paths)
        except Exception:  # one failed burst (a full disk, say) must not end the watch
            log.exception("trigger %d: cannot fire for a burst of changes", schedule_id)

    async def _watch_once(self, schedule_id: int, spec: TriggerSpec, stop: asyncio.Event) -> None:
        """watchfiles' own grouping cannot be the quiet period: it ends a group when the set of
        changed (kind, path) pairs stops growing, so a file written every 0.2 s ends one each
        step. Its groups come here within a few tenths of a second, and `Burst` waits for the
        quiet (watchfiles yields on a timeout too, so a burst fires without a further change)."""
        from watchfiles import Change, awatch

        def wanted(change: Change, path: str) -> bool:
            if change == Change.modified and os.path.isdir(path):
                return False  # only that its entries changed (polling says so): they are listed
            if spec.glob is None:
                return True
            return fnmatch.fnmatch(os.path.basename(path), spec.glob) or fnmatch.fnmatch(
                path, spec.glob
            )

        burst = Burst(spec.debounce)
        step = min(max(int(spec.debounce * 100), 20), 200)  # ms; a tenth of the quiet period
        watching = awatch(
            *spec.paths,
            watch_filter=wanted,
            recursive=spec.recursive,
            step=step,
            debounce=2 * step,
            stop_event=stop,
            rust_timeout=min(max(step, int(spec.debounce * 250)), 1000),
            yield_on_timeout=True,
        )
        self.failures.pop(schedule_id, None)
        async for changes in watching:
            now = time.monotonic()
            burst.add({path for _, path in changes}, now)
            if burst.due(now):
                self._fire(schedule_id, burst.take())


class Burst:
    """A burst of file changes: it ends after `quiet` seconds without a change, or at the
    latest `longest` seconds after its first change (so that an endless stream of writes still
    fires, once per `longest`). Pure: time is passed in."""

    def __init__(self, quiet: float, longest: float | None = None) -> None:
        self.quiet = quiet
        self.longest = max(BURST_LONGEST, 10 * quiet) if longest is None else longest
        self.paths: set[str] = set()
        self.first = self.last = 0.0

    def add(self, paths: set[str], now: float) -> None:
        if not paths:
            return
        if not self.paths:
            self.first = now
        self.paths |= paths
        self.last = now

    def due(self, now: float) -> bool:
        return bool(self.paths) and (
            now - self.last >= self.quiet or now - self.first >= self.longest
        )

    def take(self) -> list[str]:
        paths, self.paths = sorted(self.paths), set()
        return paths


def _undecodable_names(spec: TriggerSpec) -> list[str]:
    """The entries of the watched paths whose names are not UTF-8 (as surrogate-escaped str),
    that the trigger's glob takes."""
    found = []
    for root in spec.paths:
        walk = os.walk(root)  # a folder that cannot be listed is skipped
        for folder, dirs, files in walk if spec.recursive else itertools.islice(walk, 1):
            for name in (*dirs, *files):
                if not is_text(name) and (spec.glob is None or fnmatch.fnmatch(name, spec.glob)):
                    found.append(os.path.join(folder, name))
    return sorted(found)


def _undecodable_path(error: BaseException) -> bool:
    """Whether watchfiles failed for a path it could not decode (its error may come wrapped in
    an exception group by the thread that waits for it)."""
    if isinstance(error, BaseExceptionGroup):
        return any(_undecodable_path(e) for e in error.exceptions)
    return "Unable to decode path" in str(error)
