"""What every router shares: the `Routes` base (a resource's handlers as methods, bound to the
services it was built with), JSON responses, and the documented error statuses."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, TypeVar

from fastapi import APIRouter
from fastapi import Path as PathParam
from fastapi.responses import Response, StreamingResponse

from taskctl import API_VERSION
from taskctl.api import ErrorBody

V1 = f"/{API_VERSION}"
MAX_ID = (1 << 63) - 1  # SQLite's integers
TaskId = Annotated[int, PathParam(ge=1, le=MAX_ID)]
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody},
    404: {"model": ErrorBody},
    409: {"model": ErrorBody},
    413: {"model": ErrorBody},
    507: {"model": ErrorBody},
}
Handler = TypeVar("Handler", bound=Callable[..., Any])
_ENDPOINT = "__taskctl_endpoint__"


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    options: dict[str, Any]


def endpoint(method: str, path: str, **options: Any) -> Callable[[Handler], Handler]:
    """Mark a `Routes` method as the handler of `method path`; `options` as FastAPI's
    `add_api_route` takes them (response_model, status_code, responses...)."""

    def mark(handler: Handler) -> Handler:
        vars(handler)[_ENDPOINT] = Endpoint(method, path, options)
        return handler

    return mark


def get(path: str, **options: Any) -> Callable[[Handler], Handler]:
    return endpoint("GET", path, **options)


def post(path: str, **options: Any) -> Callable[[Handler], Handler]:
    return endpoint("POST", path, **options)


def put(path: str, **options: Any) -> Callable[[Handler], Handler]:
    return endpoint("PUT", path, **options)


def delete(path: str, **options: Any) -> Callable[[Handler], Handler]:
    return endpoint("DELETE", path, **options)


class Routes:
    """A resource's routes. Subclasses hold their services (constructor arguments) and mark
    their handlers with `get`, `post`... Every handler is `async def`: they all run on the
    event loop's thread, the only thread that may touch the store (FastAPI would run a plain
    `def` in a thread pool)."""

    tags: ClassVar[list[str]]

    def router(self) -> APIRouter:
        """The handlers as a FastAPI router, in the order the class defines them (the order
        their paths are matched in)."""
        router = APIRouter(tags=list(self.tags))
        for name, member in vars(type(self)).items():
            found = getattr(member, _ENDPOINT, None)
            if isinstance(found, Endpoint):
                router.add_api_route(
                    found.path, getattr(self, name), methods=[found.method], **found.options
                )
        return router


class NDJSONResponse(StreamingResponse):
    media_type = "application/x-ndjson"


def json_response(content: Any, status: int = 200) -> Response:
    body = json.dumps(content, separators=(",", ":"), ensure_ascii=False).encode()
    return Response(body, status_code=status, media_type="application/json")
