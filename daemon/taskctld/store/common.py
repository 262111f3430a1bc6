"""What both stores share besides their SQL: the events a transaction appends, kept until it
commits and then handed to the `on_commit` subscribers (dropped if it rolls back), and the
text forms of values that both keep the same way."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any

from taskctld.store import EventRow, EventSpan


class CommitEvents:
    """`on_commit` and `uncommitted_*` of the `Transactions` role: a backend appends to
    `_pending` (and `_pending_spans`) inside a transaction, then calls `_publish_pending`
    after its commit or `_drop_pending` after a rollback."""

    def __init__(self) -> None:
        self._in_transaction = False
        self._pending: list[EventRow] = []
        self._pending_spans: list[EventSpan] = []
        self._subscribers: list[Callable[[list[EventRow]], None]] = []
        self._span_subscribers: list[Callable[[EventSpan], None]] = []

    def on_commit(
        self,
        callback: Callable[[list[EventRow]], None],
        on_span: Callable[[EventSpan], None] | None = None,
    ) -> None:
        """`callback` gets the events of each commit; `on_span` (if given) each `EventSpan`,
        the creation events of a published batch, before them."""
        self._subscribers.append(callback)
        if on_span is not None:
            self._span_subscribers.append(on_span)

    def uncommitted_events(self) -> Sequence[EventRow]:
        """What the open transaction has appended so far (published only once it commits)."""
        return tuple(self._pending)

    def uncommitted_spans(self) -> Sequence[EventSpan]:
        """The batches the open transaction has published so far, as spans of events."""
        return tuple(self._pending_spans)

    def _require_transaction(self) -> None:
        if not self._in_transaction:
            raise RuntimeError("store writes must run inside transaction()")

    def _drop_pending(self) -> None:
        self._pending.clear()
        self._pending_spans.clear()

    def _publish_pending(self) -> None:
        events, self._pending = self._pending, []
        spans, self._pending_spans = self._pending_spans, []
        for span in spans:
            for on_span in self._span_subscribers:
                on_span(span)
        if events:
            for callback in self._subscribers:
                callback(events)


def dump(value: Any) -> str | None:
    """JSON text (a lone surrogate is escaped, `\\udcXX`, so the text is valid UTF-8 and comes
    back as the same str)."""
    return None if value is None else json.dumps(value, separators=(",", ":"))


def env_digest(env: dict[str, str]) -> tuple[str, str]:
    """(content id, JSON): environments are stored once per distinct content."""
    data = json.dumps(env, separators=(",", ":"), sort_keys=True)
    return hashlib.blake2b(data.encode(), digest_size=16).hexdigest(), data
