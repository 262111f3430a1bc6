"""The daemon's HTTP server: the FastAPI app that mounts the routers (`taskctld.http`), and
everything between the socket and a route.

Errors are converted here, in one place: a `TaskctlError` becomes its status and
`{"error": {"code", "message"}}`; a request that fails validation becomes 400 `invalid` with the
field named; anything unexpected becomes 500 `internal` with no traceback on the wire (the
traceback goes to the daemon log). Bodies are checked here before anything parses them
(`StrictJSON`), and so are unknown query parameters.

Connections are accepted only from the daemon's own uid (SO_PEERCRED on the accepted socket),
whatever the socket file's permissions say.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import struct
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from taskctl import API_VERSION, __version__
from taskctl.api import BatchSpec, ErrorBody, Event
from taskctl.errors import (
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    TaskctlError,
    Unavailable,
)
from taskctld.http import routers
from taskctld.http.routing import json_response
from taskctld.services import Services
from taskctld.wording import describe

log = logging.getLogger("taskctld.server")

MAX_BODY = 1 << 20
MAX_BATCH_BODY = 64 << 20
# At a stop, event streams end and waits answer at once; a `logs -f` (or any other request
# still going) is cut after this many seconds, so no client can hold the daemon.
STREAMS_CUT_AFTER = 2


def create_app(services: Services) -> FastAPI:
    """The API: every resource's router, behind the body checks and the error conversion."""
    app = FastAPI(
        title="taskctld",
        version=__version__,
        description="The taskctl daemon's API, served over its Unix socket.",
        docs_url=None,
        redoc_url=None,
        dependencies=[Depends(_refuse_unknown_query)],
        responses={400: {"model": ErrorBody}, 429: {"model": ErrorBody}, 503: {"model": ErrorBody}},
    )
    _document_errors_as_sent(app)
    _install_error_handlers(app)
    app.add_middleware(StrictJSON)
    for router in routers(services):
        app.include_router(router)
    return app


async def start_server(
    app: FastAPI, sock: socket.socket, request_timeout: float, max_connections: int
) -> uvicorn.Server:
    """Serve `app` on the bound socket, through `PeerCheckedProtocol`."""
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            http=peer_checked(request_timeout),
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            date_header=False,
            timeout_keep_alive=5,
            timeout_graceful_shutdown=STREAMS_CUT_AFTER,
            limit_concurrency=max_connections,
        )
    )
    # What uvicorn's `serve` does before `startup`, which we call ourselves to hand it the
    # socket bound already.
    server.config.load()
    server.lifespan = server.config.lifespan_class(server.config)
    await server.startup(sockets=[sock])
    return server


async def stop_server(server: uvicorn.Server) -> None:
    """Close the socket, let answers in progress end (streams: within STREAMS_CUT_AFTER)."""
    server.should_exit = True
    await server.shutdown()


def _document_errors_as_sent(app: FastAPI) -> None:
    """Validation errors leave as 400 with an ErrorBody (see the handlers), never FastAPI's 422:
    the OpenAPI document says so, and keeps the Event schema that NDJSON streams carry."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        for methods in schema.get("paths", {}).values():
            for operation in methods.values():
                operation.get("responses", {}).pop("422", None)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (Event, BatchSpec):
            schema_of = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(schema_of.pop("$defs", {}))
            components.setdefault(model.__name__, schema_of)
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


async def _refuse_unknown_query(request: Request) -> None:
    """A misspelt query parameter must not be silently dropped (requests refuse unknown body
    fields the same way)."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return
    known = {p.alias for p in dependant.query_params}
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        raise InvalidRequest(f"unknown query parameter(s): {', '.join(unknown)}")


# -- errors and limits ----------------------------------------------------------------------------


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(TaskctlError)
    async def taskctl_error(_: Request, exc: TaskctlError) -> Response:
        return json_response(exc.to_body(), exc.http_status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> Response:
        return json_response(InvalidRequest(_validation_message(exc)).to_body(), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        bad_body = request.scope.get("taskctl.bad_body")
        if bad_body:
            return json_response(InvalidRequest(f"invalid JSON body: {bad_body}").to_body(), 400)
        if exc.status_code == 400:
            return json_response(InvalidRequest(f"invalid request: {exc.detail}").to_body(), 400)
        if exc.status_code == 413:
            return json_response(PayloadTooLarge("request body over the size limit").to_body(), 413)
        if exc.status_code == 404:
            return json_response(
                NotFound(f"no such endpoint (this daemon speaks /{API_VERSION})").to_body(), 404
            )
        error = TaskctlError(str(exc.detail), code="http_error")
        return json_response(error.to_body(), exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> Response:
        log.exception("internal error while serving a request")
        return json_response(TaskctlError(f"internal error: {type(exc).__name__}").to_body(), 500)


def _validation_message(exc: RequestValidationError) -> str:
    """The first few problems, each with where it is: `priority: ...`, or `task 3: priority:
    ...` for the third task of a batch."""
    parts = []
    for err in exc.errors()[:3]:
        loc = [p for p in err.get("loc", ()) if p not in ("body", "query", "path")]
        prefix = ""
        if len(loc) >= 2 and loc[0] == "tasks" and isinstance(loc[1], int):
            prefix, loc = f"task {loc[1] + 1}: ", loc[2:]
        where = ".".join(str(p) for p in loc)
        msg = describe(dict(err))
        parts.append(prefix + (f"{where}: {msg}" if where else msg))
    return "invalid request: " + "; ".join(parts)


# -- the socket -----------------------------------------------------------------------------------


def peer_checked(request_timeout: float) -> type[PeerCheckedProtocol]:
    """The protocol class uvicorn builds for each connection, with the daemon's deadline."""
    return type("PeerCheckedProtocol", (PeerCheckedProtocol,), {"request_timeout": request_timeout})


class PeerCheckedProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol on httptools (llhttp, in C: about 0.4 ms less per request
    than h11 here), refusing any peer that is not the daemon's own user, and closing
    connections whose request does not arrive whole within `request_timeout` (a slow or silent
    client cannot hold a connection open for ever). A request that has arrived may take as
    long as it needs to be answered (`wait`, streams)."""

    request_timeout = 10.0  # seconds; `peer_checked` makes the class with the configured one

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        sock = transport.get_extra_info("socket")
        uid = _peer_uid(sock) if sock is not None else None
        if uid != os.getuid():
            log.warning(
                "refused a connection from uid %s (only uid %d may connect)", uid, os.getuid()
            )
            transport.abort()
            return
        super().connection_made(transport)
        self._head = b""
        self._reading_head = True  # until a request's line and headers are in
        self._answering = False  # a request arrived whole and its answer is not complete
        self._deadline: asyncio.TimerHandle | None = None
        self._arm_deadline()

    def _arm_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(self.request_timeout, self._request_overdue)

    def _request_overdue(self) -> None:
        self._deadline = None
        if not self._answering and not self.transport.is_closing():
            self.transport.close()

    def on_headers_complete(self) -> None:
        self._reading_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reading_head = True
        self._answering = self.cycle is not None and not self.cycle.response_complete

    def on_response_complete(self) -> None:
        self._answering = False
        super().on_response_complete()
        if getattr(self, "_deadline", None) is not None or not self.transport.is_closing():
            self._arm_deadline()

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        # uvicorn answers a request over `limit_concurrency` in plain text; ours is an error
        # body like every other, so that the CLI can say why (and exit 3, not 1).
        super()._start_asgi_task(cycle, _busy if app is service_unavailable else app)  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        if getattr(self, "transport", None) is None:
            return  # refused in connection_made
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if getattr(self, "transport", None) is None:
            return
        if self._reading_head and not self._head_fits(data):
            error = PayloadTooLarge(f"request headers over the limit of {MAX_HEAD} bytes")
            body = json.dumps(error.to_body()).encode()
            self.transport.write(
                b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
            )
            self.transport.close()
            return
        super().data_received(data)

    def _head_fits(self, data: bytes) -> bool:
        """Whether the request line and headers end within MAX_HEAD bytes (checked on the
        bytes before the blank line only, so a large body is not mistaken for a header)."""
        head = self._head + data
        if b"\r\n\r\n" in head[: MAX_HEAD + 4]:
            self._head = b""
            return True
        self._head = head[: MAX_HEAD + 4]
        return len(head) <= MAX_HEAD


MAX_HEAD = 16 * 1024
MAX_JSON_DEPTH = 32


class _BadBody(Exception):
    pass


class StrictJSON:
    """Pure ASGI middleware: a JSON body must be UTF-8, nest at most MAX_JSON_DEPTH deep, and
    hold no NaN or Infinity. Checked while the body streams in, before anything parses it,
    so a hostile body is refused with 400 and costs no more than reading it."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "DELETE"):
            await self.app(scope, receive, send)
            return
        batch = scope["path"].endswith("/tasks/batch")
        cap = MAX_BATCH_BODY if batch else MAX_BODY
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > cap:
            await _send_error(send, PayloadTooLarge(f"request body over the limit of {cap} bytes"))
            return
        if batch:  # pydantic's parser checks the same, 4.8 times faster (see _parse_batch)
            await self.app(scope, receive, send)
            return
        scanner = _JsonScanner(cap)
        started = False

        async def checked_receive() -> dict[str, Any]:
            message = await receive()
            if message["type"] == "http.request":
                try:
                    scanner.feed(
                        message.get("body", b""), final=not message.get("more_body", False)
                    )
                except _BadBody as e:
                    # FastAPI turns any failure while it reads the body into a generic 400;
                    # the error handler finds the real reason here.
                    scope["taskctl.bad_body"] = str(e)
                    raise
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, checked_receive, tracking_send)
        except _BadBody as e:
            if started:
                raise
            await _send_error(send, InvalidRequest(f"invalid JSON body: {e}"))


async def _busy(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The answer to a request over `max_connections` (the connection is then closed)."""
    busy = Unavailable(
        "taskctld is busy: it has as many connections as `max_connections` allows; try again"
    )
    await _send_error(send, busy, close=True)


async def _send_error(send: Any, error: TaskctlError, *, close: bool = False) -> None:
    body = json.dumps(error.to_body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.http_status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


LONE_SURROGATE = 'a lone surrogate escape (bytes that are not UTF-8 go as {"base64": ...})'


class _JsonScanner:
    """An incremental check of a JSON text's bytes: UTF-8, depth, no bare N or I (NaN,
    Infinity) outside strings, no lone surrogate escape (`\\udcff`: text that stands for no
    Unicode; bytes that are not UTF-8 travel as {"base64": ...}). Everything else is left to
    the JSON parser."""

    def __init__(self, cap: int) -> None:
        import codecs

        self.cap = cap
        self.size = 0
        self.decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.hex: str | None = None  # the digits of a \\u escape being read
        self.want_low = 0  # after a high surrogate: 2 = a backslash must follow, 1 = a u

    def feed(self, data: bytes, *, final: bool) -> None:
        self.size += len(data)
        if self.size > self.cap:
            raise _BadBody(f"the body is over the limit of {self.cap} bytes")
        try:
            text = self.decoder.decode(data, final)
        except UnicodeDecodeError:
            raise _BadBody("it is not UTF-8") from None
        for ch in text:
            if self.in_string:
                if self.hex is not None:
                    self._hex_digit(ch)
                elif self.want_low:
                    self._low_surrogate_follows(ch)
                elif self.escaped:
                    self.escaped = False
                    if ch == "u":
                        self.hex = ""
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "[{":
                self.depth += 1
                if self.depth > MAX_JSON_DEPTH:
                    raise _BadBody(f"nested deeper than {MAX_JSON_DEPTH}")
            elif ch in "]}":
                self.depth -= 1
            elif ch in "NI":
                raise _BadBody("NaN and Infinity are not JSON")

    def _hex_digit(self, ch: str) -> None:
        assert self.hex is not None
        self.hex += ch
        if len(self.hex) < 4:
            return
        try:
            code = int(self.hex, 16)
        except ValueError:
            code = 0  # not hex: the JSON parser says so
        low = 0xDC00 <= code <= 0xDFFF
        if (self.want_low == -1 and not low) or (self.want_low != -1 and low):
            raise _BadBody(LONE_SURROGATE)
        self.want_low = 2 if 0xD800 <= code <= 0xDBFF else 0
        self.hex = None

    def _low_surrogate_follows(self, ch: str) -> None:
        """After a high surrogate escape, only `\\u` and a low one may come."""
        if ch != ("\\" if self.want_low == 2 else "u"):
            raise _BadBody(LONE_SURROGATE)
        self.want_low -= 1
        if self.want_low == 0:
            self.hex, self.want_low = "", -1  # the low one's digits are read next


def _peer_uid(sock: socket.socket) -> int | None:
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    return int(struct.unpack("3i", creds)[1])
