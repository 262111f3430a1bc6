"""Durations, sizes and times as people type them, and as the wire carries them.

Durations read like `500ms`, `30s`, `5m`, `1h30m`, `2d` (a bare number is seconds); sizes like
`100M`, `1.5G`, `512k` (binary multiples; a bare number is bytes). Times on the wire are RFC 3339
in UTC; in the store they are integer epoch milliseconds.

Pure functions, standard library only: both the CLI (start-up sensitive) and the daemon use them.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from datetime import datetime, timedelta

_DURATION_PART = r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)"  # compiled on first use (CLI start-up)
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_SIZE = r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)"
_SIZE_FACTOR = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_duration(text: str) -> float:
    """Seconds in `text` (`1h30m`, `500ms`, `2.5`); raises ValueError with the reason."""
    s = text.strip().lower()
    if not s:
        raise ValueError("empty duration")
    try:
        value = float(s)
    except ValueError:
        pos, total = 0, 0.0
        for match in re.finditer(_DURATION_PART, s):
            if match.start() != pos:
                break
            total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
            pos = match.end()
        if pos != len(s) or pos == 0:
            raise ValueError(
                f"invalid duration {text!r}: use forms like 500ms, 30s, 5m, 1h30m, 2d"
            ) from None
        return total
    if value < 0 or value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"invalid duration {text!r}: must be a finite number >= 0")
    return value


def parse_size(text: str) -> int:
    """Bytes in `text` (`100M`, `1.5G`, `512k`, `4096`); binary multiples."""
    match = re.fullmatch(_SIZE, text.strip(), re.IGNORECASE)
    if not match or (match.group(3) and match.group(3).lower() not in ("b", "ib")):
        raise ValueError(f"invalid size {text!r}: use forms like 512k, 100M, 2G")
    return int(float(match.group(1)) * _SIZE_FACTOR[match.group(2).lower()])


def format_duration(seconds: float | None) -> str:
    """`1h02m`, `3.2s`, `450ms`: short and readable; `-` for None."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def duration_text(seconds: float) -> str:
    """A setting as one would type it (`2h`, `1m30s`, `500ms`): exact, unlike format_duration."""
    ms = round(seconds * 1000)
    if ms % 1000:
        return f"{ms}ms"
    rest, parts = ms // 1000, []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        n, rest = divmod(rest, size)
        if n:
            parts.append(f"{n}{unit}")
    return "".join(parts) or "0s"


def format_size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}GiB"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def ms_to_rfc3339(ms: int | None) -> str | None:
    """Epoch milliseconds to `2026-11-30T16:22:46.123Z`."""
    if ms is None:
        return None
    t = time.gmtime(ms // 1000)
    return (
        f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T"
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}.{ms % 1000:03d}Z"
    )


def rfc3339_to_ms(text: str) -> int:
    """RFC 3339 (or ISO 8601 with an offset) to epoch milliseconds; naive times are local."""
    dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.astimezone()
    return int(dt.timestamp() * 1000)


def parse_at(text: str, now: datetime | None = None) -> int:
    """A start time as people type it, to epoch milliseconds.

    Accepts RFC 3339 (`2026-12-01T09:00:00Z`), `HH:MM` (today, or tomorrow if already past, local
    time) and durations (`10m` = ten minutes from now).
    """
    now = now or datetime.now().astimezone()
    s = text.strip()
    hhmm = re.fullmatch(r"(\d{1,2}):(\d{2})(?::(\d{2}))?", s)
    if hhmm:
        h, m, sec = int(hhmm.group(1)), int(hhmm.group(2)), int(hhmm.group(3) or 0)
        if h > 23 or m > 59 or sec > 59:
            raise ValueError(f"invalid time {text!r}: hours 0-23, minutes 0-59")
        target = now.replace(hour=h, minute=m, second=sec, microsecond=0)
        if target <= now:
            target += timedelta(days=1)
        return int(target.timestamp() * 1000)
    try:
        return rfc3339_to_ms(s)
    except ValueError:
        pass
    try:
        return int((now.timestamp() + parse_duration(s)) * 1000)
    except ValueError:
        raise ValueError(
            f"invalid time {text!r}: use RFC 3339 (2026-12-01T09:00:00Z), HH:MM, or a duration"
        ) from None


def local_zone_name() -> str | None:
    """The IANA name of the local zone, found as the C library finds the zone: `TZ`
    (`Europe/Berlin`, `:Europe/Berlin`, or a path into a zoneinfo folder), else /etc/localtime;
    "UTC" when neither names one. None when `TZ` is set to something that has no IANA name (a
    POSIX rule such as `CET-1CEST`): the caller must ask for a zone rather than guess."""
    given = os.environ.get("TZ", "").lstrip(":")
    if given and not given.startswith("/"):
        return given if _known_zone(given) else None
    with contextlib.suppress(OSError):
        target = os.path.realpath(given or "/etc/localtime")
        if "zoneinfo/" in target and _known_zone(name := target.split("zoneinfo/", 1)[1]):
            return name
    return None if given else "UTC"


def _known_zone(name: str) -> bool:
    from zoneinfo import ZoneInfo

    try:
        ZoneInfo(name)
    except (ValueError, OSError, KeyError):  # ZoneInfoNotFoundError is a KeyError
        return False
    return True
