"""A clock that moves only when a test says so, for the daemon's `Clock` (taskctld/clock.py)."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

from taskctld.clock import Timer


class _ManualTimer:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualClock:
    """A clock that moves only when told (tests): `advance` runs the wake-ups it passes, in
    order of their times."""

    def __init__(self, start: int) -> None:
        self._now = start
        self._timers: list[tuple[int, int, Callable[[], None], _ManualTimer]] = []
        self._order = itertools.count()

    def now(self) -> int:
        return self._now

    def call_at(self, when: int, callback: Callable[[], None]) -> Timer:
        timer = _ManualTimer()
        heapq.heappush(self._timers, (when, next(self._order), callback, timer))
        return timer

    def advance(self, seconds: float) -> None:
        self.set(self._now + round(seconds * 1000))

    def set(self, when: int) -> None:
        while self._timers and self._timers[0][0] <= when:
            at, _, callback, timer = heapq.heappop(self._timers)
            self._now = max(self._now, at)
            if not timer.cancelled:
                callback()
        self._now = when  # a wall clock may also be set back

    def next_wake(self) -> int | None:
        """When the earliest live wake-up is due (None: nothing is waiting on time)."""
        while self._timers and self._timers[0][3].cancelled:
            heapq.heappop(self._timers)
        return self._timers[0][0] if self._timers else None
