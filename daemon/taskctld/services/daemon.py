"""Stopping the daemon: the request (`taskctl daemon stop`, a signal) and what happens to
running tasks before it exits, by mode."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Protocol

from taskctld.dispatcher import Dispatcher

log = logging.getLogger("taskctld.daemon")

STOP_POLL = 0.05  # seconds between looks at the running count (only while stopping)


class Interrupter(Protocol):
    """What a `kill` stop asks of the runner."""

    def interrupt_all(self) -> None: ...


@dataclass
class DaemonService:
    dispatcher: Dispatcher
    runner: Interrupter
    shutdown: asyncio.Event  # set: the daemon stops
    stop_mode: str = "leave"
    stop_timeout: float | None = None

    def request_stop(self, mode: str, timeout: float | None) -> None:
        self.stop_mode, self.stop_timeout = mode, timeout
        self.shutdown.set()

    async def wind_down(self) -> None:
        """What a stop does before the daemon exits, by mode: `leave` nothing (tasks go on
        under their supervisor), `drain` wait for running tasks, `kill` interrupt them (they
        are queued again) and wait for that. Nothing new starts meanwhile."""
        self.dispatcher.stop_accepting()
        if self.stop_mode == "leave":
            return
        if self.stop_mode == "kill":
            self.runner.interrupt_all()
        deadline = None if self.stop_timeout is None else time.monotonic() + self.stop_timeout
        while self.dispatcher.running_count() > 0:
            if deadline is not None and time.monotonic() > deadline:
                log.warning(
                    "stop: %d task(s) still running; left to the next daemon",
                    self.dispatcher.running_count(),
                )
                return
            await asyncio.sleep(STOP_POLL)
