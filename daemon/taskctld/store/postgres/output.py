"""Attempts' output in the store: a node ships what its attempts write (their log files) in
bounded chunks, so that `logs` and `logs -f` work from any node. A chunk is keyed by its byte
offset (`at`), so shipping one twice changes nothing; `output_done` says an attempt's stream
is whole (its size as shipped)."""

from __future__ import annotations

from taskctld.store.postgres.base import PgBase


class PgOutput(PgBase):
    def ship_output(
        self, task_id: int, attempt: int, stream: str, at: int, data: bytes, *, done: bool
    ) -> None:
        """Store `data`, the bytes of the stream from offset `at` (none: only `done`); with
        `done`, the stream is whole at `at + len(data)`. Outside a transaction is fine."""
        if data:
            self._x(
                "INSERT INTO output (task_id, attempt, stream, at, data) "
                "VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                (task_id, attempt, stream, at, data),
            )
        if done:
            self._x(
                "INSERT INTO output_done (task_id, attempt, stream, size) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
                (task_id, attempt, stream, at + len(data)),
            )

    def output_of(
        self, task_id: int, attempt: int, stream: str, start: int, limit: int
    ) -> tuple[bytes, bool]:
        """Up to about `limit` bytes of the stream from offset `start`, and whether the
        stream is whole (shipped to its end) and these reach its end."""
        rows = self._x(
            "SELECT at, data FROM output WHERE task_id = %s AND attempt = %s AND stream = %s "
            "AND at + length(data) > %s ORDER BY at",
            (task_id, attempt, stream, start),
        ).fetchall()
        out = bytearray()
        for at, data in rows:
            if at > start + len(out) or len(out) >= limit:
                break  # a gap (not shipped yet) or enough for now
            out += bytes(data)[start + len(out) - at :]
        row = self._x(
            "SELECT size FROM output_done WHERE task_id = %s AND attempt = %s AND stream = %s",
            (task_id, attempt, stream),
        ).fetchone()
        return bytes(out), row is not None and start + len(out) >= int(row[0])

    def close_output(self, task_id: int, attempt: int) -> None:
        """The attempt's streams are whole as far as they were shipped (its node is lost, and
        nothing more will come): readers stop waiting for more."""
        self._x(
            "INSERT INTO output_done (task_id, attempt, stream, size) "
            "SELECT %s, %s, s.stream, COALESCE(max(o.at + length(o.data)), 0) "
            "FROM (VALUES ('stdout'), ('stderr')) AS s(stream) "
            "LEFT JOIN output o ON o.task_id = %s AND o.attempt = %s AND o.stream = s.stream "
            "GROUP BY s.stream ON CONFLICT DO NOTHING",
            (task_id, attempt, task_id, attempt),
        )
