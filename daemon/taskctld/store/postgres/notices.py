"""Notifications between nodes: every commit that appends events NOTIFYs `CHANNEL`, and a node
asks another to stop an attempt the same way. This is the listening half: a connection of its
own, in autocommit, that a thread reads (psycopg's `notifies` blocks)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import psycopg

CHANNEL = "taskctl"
WAIT = 1.0  # seconds between looks at `stop`
# A cut link fails the connection within seconds instead of leaving it silent for good.
LIVENESS = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10000,
}


def listen(url: str, stop: threading.Event) -> Iterator[str]:
    """The payload of each notification on `CHANNEL`, until `stop` is set. Raises the
    connection's error when it breaks (the caller reconnects)."""
    with psycopg.connect(url, autocommit=True, **LIVENESS) as conn:  # type: ignore[arg-type]
        conn.execute(f"LISTEN {CHANNEL}")
        while not stop.is_set():
            for notice in conn.notifies(timeout=WAIT):
                yield notice.payload
