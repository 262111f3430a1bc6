"""The daemon's clock, injected: what time it is, and a wake-up at a wall-clock time.

Every decision that depends on time (due tasks, backoff, cron) reads `Clock.now` and sleeps with
`Clock.call_at`, so a test can run days of schedules in a second by moving a `ManualClock`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from taskctl.units import now_ms

# The loop's timers run on the monotonic clock, which stops while the machine is suspended: a
# wake-up is never further away than this (seconds), so that the caller, woken early, looks at
# the wall clock again and is not late by the time asleep.
WALL_CLOCK_CHECK = 60.0


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    def now(self) -> int:
        """Wall-clock time, epoch milliseconds (UTC)."""
        ...

    def call_at(self, when: int, callback: Callable[[], None]) -> Timer:
        """Call `callback` on the running loop at `when` (epoch ms) or a little earlier (the
        callee checks `now()` itself)."""
        ...


class SystemClock:
    def now(self) -> int:
        return now_ms()

    def call_at(self, when: int, callback: Callable[[], None]) -> Timer:
        delay = min(max(0.0, (when - now_ms()) / 1000), WALL_CLOCK_CHECK)
        return asyncio.get_running_loop().call_later(delay, callback)


SYSTEM_CLOCK = SystemClock()
