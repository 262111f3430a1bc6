"""What every part of the PostgreSQL store shares: the connection, its transactions, errors that
never show a password, and the event log, whose ids are given at the commit in commit order.

Events in commit order. Several nodes commit to one database, so an id drawn from a sequence
when the row is written would not be in commit order: a `watch --since ID` could pass over an
event that commits later with a smaller id. So a transaction keeps its events in Python until
its commit; then, in one statement, it takes `EVENTS_LOCK` (a transaction advisory lock, held
until the COMMIT), reserves a contiguous range of ids from `events_id_seq` under it, inserts
the events with those ids and queues a NOTIFY on `CHANNEL`. Whoever holds the lock commits
before the next one gets ids, and a commit is visible before its locks are released, so ids
are given and made visible in commit order. A batch's creation events (`EventSpan`) get their
ids when it is published, which takes the same lock until that commit.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import replace
from typing import Any, LiteralString, cast

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from taskctl.api import TaskState
from taskctl.errors import InvalidRequest, TaskctlError
from taskctld.store import EventRow
from taskctld.store.common import CommitEvents
from taskctld.store.postgres.rows import rows_from_json
from taskctld.store.postgres.schema import EVENTS_LOCK

log = logging.getLogger(__name__)

CHANNEL = "taskctl"  # LISTEN taskctl: one NOTIFY per commit that has events or stops
NOTIFY_LIMIT = 7900  # bytes: PostgreSQL refuses a payload of 8000 or more

# libpq options that make a cut network fail a call within seconds instead of hanging on it;
# a store URL that sets one of them wins.
CONNECT_OPTIONS: dict[str, Any] = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10000,
}

Params = Sequence[Any] | Mapping[str, Any] | None

# Each commit's events, as JSON rows (`rows_from_json`), inserted under the events lock with
# ids it reserves, in their order; then the NOTIFY, whose payload names the last id.
_EVENTS = rows_from_json(
    "events",
    "at int8, task_id int8, queue text, from_state text, to_state text, attempt int4, "
    "exit_code int4, reason text",
)
_FLUSH = f"""
WITH ids AS (
    SELECT setval('events_id_seq', nextval('events_id_seq') + %(n)s - 1) AS last
    FROM (SELECT pg_advisory_xact_lock(%(lock)s)) AS locked
), added AS (
    INSERT INTO events (id, at, task_id, queue, from_state, to_state, attempt, exit_code, reason)
    SELECT ids.last - %(n)s + e.ord, e.at, e.task_id, e.queue, e.from_state, e.to_state,
           e.attempt, e.exit_code, e.reason
    FROM ids, {_EVENTS} AS e
)
SELECT last, pg_notify(%(channel)s, %(head)s || last || %(tail)s) FROM ids
"""


def _within_lease(lease_ms: int) -> dict[str, int]:
    """A short lease needs a cut network noticed sooner than `CONNECT_OPTIONS` would: at most
    half a lease per call (a node's loop waits on its store calls)."""
    half = max(1000, lease_ms // 2)
    return {
        "connect_timeout": max(2, min(CONNECT_OPTIONS["connect_timeout"], half // 1000)),
        "tcp_user_timeout": min(CONNECT_OPTIONS["tcp_user_timeout"], half),
    }


def redact(url: str) -> str:
    """The store's URL as it may be shown: `postgresql://user@host:port/dbname`, never the
    password (nor any other option)."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error:
        return "postgresql://(a URL that does not parse)"
    user = f"{params['user']}@" if params.get("user") else ""
    port = f":{params['port']}" if params.get("port") else ""
    return f"postgresql://{user}{params.get('host', '')}{port}/{params.get('dbname', '')}"


# A password as a URL or a conninfo string gives it, found without parsing (for a URL that
# does not parse: libpq's complaint may quote the password).
_PASSWORD_TEXT = re.compile(r"://[^:/@\s]*:([^@\s]+)@|password\s*=\s*([^&\s]+)")


def _secrets_of(url: str) -> list[str]:
    """What must never appear in a message: the URL as given, and its password (and, as
    found in the text, the pieces that look like one)."""
    found = [url]
    with suppress(psycopg.Error):
        password = conninfo_to_dict(url).get("password")
        if password:
            found.append(str(password))
    for match in _PASSWORD_TEXT.finditer(url):
        found += [piece for piece in match.groups() if piece]
    return sorted(set(found), key=len, reverse=True)  # the longest first


class PgBase(CommitEvents):
    """The connection and its transactions; `Transactions` and `EventLog` of the Protocol.
    Each part of `PostgresStore` builds on this (their `__init__`s chain through `super()`).

    One connection, used by one thread at a time (the daemon's store thread), in autocommit
    mode: a read outside `transaction()` leaves no transaction open. `transaction()` sends
    BEGIN and COMMIT itself; a nested call joins the outer one. A connection that broke is
    replaced at the next `transaction()` (or read outside one)."""

    distributed = True

    def __init__(self, url: str, *, node: str, lease_ms: int) -> None:
        super().__init__()
        self.url = url
        self.node = node
        self.lease_ms = lease_ms
        self.where = redact(url)
        self._secrets = _secrets_of(url)
        self._depth = 0  # savepoints open
        self._stops: list[tuple[int, int]] = []
        # Queues whose claim this transaction left tasks in (locked by it meanwhile, so that
        # another node's claim passed over them): named in the commit's notice as queued.
        self.left_queued: set[str] = set()
        self.conn = self._connect()

    # -- the connection ---------------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            given = conninfo_to_dict(self.url)
            options = {**CONNECT_OPTIONS, **_within_lease(self.lease_ms), **given}
            options.setdefault("application_name", f"taskctld {self.node}"[:63])
            # A node stopped (SIGSTOP, a debugger) inside a transaction would hold the events
            # lock for every node: the server ends such a session after one lease.
            idle = f"-c idle_in_transaction_session_timeout={max(self.lease_ms, 1000)}"
            options["options"] = f"{options.get('options', '')} {idle}".strip()
            return psycopg.connect(make_conninfo("", **options), autocommit=True)
        except psycopg.Error as e:
            raise self.error(e) from None

    def _ensure_connection(self) -> None:
        if self.conn.closed or self.conn.broken:
            with suppress(psycopg.Error):
                self.conn.close()
            self.conn = self._connect()

    def error(self, error: psycopg.Error) -> TaskctlError:
        """psycopg's error as ours, naming the store by its redacted URL: "store unreachable"
        when the connection is gone (or could not be made), else the server's complaint."""
        text = self._scrub(str(error))
        conn = getattr(self, "conn", None)
        if conn is None or conn.closed or conn.broken:
            return TaskctlError(f"store unreachable: {self.where}: {text}")
        return TaskctlError(f"store error: {self.where}: {text}")

    def _scrub(self, text: str) -> str:
        """`text` on one line (libpq's messages have several), with no secret of the URL."""
        text = " ".join(text.split())
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _x(self, sql: str, params: Params = None) -> psycopg.Cursor[Any]:
        """Run one statement; the one place where a psycopg OperationalError (the network,
        the server going away, a lock or deadlock the server gave up on) becomes ours."""
        if not self._in_transaction:
            self._ensure_connection()
        try:
            # Every statement is this package's own text; values always go as parameters.
            return self.conn.execute(cast(LiteralString, sql), params)
        except psycopg.OperationalError as e:
            raise self.error(e) from e
        except psycopg.DataError as e:  # a value the server will not store: the request's fault
            raise InvalidRequest(f"the store refused a value: {self._scrub(str(e))}") from e

    # -- transactions ---------------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """BEGIN ... COMMIT; nested calls join the outer transaction. Events appended inside
        get their ids at the commit (see the module docstring) and are published to
        subscribers after it, dropped on rollback."""
        if self._in_transaction:
            yield
            return
        self._ensure_connection()
        self._in_transaction = True
        try:
            self._x("BEGIN")
            try:
                yield
                self._flush_events()
                self._x("COMMIT")
            except BaseException:
                self._drop_pending()
                self._rollback()
                raise
        finally:
            self._in_transaction = False
            self._depth = 0
        self._publish_pending()

    def _rollback(self) -> None:
        if self.conn.closed or self.conn.broken:
            return  # the server rolls back a session that went away
        try:
            self.conn.execute("ROLLBACK")
        except psycopg.Error:
            with suppress(psycopg.Error):
                self.conn.close()  # replaced at the next transaction

    def _drop_pending(self) -> None:
        super()._drop_pending()
        self._forget_notice()

    def _publish_pending(self) -> None:
        self._forget_notice()
        super()._publish_pending()

    def _forget_notice(self) -> None:
        """What the transaction had for its notice, beyond its events (it is over)."""
        self._stops.clear()
        self.left_queued.clear()

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """A nested transaction: on an exception, what happened inside is undone (and its
        events dropped), the outer transaction goes on."""
        self._require_transaction()
        mark, spans, stops = len(self._pending), len(self._pending_spans), len(self._stops)
        self._depth += 1
        name = f"sp{self._depth}"
        self._x(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            del self._pending[mark:]
            del self._pending_spans[spans:]
            del self._stops[stops:]
            if not (self.conn.closed or self.conn.broken):
                self._x(f"ROLLBACK TO SAVEPOINT {name}")
                self._x(f"RELEASE SAVEPOINT {name}")
            raise
        else:
            self._x(f"RELEASE SAVEPOINT {name}")
        finally:
            self._depth -= 1

    def request_stop(self, task_id: int, attempt: int) -> None:
        """Ask, with this transaction's NOTIFY, whichever node runs attempt `attempt` of
        `task_id` to stop it (a cancel made on another node than the one running it)."""
        self._require_transaction()
        self._x(
            "UPDATE attempts SET stop_asked = true "
            "WHERE task_id = %s AND number = %s AND ended_at IS NULL",
            (task_id, attempt),
        )
        self._stops.append((task_id, attempt))

    def tell(self, message: dict[str, object]) -> None:
        """Send every node `message` on `CHANNEL` (a JSON object with keys of its own, not a
        commit's notice: a queue's settings changed, say); at once outside a transaction, at
        its commit inside one."""
        self._x("SELECT pg_notify(%s, %s)", (CHANNEL, json.dumps(message)))

    # -- the event log --------------------------------------------------------------------------

    def _append_event(
        self,
        now: int,
        task_id: int,
        old: TaskState | None,
        new: TaskState,
        attempt: int | None = None,
        exit_code: int | None = None,
        reason: str | None = None,
        queue: str | None = None,
    ) -> None:
        """Keep an event for the commit (its queue read when not given)."""
        if queue is None:
            queue = self._x("SELECT queue FROM tasks WHERE id = %s", (task_id,)).fetchone()[0]  # type: ignore[index]
        self._pending.append(EventRow(0, now, task_id, queue, old, new, attempt, exit_code, reason))

    def _reserve_event_ids(self, n: int) -> int:
        """Take the events lock until the commit and a contiguous range of `n` ids; returns
        the first."""
        (last,) = self._x(
            "SELECT setval('events_id_seq', nextval('events_id_seq') + %s - 1) "
            "FROM (SELECT pg_advisory_xact_lock(%s)) AS locked",
            (n, EVENTS_LOCK),
        ).fetchone()  # type: ignore[misc]
        return int(last) - n + 1

    def _flush_events(self) -> None:
        """At the commit: the kept events get their ids and rows, and the commit its NOTIFY
        (in one statement; none when there is nothing to tell)."""
        events = self._pending
        if not (events or self._pending_spans or self._stops):
            return
        head, tail = self._notice(events)
        if not events:
            last = max(span.last for span in self._pending_spans) if self._pending_spans else 0
            self._x("SELECT pg_notify(%s, %s)", (CHANNEL, f"{head}{last}{tail}"))
            return
        rows = [
            (e.at, e.task_id, e.queue, e.from_state and e.from_state.value, e.to_state.value,
             e.attempt, e.exit_code, e.reason)
            for e in events
        ]  # fmt: skip
        params = {
            "n": len(events), "lock": EVENTS_LOCK, "channel": CHANNEL, "head": head, "tail": tail,
            "events": json.dumps(rows),
        }  # fmt: skip
        (last, _) = self._x(_FLUSH, params).fetchone()  # type: ignore[misc]
        first = int(last) - len(events) + 1
        self._pending = [replace(e, id=first + i) for i, e in enumerate(events)]

    def _notice(self, events: Sequence[EventRow]) -> tuple[str, str]:
        """The NOTIFY payload of this commit, around its last event id (see `notice_of`)."""
        queued = {e.queue for e in events if e.to_state is TaskState.QUEUED} | self.left_queued
        for span in self._pending_spans:
            queued.update(q for q, state in span.created if state is TaskState.QUEUED)
        freed = {e.queue for e in events if e.from_state is TaskState.RUNNING}
        return notice_of(self.node, sorted(queued), sorted(freed), list(self._stops))

    def events_after(self, event_id: int, limit: int) -> list[EventRow]:
        cur = self._x(
            "SELECT id, at, task_id, queue, from_state, to_state, attempt, exit_code, reason "
            "FROM events WHERE id > %s ORDER BY id LIMIT %s",
            (event_id, limit),
        )
        return [
            EventRow(i, at, t, q, TaskState(f) if f else None, TaskState(to), a, x, r)
            for i, at, t, q, f, to, a, x, r in cur
        ]

    def last_event_id(self) -> int:
        """The newest committed event's id. Not the sequence: ids reserved by a commit still
        under way would be passed over by a cursor resuming from them. (Pruning keeps the
        newest event, so this never goes back.)"""
        row = self._x("SELECT max(id) FROM events").fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def close(self) -> None:
        with suppress(psycopg.Error):
            self.conn.close()


def notice_of(
    node: str, queued: list[str], freed: list[str], stops: list[tuple[int, int]]
) -> tuple[str, str]:
    """A commit's NOTIFY payload on `CHANNEL`, as the text before and after its last event id
    (the statement that gives the ids puts it in between). The payload is one JSON object:

        {"node": "n1", "last": 812, "queued": ["default"], "freed": ["gpu"],
         "stop": [[42, 1]], "more": false}

    `node`: who committed; `last`: the commit's last event id (0 for none); `queued`: queues
    that got queued tasks (worth a claim); `freed`: queues where a running task ended (a
    slot of a cluster-wide limit came free); `stop`: [task id, attempt] pairs whose node
    should stop them (`request_stop`); `more`: true when lists were cut to keep the payload
    under PostgreSQL's 8000 bytes, meaning "re-read the store" (events after your cursor, and
    the ready queues)."""
    body: dict[str, Any] = {"queued": queued, "freed": freed, "stop": [list(s) for s in stops]}
    more = False
    while True:
        head = '{"node":' + json.dumps(node) + ',"last":'
        tail = "," + json.dumps({**body, "more": more}, separators=(",", ":"))[1:]
        if len(head.encode()) + 20 + len(tail.encode()) <= NOTIFY_LIMIT:
            return head, tail
        longest = max(body, key=lambda k: len(json.dumps(body[k])))
        if not body[longest]:
            raise ValueError(f"node name too long for a NOTIFY payload: {node[:40]}...")
        body[longest] = body[longest][: len(body[longest]) // 2]
        more = True
