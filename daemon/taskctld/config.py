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
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError

from taskctl.api import Backoff, Duration, Request
from taskctl.errors import InvalidRequest
from taskctld.wording import describe


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

    @classmethod
    def log_size_of(cls, path: Path) -> int:
        """The log size limit, before anything else is set up (the default if the file is
        bad: the start then fails with the reason, in the log)."""
        try:
            return cls.load(path).log_size
        except InvalidRequest:
            return int(cls.model_fields["log_size"].default)

    @classmethod
    def load(cls, path: Path) -> Config:
        """Read `path` (a missing file means all defaults); raises InvalidRequest on bad input."""
        try:
            raw = tomllib.loads(path.read_text()) if path.exists() else {}
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise InvalidRequest(f"cannot read {path}: {e}") from None
        for key in ("log_cap", "log_size"):
            if isinstance(raw.get(key), str):
                from taskctl.units import parse_size

                try:
                    raw[key] = parse_size(raw[key])
                except ValueError as e:
                    raise InvalidRequest(f"{path}: {key}: {e}") from None
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise InvalidRequest(f"{path}: {where}: {describe(dict(first))}") from None
