"""Is our supervisor answering? A ping every PING_EVERY while none is unanswered; one left
unanswered for PING_LIMIT makes `health` unhealthy (a stopped supervisor, say)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from taskctld.procfs import stopped
from taskctld.runner.link import Link
from taskctld.supervisor import messages as wire

PING_EVERY = 1.0  # seconds between pings of our supervisor
PING_LIMIT = 3.0  # seconds without an answer before health says it does not answer


class PingWatch:
    """Pings whatever `current()` is (our supervisor's link, or None while there is none)."""

    def __init__(self, current: Callable[[], Link | None]) -> None:
        self.current = current
        self.sent: float | None = None  # when our unanswered ping went out
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._ping_forever())

    def stop(self) -> None:
        self._stopped = True
        if self._task is not None:
            self._task.cancel()

    def fresh(self) -> None:
        """A new supervisor: nothing is unanswered."""
        self.sent = None

    def pong(self, link: Link) -> None:
        if link is self.current():
            self.sent = None

    def unanswered(self) -> str | None:
        """Why our supervisor is not doing its job though it is connected, if it is not."""
        link, sent = self.current(), self.sent
        if link is None or sent is None or time.monotonic() - sent < PING_LIMIT:
            return None
        state = " (it is stopped)" if stopped(link.info.pid) else ""
        return f"the supervisor (pid {link.info.pid}) does not answer{state}"

    async def _ping_forever(self) -> None:
        while not self._stopped:
            await asyncio.sleep(PING_EVERY)
            link = self.current()
            if link is not None and self.sent is None and link.send(wire.Ping()):
                self.sent = time.monotonic()
