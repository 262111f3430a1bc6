"""How many long-lived streams are connected, for `health`: a stop waits for none of them, but
a client (the tests, a dashboard) can tell that its stream is attached."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Streams:
    watchers: int = 0  # `/v1/events?follow`: `watch`
    followers: int = 0  # `logs --follow`

    @property
    def total(self) -> int:
        return self.watchers + self.followers
