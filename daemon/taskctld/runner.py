"""The runner: the daemon's side of the supervisors. It starts attempts, asks for them to be
stopped, and adopts what earlier daemons left running.

It never touches the database. What it learns (an attempt started, an attempt ended) becomes a
`Report` queued for the dispatcher, which applies reports in its next transaction; only after
that commit does the runner acknowledge the end to the supervisor (`forget`).

At start-up it launches a fresh supervisor for new work and connects to every live supervisor
an earlier daemon left behind: each says in its `hello` what still runs and what ended while no
daemon listened, and is then retired (it exits once its last task has ended). An open attempt
that no supervisor knows is settled from its run file: its final record if it has one; `lost` if
it started and its supervisor is gone (its command, if alive, is killed: nothing runs
unsupervised); `interrupted` (not counted) if it never started.

Trust: the runner proves itself to each supervisor with that supervisor's secret (`auth`, the
first frame) and accepts only a supervisor of its own uid. A supervisor of an earlier daemon that
is stopped (SIGSTOP) is continued and given time to answer: killing it would lose the outcomes it
has not reaped yet. Our own supervisor is pinged; one that stops answering makes `health`
unhealthy. Before an attempt whose supervisor died is recorded `lost` (and perhaps retried),
its cgroup is ended and seen empty, so no process of it outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taskctl.api import Outcome
from taskctl.environment import minimal_env
from taskctl.errors import TaskctlError
from taskctl.paths import Paths
from taskctl.units import now_ms
from taskctld import containment
from taskctld.procfs import ProcessId, read_boot_id, start_epoch_ms, stopped
from taskctld.store import AttemptEnd, AttemptRow, TaskRow
from taskctld.supervisor import (
    AttemptSpec,
    FrameReader,
    SupervisorInfo,
    known_supervisors,
    launch_supervisor,
    read_journal,
)
from taskctld.supervisor import messages as wire
from taskctld.supervisor.messages import Started

log = logging.getLogger("taskctld.runner")

HELLO_TIMEOUT = 10.0  # well under the CLI's 30 s wait for a starting daemon
RESTART_BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)  # seconds between tries for a new supervisor
PING_EVERY = 1.0  # seconds between pings of our supervisor
PING_LIMIT = 3.0  # seconds without an answer before health says it does not answer
Key = tuple[int, int]


@dataclass
class Ended:
    end: AttemptEnd
    counts: bool = True  # False: the attempt never ran (not started, interrupted)
    next: Key | None = None  # the held attempt the supervisor started in its slot


@dataclass
class Released:
    """A held attempt given back unstarted (by its supervisor, or because that is gone)."""

    task_id: int
    attempt: int
    token: int | None = None  # the hold it answers; None: whichever hold it is


@dataclass
class Unheld:
    """The supervisor's answer to taking a held attempt back: `taken`, it will not start;
    else it had started (its Started came before this)."""

    task_id: int
    attempt: int
    taken: bool
    token: int | None  # the hold it answers


Report = Started | Ended | Released | Unheld


@dataclass
class RunnerSettings:
    log_cap: int = 100 << 20


class Link(asyncio.Protocol):
    """One connection to one supervisor."""

    def __init__(self, runner: Runner, info: SupervisorInfo) -> None:
        self.runner = runner
        self.info = info
        self.reader = FrameReader()
        self.transport: asyncio.Transport | None = None
        self.hello: asyncio.Future[wire.Hello] = asyncio.get_running_loop().create_future()
        self.lost = False
        self.protocol = 0  # the supervisor's, from its hello

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _, uid, _ = struct.unpack("3i", creds)
        if uid != os.getuid():  # a socket planted by someone else: never hand it a command
            log.error("refusing supervisor socket %s: it belongs to uid %d", self.info.socket, uid)
            self.lost = True
            transport.close()
            return
        self.send(wire.Auth(self.info.token))

    def data_received(self, data: bytes) -> None:
        for frame in self.reader.feed(data):
            try:
                message = wire.decode_from_supervisor(frame)
            except wire.BadMessage as e:
                log.warning("ignoring a malformed supervisor message: %s", e)
                continue
            if isinstance(message, wire.Hello):
                self._on_hello(message)
            elif message is not None:
                self.runner.on_message(self, message)

    def _on_hello(self, hello: wire.Hello) -> None:
        """The first frame of a supervisor: says its protocol (0 when it predates the field;
        every version so far is read the same way). A later hello is ignored."""
        if self.hello.done():
            return
        self.protocol = hello.protocol
        if hello.protocol > wire.PROTOCOL:
            log.warning(
                "supervisor pid %d speaks protocol %d, newer than ours (%d)",
                self.info.pid,
                hello.protocol,
                wire.PROTOCOL,
            )
        self.hello.set_result(hello)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.hello.done():
            self.hello.set_exception(ConnectionError("the supervisor went away"))
        self.runner.on_link_lost(self)

    def send(self, message: wire.DaemonMessage) -> bool:
        if self.transport is None or self.lost:
            return False
        self.transport.write(wire.encode(message))
        return True

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Runner:
    def __init__(
        self,
        paths: Paths,
        settings: RunnerSettings,
        report: Callable[[Report], None],
        on_ready: Callable[[], None] = lambda: None,  # a new supervisor takes attempts
    ) -> None:
        self.paths = paths
        self.settings = settings
        self.report = report
        self.on_ready = on_ready
        self.current: Link | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.owner: dict[Key, Link] = {}  # attempts that have not ended, by supervisor
        self.held: dict[Key, Link] = {}  # held attempts not yet reported started or released
        self.unholding: dict[Key, tuple[Link, int]] = {}  # taken back, answer not yet heard
        self.links: list[Link] = []
        self.closing = False
        self.orphaned: dict[Key, dict[str, Any]] = {}  # journals of supervisors that died
        self.dead_journals: list[Path] = []  # to delete once their outcomes are committed
        self.problem: str | None = None  # why no supervisor takes attempts, when none does
        self.cgroup_home: Path | None = None  # where attempts' cgroups go (None: no cgroups)
        self.containment = containment.PROCESS_GROUP  # as our supervisor said in its hello
        self.ping_sent: float | None = None  # when our unanswered ping went out
        self.pinger: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    async def attach(self) -> list[wire.Hello]:
        """Launch our supervisor and connect to the ones earlier daemons left; returns their
        hellos (what they still run and what ended meanwhile)."""
        earlier = known_supervisors(self.paths.run)
        self._read_dead_journals({info.pid for info in earlier})
        self.cgroup_home, why = containment.home_for(self.paths.state)
        if self.cgroup_home is None:
            log.info("attempts are contained by process group: %s", why)
            self.containment = f"{containment.PROCESS_GROUP} ({why})"
        try:
            self.current = await self._start_own()
        except (OSError, ConnectionError, TimeoutError) as e:
            raise TaskctlError(f"cannot start the supervisor: {e or type(e).__name__}") from e
        # All earlier supervisors are asked at once: one that hangs costs HELLO_TIMEOUT, not
        # HELLO_TIMEOUT each.
        answers = await asyncio.gather(*(self._hello_of(old) for old in earlier))
        if any(answer is None for answer in answers):  # their journals settle what they ran
            self._read_dead_journals({link.info.pid for link in self.links})
        self._end_dead_cgroups()
        self.pinger = asyncio.get_running_loop().create_task(self._ping_forever())
        hellos = []
        for old, answer in zip(earlier, answers, strict=True):
            if answer is None:
                continue
            link, hello = answer
            link.send(wire.Retire())
            hellos.append(hello)
            for item in hello.running:
                self.owner[item.key] = link
            log.info(
                "adopted supervisor pid %d (protocol %d) with %d running task(s)",
                old.pid,
                hello.protocol,
                len(hello.running),
            )
        return hellos

    async def _hello_of(self, old: SupervisorInfo) -> tuple[Link, wire.Hello] | None:
        """Connect to an earlier daemon's supervisor and take its hello. None when it exited
        meanwhile (idle supervisors do) or does not answer: then it is treated as dead, so that
        nothing it runs goes unsupervised or runs twice."""
        if stopped(old.pid):  # killing it would lose what it has not reaped yet
            log.warning(
                "the supervisor of an earlier daemon (pid %d) is stopped; continuing it", old.pid
            )
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(old.pid, signal.SIGCONT)
        try:
            link = await self._connect(old)
            return link, await asyncio.wait_for(link.hello, HELLO_TIMEOUT)
        except (OSError, ConnectionError, TimeoutError) as e:
            log.info("the supervisor of an earlier daemon (pid %d) is gone: %r", old.pid, e)
            self._abandon(old)
            return None

    async def _start_own(self) -> Link:
        """Launch our supervisor and wait for its hello; one that does not answer in time is
        killed."""
        self.process, info = launch_supervisor(
            self.paths.run, self.paths.runtime / f"sup.{os.getpid()}.sock", self.cgroup_home
        )
        try:
            link = await self._connect(info)
            hello = await asyncio.wait_for(link.hello, HELLO_TIMEOUT)
        except BaseException:
            self._abandon(info)
            _remove_launch_files(info, self.paths.run)
            raise
        self.containment = hello.containment or self.containment
        self.ping_sent = None
        return link

    def _abandon(self, info: SupervisorInfo) -> None:
        """Drop a supervisor that did not say hello: close our link and kill it (if it is still
        that process). Its journal then settles what it ran; its commands are killed there."""
        for link in [link for link in self.links if link.info.pid == info.pid]:
            self.links.remove(link)
            link.close()
        if ProcessId(info.pid, info.start, info.boot_id).state(read_boot_id()) == "alive":
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(info.pid, signal.SIGKILL)

    def _end_dead_cgroups(self) -> None:
        """End every process left in the cgroups of supervisors that are gone, and remove those
        cgroups: what they ran is unsupervised (its outcome comes from their journals)."""
        if self.cgroup_home is None:
            return
        alive = {link.info.pid for link in self.links}
        if self.process is not None:  # ours, even before it said hello
            alive.add(self.process.pid)
        for cgroup in containment.leftover_supervisors(self.cgroup_home, alive):
            if not containment.end(cgroup):
                log.error("processes of %s did not end within 5 s of cgroup.kill", cgroup)

    def _read_dead_journals(self, alive: set[int]) -> None:
        for path in self.paths.run.glob("supervisor.*.journal"):
            pid = path.name.split(".")[1]
            if pid.isdigit() and int(pid) not in alive and path not in self.dead_journals:
                self.orphaned.update(read_journal(path))
                self.dead_journals.append(path)

    def committed(self) -> None:
        """Called after each dispatcher commit: outcomes read from dead supervisors' journals
        are in the store now, so the journals can go."""
        for path in self.dead_journals:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self.dead_journals.clear()
        self.orphaned.clear()

    async def _connect(self, info: SupervisorInfo) -> Link:
        loop = asyncio.get_running_loop()
        _, link = await loop.create_unix_connection(lambda: Link(self, info), info.socket)
        self.links.append(link)
        return link

    def close(self) -> None:
        """Stop listening. Supervisors and their tasks keep running; the next daemon adopts
        them (ours sees the connection close, and exits once it has nothing left to run)."""
        self.closing = True
        if self.pinger is not None:
            self.pinger.cancel()
        for link in self.links:
            link.close()

    # -- starting and stopping attempts ---------------------------------------------------------

    def start(self, task: TaskRow, env: dict[str, str] | None) -> None:
        """Hand one claimed attempt to our supervisor."""
        key = (task.id, task.attempts)
        link = self.current
        if link is None or not link.send(wire.Spawn(self.spec_for(task, env))):
            self.report(_interrupted(key, "the supervisor is not available"))
            return
        self.owner[key] = link

    def hold(self, task: TaskRow, env: dict[str, str] | None, after: Key, token: int) -> bool:
        """Hand a queued task (as its next attempt) to our supervisor, to start in the slot of
        `after` when that ends. It stays queued in the store until its start is reported."""
        spec = self.spec_for(task, env, number=task.attempts + 1)
        link = self.current
        if link is None or not link.send(wire.Spawn(spec, after, token)):
            return False
        self.held[(task.id, spec.attempt)] = link
        return True

    def runs_on_current(self, key: Key) -> bool:
        """Whether the attempt runs under our current supervisor (holds go only there)."""
        return self.current is not None and self.owner.get(key) is self.current

    def unhold(self, key: Key, token: int) -> None:
        """Take a held attempt back (it may have started meanwhile: its report says so)."""
        link = self.held.pop(key, None)
        if link is not None:
            link.send(wire.Unhold(*key, token))
            self.unholding[key] = (link, token)

    def spec_for(
        self, task: TaskRow, env: dict[str, str] | None, number: int | None = None
    ) -> AttemptSpec:
        number = task.attempts if number is None else number
        argv = ["/bin/sh", "-c", task.command[0]] if task.shell else list(task.command)
        full_env = dict(env) if env is not None else minimal_env()
        full_env["TASKCTL_TASK_ID"] = str(task.id)
        full_env["TASKCTL_ATTEMPT"] = str(number)
        full_env["TASKCTL_QUEUE"] = task.queue
        base = f"{task.id}.{number}"
        return AttemptSpec(
            task_id=task.id,
            attempt=number,
            argv=argv,
            cwd=task.cwd,
            env=full_env,
            stdout_path=str(self.paths.logs / f"{base}.out"),
            stderr_path=str(self.paths.logs / f"{base}.err"),
            timeout=task.timeout,
            kill_grace=task.kill_grace,
            memory_limit=task.memory_limit,
            log_cap=self.settings.log_cap,
        )

    def stop(self, task_id: int, attempt: int, kind: str) -> bool:
        """Ask the attempt's supervisor to end it: `cancel` or `interrupt` (run again later)."""
        link = self.owner.get((task_id, attempt))
        return link is not None and link.send(wire.Signal(task_id, attempt, kind))

    def interrupt_all(self) -> None:
        """End every running attempt (`daemon stop --kill`): each is queued again."""
        for task_id, attempt in list(self.owner):
            self.stop(task_id, attempt, "interrupt")

    def ready(self) -> bool:
        """Whether a supervisor takes new attempts now (ours said hello and is connected)."""
        return self.current is not None and not self.current.lost

    def running_count(self) -> int:
        return len(self.owner)

    def forget(self, task_id: int, attempt: int) -> None:
        """The attempt's end is committed: its supervisor may forget it."""
        link = self.owner.pop((task_id, attempt), None) or self.current
        if link is not None:
            link.send(wire.Ack(task_id, attempt))

    # -- is our supervisor answering? -----------------------------------------------------------

    async def _ping_forever(self) -> None:
        while not self.closing:
            await asyncio.sleep(PING_EVERY)
            link = self.current
            if link is not None and self.ping_sent is None and link.send(wire.Ping()):
                self.ping_sent = time.monotonic()

    def _on_pong(self, link: Link) -> None:
        if link is self.current:
            self.ping_sent = None

    def unanswered(self) -> str | None:
        """Why our supervisor is not doing its job though it is connected, if it is not."""
        link, sent = self.current, self.ping_sent
        if link is None or sent is None or time.monotonic() - sent < PING_LIMIT:
            return None
        state = " (it is stopped)" if stopped(link.info.pid) else ""
        return f"the supervisor (pid {link.info.pid}) does not answer{state}"

    # -- hearing from supervisors ---------------------------------------------------------------

    def on_message(self, link: Link, message: wire.SupervisorMessage) -> None:
        """One message from a supervisor after its hello, to its one handler."""
        if isinstance(message, wire.Started):
            self._on_started(link, message)
        elif isinstance(message, wire.Done):
            self._on_done(message)
        elif isinstance(message, wire.Released):
            self._on_released(message)
        elif isinstance(message, wire.Unheld):
            self._on_unheld(message)
        elif isinstance(message, wire.Pong):
            self._on_pong(link)

    def _on_started(self, link: Link, message: wire.Started) -> None:
        self.held.pop(message.key, None)
        self.owner.setdefault(message.key, link)  # a held attempt becomes this link's to stop
        self.report(message)

    def _on_done(self, message: wire.Done) -> None:
        self.held.pop(message.final.key, None)
        self.report(ended_from_final(message.final, message.next))

    def _on_released(self, message: wire.Released) -> None:
        key = (message.task_id, message.attempt)
        self.held.pop(key, None)
        self.report(Released(*key, token=_token(message.hold)))

    def _on_unheld(self, message: wire.Unheld) -> None:
        key = (message.task_id, message.attempt)
        self.unholding.pop(key, None)
        self.report(Unheld(*key, message.taken, _token(message.hold)))

    def on_link_lost(self, link: Link) -> None:
        """A supervisor is gone. If we were not closing, what it ran is settled from run files."""
        if link in self.links:
            self.links.remove(link)
        if self.closing:
            return
        if link is self.current:
            log.error("our supervisor (pid %d) died; starting a new one", link.info.pid)
            self.current = None
            self.problem = "the supervisor died; starting a new one"
            asyncio.get_running_loop().create_task(self._replace_supervisor())
        self._read_dead_journals({other.info.pid for other in self.links})
        self._end_dead_cgroups()
        for key in [k for k, owner in self.owner.items() if owner is link]:
            self.report(self.settle(key))
        # Held attempts it may have started without our hearing of it: its journal says;
        # the others come back to the queue.
        for key in [k for k, holder in self.held.items() if holder is link]:
            del self.held[key]
            self.report(self.settle(key) if key in self.orphaned else Released(*key))
        for key, (holder, token) in list(self.unholding.items()):
            if holder is link:  # taken back, unanswered: its journal says if it started
                del self.unholding[key]
                if key in self.orphaned:
                    self.report(self.settle(key))
                self.report(Unheld(*key, key not in self.orphaned, token))

    async def _replace_supervisor(self) -> None:
        """Our supervisor died (the daemon reaps its process): start another, trying again with
        a growing pause until one says hello, then tell the dispatcher. Meanwhile `ready()` is
        false, so the dispatcher claims nothing, and health says why."""
        for attempt in itertools.count():
            if self.closing:
                return
            try:
                link = await self._start_own()
            except (OSError, ConnectionError, TimeoutError, TaskctlError) as e:
                pause = RESTART_BACKOFF[min(attempt, len(RESTART_BACKOFF) - 1)]
                self.problem = f"cannot start a supervisor ({e or type(e).__name__}); retrying"
                log.error("cannot start a new supervisor: %r; trying again in %.1fs", e, pause)
                await asyncio.sleep(pause)
                continue
            if self.closing:
                link.close()
                return
            self.current, self.problem = link, None
            self.on_ready()
            return

    # -- settling attempts nobody runs any more -------------------------------------------------

    def recover(self, attempts: list[AttemptRow], hellos: list[wire.Hello]) -> None:
        """Settle the open attempts of the store once every supervisor has said hello."""
        done = {final.key: final for hello in hellos for final in hello.done}
        open_keys = set()
        for attempt in attempts:
            key = (attempt.task_id, attempt.number)
            open_keys.add(key)
            if key in self.owner:
                continue  # still running under an adopted supervisor
            if key in done:
                self.report(ended_from_final(done[key]))
            else:
                self.report(self.settle(key))
        # What supervisors ran that the store never saw start (held attempts that started
        # while no daemon recorded it): reported as news, so the dispatcher claims them for
        # the attempt they are, or stops them. Ends already recorded are acknowledged there.
        for hello in hellos:
            for item in hello.running:
                if item.key not in open_keys:
                    self.report(item)
        for key, final in done.items():
            if key not in open_keys:
                self.report(ended_from_final(final))
        # And what dead supervisors' journals say about such attempts (they exit once idle
        # without a daemon, keeping the journal while an outcome is unacknowledged).
        known = open_keys | done.keys() | self.owner.keys()
        for key in [k for k in self.orphaned if k not in known]:
            self.report(self.settle(key))

    def settle(self, key: Key) -> Ended:
        """The end of an attempt whose supervisor is gone, from that supervisor's journal."""
        self.owner.pop(key, None)
        records = self.orphaned.get(key, {})
        if "final" in records:
            return ended_from_final(wire.Final.from_wire(records["final"]))
        if "started" not in records:
            return _interrupted(key, "never started: the daemon stopped before its command ran")
        _kill_orphan(records["started"], records.get("ident"))
        return Ended(
            AttemptEnd(
                *key,
                Outcome.LOST,
                ended_at=now_ms(),
                error="its supervisor died while it ran; the outcome is unknown",
            )
        )


def _remove_launch_files(info: SupervisorInfo, run_dir: Path) -> None:
    """What a supervisor that never said hello (killed, or unable to write on a full disk)
    may have left: the socket we bound for it and its half-written identity file."""
    for leftover in (Path(info.socket), run_dir / f".supervisor.{info.pid}.tmp"):
        with contextlib.suppress(OSError):
            leftover.unlink()


def _interrupted(key: Key, why: str) -> Ended:
    return Ended(AttemptEnd(*key, Outcome.INTERRUPTED, ended_at=now_ms(), error=why), counts=False)


def _kill_orphan(started: dict[str, Any], ident: dict[str, Any] | None) -> None:
    """A command whose supervisor died is unsupervised: end its process group, if that pid is
    still the same process. Identity is the start time in ticks when the journal has it (after
    a second of running), else a start within two seconds of when the supervisor started it."""
    pid, boot_id = int(started["pid"]), str(started.get("boot_id"))
    if boot_id != read_boot_id():
        return
    if started.get("cgroup"):  # no pid to trust: the cgroup holds exactly its processes
        containment.end(Path(started["cgroup"]))
        return
    if ident is not None:
        same = ProcessId(pid, int(ident["start"]), boot_id).state(boot_id) == "alive"
    else:
        began = start_epoch_ms(pid)
        same = began is not None and abs(began - int(started["started_at"])) <= 2000
    if same:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def ended_from_final(final: wire.Final, following: Key | None = None) -> Ended:
    """A supervisor's final record as a report for the dispatcher; `following`: the held
    attempt it started in the slot."""
    if final.outcome == "not_started":
        return _interrupted(final.key, final.error or "never started")
    outcome = Outcome(final.outcome)
    return Ended(
        AttemptEnd(
            *final.key,
            outcome,
            ended_at=final.ended_at or now_ms(),
            exit_code=final.exit_code,
            signal=final.signal,
            error=final.error,
            max_rss=final.max_rss,
            cpu_user=final.cpu_user,
            cpu_system=final.cpu_system,
            cause=final.cause,
            started_at=final.started_at,
        ),
        counts=outcome is not Outcome.INTERRUPTED,
        next=following,
    )


def _token(hold: Any) -> int | None:
    return int(hold) if hold is not None else None
