"""The daemon proper: builds the object graph, recovers, serves, and shuts down.

`compose` is the composition root: the one place objects are built and given to each other,
by constructor. `_serve` reads like the daemon's table of contents: build, adopt what the last
daemon left running, serve the socket, start the dispatch loop, wait for a stop request or
signal, stop. The first SIGTERM or SIGINT stops gracefully (running tasks go on and are adopted
by the next daemon); a second one forces.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import uvicorn

from taskctl.errors import StorageFull, TaskctlError
from taskctl.paths import Paths
from taskctld import logfile
from taskctld.clock import SYSTEM_CLOCK, Clock
from taskctld.cluster import (
    ClusterStops,
    Heartbeat,
    Listener,
    Node,
    NodeSettings,
    Rescuer,
    Shipper,
    Tailer,
)
from taskctld.config import Config
from taskctld.dispatcher import Dispatcher, Limits
from taskctld.events import AttemptEnds, EventHub
from taskctld.lifecycle import Lifecycle
from taskctld.metrics import Metrics
from taskctld.reports import Reports
from taskctld.runner import Runner, RunnerSettings
from taskctld.scheduler import Scheduler, Triggers
from taskctld.server import create_app, start_server, stop_server
from taskctld.services import Services
from taskctld.services.daemon import DaemonService
from taskctld.services.feed import EventFeed
from taskctld.services.health import HealthService
from taskctld.services.logs import LogService
from taskctld.services.nodes import NodeService
from taskctld.services.queues import QueueService
from taskctld.services.resolve import Resolver
from taskctld.services.retention import RetentionService
from taskctld.services.schedules import ScheduleService, fire_on_burst
from taskctld.services.streams import Streams
from taskctld.services.submit import SubmitService
from taskctld.services.tasks import Stopper as TaskStops
from taskctld.services.tasks import TaskService
from taskctld.store import DistributedStore, NodeStore, Store
from taskctld.store.sqlite import SqliteStore

log = logging.getLogger("taskctld")

READY = "ok"  # what the starting process hears when the daemon is ready
ROOM_PROBE = 4096  # bytes the state folder must take before the daemon starts


def run(
    paths: Paths, *, ready_fd: int | None, lock_fd: int | None = None, store: str | None = None
) -> int:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s taskctld[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = Config.load(paths.config_file, store)
    except TaskctlError as e:  # the user's config.toml: a usage error (exit 2), not a fault
        if ready_fd is None:
            print(f"taskctld: {e.message}", file=sys.stderr)
        return _fail(ready_fd, lock_fd, e.message, e.exit_code)
    try:
        return asyncio.run(_serve(paths, config, ready_fd))
    except StorageFull as e:
        message = f"{e.message} ({paths.state}); free some space, then start it again"
        log.error("cannot start: %s", message)
        return _fail(ready_fd, lock_fd, message, StorageFull.exit_code)
    except TaskctlError as e:
        log.error("%s", e.message)
        return _fail(ready_fd, lock_fd, e.message)
    except Exception as e:
        log.exception("taskctld failed")
        message = f"failed: {type(e).__name__}: {e} (see {paths.daemon_log})"
        return _fail(ready_fd, lock_fd, message)


def _fail(ready_fd: int | None, lock_fd: int | None, message: str, code: int = 1) -> int:
    """A start that failed: let go of the instance lock first, so that a start the moment
    the starter hears of it (once space is freed, say) is not taken for a running daemon."""
    if lock_fd is not None:
        with contextlib.suppress(OSError):
            os.close(lock_fd)
    _tell_starter(ready_fd, message, code)
    return code


@dataclass(frozen=True)
class Core:
    """What the services stand on: the store, and what drives tasks through it."""

    store: Store
    hub: EventHub
    metrics: Metrics
    lifecycle: Lifecycle
    resolver: Resolver
    scheduler: Scheduler
    runner: Runner
    ends: AttemptEnds
    dispatcher: Dispatcher
    triggers: Triggers
    stops: TaskStops  # the runner, or on a cluster what also reaches other nodes
    node: Node | None  # on a shared store: heartbeat, rescue, notifications


def compose(
    paths: Paths,
    config: Config,
    started: float,
    shutdown: asyncio.Event,
    clock: Clock = SYSTEM_CLOCK,
) -> tuple[Core, Services]:
    """The composition root: every object of the daemon, built in order, each given its
    collaborators by its constructor (nothing is wired afterwards). `started`: monotonic
    time of the start; `shutdown`: set to stop; `clock`: what time it is (epoch ms) and wake-ups, for every time decision."""
    core = _core(paths, config, started, clock)
    return core, _services(core, paths, config, started, shutdown, clock)


def _core(paths: Paths, config: Config, started: float, clock: Clock) -> Core:
    """The store, and what drives tasks through it, each after what it needs."""
    store = open_store(paths, config)  # migrations run
    hub = EventHub()
    if config.distributed:  # (hub and metrics hear the cluster's event log: see _node)
        metrics = Metrics(store, None, started, clock.now, node=config.node)
    else:
        metrics = Metrics(store, paths.database, started, clock.now)
        store.on_commit(hub.publish, hub.publish_span)  # after each commit, in this order
        store.on_commit(metrics.on_events, metrics.on_span)
    metrics.load()
    lifecycle = Lifecycle(store)
    resolver = Resolver(store, config, clock.now, _node_names(store, config))
    scheduler = Scheduler(
        store, resolver.build_from_template, paths.state / "changes",
        lifecycle=lifecycle, on_fire=[metrics.on_fire],
    )  # fmt: skip
    reports = Reports()  # the runner's to the dispatcher (each needs the other)
    runner = Runner(
        paths,
        RunnerSettings(log_cap=config.log_cap, node=config.node if config.distributed else None),
        report=reports.send,
        on_ready=reports.ready,
    )
    ends = AttemptEnds()
    on_end = [metrics.on_attempt_end, ends.note]
    shipper = None
    if config.distributed:  # output goes to the store, for the other nodes to show
        shipper = Shipper(
            cast(DistributedStore, store), paths.logs, config.ship_cap, config.node,
            runner.running_keys,
        )  # fmt: skip
        on_end.append(shipper.ended)
    limits = Limits(
        concurrency=config.concurrency, node_limits=config.node_limits,
        served=frozenset(config.queues) if config.queues is not None else None,
    )  # fmt: skip
    dispatcher = Dispatcher(
        store, runner, limits, lifecycle=lifecycle, clock=clock, reports=reports,
        scheduler=scheduler, on_attempt_end=on_end,
        accepting=not config.hold, hold_ahead=not config.distributed,
    )  # fmt: skip
    triggers = Triggers(fire_on_burst(dispatcher, scheduler))
    stops: TaskStops = runner
    node = None
    if shipper is not None:
        nodes = cast(DistributedStore, store)
        node = _node(config, nodes, lifecycle, hub, metrics, dispatcher, runner, shipper)
        stops = ClusterStops(runner, nodes, config.node)
    return Core(
        store, hub, metrics, lifecycle, resolver, scheduler, runner, ends, dispatcher, triggers,
        stops, node,
    )  # fmt: skip


def _node_names(store: Store, config: Config) -> Callable[[], list[str]] | None:
    """What names the nodes a task may be pinned to (None: a daemon alone on SQLite)."""
    if not config.distributed:
        return None
    nodes = cast(DistributedStore, store)
    return lambda: [n.name for n in nodes.nodes()]


def _announcer(core: Core, config: Config) -> Callable[[], None]:
    """What tells the other nodes that queue settings changed (nothing, alone on SQLite)."""
    if not config.distributed:
        return lambda: None
    nodes = cast(NodeStore, core.store)
    return lambda: nodes.tell({"queues": True})


def open_store(paths: Paths, config: Config) -> Store:
    """SQLite in the home, or the cluster's PostgreSQL (imported only then)."""
    if config.store is None:
        return SqliteStore(paths.database, durability=config.durability)
    from taskctld.store.postgres import PostgresStore

    return PostgresStore(config.store, node=config.node, lease_ms=int(config.lease * 1000))


def _node(
    config: Config,
    store: DistributedStore,
    lifecycle: Lifecycle,
    hub: EventHub,
    metrics: Metrics,
    dispatcher: Dispatcher,
    runner: Runner,
    shipper: Shipper,
) -> Node:
    """This daemon as a node of a cluster (see `taskctld.cluster`)."""
    from taskctld.store.postgres import PostgresStore
    from taskctld.store.postgres.notices import listen

    url = config.store
    assert url is not None and isinstance(store, PostgresStore)
    loop = asyncio.get_running_loop()
    settings = NodeSettings(config.node, config.lease, config.concurrency, config.queues)
    tailer = Tailer(store, [hub.publish, metrics.on_events, dispatcher.note_events])
    store.on_commit(tailer.committed, tailer.poke)
    rescuer = Rescuer(store, store, lifecycle, dispatcher.cycle)

    def heartbeat_store() -> DistributedStore:
        return PostgresStore(url, node=config.node, lease_ms=int(config.lease * 1000))

    node = Node(
        settings,
        store,
        Heartbeat(heartbeat_store, settings, loop, lambda why: node.lost_lease(why)),
        Listener(lambda stop: listen(url, stop), loop, lambda message: node.heard(message)),
        tailer,
        rescuer,
        runner,
        dispatcher.load_queues,
        dispatcher.look_again,
        dispatcher.slots_freed,
        dispatcher.work_in,
        shipper,
    )
    return node


def _services(
    core: Core, paths: Paths, config: Config, started: float, shutdown: asyncio.Event, clock: Clock
) -> Services:
    """The use cases over the core, each given the parts it needs."""
    streams = Streams()
    tasks = TaskService(
        core.store, core.dispatcher, core.lifecycle, core.stops, core.hub, core.ends
    )
    queues = QueueService(core.store, core.dispatcher, core.metrics, _announcer(core, config))
    health = HealthService(
        core.store, core.dispatcher, core.runner, core.scheduler, core.triggers, core.metrics,
        queues, streams, config, paths, started, clock.now,
    )  # fmt: skip
    return Services(
        tasks=tasks,
        submissions=SubmitService(
            core.store, core.dispatcher, core.lifecycle, core.resolver, config, clock.now
        ),
        logs=LogService(
            tasks,
            core.hub,
            paths.logs,
            streams,
            shipped=cast(DistributedStore, core.store) if config.distributed else None,
            node=config.node if config.distributed else None,
        ),
        retention=RetentionService(
            core.store, core.dispatcher, core.metrics, config, paths, clock.now
        ),
        feed=EventFeed(core.store, core.hub, streams),
        schedules=ScheduleService(
            core.store,
            core.dispatcher,
            core.triggers,
            core.resolver,
            clock.now,
            node=config.node if config.distributed else None,
        ),
        queues=queues,
        health=health,
        daemon=DaemonService(core.dispatcher, core.runner, shutdown),
        nodes=NodeService(
            cast(NodeStore, core.store) if config.distributed else None, core.dispatcher, config
        ),
    )


async def _serve(paths: Paths, config: Config, ready_fd: int | None) -> int:
    loop = asyncio.get_running_loop()
    check_room(paths.run)
    shutdown = asyncio.Event()
    core, services = compose(paths, config, time.monotonic(), shutdown)
    install_child_reaper(loop)
    if core.node is not None:
        core.node.join()
    await _recover(core, paths)
    if core.node is not None:
        core.node.start()
    services.schedules.arm_triggers()
    sock = bind_control_socket(paths.socket)
    app = create_app(services)
    server = await start_server(app, sock, config.request_timeout, config.max_connections)
    background = [
        asyncio.create_task(core.dispatcher.run()),
        asyncio.create_task(_maintain(services.retention)),
    ]
    if ready_fd is not None:  # detached: our stdout and stderr are taskctld.log
        rotation = logfile.keep_rotating(paths.daemon_log, config.log_size)
        background.append(asyncio.create_task(rotation))
    core.dispatcher.wake()
    install_signal_handlers(loop, shutdown)
    _tell_starter(ready_fd, READY)
    log.info(
        "taskctld ready on %s (pid %d, concurrency %d)",
        paths.socket,
        os.getpid(),
        config.concurrency,
    )
    await shutdown.wait()
    await _stop(core, services.daemon, server, background)
    with contextlib.suppress(FileNotFoundError):
        paths.socket.unlink()
    return 0


async def _recover(core: Core, paths: Paths) -> None:
    """Launch our supervisor, connect to earlier ones, settle every open attempt of the
    store, and take the dispatcher's counts."""
    try:
        hellos = await core.runner.attach()
    except TaskctlError:
        check_room(paths.run)  # a supervisor that could not write its files: say so
        raise
    core.runner.recover(core.store.open_attempts(), hellos)
    core.dispatcher.load()


STOPPING = {
    "leave": "running tasks go on; the next daemon adopts them",
    "drain": "waiting for running tasks",
    "kill": "ending running tasks; they will run again",
}


async def _stop(
    core: Core,
    stopping: DaemonService,
    server: uvicorn.Server,
    background: list[asyncio.Task[None]],
) -> None:
    """Wind down by the stop's mode, end streams and waits, stop serving, commit what
    supervisors reported in the last moments, and close everything."""
    log.info("stopping (%s)", STOPPING[stopping.stop_mode])
    await stopping.wind_down()
    core.hub.close()  # streams end and waits answer, so no client holds the stop
    await stop_server(server)
    for task in background:
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await background[0]  # the dispatcher's loop
    with contextlib.suppress(TaskctlError):
        core.dispatcher.cycle()  # commit what supervisors reported in the last moments
    core.triggers.close()
    if core.node is not None:
        core.node.close()
    core.runner.close()
    core.store.close()


PRUNE_FIRST, PRUNE_EVERY = 60.0, 3600.0  # seconds


async def _maintain(retention: RetentionService) -> None:
    """Retention, a minute after start and then every hour (never a tight loop)."""
    await asyncio.sleep(PRUNE_FIRST)
    while True:
        try:
            removed = await retention.prune()
            if removed["tasks"] or removed["events"]:
                log.info(
                    "pruned %(tasks)d finished task(s), %(log_files)d log file(s), %(events)d event(s)",
                    removed,
                )
        except TaskctlError as e:
            log.warning("pruning failed: %s", e.message)
        await asyncio.sleep(PRUNE_EVERY)


def install_child_reaper(loop: asyncio.AbstractEventLoop) -> None:
    """Our supervisor is our child: reap it when it exits (no zombies)."""

    def reap() -> None:
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass

    loop.add_signal_handler(signal.SIGCHLD, reap)


def bind_control_socket(path: Path) -> socket.socket:
    """Bind the API socket. We hold the instance lock, so a file already there is stale. The
    umask (077) applies at bind, so the socket is never open to others, not even briefly."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(128)
    sock.setblocking(False)
    return sock


def install_signal_handlers(loop: asyncio.AbstractEventLoop, shutdown: asyncio.Event) -> None:
    """First SIGTERM/SIGINT: graceful stop. Second: exit now (tasks still survive: they run
    under the supervisor, not under the daemon)."""

    def on_signal(sig: signal.Signals) -> None:
        if shutdown.is_set():
            log.warning("second %s: exiting now (tasks go on under their supervisor)", sig.name)
            os._exit(1)
        shutdown.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)


def check_room(folder: Path) -> None:
    """Raise StorageFull unless `folder` takes a page of data. Checked before the daemon opens
    its store or starts a supervisor (which must write its identity file there), so that a
    full disk is refused in one clear line instead of half-way through a start."""
    probe = folder / f".room.{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(bytes(ROOM_PROBE))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFull(f"the state folder is out of space: {e.strerror}") from None
        raise
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def _tell_starter(ready_fd: int | None, message: str, code: int = 1) -> None:
    """Tell the process that started us (see `__main__.daemonize`): "ok", or the exit code it
    should end with and why, as `CODE:MESSAGE`."""
    if ready_fd is None:
        return
    with contextlib.suppress(OSError):
        os.write(ready_fd, (message if message == READY else f"{code}:{message}").encode())
        os.close(ready_fd)
