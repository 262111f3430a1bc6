"""The one error family shared by the CLI and the daemon.

Every error carries a machine code (stable, on the wire), an HTTP status (how the daemon reports
it) and an exit code (how the CLI reports it). The daemon turns any `TaskctlError` into
`{"error": {"code", "message"}}` in one place; the client turns that body back into the same class
in one place; the CLI prints the message and exits with the class's exit code.

Exit codes are part of the contract (see the man page):
0 ok, 1 a task failed, 2 usage error, 3 daemon unreachable, 4 not found, 5 conflict or invalid
state, 6 storage full.
"""

from __future__ import annotations

from typing import ClassVar


class TaskctlError(Exception):
    """Base error: a message for people plus a code for machines."""

    code: ClassVar[str] = "internal"
    http_status: ClassVar[int] = 500
    exit_code: ClassVar[int] = 1

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code  # type: ignore[misc]

    def to_body(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}


class InvalidRequest(TaskctlError):
    """Bad input: the request was refused and nothing changed."""

    code = "invalid"
    http_status = 400
    exit_code = 2


class PayloadTooLarge(InvalidRequest):
    code = "too_large"
    http_status = 413


class NotFound(TaskctlError):
    code = "not_found"
    http_status = 404
    exit_code = 4


class Conflict(TaskctlError):
    """The request is valid but the object's state does not allow it."""

    code = "conflict"
    http_status = 409
    exit_code = 5


class StorageFull(TaskctlError):
    """The state or log folder is out of space; nothing was accepted."""

    code = "storage_full"
    http_status = 507
    exit_code = 6


class Unavailable(TaskctlError):
    """The daemon is shutting down or not ready."""

    code = "unavailable"
    http_status = 503
    exit_code = 3


class Unreachable(TaskctlError):
    """The CLI could not talk to the daemon at all (raised on the client side only)."""

    code = "unreachable"
    http_status = 503
    exit_code = 3


class TooMany(TaskctlError):
    """A limit on concurrent use (watchers, connections) is reached; try again later."""

    code = "too_many"
    http_status = 429
    exit_code = 5


class Forbidden(TaskctlError):
    code = "forbidden"
    http_status = 403
    exit_code = 3


_BY_CODE: dict[str, type[TaskctlError]] = {
    cls.code: cls
    for cls in (
        TaskctlError,
        InvalidRequest,
        PayloadTooLarge,
        NotFound,
        Conflict,
        StorageFull,
        Unavailable,
        Unreachable,
        TooMany,
        Forbidden,
    )
}


def error_from_body(status: int, body: object) -> TaskctlError:
    """Rebuild the error the daemon raised from its JSON error body (tolerates unknown codes)."""
    code, message = None, f"taskctld answered HTTP {status}"
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        code = str(body["error"].get("code", "")) or None
        message = str(body["error"].get("message", message))
    cls = _BY_CODE.get(code) if code else None
    if cls is None:  # no error body, or a code this CLI does not know: go by the status
        cls = next((c for c in _BY_CODE.values() if c.http_status == status), TaskctlError)
    return cls(message, code=code)
