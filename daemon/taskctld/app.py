"""The daemon proper: builds the object graph, recovers, serves, and shuts down.

`run` reads like the daemon's table of contents: open the store, adopt what the last daemon left
running, start the dispatch loop, serve the socket, wait for a stop request or signal, stop.
The first SIGTERM or SIGINT stops gracefully (running tasks go on and are adopted by the next
daemon); a second one forces.
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
from pathlib import Path

import uvicorn

from taskctl.errors import StorageFull, TaskctlError
from taskctl.paths import Paths
from taskctld import logfile
from taskctld.config import Config
from taskctld.dispatcher import Dispatcher, Limits
from taskctld.events import EventHub
from taskctld.runner import Runner, RunnerSettings
from taskctld.server import PeerCheckedProtocol, create_app
from taskctld.service import Service
from taskctld.store.sqlite import SqliteStore

log = logging.getLogger("taskctld")

# At a stop, event streams end and waits answer at once; a `logs -f` (or any other request
# still going) is cut after this many seconds, so no client can hold the daemon.
STREAMS_CUT_AFTER = 2
READY = "ok"  # what the starting process hears when the daemon is ready
ROOM_PROBE = 4096  # bytes the state folder must take before the daemon starts


def run(paths: Paths, *, ready_fd: int | None, lock_fd: int | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s taskctld[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = Config.load(paths.config_file)
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


async def _serve(paths: Paths, config: Config, ready_fd: int | None) -> int:
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    check_room(paths.run)
    store = SqliteStore(paths.database, durability=config.durability)
    hub = EventHub()
    store.on_commit(hub.publish, hub.publish_span)
    # Each needs the other: the runner reaches the dispatcher through closures (it reports
    # nothing before `attach`, by when the dispatcher exists).
    runner = Runner(
        paths,
        RunnerSettings(log_cap=config.log_cap),
        report=lambda report: dispatcher.report(report),
        on_ready=lambda: dispatcher.wake(),
    )
    dispatcher = Dispatcher(store, runner, Limits(concurrency=config.concurrency))
    install_child_reaper(loop)
    try:
        hellos = await runner.attach()
    except TaskctlError:
        check_room(paths.run)  # a supervisor that could not write its files: say so
        raise
    runner.recover(store.open_attempts(), hellos)
    dispatcher.load()

    shutdown = asyncio.Event()
    service = Service(store, dispatcher, runner, hub, config, paths, started, shutdown)
    service.arm_triggers()
    sock = bind_control_socket(paths.socket)
    PeerCheckedProtocol.request_timeout = config.request_timeout
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(service),
            http=PeerCheckedProtocol,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            date_header=False,
            timeout_keep_alive=5,
            timeout_graceful_shutdown=STREAMS_CUT_AFTER,
            limit_concurrency=config.max_connections,
        )
    )
    server.config.load()
    server.lifespan = server.config.lifespan_class(server.config)
    await server.startup(sockets=[sock])
    dispatch = asyncio.create_task(dispatcher.run())
    maintenance = asyncio.create_task(_maintain(service))
    if ready_fd is not None:  # detached: our stdout and stderr are taskctld.log
        rotation = asyncio.create_task(logfile.keep_rotating(paths.daemon_log, config.log_size))
    dispatcher.wake()
    install_signal_handlers(loop, shutdown)
    _tell_starter(ready_fd, READY)
    log.info(
        "taskctld ready on %s (pid %d, concurrency %d)",
        paths.socket,
        os.getpid(),
        config.concurrency,
    )

    await shutdown.wait()
    log.info(
        "stopping (%s)",
        {
            "leave": "running tasks go on; the next daemon adopts them",
            "drain": "waiting for running tasks",
            "kill": "ending running tasks; they will run again",
        }[service.stop_mode],
    )
    await service.wind_down()
    hub.close()  # streams end and waits answer, so no client holds the stop
    server.should_exit = True
    await server.shutdown()
    dispatch.cancel()
    maintenance.cancel()
    if ready_fd is not None:
        rotation.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await dispatch
    with contextlib.suppress(TaskctlError):
        dispatcher.cycle()  # commit what supervisors reported in the last moments
    service.triggers.close()
    runner.close()
    store.close()
    with contextlib.suppress(FileNotFoundError):
        paths.socket.unlink()
    return 0


PRUNE_FIRST, PRUNE_EVERY = 60.0, 3600.0  # seconds


async def _maintain(service: Service) -> None:
    """Retention, a minute after start and then every hour (never a tight loop)."""
    await asyncio.sleep(PRUNE_FIRST)
    while True:
        try:
            removed = await service.prune()
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
