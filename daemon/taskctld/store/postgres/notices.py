"""Notifications between nodes: every commit that appends events NOTIFYs `CHANNEL`, and a node
asks another to stop an attempt the same way. This is the listening half: a connection of its
own, in autocommit, that a thread reads (psycopg's `notifies` blocks)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import psycopg

from taskctld.store.postgres.base import CHANNEL, CONNECT_OPTIONS

WAIT = 1.0  # seconds between looks at `stop`


def listen(url: str, stop: threading.Event) -> Iterator[str]:
    """The payload of each notification on `CHANNEL`, until `stop` is set. Raises the
    connection's error when it breaks (the caller reconnects)."""
    with psycopg.connect(url, autocommit=True, **CONNECT_OPTIONS) as conn:
        conn.execute(f"LISTEN {CHANNEL}")
        while not stop.is_set():
            for notice in conn.notifies(timeout=WAIT):
                yield notice.payload
