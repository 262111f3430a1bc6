"""HTTP/1.1 over the daemon's Unix socket, with the standard library only.

The CLI runs in shell loops, so this module avoids `http.client` (it drags in `email` and `ssl`,
about 16 ms of imports measured with `python -X importtime`) and speaks the small subset of
HTTP/1.1 the daemon uses: one request per connection, `Content-Length` or chunked bodies.

Errors are converted here, once: a daemon error body becomes the matching `TaskctlError`
subclass; a socket that cannot be reached becomes `Unreachable` (after starting the daemon, when
autostart is on). The server's uid is checked with SO_PEERCRED, so a socket planted by another
user is never talked to.
"""

from __future__ import annotations

# `_socket` rather than `socket`: the wrapper module converts its constants to enums at import,
# which costs the CLI about 1.5 ms; the C module has everything a Unix-socket client needs.
import _socket as socket
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from taskctl import API_VERSION, __version__
from taskctl.errors import InvalidRequest, StorageFull, TaskctlError, Unreachable, error_from_body
from taskctl.paths import Paths
from taskctl.wire import dumps_request

_CRLF = b"\r\n"
_MAX_HEADER = 64 * 1024
_START_TIMEOUT = 30.0


_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def quote(text: str) -> str:
    """Percent-encode everything but RFC 3986's unreserved characters (urllib.parse costs
    start-up time; this is all the CLI needs)."""
    return "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in text.encode())


def path_for(*parts: object, **query: object) -> str:
    """`/v1/tasks/42?limit=10`: quoted path segments, query without None values; a list value
    repeats its key."""
    path = "/" + "/".join(quote(str(p)) for p in (API_VERSION, *parts))
    flat: list[str] = []
    for key, value in query.items():
        if value is None:
            continue
        for item in value if isinstance(value, list | tuple) else [value]:
            text = ("true" if item else "false") if isinstance(item, bool) else str(item)
            flat.append(f"{quote(key)}={quote(text)}")
    return path + ("?" + "&".join(flat) if flat else "")


class Response:
    """A response whose body is read lazily: whole (`read`) or chunk by chunk (`iter_chunks`)."""

    def __init__(self, sock: socket.socket, status: int, headers: dict[str, str], rest: bytes):
        self._sock = sock
        self.status = status
        self.headers = headers
        self._buf = rest

    def _recv(self) -> bytes:
        data = self._sock.recv(65536)
        if not data:
            raise Unreachable("the daemon closed the connection in the middle of a response")
        return data

    def _read_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._buf += self._recv()
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def _read_line(self) -> bytes:
        while _CRLF not in self._buf:
            self._buf += self._recv()
        line, _, self._buf = self._buf.partition(_CRLF)
        return line

    def iter_chunks(self) -> Iterator[bytes]:
        """Yield body pieces as they arrive; ends at the end of the body."""
        try:
            if self.headers.get("transfer-encoding", "").lower() == "chunked":
                while True:
                    size = int(self._read_line().split(b";")[0], 16)
                    if size == 0:
                        return
                    yield self._read_exact(size)
                    self._read_exact(2)
            elif "content-length" in self.headers:
                remaining = int(self.headers["content-length"])
                while remaining > 0:
                    if not self._buf:
                        self._buf = self._recv()
                    piece, self._buf = self._buf[:remaining], self._buf[remaining:]
                    remaining -= len(piece)
                    yield piece
            else:
                if self._buf:
                    yield self._buf
                    self._buf = b""
                while data := self._sock.recv(65536):
                    yield data
        finally:
            self.close()

    def iter_lines(self) -> Iterator[bytes]:
        """NDJSON: yield each complete line without its newline."""
        pending = b""
        for chunk in self.iter_chunks():
            pending += chunk
            *lines, pending = pending.split(b"\n")
            yield from (line for line in lines if line)
        if pending:
            yield pending

    def read(self) -> bytes:
        return b"".join(self.iter_chunks())

    def json(self) -> Any:
        return json.loads(self.read() or b"null")

    def close(self) -> None:
        self._sock.close()


class Client:
    """Talks to one daemon. `autostart` starts it on first use when its socket is not there."""

    def __init__(self, paths: Paths | None = None, *, autostart: bool | None = None) -> None:
        self.paths = paths or Paths.from_env()
        if autostart is None:
            autostart = os.environ.get("TASKCTL_NO_AUTOSTART", "") in ("", "0")
        self.autostart = autostart

    # -- public calls -------------------------------------------------------------------------

    def call(self, method: str, path: str, body: Any = None, *, timeout: float | None = 60) -> Any:
        """Send one request and return its decoded JSON; raises the daemon's error as-is."""
        response = self.open(method, path, body, timeout=timeout)
        return response.json()

    def open(
        self, method: str, path: str, body: Any = None, *, timeout: float | None = 60
    ) -> Response:
        """Send one request and return the response with its body unread (for streams)."""
        payload = b"" if body is None else dumps_request(body)
        sock = self._connect(timeout)
        try:
            # Refused before it was whole (over the size limit)? Its answer says why: read it.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(_request_bytes(method, path, payload))
            response = _read_head(sock)
        except TimeoutError:
            sock.close()
            raise Unreachable("the daemon did not answer in time") from None
        except OSError as e:
            sock.close()
            raise Unreachable(f"lost the connection to the daemon: {e.strerror or e}") from None
        if response.status >= 400:
            raw = response.read()
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = None
            raise error_from_body(response.status, parsed)
        return response

    def ping(self) -> bool:
        """True when a daemon answers on the socket (never starts one)."""
        try:
            sock = self._connect_once(timeout=5)
        except (OSError, TaskctlError):
            return False
        try:
            sock.sendall(_request_bytes("GET", "/healthz", b""))
            return _read_head(sock).status == 200
        except OSError:
            return False
        finally:
            sock.close()

    # -- connecting ---------------------------------------------------------------------------

    def _connect(self, timeout: float | None) -> socket.socket:
        try:
            return self._connect_once(timeout)
        except NotADirectoryError:
            raise InvalidRequest(
                f"{self.paths.runtime} is not a folder: TASKCTL_HOME (or XDG_RUNTIME_DIR) must "
                "name a folder"
            ) from None
        except (FileNotFoundError, ConnectionRefusedError):
            if not self.autostart:
                raise Unreachable(
                    f"taskctld is not running (no answer on {self.paths.socket}); "
                    "start it with `taskctl daemon start`"
                ) from None
        start_daemon(self.paths)
        try:
            return self._connect_once(timeout)
        except OSError as e:
            raise Unreachable(f"started taskctld but cannot connect: {e.strerror or e}") from None

    def _connect_once(self, timeout: float | None) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(str(self.paths.socket))
            _check_peer(sock)
        except BaseException:
            sock.close()
            raise
        return sock


def _check_peer(sock: socket.socket) -> None:
    """Refuse a socket served by another user: it could be a planted impostor."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)  # struct ucred
    uid = int.from_bytes(creds[4:8], sys.byteorder)
    if uid != os.getuid():
        raise Unreachable(
            f"refusing to talk to the socket: it is served by uid {uid}, not by you "
            f"(uid {os.getuid()}); someone else may have planted it"
        )


def _request_bytes(method: str, path: str, payload: bytes) -> bytes:
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: taskctl\r\nUser-Agent: taskctl/{__version__}\r\n"
        f"Connection: close\r\nContent-Length: {len(payload)}\r\n"
    )
    if payload:
        head += "Content-Type: application/json\r\n"
    return head.encode() + _CRLF + payload


def _read_head(sock: socket.socket) -> Response:
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise Unreachable("the daemon closed the connection without answering")
        buf += data
        if len(buf) > _MAX_HEADER:
            raise Unreachable("the daemon sent an oversized response header")
    head, _, rest = buf.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(status_line.split(" ", 2)[1])
    except (IndexError, ValueError):
        raise Unreachable(f"not an HTTP response from the daemon: {status_line[:80]!r}") from None
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Response(sock, status, headers, rest)


def start_daemon(paths: Paths, *, timeout: float = _START_TIMEOUT) -> None:
    """Start taskctld in the background and return once it accepts connections.

    `taskctld` daemonizes itself and its first process exits only after the daemon is ready (or
    failed), so waiting for that process is waiting for readiness.
    """
    import subprocess

    try:
        done = subprocess.run(
            [sys.executable, "-m", "taskctld"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise Unreachable(f"taskctld did not become ready within {timeout:.0f}s") from None
    if done.returncode != 0:
        detail = done.stderr.decode(errors="replace").strip().splitlines()
        reason = (
            detail[-1].removeprefix("taskctld: ") if detail else f"exit status {done.returncode}"
        )
        if done.returncode == StorageFull.exit_code:  # taskctld's exit code for a full disk
            raise StorageFull(f"could not start taskctld: {reason}")
        if done.returncode == 2:  # its config is wrong: the user's to fix, not unreachable
            raise InvalidRequest(f"cannot start taskctld: {reason}")
        raise Unreachable(f"could not start taskctld: {reason}")
    deadline = time.monotonic() + 5
    while not Client(paths, autostart=False).ping():
        if time.monotonic() > deadline:
            raise Unreachable("taskctld started but does not answer on its socket")
        time.sleep(0.02)
