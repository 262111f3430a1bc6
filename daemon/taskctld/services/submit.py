"""Submitting tasks: one, a small batch, or a big batch staged a chunk at a time; all or none,
and answered only after the commit (an acknowledged task is durable). Idempotency keys are
checked here: a key that matches a task not final, or finished within `key_retention`, gives
that task back (deduplicated) instead of a new one; the same key with a different command or
options is a Conflict."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field

from taskctl.api import TaskSpec
from taskctl.errors import Conflict
from taskctl.units import now_ms
from taskctld.config import Config
from taskctld.dispatcher import Dispatcher
from taskctld.lifecycle import Lifecycle
from taskctld.services.resolve import Places, Resolver
from taskctld.store import NewTask, StagedBatch, Store

log = logging.getLogger("taskctld.submit")

Holders = dict[str, tuple[str | None, int]]  # key -> (fingerprint, the task that holds it)


@dataclass
class Submitted:
    task_id: int
    deduplicated: bool


@dataclass
class Published:
    """A staged batch's tasks in the order given, told without one object each: task `index`
    is in `dups` when its key gave back another task (an id, or -seq: an earlier task of the
    batch), else it is the next staged row `seq`, which became task `base + seq` unless its key
    was `taken` meanwhile (seq -> the task that holds it)."""

    count: int
    base: int = 0
    dups: dict[int, int] = field(default_factory=dict)
    taken: dict[int, int] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Submitted]:
        seq = 0
        for index in range(self.count):
            ref = self.dups.get(index)
            if ref is not None and ref > 0:
                yield Submitted(ref, True)
                continue
            if ref is None:
                seq += 1
            own = seq if ref is None else -ref
            if own in self.taken:
                yield Submitted(self.taken[own], True)
            else:
                yield Submitted(self.base + own, ref is not None)


@dataclass
class SubmitService:
    store: Store
    dispatcher: Dispatcher
    lifecycle: Lifecycle
    resolver: Resolver
    config: Config
    clock: Callable[[], int] = now_ms

    def submit(self, specs: Sequence[TaskSpec]) -> list[Submitted]:
        """Validate every spec, then insert all of them in one transaction (all or none).
        The ids are returned only after the commit."""
        return self.insert(self.resolver.resolve_all(specs, self.resolver.places(specs)))

    async def submit_parsed(self, specs: Sequence[TaskSpec]) -> list[Submitted]:
        """`submit`, with the specs resolved in a thread (a batch: the socket keeps answering)."""
        places = self.resolver.places(specs)
        tasks = await asyncio.to_thread(self.resolver.resolve_all, specs, places)
        return self.insert(tasks)

    async def submit_staged(self, chunks: AsyncIterator[list[TaskSpec]]) -> Published:
        """A big batch, all or none, without holding the event loop or the whole batch: each
        chunk is checked, resolved and staged (other requests run in between), then one short
        transaction publishes every staged task. Keys are checked per chunk against the store
        and the batch's own keys (kept in memory, nothing else is), and once more when
        publishing. Raises as `submit` does, the failing task named by its place in the
        batch; nothing is stored then."""
        staging = self.store.open_staging()
        try:
            published = Published(0)
            holders: Holders = {}  # key -> (fingerprint, id or -seq)
            places: Places = {}
            seq = 0
            async for specs in chunks:
                first = published.count
                self.resolver.places(specs, places, first)
                tasks = await asyncio.to_thread(self.resolver.resolve_all, specs, places, first)
                fresh = self._fresh_of(tasks, first, holders, published.dups, seq)
                self.store.stage(staging, seq + 1, fresh)
                seq += len(fresh)
                published.count += len(specs)
                await asyncio.sleep(0)  # let other requests in between chunks
            began = time.monotonic()
            done = await self._publish(staging)
            log.info("a batch of %d published in %.3fs", seq, time.monotonic() - began)
            await asyncio.to_thread(self.store.checkpoint_apart)
            published.base, published.taken = done.base, done.taken
            return published
        finally:
            self.store.drop_staging(staging)

    async def _publish(self, staging: str) -> StagedBatch:
        """Publish a staged batch in one transaction. Without dependencies, in a thread on a
        connection of its own: requests that only read are answered meanwhile (100,000 tasks
        take 0.3 to 0.8 s to insert, by load). With them, in the dispatcher's cycle, which
        settles them in the same transaction."""
        retention = int(self.config.key_retention * 1000)
        if not self.store.can_publish_apart(staging):
            cycled = self.dispatcher.cycle(
                lambda now: self.lifecycle.publish_staged(staging, now, now - retention)
            )
            assert cycled is not None
            return cycled
        now = self.clock()
        done, span = await asyncio.to_thread(
            self.lifecycle.publish_apart, staging, now, now - retention
        )
        self.store.announce(span)
        self.dispatcher.wake()
        return done

    def _fresh_of(
        self, tasks: list[NewTask], first: int, holders: Holders, dups: dict[int, int], seq: int
    ) -> list[NewTask]:
        """The tasks to stage, numbered on from `seq`; a task whose key a stored task or an
        earlier task of the batch holds is noted in `dups` instead (Conflict if the request
        differs), as `_insert_unless_known` does."""
        since = self.clock() - int(self.config.key_retention * 1000)
        fresh = []
        for index, task in enumerate(tasks, start=first):
            holder = self._key_holder(task, holders, since)
            if holder is not None:
                dups[index] = holder
                continue
            fresh.append(task)
            if task.key is not None:
                holders[task.key] = (task.key_fingerprint, -(seq + len(fresh)))
        return fresh

    def _key_holder(self, task: NewTask, holders: Holders, since: int) -> int | None:
        """The task that holds `task`'s key (found in the store, or in `holders`: the batch's
        own keys, with a task id or a negative reference into the batch), None if no task
        does. Conflict when that task was submitted with a different command or options."""
        key = task.key
        if key is None:
            return None
        if key not in holders:
            found = self.store.find_by_key(key, since)
            if found is None:
                return None
            holders[key] = (found.key_fingerprint, found.id)
        fingerprint, holder = holders[key]
        if fingerprint != task.key_fingerprint:
            owner = f"task {holder}" if holder > 0 else "another task of this batch"
            raise Conflict(
                f"idempotency key {key!r} belongs to {owner}, submitted with a different "
                "command or options"
            )
        return holder

    def insert(self, tasks: list[NewTask]) -> list[Submitted]:
        """Resolved tasks into the store in one transaction (all or none)."""
        result = self.dispatcher.cycle(lambda now: self._insert_unless_known(tasks, now))
        assert result is not None
        return result

    def _insert_unless_known(self, tasks: list[NewTask], now: int) -> list[Submitted]:
        """Insert the tasks whose key (if any) is new; a key seen before, in the store or
        earlier in the same batch, gives back its task if the request is the same one."""
        since = now - int(self.config.key_retention * 1000)
        holders: Holders = {}  # key -> (fingerprint, id or -1-index)
        fresh: list[NewTask] = []
        plan: list[tuple[int, bool]] = []  # (id, or -1-index into fresh; deduplicated)
        for task in tasks:
            holder = self._key_holder(task, holders, since)
            if holder is not None:
                plan.append((holder, True))
                continue
            plan.append((-1 - len(fresh), False))
            if task.key is not None:
                holders[task.key] = (task.key_fingerprint, -1 - len(fresh))
            fresh.append(task)
        ids = self.lifecycle.submit(fresh, now) if fresh else []
        return [Submitted(ref if ref > 0 else ids[-1 - ref], dedup) for ref, dedup in plan]
