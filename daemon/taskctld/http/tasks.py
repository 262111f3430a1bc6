"""`/v1/tasks`: submit (one, or a batch), list, show, cancel, retry, wait, logs; and prune."""

from __future__ import annotations

from typing import Annotated

from fastapi import Query, Request
from fastapi.responses import Response, StreamingResponse

from taskctl.api import PruneRequest, Task, TaskSpec, TaskState
from taskctld.http.batch import BATCH_BODY, batch_views, submit_body
from taskctld.http.routing import ERRORS, MAX_ID, V1, Routes, TaskId, get, json_response, post
from taskctld.services.logs import LogService
from taskctld.services.retention import RetentionService
from taskctld.services.submit import SubmitService
from taskctld.services.tasks import TaskService

TOTAL_COUNT = "X-Total-Count"  # on GET /v1/tasks: how many tasks the filter matches in all
OCTETS = "application/octet-stream"


class TaskRoutes(Routes):
    tags = ["tasks"]

    def __init__(
        self,
        tasks: TaskService,
        submissions: SubmitService,
        task_logs: LogService,
        retention: RetentionService,
    ) -> None:
        self.tasks = tasks
        self.submissions = submissions
        self.task_logs = task_logs
        self.retention = retention

    @post(
        f"{V1}/tasks", response_model=Task, status_code=201,
        responses={**ERRORS, 200: {"model": Task, "description": "Deduplicated: an equal request's task"}},
    )  # fmt: skip
    async def submit(self, spec: TaskSpec) -> Response:
        """Create a task. Answered only after the task is committed to the store. With a `key`
        already in use by an equal request, the existing task is returned (`deduplicated`)."""
        (done,) = self.submissions.submit([spec])
        view = self.tasks.view(done.task_id)
        view["deduplicated"] = done.deduplicated
        return json_response(view, 200 if done.deduplicated else 201)

    @post(
        f"{V1}/tasks/batch", response_model=list[Task], status_code=201, responses=ERRORS,
        openapi_extra=BATCH_BODY,
    )  # fmt: skip
    async def submit_batch(self, request: Request) -> Response:
        """Create many tasks in one transaction: all of them, or none and an error naming the
        first bad one. The body is a `BatchSpec`."""
        done = await submit_body(request, self.submissions)
        views = batch_views(self.tasks, done)
        return StreamingResponse(views, status_code=201, media_type="application/json")

    @get(f"{V1}/tasks", response_model=list[Task], responses=ERRORS)
    async def list_tasks(
        self,
        state: Annotated[list[TaskState] | None, Query()] = None,
        queue: str | None = None,
        label: Annotated[list[str] | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=100_000)] = 100,
        before: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
        show_env: bool = False,
    ) -> Response:
        """Tasks, newest first. `X-Total-Count` says how many match beyond `limit`, so that a
        client never shows fewer than there are without saying so."""
        views, total = self.tasks.page(
            state or (), queue, label or [], limit, before, show_env=show_env
        )
        response = json_response(views)
        response.headers[TOTAL_COUNT] = str(total)
        return response

    @get(f"{V1}/tasks/{{task_id}}", response_model=Task, responses=ERRORS)
    async def get_task(self, task_id: TaskId, show_env: bool = False) -> Response:
        return json_response(self.tasks.view(task_id, show_env=show_env))

    @post(f"{V1}/tasks/{{task_id}}/cancel", response_model=Task, responses=ERRORS)
    async def cancel(self, task_id: TaskId) -> Response:
        """Cancel a task; a running one is stopped with its whole process tree first."""
        task = await self.tasks.cancel(task_id)
        return json_response(self.tasks.views([task])[0])

    @post(f"{V1}/tasks/{{task_id}}/retry", response_model=Task, responses=ERRORS)
    async def retry(self, task_id: TaskId) -> Response:
        """Run a finished task again as a new attempt, keeping its history."""
        return json_response(self.tasks.views([self.tasks.retry(task_id)])[0])

    @get(f"{V1}/tasks/{{task_id}}/wait", response_model=Task, responses=ERRORS)
    async def wait(
        self, task_id: TaskId, timeout: Annotated[float, Query(ge=0, le=3600)] = 60
    ) -> Response:
        """The task once it is final, or as it is after `timeout` seconds (check its state)."""
        task = await self.tasks.wait_final(task_id, timeout)
        return json_response(self.tasks.views([task])[0])

    @get(f"{V1}/tasks/{{task_id}}/logs", responses={**ERRORS, 200: {"content": {OCTETS: {}}}})
    async def logs(
        self,
        task_id: TaskId,
        stream: Annotated[str, Query(pattern="^(stdout|stderr)$")] = "stdout",
        attempt: Annotated[int | None, Query(ge=1)] = None,
        tail: Annotated[int | None, Query(ge=0)] = None,
        follow: bool = False,
    ) -> Response:
        """An attempt's output as bytes (default: the latest attempt). With `follow`, the
        response streams until the task is final, across attempts."""
        chunks = await self.task_logs.output(task_id, stream, attempt, tail, follow)
        if chunks is None:  # ended without running
            return Response(b"", media_type=OCTETS)
        return StreamingResponse(chunks, media_type=OCTETS)

    @post(f"{V1}/prune")
    async def prune(self, request: PruneRequest) -> Response:
        """Remove finished tasks, their logs and old events now (retention runs hourly too)."""
        return json_response(await self.retention.prune(request.older_than))
