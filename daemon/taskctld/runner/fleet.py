"""The supervisors this daemon talks to: ours, which takes new work (launched at attach, and
again whenever it dies), and those earlier daemons left running, adopted and retired.

A supervisor of an earlier daemon that is stopped (SIGSTOP) is continued and given time to
answer: killing it would lose the outcomes it has not reaped yet. One that does not answer is
killed and its journal read instead. Before an attempt whose supervisor died is recorded `lost`
(and perhaps retried), the cgroups of dead supervisors are ended and seen empty, so no process
of it outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from taskctl.errors import TaskctlError
from taskctl.paths import Paths
from taskctld import containment
from taskctld.procfs import ProcessId, read_boot_id, stopped
from taskctld.runner.journals import DeadJournals
from taskctld.runner.link import Link, Listener
from taskctld.runner.watch import PingWatch
from taskctld.supervisor import SupervisorInfo, known_supervisors, launch_supervisor
from taskctld.supervisor import messages as wire

log = logging.getLogger("taskctld.runner")

HELLO_TIMEOUT = 10.0  # well under the CLI's 30 s wait for a starting daemon
RESTART_BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)  # seconds between tries for a new supervisor


class Fleet:
    """Owns the links: `current` (ours, None while there is none), every link open, and why
    no supervisor takes work when none does (`problem`). Links report to `listener`; a
    replacement supervisor that says hello calls `on_ready`."""

    def __init__(
        self,
        paths: Paths,
        journals: DeadJournals,
        listener: Listener,
        on_ready: Callable[[], None],
    ) -> None:
        self.paths = paths
        self.journals = journals
        self.listener = listener
        self.on_ready = on_ready
        self.current: Link | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.links: list[Link] = []
        self.closing = False
        self.problem: str | None = None  # why no supervisor takes attempts, when none does
        self.cgroup_home: Path | None = None  # where attempts' cgroups go (None: no cgroups)
        self.containment = containment.PROCESS_GROUP  # as our supervisor said in its hello
        self.watch = PingWatch(lambda: self.current)

    async def attach(self) -> list[tuple[Link, wire.Hello]]:
        """Launch our supervisor and connect to the ones earlier daemons left; returns those
        that answered, with their hellos (what they still run and what ended meanwhile),
        each told to retire."""
        earlier = known_supervisors(self.paths.run)
        self.journals.read({info.pid for info in earlier})
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
            self.journals.read({link.info.pid for link in self.links})
        self._end_dead_cgroups()
        self.watch.start()
        adopted = []
        for old, answer in zip(earlier, answers, strict=True):
            if answer is None:
                continue
            link, hello = answer
            link.send(wire.Retire())
            adopted.append(answer)
            log.info(
                "adopted supervisor pid %d (protocol %d) with %d running task(s)",
                old.pid,
                hello.protocol,
                len(hello.running),
            )
        return adopted

    def close(self) -> None:
        """Stop listening. Supervisors and their tasks keep running; the next daemon adopts
        them (ours sees the connection close, and exits once it has nothing left to run)."""
        self.closing = True
        self.watch.stop()
        for link in self.links:
            link.close()

    def lost(self, link: Link) -> bool:
        """A supervisor is gone: ours is replaced, and the journals of dead supervisors are
        read (their cgroups ended) to settle what it ran. False when we are closing (then
        there is nothing to settle)."""
        if link in self.links:
            self.links.remove(link)
        if self.closing:
            return False
        if link is self.current:
            log.error("our supervisor (pid %d) died; starting a new one", link.info.pid)
            self.current = None
            self.problem = "the supervisor died; starting a new one"
            asyncio.get_running_loop().create_task(self._replace_supervisor())
        self.journals.read({other.info.pid for other in self.links})
        self._end_dead_cgroups()
        return True

    # -- launching and adopting -----------------------------------------------------------------

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
        self.watch.fresh()
        return link

    async def _replace_supervisor(self) -> None:
        """Our supervisor died (the daemon reaps its process): start another, trying again with
        a growing pause until one says hello, then say it is ready. Meanwhile `current` is
        None, so the dispatcher claims nothing, and health says why (`problem`)."""
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

    async def _connect(self, info: SupervisorInfo) -> Link:
        loop = asyncio.get_running_loop()
        _, link = await loop.create_unix_connection(lambda: Link(self.listener, info), info.socket)
        self.links.append(link)
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


def _remove_launch_files(info: SupervisorInfo, run_dir: Path) -> None:
    """What a supervisor that never said hello (killed, or unable to write on a full disk)
    may have left: the socket we bound for it and its half-written identity file."""
    for leftover in (Path(info.socket), run_dir / f".supervisor.{info.pid}.tmp"):
        with contextlib.suppress(OSError):
            leftover.unlink()
