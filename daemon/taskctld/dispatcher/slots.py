"""Slot accounting: how many slots each queue's attempts take, and which attempt takes each.

An attempt takes a slot of its queue from the moment it is claimed (or, started without a claim
of ours, adopted) until its end is applied. Three cases keep a slot without a claimed row:

- inherited: an attempt ended and its supervisor started the held attempt that followed it in
  its slot; the slot passes on and the count stays, until the follower's start claims it (or it
  is given back unstarted: then the slot is free);
- refused: a held start that could not be claimed (its task was cancelled as it started) is
  being stopped; it keeps its slot until its end arrives;
- stray: the same, found in the store by a daemon that starts after it (`count_stray`).

So a queue never runs more than its limit, holds included. The dispatcher's turn is the only
caller; nothing here touches the store.
"""

from __future__ import annotations

from collections.abc import Iterator

from taskctld.launcher import Key
from taskctld.store import TaskRow


class Slots:
    """One dispatcher's slot accounting (see the module's docstring)."""

    def __init__(self) -> None:
        self._running: dict[str, int] = {}  # queue -> slots taken
        self._claimed: dict[Key, TaskRow] = {}  # running attempts, as claimed
        self._inherited: dict[Key, str] = {}  # started in a passed-on slot (queue), unclaimed
        self._refused: dict[Key, str] = {}  # started once taken back: keeps its slot to its end
        self._took: dict[str, float] = {}  # queue -> how long its attempts take lately (ms)

    # -- counts ---------------------------------------------------------------------------------

    def forget(self) -> None:
        """Drop every claim, passed-on slot and refusal (a rollback undid them); `count`
        takes the store's view next."""
        self._claimed.clear()
        self._inherited.clear()
        self._refused.clear()

    def count(self, running: dict[str, int], strays: list[tuple[int, int, str]]) -> None:
        """The store's view: running tasks by queue, and stray attempts still being stopped
        (task id, attempt, queue), counted as refused starts so that their ends free them."""
        self._running = running
        for task_id, attempt, queue in strays:
            self.count_stray((task_id, attempt), queue)

    def taken(self) -> int:
        return sum(self._running.values())

    def taken_in(self, queue: str) -> int:
        return self._running.get(queue, 0)

    def free(self, concurrency: int) -> int:
        """How many slots are free under the global `concurrency` (negative: over it)."""
        return concurrency - sum(self._running.values())

    def open_in(self, queues: set[str], free: int, limits: dict[str, int]) -> dict[str, int]:
        """How many of the `free` slots each of `queues` may take, within its own limit."""
        slots = {}
        for queue in queues:
            limit = limits.get(queue)
            slots[queue] = free if limit is None else min(free, limit - self._running.get(queue, 0))
        return slots

    # -- claimed attempts -----------------------------------------------------------------------

    def claimed(self, task: TaskRow) -> None:
        """A claim of ours: the task runs as its attempt `task.attempts`."""
        self._running[task.queue] = self._running.get(task.queue, 0) + 1
        self._claimed[(task.id, task.attempts)] = task

    def is_claimed(self, key: Key) -> bool:
        return key in self._claimed

    def keep(self, key: Key, task: TaskRow) -> None:
        """The row of an adopted attempt that runs on (its slot is counted already)."""
        self._claimed[key] = task

    def ended(self, key: Key) -> TaskRow | None:
        """The claimed row of an attempt that ended (None: not claimed by us); its slot stays
        counted until `pass_or_free`."""
        return self._claimed.pop(key, None)

    def claimed_in(self, queue: str) -> Iterator[Key]:
        """The attempts of `queue` we claimed that still run, in the order of their claims."""
        return (key for key, task in self._claimed.items() if task.queue == queue)

    # -- slots passed on, refused starts, strays -------------------------------------------------

    def adopt(self, key: Key, queue: str | None) -> None:
        """An attempt started without a claim of ours: `queue` if it was claimed just now, None
        if it could not be. Its slot is counted unless it inherited one; refused, it keeps the
        one it inherited until its end."""
        inherited = self._inherited.pop(key, None)
        if queue is None:
            if inherited is not None:  # it is being stopped: its slot is taken until it ends
                self._refused[key] = inherited
        elif inherited is None:
            self._running[queue] = self._running.get(queue, 0) + 1

    def count_stray(self, key: Key, queue: str) -> None:
        """A stray attempt (its start crossed its task's cancel) takes a slot until it ends;
        counted as a refused start, whose end frees it."""
        self._refused[key] = queue
        self._running[queue] = self._running.get(queue, 0) + 1

    def is_refused(self, key: Key) -> bool:
        return key in self._refused

    def refused_end(self, key: Key) -> str | None:
        """The queue of a refused start that ended (None: it was not refused)."""
        return self._refused.pop(key, None)

    def pass_or_free(self, queue: str, following: Key | None) -> None:
        """An attempt of `queue` ended: its slot is free, or passed on to `following`."""
        if following is None:
            self._running[queue] = max(0, self._running.get(queue, 0) - 1)
        else:
            self._inherited[following] = queue  # the count stays

    def given_back(self, key: Key) -> None:
        """A held attempt came back unstarted: a slot passed on to it is free."""
        queue = self._inherited.pop(key, None)
        if queue is not None:
            self._running[queue] = max(0, self._running.get(queue, 0) - 1)

    # -- how long attempts take -----------------------------------------------------------------

    def took(self, queue: str, ms: int) -> None:
        """An attempt of `queue` ran `ms`: kept as a moving average (weight 0.2 to the new)."""
        before = self._took.get(queue)
        self._took[queue] = ms if before is None else 0.8 * before + 0.2 * ms

    def takes(self, queue: str, default: float) -> float:
        """How long `queue`'s attempts take lately (ms); `default` before any has ended."""
        return self._took.get(queue, default)
