"""Values for shell completion (`autocompletion=` on options and arguments).

Fixed sets (states, backoff kinds, policies) come from here; queue and schedule names come from
the daemon when it is running. A completion runs on every TAB, so asking the daemon is one
request with a short deadline, never starts it, and any failure completes nothing: a shell
must never print an error or hang.
"""

from __future__ import annotations

from collections.abc import Callable

from taskctl.client import Client, path_for
from taskctl.errors import TaskctlError

STATES = ("waiting", "scheduled", "queued", "running", "succeeded", "failed", "cancelled")
BACKOFFS = ("fixed", "exponential")
OVERLAPS = ("skip", "queue", "allow")
CATCH_UPS = ("none", "latest", "all")
_DEADLINE = 0.5  # seconds: a daemon slower than this completes nothing


def _starting(values: tuple[str, ...] | list[str], incomplete: str) -> list[str]:
    return [v for v in values if v.startswith(incomplete)]


def _fixed(values: tuple[str, ...]) -> Callable[[str], list[str]]:
    def complete(incomplete: str) -> list[str]:
        return _starting(values, incomplete)

    return complete


states = _fixed(STATES)
backoffs = _fixed(BACKOFFS)
overlaps = _fixed(OVERLAPS)
catch_ups = _fixed(CATCH_UPS)


def _names(path: str) -> list[str]:
    """The `name` of each object the daemon lists at `path`; [] when it cannot say quickly."""
    try:
        found = Client(autostart=False).call("GET", path, timeout=_DEADLINE)
    except (TaskctlError, OSError, ValueError):
        return []
    return [str(item["name"]) for item in found if isinstance(item, dict) and "name" in item]


def queues(incomplete: str) -> list[str]:
    return _starting(_names(path_for("queues")), incomplete)


def cron_names(incomplete: str) -> list[str]:
    return _starting(_names(path_for("schedules", kind="cron")), incomplete)


def trigger_names(incomplete: str) -> list[str]:
    return _starting(_names(path_for("schedules", kind="trigger")), incomplete)
