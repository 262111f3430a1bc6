"""Held specs: attempts to start the moment another ends, with no round trip to the daemon.

A held spec belongs to the connection that sent it: it is dropped when that daemon goes away or
retires us. Each hold has the daemon's token, which names it in `released` and `unheld`, so
that a late answer is not taken for a newer hold of the same task.
"""

from __future__ import annotations

from typing import Any

from taskctld.supervisor.messages import AttemptSpec, Key


class Holds:
    def __init__(self) -> None:
        self.by_after: dict[Key, AttemptSpec] = {}  # by the attempt it follows
        self.keys: set[Key] = set()  # the attempts held
        self.tokens: dict[Key, Any] = {}  # what the daemon calls each hold

    def __contains__(self, key: Key) -> bool:
        return key in self.keys

    def can_follow(self, after: Key) -> bool:
        """Whether nothing is held after `after` yet."""
        return after not in self.by_after

    def add(self, spec: AttemptSpec, after: Key, token: Any) -> None:
        self.by_after[after] = spec
        self.keys.add(spec.key)
        self.tokens[spec.key] = token

    def take(self, after: Key) -> tuple[AttemptSpec, Any] | None:
        """The spec held to follow `after` (and its token), no longer held."""
        spec = self.by_after.pop(after, None)
        if spec is None:
            return None
        self.keys.discard(spec.key)
        return spec, self.tokens.pop(spec.key, None)

    def withdraw(self, key: Key) -> list[tuple[Key, Any]]:
        """Drop the held attempt `key` and give back the chain held after it: returns the
        (key, token) of each attempt given back, `key` itself not included."""
        after = next((a for a, spec in self.by_after.items() if spec.key == key), None)
        if after is not None:
            self.take(after)
        released = []
        while (taken := self.take(key)) is not None:
            key = taken[0].key
            released.append((key, taken[1]))
        return released

    def clear(self) -> None:
        self.by_after.clear()
        self.keys.clear()
        self.tokens.clear()
