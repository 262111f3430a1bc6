"""The supervisor's one voice: a line on stderr, which is the daemon's log."""

from __future__ import annotations

import contextlib
import sys


def say(message: str) -> None:
    """One line for the daemon's log, which may itself be on the full disk: never raises."""
    with contextlib.suppress(OSError):
        print(f"taskctld supervisor: {message}", file=sys.stderr, flush=True)
