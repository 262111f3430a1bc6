"""The dispatcher: the daemon's main loop, one transaction per turn (see `loop`).

The package:
  loop      `Dispatcher`: the turn, the wake-ups, the queues with work; `DueTimer`; `Limits`
  slots     `Slots`: how many slots each queue's attempts take, and which attempt takes each
  holding   `HoldAhead`: tasks handed to the supervisor to start in a slot the moment it frees
  applier   `ReportApplier`: a launcher's reports, as store and lifecycle calls

It reaches attempts only through `taskctld.launcher.Launcher` (the runner, or a fake in tests)
and hears back `taskctld.launcher.Report`s.
"""

from taskctld.dispatcher.holding import HOLD_AHEAD, HOLD_BELOW
from taskctld.dispatcher.loop import Dispatcher, DueTimer, Limits
from taskctld.launcher import Launcher

__all__ = ["HOLD_AHEAD", "HOLD_BELOW", "Dispatcher", "DueTimer", "Launcher", "Limits"]
