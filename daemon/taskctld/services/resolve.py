"""A task spec made whole: every default filled in (the task's, then its queue's, then the
daemon's) and every check done that needs the machine (the working directory exists, the
command fits execve, the queue exists). Reads queues from the store; writes nothing."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from taskctl.api import TaskSpec
from taskctl.errors import InvalidRequest
from taskctl.units import now_ms
from taskctld.config import Config
from taskctld.store import NewTask, QueueRow, Store

MAX_ARG_STRLEN = 131072  # Linux: the longest single argument or environment string
Place = tuple[str, QueueRow | None]  # a task's working directory and its queue's row
Places = dict[tuple[str | None, str], Place]  # by the spec's (cwd, queue)


@dataclass
class Resolver:
    store: Store
    config: Config
    clock: Callable[[], int] = now_ms
    node_names: Callable[[], Collection[str]] | None = None  # a cluster's nodes (None: alone)

    def places(
        self, specs: Sequence[TaskSpec], known: Places | None = None, first: int = 0
    ) -> Places:
        """Each distinct (cwd, queue) of the specs, checked once: both must exist. A fault
        that every spec shares names no task; one of a few names the first task it hits.
        `known`: places checked already (added to); `first`: the index of specs[0] in the
        batch, when these are a later chunk of one."""
        places = {} if known is None else known
        if not places and len({(spec.cwd, spec.queue) for spec in specs}) == 1:
            places[(specs[0].cwd, specs[0].queue)] = self._where_it_runs(specs[0], check=True)
        for index, spec in enumerate(specs, start=first):
            if (spec.cwd, spec.queue) not in places:
                with _naming_task(index, 2 if first else len(specs)):
                    places[(spec.cwd, spec.queue)] = self._where_it_runs(spec, check=True)
        self._check_nodes({spec.node for spec in specs if spec.node})
        return places

    def resolve_all(
        self, specs: Sequence[TaskSpec], places: Places, first: int = 0
    ) -> list[NewTask]:
        """`resolve` for each spec, with its place checked already by `places`. Touches no
        store, so a big batch can be resolved in a thread. `first`: as for `places`."""
        now = self.clock()
        tasks = []
        for index, spec in enumerate(specs, start=first):
            with _naming_task(index, 2 if first else len(specs)):
                tasks.append(self.resolve(spec, now, place=places[(spec.cwd, spec.queue)]))
        return tasks

    def build_from_template(self, template: dict[str, Any], now: int) -> NewTask:
        """A schedule's stored task template, as the task one of its fires inserts."""
        return self.resolve(TaskSpec.model_validate(template), now, fired=True)

    def resolve(
        self, spec: TaskSpec, now: int, *, fired: bool = False, place: Place | None = None
    ) -> NewTask:
        """A spec with every default filled in and every check done (checks that need the
        machine: cwd exists, argv fits execve; and its queue exists). A task `fired` by a
        schedule skips the cwd and queue checks, made when the schedule was added: a directory
        that vanished since shows as the task's spawn error, not as a lost fire. `place`: its
        cwd and queue, checked already."""
        cwd, queue = place or self._where_it_runs(spec, check=not fired)
        if spec.shell and len(spec.command) != 1:
            raise InvalidRequest("with shell=true, command must be one string for `sh -c`")
        _check_exec_size(spec.command, spec.env)
        run_at = None
        if spec.run_at is not None:
            run_at = int(spec.run_at.timestamp() * 1000)
        elif spec.delay:
            run_at = now + int(spec.delay * 1000)
        c = self.config
        q = queue.defaults if queue else {}
        return NewTask(
            command=spec.command,
            cwd=cwd,
            queue=spec.queue,
            node=spec.node,
            name=spec.name,
            shell=spec.shell,
            priority=spec.priority,
            env=spec.env,
            labels=spec.labels,
            retries=_first(spec.retries, q.get("retries"), c.retries),
            backoff=str(_first(spec.backoff, q.get("backoff"), c.backoff)),
            retry_delay=_first(spec.retry_delay, q.get("retry_delay"), c.retry_delay),
            max_delay=_first(spec.max_delay, q.get("max_delay"), c.max_delay),
            retry_on=spec.retry_on,
            no_retry_on=spec.no_retry_on,
            timeout=_first(spec.timeout, q.get("timeout"), None) or None,  # 0: no timeout
            kill_grace=_first(spec.kill_grace, q.get("kill_grace"), c.kill_grace),
            memory_limit=spec.memory_limit,
            run_at=run_at,
            key=spec.key,
            key_fingerprint=spec.fingerprint() if spec.key else None,
            after=spec.after,
            after_any=spec.after_any,
        )

    def _where_it_runs(self, spec: TaskSpec, *, check: bool) -> Place:
        """The task's working directory and queue; with `check`, both must exist."""
        cwd = spec.cwd or os.path.expanduser("~")
        queue = self.store.get_queue(spec.queue)
        if check:
            if spec.node:
                self._check_nodes({spec.node})
            _check_cwd_form(cwd)
            if self._runs_here(spec):
                _check_cwd(cwd)
            if queue is None:
                self._unknown_queue(spec.queue)
        return cwd, queue

    def _check_nodes(self, names: set[str]) -> None:
        """A task pinned to a node that does not exist would wait for ever."""
        if not names:
            return
        known = set(self.node_names()) if self.node_names else {self.config.node}
        unknown = sorted(names - known)
        if unknown:
            alone = "" if self.node_names else " (this daemon, alone on SQLite)"
            raise InvalidRequest(
                f"no node named {unknown[0]!r} (nodes: {', '.join(sorted(known))}{alone})"
            )

    def _runs_here(self, spec: TaskSpec) -> bool:
        """Whether the task will run on this machine, so that its cwd is checked here: on a
        cluster only when pinned to this node (elsewhere a missing cwd is the running node's
        spawn error, which names it)."""
        return not self.config.distributed or spec.node == self.config.node

    def _unknown_queue(self, name: str) -> NoReturn:
        """A typo must not make a queue free of its limits and pause: queues are created only
        by `queue set`."""
        known = ", ".join(q.name for q in self.store.list_queues())
        raise InvalidRequest(
            f"no queue named {name!r} (queues: {known}); create it with `taskctl queue set {name}`"
        )


@contextlib.contextmanager
def _naming_task(index: int, count: int) -> Iterator[None]:
    """An InvalidRequest about one task of several says which: `task 3: ...`."""
    try:
        yield
    except InvalidRequest as e:
        raise InvalidRequest((f"task {index + 1}: " if count > 1 else "") + e.message) from None


def _first(*values: Any) -> Any:
    """The first of the values that is set (task, then queue, then daemon default)."""
    return next((v for v in values if v is not None), None)


def _check_cwd_form(cwd: str) -> None:
    """What a working directory must be wherever it runs."""
    if not os.path.isabs(cwd):
        raise InvalidRequest(f"working directory {cwd!r} must be an absolute path")
    if "\0" in cwd:
        raise InvalidRequest("working directory must not contain NUL bytes")


def _check_cwd(cwd: str) -> None:
    """That it is one here (checked where the task will run)."""
    if not os.path.exists(cwd):
        raise InvalidRequest(f"working directory {cwd!r} does not exist")
    if not os.path.isdir(cwd):
        raise InvalidRequest(f"working directory {cwd!r} is not a directory")


def _check_exec_size(command: list[str], env: dict[str, str] | None) -> None:
    """Refuse what execve would refuse (E2BIG), with the reason, at submit time."""
    strings = [*command, *(f"{k}={v}" for k, v in (env or {}).items())]
    sizes = [len(os.fsencode(s)) for s in strings]  # the bytes execve gets
    if max(sizes) >= MAX_ARG_STRLEN:
        raise InvalidRequest(
            f"an argument or environment entry is {max(sizes)} bytes; "
            f"the limit for one is {MAX_ARG_STRLEN - 1}"
        )
    total = sum(size + 1 + 8 for size in sizes)  # bytes plus a pointer each
    limit = os.sysconf("SC_ARG_MAX") - 4096  # room for the TASKCTL_* variables we add
    if total > limit:
        raise InvalidRequest(
            f"command and environment take {total} bytes; execve accepts at most {limit} here"
        )
