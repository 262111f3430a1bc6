"""Durations, sizes and times as people type them."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from taskctl.units import (
    duration_text,
    format_duration,
    ms_to_rfc3339,
    parse_at,
    parse_duration,
    parse_size,
    rfc3339_to_ms,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30),
        ("5m", 300),
        ("1h30m", 5400),
        ("2d", 172800),
        ("1.5", 1.5),
        ("0", 0),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "5x", "1h 30m", "-1", "m5", "1e400", "nan"])
def test_bad_durations_name_the_forms(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("100M", 100 << 20),
        ("1.5G", 3 << 29),
        ("512k", 512 << 10),
        ("4096", 4096),
        ("2GiB", 2 << 30),
    ],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "big", "10Q", "1MBs"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_rfc3339_round_trip() -> None:
    ms = 1_796_000_000_123
    assert ms_to_rfc3339(ms) == "2026-11-30T00:53:20.123Z"
    assert rfc3339_to_ms(ms_to_rfc3339(ms) or "") == ms


def test_at_accepts_clock_times_rfc3339_and_durations() -> None:
    now = datetime(2026, 11, 30, 16, 0, tzinfo=timezone(timedelta(hours=1)))
    assert parse_at("17:30", now) == int(now.replace(hour=17, minute=30).timestamp() * 1000)
    tomorrow = (now + timedelta(days=1)).replace(hour=9, minute=0)
    assert parse_at("09:00", now) == int(tomorrow.timestamp() * 1000)
    assert parse_at("10m", now) == int((now.timestamp() + 600) * 1000)
    assert parse_at("2026-12-01T00:00:00Z", now) == 1_796_083_200_000
    with pytest.raises(ValueError, match="RFC 3339"):
        parse_at("teatime", now)
    with pytest.raises(ValueError, match="hours"):
        parse_at("25:00", now)


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0.25, 3.21, 65, 3725, 200000)] == [
        "250ms",
        "3.2s",
        "1m05s",
        "1h02m",
        "2d07h",
    ]


@pytest.mark.parametrize(
    ("seconds", "text"), [(7200, "2h"), (5, "5s"), (0.5, "500ms"), (90, "1m30s"), (90000, "1d1h")]
)
def test_a_setting_is_shown_as_typed_and_reads_back(seconds: float, text: str) -> None:
    assert duration_text(seconds) == text
    assert parse_duration(text) == seconds
