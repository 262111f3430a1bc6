"""The runner's reports on their way to the dispatcher.

The two need each other: the dispatcher asks the runner to start, hold and stop attempts, and
the runner tells the dispatcher what its supervisors said. So this inbox is built first and
given to both: the runner `send`s into it (and says when a new supervisor is `ready` for work),
and the dispatcher, built with it, `listen`s. What arrives before the dispatcher listens waits
here (nothing does today: the runner reports once attached, after both are built).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from taskctld.launcher import Report


class Reports:
    def __init__(self) -> None:
        self._deliver: Callable[[Report], None] | None = None
        self._wake: Callable[[], None] | None = None
        self._early: list[Report] = []
        self._ready_early = False

    def listen(self, deliver: Callable[[Report], None], wake: Callable[[], None]) -> None:
        """From now on each report goes to `deliver`, and a supervisor ready for work calls
        `wake`; what came before is delivered now. One listener: the dispatcher."""
        assert self._deliver is None, "the reports have a listener already"
        self._deliver, self._wake = deliver, wake
        early, self._early = self._early, []
        for report in early:
            deliver(report)
        if self._ready_early:
            wake()

    def send(self, report: Report) -> None:
        if self._deliver is None:
            self._early.append(report)
        else:
            self._deliver(report)

    def ready(self) -> None:
        """A new supervisor takes attempts: the dispatcher may start what waits."""
        if self._wake is None:
            self._ready_early = True
        else:
            self._wake()
