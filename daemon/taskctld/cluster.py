"""One node of a cluster: what a daemon on a shared PostgreSQL store does besides its own work.

Nodes never talk to each other; the database is the one shared surface. A node:

- **beats** (`Heartbeat`, a thread with its own connection, so that a loop busy or stuck on a
  slow query never lets the lease lapse unnoticed): every third of the lease it renews its
  row. When the store says the node was declared lost (another node rescued its attempts), or
  when no beat got through for a whole lease (partitioned, or the process was stopped), it
  stops its own task trees at once and says so in its log: their attempts belong to others now.
- **rescues** (`Rescuer`, on the loop): nodes whose heartbeat is older than the lease are
  declared lost, one transaction each, and their open attempts end `lost`; the retry policy
  decides (`Lifecycle.finish`).
- **hears** (`Listener`, a thread on a LISTEN connection): every commit that appends events
  NOTIFYs; a stop asked for an attempt this node runs is carried out.
- **tails** the event log (`Tailer`): watchers, waiters and the dispatcher learn of changes
  from the events table in id order, which the store makes commit order. Local commits and
  notifications only poke it; it reads what is new. So `watch --since N` resumes anywhere
  without a gap, whichever node wrote what.

Polling is the fallback for lost notifications: the tailer also reads every `POLL` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from taskctl import __version__
from taskctl.api import Outcome, TaskState
from taskctl.errors import TaskctlError
from taskctld.launcher import Key
from taskctld.lifecycle import Lifecycle
from taskctld.store import AttemptEnd, DistributedStore, EventRow, NodeStore, Store

log = logging.getLogger("taskctld.cluster")

POLL = 2.0  # seconds between reads of the event log when no notification came
SETTLE_AT_MOST = 200  # waiting tasks settled by one sweep
# How a node ends the trees of a lease it lost: if nobody rescued them meanwhile, each is
# queued again without counting (as `daemon stop --kill` does); if somebody did, the end is
# stale and changes nothing.
LOST_LEASE_STOP = "interrupt"
CANCEL = "cancel"  # a stop asked of this node by another's cancel


class Beats(Protocol):
    """What the heartbeat asks of its own connection to the store."""

    def join(self, name: str, version: str, slots: int, queues: list[str] | None) -> None: ...
    def beat(self) -> bool: ...
    def close(self) -> None: ...


class Owners(Protocol):
    """Who runs an attempt, and asking that node to stop it."""

    def node_of(self, task_id: int) -> str | None: ...
    def transaction(self) -> contextlib.AbstractContextManager[None]: ...
    def request_stop(self, task_id: int, attempt: int) -> None: ...


class Stops(Protocol):
    """What the node asks of the local runner."""

    def stop(self, task_id: int, attempt: int, kind: str) -> bool: ...
    def stop_all(self, kind: str) -> int: ...
    def unheld(self, keys: set[Key]) -> set[Key]: ...
    def give_up(self, keys: set[Key], why: str) -> None: ...


@dataclass(frozen=True)
class NodeSettings:
    name: str
    lease: float  # seconds
    slots: int
    queues: list[str] | None

    @property
    def beat_every(self) -> float:
        return self.lease / 3


# -- the heartbeat --------------------------------------------------------------------------------


class Heartbeat:
    """Renews the node's lease from a thread (see the module docstring). `lost` is called on
    the loop, once per loss, when the node must stop its own trees."""

    def __init__(
        self,
        open_store: Callable[[], Beats],
        settings: NodeSettings,
        loop: asyncio.AbstractEventLoop,
        lost: Callable[[str], None],
    ) -> None:
        self.open_store = open_store
        self.settings = settings
        self.loop = loop
        self.lost = lost
        self.last_ok = time.monotonic()
        self.owning = True  # False once our trees were stopped, until we rejoin
        self.error: str | None = None  # why the last beat failed (said when the lease lapses)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        self.last_ok = time.monotonic()  # (after recovery, however long that took)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.settings.lease)

    def _run(self) -> None:
        store: Beats | None = None
        while not self._stop.wait(self.settings.beat_every):
            try:
                store = store or self.open_store()
                self._beat(store)
            except TaskctlError as e:
                self.error = e.message
                store = self._drop(store)
                self._check_silence()
            except Exception as e:  # a bug must not stop the heartbeat for good
                log.exception("heartbeat failed")
                self.error = repr(e)
                store = self._drop(store)
                self._check_silence()
        self._drop(store)

    def _beat(self, store: Beats) -> None:
        silent = time.monotonic() - self.last_ok
        if silent > self.settings.lease and self.owning:
            # Stopped (SIGSTOP) or cut off longer than the lease: others may have rescued our
            # attempts already. Stop first, ask after.
            self._lose(
                f"no heartbeat got through for {silent:.0f}s (lease {self.settings.lease:.0f}s)"
            )
        if not store.beat():  # declared lost: what we ran is others' now
            if self.owning:
                self._lose("another node declared this node lost and rescued its tasks")
            s = self.settings
            store.join(s.name, __version__, s.slots, s.queues)  # back, with nothing of old
            log.warning("node %s rejoined the cluster", s.name)
        # The lease is ours again (what ran under the old one is being stopped): the next
        # lapse stops what runs then.
        self.owning = True
        self.last_ok = time.monotonic()
        self.error = None

    def _check_silence(self) -> None:
        silent = time.monotonic() - self.last_ok
        if silent > self.settings.lease and self.owning:
            self._lose(f"the store could not be reached for {silent:.0f}s: {self.error}")

    def _lose(self, why: str) -> None:
        self.owning = False
        self.loop.call_soon_threadsafe(self.lost, why)

    @staticmethod
    def _drop(store: Beats | None) -> None:
        if store is not None:
            with contextlib.suppress(Exception):
                store.close()
        return None


# -- rescue ---------------------------------------------------------------------------------------


class Rescuer:
    """Declares lapsed nodes lost and ends their open attempts `lost` (on the loop, in one
    transaction per node, through the dispatcher's turn so that its counts stay right)."""

    def __init__(
        self,
        store: Store,
        nodes: NodeStore,
        lifecycle: Lifecycle,
        run_in_turn: Callable[[Callable[[int], Any]], Any],
    ) -> None:
        self.store = store
        self.nodes = nodes
        self.lifecycle = lifecycle
        self.run_in_turn = run_in_turn

    def sweep(self) -> int:
        """Rescue every lapsed node; how many attempts were ended."""
        ended = 0
        for name in self.nodes.lapsed():
            ended += self.run_in_turn(functools.partial(self._rescue, name)) or 0
        return ended

    def settle_waiting(self) -> int:
        """Settle waiting tasks that races between nodes left waiting (see
        `NodeStore.unsettled`); how many were found."""
        found = self.nodes.unsettled(SETTLE_AT_MOST)
        if found:
            self.run_in_turn(functools.partial(self.lifecycle.settle, found))
            log.info(
                "settled %d waiting task(s) that a race between nodes left waiting", len(found)
            )
        return len(found)

    def _rescue(self, name: str, now: int) -> int:
        asked = set(self.nodes.asked_stops(name))  # cancelled by a user: not to run again
        attempts = self.nodes.take_lost(name)
        tasks = {t.id: t for t in self.store.get_tasks([a.task_id for a in attempts])}
        ended = 0
        for attempt in attempts:
            cancelled = (attempt.task_id, attempt.number) in asked
            end = AttemptEnd(
                task_id=attempt.task_id, attempt=attempt.number,
                outcome=Outcome.CANCELLED if cancelled else Outcome.LOST, ended_at=now,
                error=f"node {name} was lost (no heartbeat within its lease)",
                cause=None if cancelled else "node_lost",
            )  # fmt: skip
            if not self.store.end_attempt(end):
                continue
            self.nodes.close_output(attempt.task_id, attempt.number)
            task = tasks.get(attempt.task_id)
            if task is not None and task.state is TaskState.RUNNING:
                self.lifecycle.finish(task, end, now, counts=True)
            ended += 1
        if attempts:
            log.warning("node %s lost: %d attempt(s) rescued", name, ended)
        else:
            log.warning("node %s lost (it ran nothing)", name)
        return ended


# -- notifications and the event log ---------------------------------------------------------------


class Listener:
    """A thread on a LISTEN connection; each notification is handed to `heard` on the loop.
    It reconnects when the connection drops (and says so once)."""

    def __init__(
        self,
        listen: Callable[[threading.Event], Any],
        loop: asyncio.AbstractEventLoop,
        heard: Callable[[dict[str, Any]], None],
    ) -> None:
        self.listen = listen
        self.loop = loop
        self.heard = heard
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="listener", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                for payload in self.listen(self._stop):
                    failing = False
                    self.loop.call_soon_threadsafe(self.heard, _parse(payload))
            except Exception as e:
                if not failing:
                    log.warning("listening for other nodes failed (polling meanwhile): %s", e)
                failing = True
                self._stop.wait(POLL)


def _parse(payload: str) -> dict[str, Any]:
    try:
        data = json.loads(payload)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


class Tailer:
    """Hands the events table to the hub, the metrics and the dispatcher, in id (commit) order, whichever
    node appended them. `poke` after a commit or a notification; it reads on the loop's next
    turn, at most once per turn."""

    READ_AT_MOST = 2000

    def __init__(self, store: Store, hear: list[Callable[[list[EventRow]], None]]) -> None:
        self.store = store
        self.hear = hear  # in order: the hub, the metrics, the dispatcher
        self.cursor = store.last_event_id()
        self._pending = False

    def committed(self, events: list[EventRow]) -> None:
        """A commit of ours: its events, if they follow the cursor (no other node committed
        in between), are handed on as they are; else the log is read."""
        if events and events[0].id == self.cursor + 1:
            self.cursor = events[-1].id
            for heard in self.hear:
                heard(events)
        else:
            self.poke()

    def poke(self, *_: object) -> None:
        if not self._pending:
            self._pending = True
            asyncio.get_running_loop().call_soon(self.read)

    def read(self) -> None:
        self._pending = False
        try:
            while True:
                events = self.store.events_after(self.cursor, self.READ_AT_MOST)
                if not events:
                    return
                self.cursor = events[-1].id
                for heard in self.hear:
                    heard(events)
                if len(events) < self.READ_AT_MOST:
                    return
        except TaskctlError as e:
            log.warning("cannot read the event log: %s", e.message)


class ClusterStops:
    """Stops for the services: an attempt this node runs is stopped here; one that another
    node runs is asked of it through the store (a notification), and its end comes back
    through the event log like any other change."""

    def __init__(self, local: Stops, nodes: Owners, me: str) -> None:
        self.local = local
        self.nodes = nodes
        self.me = me

    def stop(self, task_id: int, attempt: int, kind: str) -> bool:
        """(Another node stops the attempt with its own kind of stop: a cancel.)"""
        owner = self.nodes.node_of(task_id)
        if owner is None or owner == self.me:
            return self.local.stop(task_id, attempt, kind)
        with self.nodes.transaction():  # its NOTIFY goes at the commit
            self.nodes.request_stop(task_id, attempt)
        return True


# -- output ----------------------------------------------------------------------------------------


class Output(Protocol):
    def ship_output(
        self, task_id: int, attempt: int, stream: str, at: int, data: bytes, *, done: bool
    ) -> None: ...


STREAMS = (("stdout", "out"), ("stderr", "err"))


class Shipper:
    """Ships the output of this node's attempts to the store, so that any node shows it: what
    each log file gained since the last look, every `SHIP_EVERY` seconds while it runs and the
    rest once its end is committed, at most `CHUNK` bytes a row and `cap` bytes a stream (past
    the cap, a notice says where the rest is)."""

    SHIP_EVERY = 0.5  # seconds
    CHUNK = 256 << 10

    def __init__(
        self, store: Output, folder: Path, cap: int, node: str, running: Callable[[], list[Key]]
    ) -> None:
        self.store = store
        self.folder = folder
        self.cap = cap
        self.node = node
        self.running = running
        self.shipped: dict[tuple[int, int, str], int] = {}  # (task, attempt, stream) -> bytes

    def tick(self) -> None:
        for task_id, attempt in self.running():
            for stream, suffix in STREAMS:
                self._ship(task_id, attempt, stream, suffix, done=False)

    def ended(self, end: AttemptEnd) -> None:
        """An end of ours is committed: the rest of its output, and that it is whole."""
        for stream, suffix in STREAMS:
            try:
                self._ship(end.task_id, end.attempt, stream, suffix, done=True)
            except TaskctlError as e:
                log.warning("output of task %d not shipped: %s", end.task_id, e.message)
            self.shipped.pop((end.task_id, end.attempt, stream), None)

    def _ship(self, task_id: int, attempt: int, stream: str, suffix: str, *, done: bool) -> None:
        key = (task_id, attempt, stream)
        at = self.shipped.get(key, 0)
        try:
            f = (self.folder / f"{task_id}.{attempt}.{suffix}").open("rb")
        except FileNotFoundError:
            if done:
                self.store.ship_output(task_id, attempt, stream, at, b"", done=True)
            return
        with f:
            f.seek(at)
            while at < self.cap:
                data = f.read(min(self.CHUNK, self.cap - at))
                if not data:
                    break
                self.store.ship_output(task_id, attempt, stream, at, data, done=False)
                at += len(data)
                self.shipped[key] = at
                if not done:
                    break  # one chunk a look while it runs: the loop stays responsive
            if done:
                rest = f.read(1)
                notice = (
                    f"\n[taskctl: output past {self.cap} bytes is kept on node {self.node} only]\n"
                    if rest
                    else ""
                ).encode()
                self.store.ship_output(task_id, attempt, stream, at, notice, done=True)


# -- the node -------------------------------------------------------------------------------------


class Node:
    """The parts above, started and stopped together by the daemon."""

    def __init__(
        self,
        settings: NodeSettings,
        nodes: DistributedStore,
        heartbeat: Heartbeat,
        listener: Listener,
        tailer: Tailer,
        rescuer: Rescuer,
        stops: Stops,
        queues_changed: Callable[[], None],
        look_again: Callable[[], None],
        freed: Callable[[list[str]], None],
        work_in: Callable[[list[str]], None],
        shipper: Shipper,
    ) -> None:
        self.settings = settings
        self.nodes = nodes
        self.heartbeat = heartbeat
        self.listener = listener
        self.tailer = tailer
        self.rescuer = rescuer
        self.stops = stops
        self.queues_changed = queues_changed
        self.look_again = look_again
        self.freed = freed
        self.work_in = work_in
        self.shipper = shipper
        self._stopping: set[tuple[int, int]] = set()  # stops asked and passed on
        self._suspects: set[Key] = set()  # open on record, run by nothing here (last look)
        self._tasks: list[asyncio.Task[None]] = []

    def join(self) -> None:
        """Register (or come back) as up, before anything is claimed or adopted."""
        s = self.settings
        self.nodes.join(s.name, __version__, s.slots, s.queues)
        log.info("node %s joined (lease %.0fs)", s.name, s.lease)

    def start(self) -> None:
        self.heartbeat.start()
        self.listener.start()
        self._tasks.append(asyncio.create_task(self._periodic()))
        self._tasks.append(asyncio.create_task(self._ship()))

    async def _ship(self) -> None:
        while True:
            await asyncio.sleep(self.shipper.SHIP_EVERY)
            try:
                self.shipper.tick()
            except TaskctlError as e:
                log.warning("shipping output failed: %s", e.message)
            except OSError as e:
                log.warning("shipping output failed: %s", e)

    async def _periodic(self) -> None:
        """Rescue, read the log, stop what was asked and look for work on a timer
        (notifications may be lost)."""
        while True:
            await asyncio.sleep(min(POLL, self.settings.beat_every))
            try:
                self.rescuer.sweep()
                self.rescuer.settle_waiting()
                self.reconcile()
                self.stop_asked()
                self.look_again()
            except TaskctlError as e:
                log.warning("rescue failed: %s", e.message)
            except Exception:
                log.exception("rescue failed")
            self.tailer.poke()

    def heard(self, message: dict[str, Any]) -> None:
        """A notification: stop what we were asked to stop, take new queue settings, read
        the log. Our own commits' notices are passed over (the tailer had them first)."""
        if message.get("node") == self.settings.name:
            return
        if message.get("queues"):
            self.queues_changed()
        for item in message.get("stop", ()):  # whoever runs it stops it (others: no-op)
            with contextlib.suppress(ValueError, TypeError):
                key = (int(item[0]), int(item[1]))
                if self.stops.stop(*key, CANCEL):
                    self._stopping.add(key)
        if message.get("more"):
            self.look_again()
        else:
            self.work_in([str(q) for q in message.get("queued", ())])
            self.freed([str(q) for q in message.get("freed", ())])
        self.tailer.poke()

    def reconcile(self) -> None:
        """Attempts the store says this node runs that its runner does not: a claim whose
        commit went through though its answer was lost on the network (the turn was taken
        for rolled back, so nothing was started). Seen so at two looks in a row (between
        turns, so never a claim being handed over), each ends interrupted and runs again."""
        store_says = {(a.task_id, a.number) for a in self.nodes.open_attempts()}
        suspects = self.stops.unheld(store_says)
        confirmed = suspects & self._suspects
        self._suspects = suspects - confirmed
        if confirmed:
            log.warning("%d attempt(s) on record here that nothing runs: run again", len(confirmed))
            self.stops.give_up(
                confirmed, "this node never started it (its claim's answer was lost)"
            )

    def stop_asked(self) -> None:
        """Stops asked of this node that no notification brought (each asked once)."""
        asked = set(self.nodes.asked_stops(self.settings.name))
        for task_id, attempt in asked - self._stopping:
            self.stops.stop(task_id, attempt, CANCEL)
        self._stopping = asked

    def lost_lease(self, why: str) -> None:
        """Our attempts may belong to others now: end every tree we run."""
        stopped = self.stops.stop_all(LOST_LEASE_STOP)
        log.error("lease lost: %s; stopped %d task tree(s) of this node", why, stopped)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self.listener.close()
        self.heartbeat.close()
