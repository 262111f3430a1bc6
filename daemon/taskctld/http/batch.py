"""`POST /v1/tasks/batch`, its body in and its answer out, without holding the event loop or
the whole batch: a small body is parsed whole, a big one a chunk at a time (`BatchText`), and
the answer is built and sent a slice of tasks at a time."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Iterable

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from taskctl.api import BatchSpec, TaskSpec
from taskctld.batch import BatchText
from taskctld.services.submit import SubmitService, Submitted
from taskctld.services.tasks import TaskService

VIEWS_PER_CHUNK = 250  # a batch's answer is built this many tasks at a time (more: more RSS)
SMALL_BATCH_BODY = 64 << 10  # a batch this big or smaller is parsed whole and inserted at once
BATCH_BODY = {  # the batch route reads its body itself (see parse_batch)
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/BatchSpec"}}},
    }
}


async def submit_body(request: Request, submit: SubmitService) -> Iterable[Submitted]:
    """Read the request's body and submit its tasks (all or none)."""
    body = bytearray()
    async for part in request.stream():  # not request.body(): its parts and their join
        body += part
    if len(body) > SMALL_BATCH_BODY:
        text = await asyncio.to_thread(BatchText, body)
        del body  # the decoded text is all that is kept
        return await submit.submit_staged(_chunks_of(text))
    specs = await asyncio.to_thread(parse_batch, bytes(body))
    return await submit.submit_parsed(specs)


def parse_batch(body: bytes) -> list[TaskSpec]:
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


async def batch_views(tasks: TaskService, done: Iterable[Submitted]) -> AsyncIterator[bytes]:
    """The created tasks as one JSON array, built and sent a slice at a time: the views of a
    whole batch at once would take the loop for seconds and the memory of every view."""
    yield b"["
    submitted, first = iter(done), True
    while part := list(itertools.islice(submitted, VIEWS_PER_CHUNK)):
        views = tasks.views_of([d.task_id for d in part])
        for view, d in zip(views, part, strict=True):
            view["deduplicated"] = d.deduplicated
        text = json.dumps(views, separators=(",", ":"), ensure_ascii=False)[1:-1]
        yield (b"" if first else b",") + text.encode()
        first = False
        await asyncio.sleep(0)  # let other requests in between slices
    yield b"]"
