"""A big batch's body, read a chunk of tasks at a time instead of all at once.

`BatchText` walks `{"defaults": {...}, "tasks": [...]}` once with the C JSON scanner to find
where each chunk of tasks begins and ends (and that the body is well-formed JSON with no NaN,
and at most 100,000 tasks); `chunks` then validates one chunk at a time with pydantic, merged
with the defaults, so that at most one chunk of models exists at any moment. Pure CPU: run it
in a thread.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any, NoReturn

from fastapi.exceptions import RequestValidationError
from pydantic import TypeAdapter, ValidationError

from taskctl.api import TaskOptions, TaskSpec
from taskctl.errors import InvalidRequest

CHUNK = 500  # tasks validated, resolved and staged together
MAX_TASKS = 100_000  # as BatchSpec says
_SPACE = re.compile(r"[ \t\n\r]*")
_TASKS = TypeAdapter(list[TaskSpec])


def _no_constants(name: str) -> NoReturn:
    raise InvalidRequest("invalid JSON body: NaN and Infinity are not JSON")


_DECODER = json.JSONDecoder(parse_constant=_no_constants)


class BatchText:
    """The body of `POST /v1/tasks/batch`, decoded, with its chunks of tasks located.

    Raises InvalidRequest (not UTF-8, not JSON, NaN, nested too deep) or RequestValidationError
    (a missing or unknown field, too few or too many tasks, bad defaults) on construction."""

    def __init__(self, body: bytes | bytearray) -> None:
        try:
            self.text = body.decode()
        except UnicodeDecodeError:
            raise InvalidRequest("invalid JSON body: it is not UTF-8") from None
        self.bounds: list[tuple[int, int]] = []  # each chunk's first and last task, as offsets
        self.count = 0
        self.defaults: dict[str, Any] = {}
        try:
            self._walk()
        except json.JSONDecodeError as e:
            raise InvalidRequest(f"invalid JSON body: {e}") from None
        except RecursionError:
            raise InvalidRequest("invalid JSON body: nested too deep") from None

    def _walk(self) -> None:
        text = self.text
        pos = self._space(self._expect(self._space(0), "{"))
        seen_tasks = False
        while not text.startswith("}", pos):
            key, pos = _DECODER.raw_decode(text, pos)
            if not isinstance(key, str):
                raise json.JSONDecodeError("Expecting property name", text, pos)
            pos = self._space(self._expect(self._space(pos), ":"))
            if key == "tasks":
                pos, seen_tasks = self._walk_tasks(pos), True
            elif key == "defaults":
                start = pos
                _, pos = _DECODER.raw_decode(text, pos)
                self.defaults = self._options(text[start:pos])
            else:
                _invalid((key,), "extra_forbidden", "Extra inputs are not permitted")
            pos = self._space(pos)
            if text.startswith(",", pos):
                pos = self._space(pos + 1)
            elif not text.startswith("}", pos):
                raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
        if self._space(pos + 1) != len(text):
            raise json.JSONDecodeError("Extra data", text, pos + 1)
        if not seen_tasks:
            _invalid(("tasks",), "missing", "Field required")

    def _walk_tasks(self, pos: int) -> int:
        """Skip the tasks array, noting where each chunk starts and ends."""
        text = self.text
        if not text.startswith("[", pos):
            _invalid(("tasks",), "list_type", "Input should be a valid list")
        pos, count, first = self._space(pos + 1), 0, 0
        if text.startswith("]", pos):
            _invalid(
                ("tasks",), "too_short", "List should have at least 1 item after validation, not 0"
            )
        while True:
            if count % CHUNK == 0:
                first = pos
            _, pos = _DECODER.raw_decode(text, pos)
            count += 1
            if count > MAX_TASKS:
                _invalid(
                    ("tasks",),
                    "too_long",
                    f"List should have at most {MAX_TASKS} items after validation",
                )
            end, pos = pos, self._space(pos)
            last = text.startswith("]", pos)
            if count % CHUNK == 0 or last:
                self.bounds.append((first, end))
            if last:
                self.count = count
                return pos + 1
            pos = self._space(self._expect(pos, ","))

    def _options(self, raw: str) -> dict[str, Any]:
        try:
            options = TaskOptions.model_validate_json(raw) if raw != "null" else None
        except ValidationError as e:
            raise _relocated(e, ("defaults",)) from None
        return {} if options is None else {k: getattr(options, k) for k in options.model_fields_set}

    def chunks(self) -> Iterator[list[TaskSpec]]:
        """The tasks, validated and merged with the defaults, CHUNK at a time. A bad task
        raises RequestValidationError located at `tasks.N` (N counting from 0 over the batch)."""
        done = 0
        for first, end in self.bounds:
            try:
                specs = _TASKS.validate_json("[" + self.text[first:end] + "]")
            except ValidationError as e:
                raise _relocated(e, ("tasks",), done) from None
            if self.defaults:
                specs = [_merged(spec, self.defaults) for spec in specs]
            done += len(specs)
            yield specs
        self.text = ""  # the body's memory goes once every task is read

    def _space(self, pos: int) -> int:
        found = _SPACE.match(self.text, pos)
        return found.end() if found else pos

    def _expect(self, pos: int, char: str) -> int:
        if not self.text.startswith(char, pos):
            if char == "{" and pos == 0:
                _invalid((), "model_type", "Input should be a valid dictionary or object")
            raise json.JSONDecodeError(f"Expecting {char!r}", self.text, pos)
        return pos + 1


def _merged(spec: TaskSpec, defaults: dict[str, Any]) -> TaskSpec:
    """The task with the defaults it does not set itself (as `BatchSpec.merged`)."""
    unset = {k: v for k, v in defaults.items() if k not in spec.model_fields_set}
    return spec.model_copy(update=unset) if unset else spec


def _invalid(loc: tuple[Any, ...], kind: str, msg: str) -> NoReturn:
    raise RequestValidationError([{"type": kind, "loc": ("body", *loc), "msg": msg}])


def _relocated(
    error: ValidationError, prefix: tuple[Any, ...], offset: int = 0
) -> RequestValidationError:
    """pydantic's errors about a part of the body, located in the whole body."""
    errors = []
    for err in error.errors(include_url=False):
        loc = list(err.get("loc", ()))
        if offset and loc and isinstance(loc[0], int):
            loc[0] += offset
        errors.append({**err, "loc": ("body", *prefix, *loc)})
    return RequestValidationError(errors)
