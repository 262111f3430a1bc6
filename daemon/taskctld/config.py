"""The daemon's settings, from `config.toml` (in TASKCTL_HOME, or $XDG_CONFIG_HOME/taskctl/).

Every key is optional; an unknown key or a bad value stops the daemon with a message naming it.

    concurrency = 4            # tasks running at once across all queues (default: CPU count)
    durability = "full"        # "full": an acknowledged submit survives power loss;
                               # "normal": it survives a daemon crash, but the last
                               # transactions before a power loss may be lost
    log_cap = "100M"           # per attempt and stream; the rest is dropped with a notice
    kill_grace = "10s"         # default SIGTERM -> SIGKILL grace
    retries = 0                # default retry policy for tasks that do not set one
    backoff = "fixed"
    retry_delay = "1s"
    max_delay = "1h"
    key_retention = "24h"      # a finished task still answers for its --key this long
    retention = "7d"           # finished tasks, their logs and events are pruned after this,
    keep_finished = 100000     # and beyond this many finished tasks (checked every hour)
    request_timeout = "10s"    # a client must send its whole request within this
    max_connections = 256      # connections at once; more are answered 503
    hold = false               # accept tasks but start none (a maintenance switch)
    log_size = "10M"           # taskctld.log is rotated to taskctld.log.1 past this size

Several hosts sharing one queue (PostgreSQL; see README, "Running on several hosts"):

    store = "postgresql://taskctl@db.example/taskctl"   # or TASKCTL_STORE, or --store;
                               # credentials the libpq ways: ~/.pgpass, PGPASSFILE, a service
                               # file (store = "postgresql:///?service=taskctl"), sslmode=...
    node = "build-3"           # this daemon's name in the cluster (default: the host name)
    lease = "30s"              # a node silent this long is lost: its tasks are rescued
    queues = ["build", "ci"]   # the queues this node takes work from (default: all)
    node_limits = { build = 2 }  # at most this many of a queue at once on this node
                               # (a queue's concurrency is for the whole cluster)
    ship_cap = "10M"           # per attempt and stream, output shipped to the store for
                               # the other nodes to show (the rest stays on this node)
"""

from __future__ import annotations

import os
import socket
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator

from taskctl.api import QUEUE_NAME_PATTERN, Backoff, Duration, Request
from taskctl.errors import InvalidRequest
from taskctld.wording import describe


def _has_password(url: str) -> bool:
    """Whether a PostgreSQL URL carries a password (`user:pw@`, or `password=` in its query)."""
    from urllib.parse import parse_qs, urlsplit

    try:
        parts = urlsplit(url)
        return bool(parts.password) or "password" in parse_qs(parts.query)
    except ValueError:
        return ":" in url.split("@", 1)[0].split("//", 1)[-1]


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class Config(Request):
    concurrency: int = Field(default_factory=_cpu_count, ge=1, le=10_000)
    durability: Literal["full", "normal"] = "full"
    log_cap: int = Field(100 << 20, ge=1024)
    kill_grace: Duration = 10.0
    retries: int = Field(0, ge=0, le=1000)
    backoff: Backoff = Backoff.FIXED
    retry_delay: Duration = 1.0
    max_delay: Duration = 3600.0
    key_retention: Duration = 86400.0  # how long a finished task still answers for its --key
    retention: Duration = 7 * 86400.0  # finished tasks, their logs and events older than this go
    keep_finished: int = Field(100_000, ge=0)  # and at most this many finished tasks are kept
    request_timeout: Duration = 10.0  # a request must arrive whole within this
    max_connections: int = Field(256, ge=1, le=100_000)
    hold: bool = False  # accept tasks but start none (a maintenance switch)
    log_size: int = Field(10 << 20, ge=64 << 10)  # the daemon's log is rotated past this
    store: str | None = None  # postgresql://...; None: SQLite in the home
    node: str = Field(default_factory=socket.gethostname, pattern=QUEUE_NAME_PATTERN)
    lease: Duration = Field(30.0, ge=1.0, le=3600.0)
    queues: list[str] | None = None  # served by this node (None: all)
    node_limits: dict[str, int] = {}  # queue -> at most this many at once on this node
    ship_cap: int = Field(10 << 20, ge=0)  # output shipped per attempt and stream

    @field_validator("store")
    @classmethod
    def _store_url(cls, url: str | None) -> str | None:
        """Only PostgreSQL is shared. The URL is never repeated in the error: it may hold a
        password."""
        if url is not None and not url.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL (its text is not shown)")
        return url

    @property
    def distributed(self) -> bool:
        return self.store is not None

    @classmethod
    def log_size_of(cls, path: Path) -> int:
        """The log size limit, before anything else is set up (the default if the file is
        bad: the start then fails with the reason, in the log)."""
        try:
            return cls.load(path).log_size
        except InvalidRequest:
            return int(cls.model_fields["log_size"].default)

    @classmethod
    def load(cls, path: Path, store: str | None = None) -> Config:
        """Read `path` (a missing file means all defaults); raises InvalidRequest on bad input.
        `store`: the store URL given on the command line, which wins over TASKCTL_STORE, which
        wins over the file's."""
        try:
            raw = tomllib.loads(path.read_text()) if path.exists() else {}
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise InvalidRequest(f"cannot read {path}: {e}") from None
        for key in ("log_cap", "log_size", "ship_cap"):
            if isinstance(raw.get(key), str):
                from taskctl.units import parse_size

                try:
                    raw[key] = parse_size(raw[key])
                except ValueError as e:
                    raise InvalidRequest(f"{path}: {key}: {e}") from None
        if store is not None and _has_password(store):
            raise InvalidRequest(
                "--store: a password on the command line is visible to every user (ps); "
                "give it in ~/.pgpass, PGPASSFILE, a service file, TASKCTL_STORE or config.toml"
            )
        store = store or os.environ.get("TASKCTL_STORE") or None
        if store is not None:
            raw["store"] = store
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise InvalidRequest(f"{path}: {where}: {describe(dict(first))}") from None
