"""REST over the Unix socket: routes that adapt HTTP to the `Service`, and nothing else.

Errors are converted here, in one place: a `TaskctlError` becomes its status and
`{"error": {"code", "message"}}`; a request that fails validation becomes 400 `invalid` with the
field named; anything unexpected becomes 500 `internal` with no traceback on the wire (the
traceback goes to the daemon log).

Connections are accepted only from the daemon's own uid (SO_PEERCRED on the accepted socket),
whatever the socket file's permissions say.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from taskctl import API_VERSION, __version__
from taskctl.api import (
    FINAL_STATES,
    QUEUE_NAME_PATTERN,
    BatchSpec,
    ErrorBody,
    Event,
    Health,
    Moment,
    PruneRequest,
    QueueInfo,
    QueueSettings,
    Schedule,
    ScheduleSpec,
    StopRequest,
    Summary,
    Task,
    TaskSpec,
    TaskState,
)
from taskctl.errors import (
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    TaskctlError,
    TooMany,
    Unavailable,
)
from taskctld.batch import BatchText
from taskctld.service import Service, Submitted
from taskctld.store import TaskFilter
from taskctld.views import event_view
from taskctld.wording import describe

log = logging.getLogger("taskctld.server")

MAX_BODY = 1 << 20
TOTAL_COUNT = "X-Total-Count"  # on GET /v1/tasks: how many tasks the filter matches in all
MAX_BATCH_BODY = 64 << 20
MAX_WATCHERS = 64  # concurrent event streams
MAX_ID = (1 << 63) - 1  # SQLite's integers
TaskId = Annotated[int, PathParam(ge=1, le=MAX_ID)]
FOLLOW_POLL = 0.05  # seconds between reads of a log file being followed (only while following)
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody},
    404: {"model": ErrorBody},
    409: {"model": ErrorBody},
    413: {"model": ErrorBody},
    507: {"model": ErrorBody},
}


BATCH_BODY = {  # the batch route reads its body itself (see _parse_batch)
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/BatchSpec"}}},
    }
}
VIEWS_PER_CHUNK = 250  # a batch's answer is built this many tasks at a time (more: more RSS)
SMALL_BATCH_BODY = 64 << 10  # a batch this big or smaller is parsed whole and inserted at once


class NDJSONResponse(StreamingResponse):
    media_type = "application/x-ndjson"


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


def json_response(content: Any, status: int = 200) -> Response:
    body = json.dumps(content, separators=(",", ":"), ensure_ascii=False).encode()
    return Response(body, status_code=status, media_type="application/json")


def create_app(service: Service) -> FastAPI:
    """The API. Every route is `async def`: they all run on the event loop's thread, the only
    thread that may touch the store (FastAPI would run a plain `def` in a thread pool)."""
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
    v1 = f"/{API_VERSION}"

    @app.get("/healthz", response_model=Health, tags=["health"])
    async def healthz() -> Response:
        """The daemon is alive; also says its version."""
        return json_response(service.health())

    @app.get("/readyz", response_model=Health, tags=["health"], responses={503: {"model": Health}})
    async def readyz() -> Response:
        """Ready: the store is writable."""
        health = service.health()
        return json_response(health, 200 if health["status"] == "ok" else 503)

    @app.post(f"{v1}/tasks", response_model=Task, status_code=201, responses=ERRORS, tags=["tasks"])
    async def submit(spec: TaskSpec) -> Response:
        """Create a task. Answered only after the task is committed to the store. With a `key`
        already in use by an equal request, the existing task is returned (`deduplicated`)."""
        (done,) = service.submit([spec])
        view = service.views([service.task(done.task_id)])[0]
        view["deduplicated"] = done.deduplicated
        return json_response(view, 200 if done.deduplicated else 201)

    @app.post(
        f"{v1}/tasks/batch", response_model=list[Task], status_code=201, responses=ERRORS,
        tags=["tasks"], openapi_extra=BATCH_BODY,
    )  # fmt: skip
    async def submit_batch(request: Request) -> Response:
        """Create many tasks in one transaction: all of them, or none and an error naming the
        first bad one. The body is a `BatchSpec`."""
        body = bytearray()
        async for part in request.stream():  # not request.body(): its parts and their join
            body += part
        if len(body) > SMALL_BATCH_BODY:
            text = await asyncio.to_thread(BatchText, body)
            del body  # the decoded text is all that is kept
            done: Iterable[Submitted] = await service.submit_staged(_chunks_of(text))
        else:
            specs = await asyncio.to_thread(_parse_batch, bytes(body))
            places = service.places(specs)
            tasks = await asyncio.to_thread(service.resolve_all, specs, places)
            done = service.insert(tasks)
        return StreamingResponse(
            _batch_views(service, done), status_code=201, media_type="application/json"
        )

    @app.get(f"{v1}/tasks", response_model=list[Task], responses=ERRORS, tags=["tasks"])
    async def list_tasks(
        state: Annotated[list[TaskState] | None, Query()] = None,
        queue: str | None = None,
        label: Annotated[list[str] | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=100_000)] = 100,
        before: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
        show_env: bool = False,
    ) -> Response:
        """Tasks, newest first. `X-Total-Count` says how many match beyond `limit`, so that a
        client never shows fewer than there are without saying so."""
        where = TaskFilter(
            states=state or (),
            queue=queue,
            labels=_parse_labels(label or []),
            limit=limit,
            before_id=before,
        )
        rows = service.list_tasks(where)
        response = json_response(service.views(rows, show_env=show_env))
        total = len(rows) if len(rows) < limit else service.count_tasks(where)
        response.headers[TOTAL_COUNT] = str(total)
        return response

    @app.get(f"{v1}/tasks/{{task_id}}", response_model=Task, responses=ERRORS, tags=["tasks"])
    async def get_task(task_id: TaskId, show_env: bool = False) -> Response:
        return json_response(service.views([service.task(task_id)], show_env=show_env)[0])

    @app.post(
        f"{v1}/tasks/{{task_id}}/cancel", response_model=Task, responses=ERRORS, tags=["tasks"]
    )
    async def cancel(task_id: TaskId) -> Response:
        """Cancel a task; a running one is stopped with its whole process tree first."""
        task = await service.cancel(task_id)
        return json_response(service.views([task])[0])

    @app.post(
        f"{v1}/tasks/{{task_id}}/retry", response_model=Task, responses=ERRORS, tags=["tasks"]
    )
    async def retry(task_id: TaskId) -> Response:
        """Run a finished task again as a new attempt, keeping its history."""
        return json_response(service.views([service.retry(task_id)])[0])

    @app.get(f"{v1}/tasks/{{task_id}}/wait", response_model=Task, responses=ERRORS, tags=["tasks"])
    async def wait(
        task_id: TaskId, timeout: Annotated[float, Query(ge=0, le=3600)] = 60
    ) -> Response:
        """The task once it is final, or as it is after `timeout` seconds (check its state)."""
        task = await service.wait_final(task_id, timeout)
        return json_response(service.views([task])[0])

    @app.get(
        f"{v1}/tasks/{{task_id}}/logs",
        responses={**ERRORS, 200: {"content": {"application/octet-stream": {}}}},
        tags=["tasks"],
    )
    async def logs(
        task_id: TaskId,
        stream: Annotated[str, Query(pattern="^(stdout|stderr)$")] = "stdout",
        attempt: Annotated[int | None, Query(ge=1)] = None,
        tail: Annotated[int | None, Query(ge=0)] = None,
        follow: bool = False,
    ) -> Response:
        """An attempt's output as bytes (default: the latest attempt). With `follow`, the
        response streams until the task is final, across attempts."""
        task = service.task(task_id)
        if follow and task.attempts == 0:
            task = await service.wait_started(task_id)
        if task.attempts == 0 and task.state in FINAL_STATES:
            return Response(b"", media_type="application/octet-stream")  # ended without running
        number, path = service.log_path(task, attempt, stream)
        start = 0 if tail is None else await asyncio.to_thread(tail_offset, path, tail)
        if follow:
            chunks = _follow_log(service, task_id, number, stream, start, across=attempt is None)
        else:
            chunks = _read_log(path, start)
        return StreamingResponse(chunks, media_type="application/octet-stream")

    @app.get(
        f"{v1}/events",
        response_class=NDJSONResponse,
        responses={
            200: {
                "content": {
                    "application/x-ndjson": {"schema": {"$ref": "#/components/schemas/Event"}}
                }
            }
        },
        tags=["events"],
    )
    async def events(
        after: Annotated[int | None, Query(ge=0, le=MAX_ID)] = None,
        follow: bool = False,
        task: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
        queue: str | None = None,
        limit: Annotated[int, Query(ge=1, le=100_000)] = 10_000,
    ) -> Response:
        """State changes in order, as NDJSON. `after` resumes after a given event id (0: from
        the oldest kept); without it, only events from now on. With `follow`, the stream stays
        open and pushes each new event as it is committed."""
        start = service.store.last_event_id() if after is None else after
        if follow and service.watchers >= MAX_WATCHERS:
            raise TooMany(f"{MAX_WATCHERS} watchers are connected already; try again later")
        lines = _event_lines(service, start, follow, task, queue, limit)
        return NDJSONResponse(lines)

    @app.post(
        f"{v1}/schedules",
        response_model=Schedule,
        status_code=201,
        responses=ERRORS,
        tags=["schedules"],
    )
    async def add_schedule(spec: ScheduleSpec) -> Response:
        """Create a cron schedule or a file trigger; refused whole if anything is invalid."""
        return json_response(service.schedule_view(service.add_schedule(spec)), 201)

    @app.get(f"{v1}/schedules", response_model=list[Schedule], tags=["schedules"])
    async def list_schedules(
        kind: Annotated[str | None, Query(pattern="^(cron|trigger)$")] = None,
    ) -> Response:
        return json_response([service.schedule_view(s) for s in service.store.list_schedules(kind)])

    @app.get(
        f"{v1}/schedules/{{name}}", response_model=Schedule, responses=ERRORS, tags=["schedules"]
    )
    async def show_schedule(name: str, runs: Annotated[int, Query(ge=0, le=1000)] = 20) -> Response:
        """A schedule with its recent fires (newest first)."""
        return json_response(service.schedule_view(service.schedule(name), runs=runs))

    @app.delete(f"{v1}/schedules/{{name}}", responses=ERRORS, tags=["schedules"])
    async def remove_schedule(name: str) -> Response:
        """Remove a schedule; the tasks it created stay."""
        service.remove_schedule(name)
        return json_response({"removed": name})

    @app.post(
        f"{v1}/schedules/{{name}}/pause",
        response_model=Schedule,
        responses=ERRORS,
        tags=["schedules"],
    )
    async def pause_schedule(name: str) -> Response:
        return json_response(service.schedule_view(service.pause_schedule(name, True)))

    @app.post(
        f"{v1}/schedules/{{name}}/resume",
        response_model=Schedule,
        responses=ERRORS,
        tags=["schedules"],
    )
    async def resume_schedule(name: str) -> Response:
        """Resume from now: the time spent paused is not caught up."""
        return json_response(service.schedule_view(service.pause_schedule(name, False)))

    @app.get(
        f"{v1}/schedules/{{name}}/next",
        response_model=list[str],
        responses=ERRORS,
        tags=["schedules"],
    )
    async def next_fires(
        name: str,
        n: Annotated[int, Query(ge=1, le=1000)] = 5,
        after: Annotated[
            Moment | None, Query(description="from this moment (default: now)")
        ] = None,
    ) -> Response:
        """The next n fire times (RFC 3339 in UTC, as every time of the API; the schedule's
        zone decides which they are); fewer when the year 9999 ends first."""
        start = None if after is None else int(after.timestamp() * 1000)
        return json_response(service.next_fires(name, n, start))

    @app.get(f"{v1}/queues", response_model=list[QueueInfo], tags=["queues"])
    async def list_queues() -> Response:
        """Queues with their limit, defaults and task counts by state."""
        return json_response(service.queues())

    @app.put(f"{v1}/queues/{{name}}", response_model=QueueInfo, responses=ERRORS, tags=["queues"])
    async def set_queue(
        name: Annotated[str, PathParam(pattern=QUEUE_NAME_PATTERN)], settings: QueueSettings
    ) -> Response:
        """Create or change a queue; fields left out keep their value."""
        return json_response(service.queue_view(service.set_queue(name, settings)))

    @app.post(
        f"{v1}/queues/{{name}}/pause", response_model=QueueInfo, responses=ERRORS, tags=["queues"]
    )
    async def pause_queue(name: str) -> Response:
        """Nothing new starts from the queue; running tasks finish."""
        return json_response(service.queue_view(service.pause_queue(name, True)))

    @app.post(
        f"{v1}/queues/{{name}}/resume", response_model=QueueInfo, responses=ERRORS, tags=["queues"]
    )
    async def resume_queue(name: str) -> Response:
        return json_response(service.queue_view(service.pause_queue(name, False)))

    @app.get("/metrics", tags=["health"], responses={200: {"content": {"text/plain": {}}}})
    async def metrics() -> Response:
        """Prometheus text exposition."""
        return Response(
            service.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    @app.get(f"{v1}/summary", response_model=Summary, tags=["health"])
    async def summary() -> Response:
        return json_response(service.summary())

    @app.post(f"{v1}/prune", tags=["tasks"])
    async def prune(request: PruneRequest) -> Response:
        """Remove finished tasks, their logs and old events now (retention runs hourly too)."""
        return json_response(await service.prune(request.older_than))

    @app.post(f"{v1}/daemon/stop", tags=["daemon"])
    async def stop(request: StopRequest) -> Response:
        """Stop the daemon. `leave` (default): running tasks go on and the next daemon adopts
        them. `drain`: start nothing new and exit once running tasks have finished (or after
        `timeout`). `kill`: end running tasks and queue them again, their attempt not counted."""
        service.request_stop(request.mode, request.timeout)
        return json_response({"stopping": True, "mode": request.mode, "pid": os.getpid()})

    return app


def _parse_batch(body: bytes) -> list[TaskSpec]:
    """A batch's body, parsed and checked by pydantic's JSON parser (UTF-8, NaN, nesting)
    and merged with its defaults. Pure CPU, no store: run it in a thread, so that the socket
    keeps answering while 100,000 tasks are parsed."""
    try:
        return BatchSpec.model_validate_json(body).merged()
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False)) from None


async def _chunks_of(text: BatchText) -> AsyncIterator[list[TaskSpec]]:
    """The batch's tasks a chunk at a time, each validated in a thread."""
    chunks = text.chunks()
    while (specs := await asyncio.to_thread(next, chunks, None)) is not None:
        yield specs


async def _batch_views(service: Service, done: Iterable[Submitted]) -> AsyncIterator[bytes]:
    """The created tasks as one JSON array, built and sent a slice at a time: the views of a
    whole batch at once would take the loop for seconds and the memory of every view."""
    yield b"["
    submitted, first = iter(done), True
    while part := list(itertools.islice(submitted, VIEWS_PER_CHUNK)):
        views = service.views(service.store.get_tasks([d.task_id for d in part]))
        for view, d in zip(views, part, strict=True):
            view["deduplicated"] = d.deduplicated
        text = json.dumps(views, separators=(",", ":"), ensure_ascii=False)[1:-1]
        yield (b"" if first else b",") + text.encode()
        first = False
        await asyncio.sleep(0)  # let other requests in between slices
    yield b"]"


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


def _parse_labels(raw: list[str]) -> dict[str, str]:
    labels = {}
    for item in raw:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidRequest(f"label filter {item!r} must look like KEY=VALUE")
        labels[key] = value
    return labels


# -- logs -----------------------------------------------------------------------------------------


TAIL_BLOCK = 1 << 16


def tail_offset(path: Path, lines: int, block: int = TAIL_BLOCK) -> int:
    """Offset where the last `lines` lines start (a last line without a newline counts as one;
    fewer lines than asked: 0). Reads backwards in blocks and stops at the newline it needs,
    so the cost is what the tail returns plus one block. Blocking I/O: call it in a thread."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return 0
    with f:
        size = os.fstat(f.fileno()).st_size
        if lines == 0:
            return size
        f.seek(max(0, size - 1))
        pos = size - 1 if f.read(1) == b"\n" else size  # a final newline starts no line
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk, found = f.read(pos - start), pos - start
            while (found := chunk.rfind(b"\n", 0, found)) >= 0:
                lines -= 1
                if lines == 0:
                    return start + found + 1
            pos = start
    return 0


async def _read_log(path: Path, start: int) -> AsyncIterator[bytes]:
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return
    with f:
        f.seek(start)
        while chunk := f.read(65536):
            yield chunk


async def _follow_log(
    service: Service, task_id: int, number: int, stream: str, start: int, *, across: bool
) -> AsyncIterator[bytes]:
    """Stream one attempt's log as it grows; with `across`, move on to later attempts until the
    task is final."""
    offset = start
    service.followers += 1
    try:
        async for chunk in _follow_attempts(service, task_id, number, stream, offset, across):
            yield chunk
    finally:
        service.followers -= 1


async def _follow_attempts(
    service: Service, task_id: int, number: int, stream: str, offset: int, across: bool
) -> AsyncIterator[bytes]:
    while not service.hub.closed:  # stopping: the CLI finds the task not final and says so
        _, path = service.log_path(service.task(task_id), number, stream)
        async for chunk in _read_log(path, offset):
            offset += len(chunk)
            yield chunk
        if service.attempt_open(task_id, number):
            await asyncio.sleep(FOLLOW_POLL)
            continue
        async for chunk in _read_log(path, offset):  # what it wrote just before the end
            yield chunk
        task = service.task(task_id)
        if across and task.attempts > number:  # a later attempt (perhaps already over)
            number, offset = number + 1, 0
        elif not across or task.state in FINAL_STATES:
            return
        else:
            with contextlib.suppress(Unavailable):  # stopping: the loop ends
                await service.hub.wait_change(task_id, 1.0)


async def _event_lines(
    service: Service, after: int, follow: bool, task: int | None, queue: str | None, limit: int
) -> AsyncIterator[bytes]:
    """Backlog from the events table, then (with `follow`) live events as they are committed,
    each batch of events in one chunk. A subscriber that fell behind catches up from the table,
    so nothing is lost or repeated."""

    def wanted(e: Any) -> bool:
        return (task is None or e.task_id == task) and (queue is None or e.queue == queue)

    last, sent = after, 0
    service.watchers += follow
    try:
        async for chunk in _event_chunks(service, last, sent, follow, limit, wanted):
            yield chunk
    finally:
        service.watchers -= follow


async def _event_chunks(
    service: Service, last: int, sent: int, follow: bool, limit: int, wanted: Any
) -> AsyncIterator[bytes]:
    with service.hub.subscribe() as sub:
        while sent < limit or follow:
            backlog = service.store.events_after(last, 1000)
            if not backlog:
                break
            last = backlog[-1].id
            chunk = [e for e in backlog if wanted(e)][: None if follow else limit - sent]
            sent += len(chunk)
            if chunk:
                yield b"".join(_ndjson(event_view(e)) for e in chunk)
        if not follow:
            return
        while not sub.closed:  # until the daemon stops: then `watch` goes on with the next
            taken = [await sub.queue.get()]
            while not sub.queue.empty():
                taken.append(sub.queue.get_nowait())
            batch = [e for e in taken if e is not None]
            if sub.overflow:
                sub.overflow = False
                batch = service.store.events_after(last, 100_000)
            fresh = [e for e in batch if e.id > last]
            if fresh:
                last = fresh[-1].id
                chunk = [e for e in fresh if wanted(e)]
                if chunk:
                    yield b"".join(_ndjson(event_view(e)) for e in chunk)


def _ndjson(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


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


class PeerCheckedProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol on httptools (llhttp, in C: about 0.4 ms less per request
    than h11 here), refusing any peer that is not the daemon's own user, and closing
    connections whose request does not arrive whole within `request_timeout` (a slow or silent
    client cannot hold a connection open for ever). A request that has arrived may take as
    long as it needs to be answered (`wait`, streams)."""

    request_timeout = 10.0  # seconds; set from the daemon's config

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
