"""`Runner`: the dispatcher's launcher over supervisors (see the package's docstring)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from taskctl.environment import minimal_env
from taskctl.paths import Paths
from taskctld.launcher import Ended, Key, Released, Report, Unheld
from taskctld.runner import translate
from taskctld.runner.fleet import Fleet
from taskctld.runner.journals import DeadJournals
from taskctld.runner.link import Link
from taskctld.store import AttemptRow, TaskRow
from taskctld.supervisor import AttemptSpec
from taskctld.supervisor import messages as wire


@dataclass
class RunnerSettings:
    log_cap: int = 100 << 20
    node: str | None = None  # a cluster's node: named in the spawn errors it reports


class Runner:
    """Hands attempts to our supervisor and keeps which supervisor runs, holds or is taking
    back each attempt; turns what supervisors say into reports (`report`), and settles what a
    lost supervisor ran from its journal. `on_ready`: a new supervisor takes attempts."""

    def __init__(
        self,
        paths: Paths,
        settings: RunnerSettings,
        report: Callable[[Report], None],
        *,
        on_ready: Callable[[], None] = lambda: None,
    ) -> None:
        self.paths = paths
        self.settings = settings
        self.report = report
        self.journals = DeadJournals(paths.run)
        self.fleet = Fleet(paths, self.journals, self, on_ready)
        self.owner: dict[Key, Link] = {}  # attempts that have not ended, by supervisor
        self.held: dict[Key, Link] = {}  # held attempts not yet reported started or released
        self.unholding: dict[Key, tuple[Link, int]] = {}  # taken back, answer not yet heard

    # -- lifecycle ------------------------------------------------------------------------------

    async def attach(self) -> list[wire.Hello]:
        """Launch our supervisor and connect to the ones earlier daemons left; returns their
        hellos (what they still run and what ended meanwhile)."""
        hellos = []
        for link, hello in await self.fleet.attach():
            hellos.append(hello)
            for item in hello.running:
                self.owner[item.key] = link
        return hellos

    def committed(self) -> None:
        """Called after each dispatcher commit: outcomes read from dead supervisors' journals
        are in the store now, so the journals can go."""
        self.journals.committed()

    def close(self) -> None:
        """Stop listening; supervisors and their tasks keep running (see `Fleet.close`)."""
        self.fleet.close()

    # -- health ---------------------------------------------------------------------------------

    @property
    def problem(self) -> str | None:
        """Why no supervisor takes attempts, when none does."""
        return self.fleet.problem

    @property
    def containment(self) -> str:
        """How attempts are contained, as our supervisor said in its hello."""
        return self.fleet.containment

    def unanswered(self) -> str | None:
        """Why our supervisor is not doing its job though it is connected, if it is not."""
        return self.fleet.watch.unanswered()

    # -- starting and stopping attempts ---------------------------------------------------------

    def start(self, task: TaskRow, env: dict[str, str] | None) -> None:
        """Hand one claimed attempt to our supervisor."""
        key = (task.id, task.attempts)
        link = self.fleet.current
        if link is None or not link.send(wire.Spawn(self.spec_for(task, env))):
            self.report(translate.interrupted(key, "the supervisor is not available"))
            return
        self.owner[key] = link

    def hold(self, task: TaskRow, env: dict[str, str] | None, after: Key, token: int) -> bool:
        """Hand a queued task (as its next attempt) to our supervisor, to start in the slot of
        `after` when that ends. It stays queued in the store until its start is reported."""
        spec = self.spec_for(task, env, number=task.attempts + 1)
        link = self.fleet.current
        if link is None or not link.send(wire.Spawn(spec, after, token)):
            return False
        self.held[(task.id, spec.attempt)] = link
        return True

    def runs_on_current(self, key: Key) -> bool:
        """Whether the attempt runs under our current supervisor (holds go only there)."""
        current = self.fleet.current
        return current is not None and self.owner.get(key) is current

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

    def stop_all(self, kind: str) -> int:
        """Ask every running attempt's supervisor to end it; how many were asked."""
        keys = list(self.owner)
        for task_id, attempt in keys:
            self.stop(task_id, attempt, kind)
        return len(keys)

    def ready(self) -> bool:
        """Whether a supervisor takes new attempts now (ours said hello and is connected)."""
        current = self.fleet.current
        return current is not None and not current.lost

    def running_count(self) -> int:
        return len(self.owner)

    def unheld(self, keys: set[Key]) -> set[Key]:
        """Of `keys` (attempts the store says this daemon runs), those no supervisor of ours
        runs, holds or is taking back."""
        return {k for k in keys if k not in self.owner and k not in self.held}

    def give_up(self, keys: set[Key], why: str) -> None:
        """Attempts that nothing of ours runs: each ends interrupted (it runs again)."""
        for key in sorted(keys):
            self.report(translate.interrupted(key, why))

    def running_keys(self) -> list[Key]:
        """The attempts running under our supervisors now."""
        return list(self.owner)

    def forget(self, task_id: int, attempt: int) -> None:
        """The attempt's end is committed: its supervisor may forget it."""
        link = self.owner.pop((task_id, attempt), None) or self.fleet.current
        if link is not None:
            link.send(wire.Ack(task_id, attempt))

    # -- hearing from supervisors ---------------------------------------------------------------

    def on_message(self, link: Link, message: wire.SupervisorMessage) -> None:
        """One message from a supervisor after its hello, to its one handler."""
        if isinstance(message, wire.Started):
            self.held.pop(message.key, None)
            self.owner.setdefault(message.key, link)  # a held attempt becomes this link's
            self.report(translate.started(message))
        elif isinstance(message, wire.Done):
            self.held.pop(message.final.key, None)
            ended = translate.ended_from_final(message.final, message.next)
            self.report(translate.on_node(ended, self.settings.node))
        elif isinstance(message, wire.Released):
            self.held.pop((message.task_id, message.attempt), None)
            self.report(translate.released(message))
        elif isinstance(message, wire.Unheld):
            self.unholding.pop((message.task_id, message.attempt), None)
            self.report(translate.unheld(message))
        elif isinstance(message, wire.Pong):
            self.fleet.watch.pong(link)

    def on_link_lost(self, link: Link) -> None:
        """A supervisor is gone. If we were not closing, what it ran is settled from journals."""
        if not self.fleet.lost(link):
            return
        for key in [k for k, owner in self.owner.items() if owner is link]:
            self.report(self.settle(key))
        # Held attempts it may have started without our hearing of it: its journal says;
        # the others come back to the queue.
        for key in [k for k, holder in self.held.items() if holder is link]:
            del self.held[key]
            self.report(self.settle(key) if self.journals.knows(key) else Released(*key))
        for key, (holder, token) in list(self.unholding.items()):
            if holder is link:  # taken back, unanswered: its journal says if it started
                del self.unholding[key]
                known = self.journals.knows(key)
                if known:
                    self.report(self.settle(key))
                self.report(Unheld(*key, not known, token))

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
                self.report(translate.ended_from_final(done[key]))
            else:
                self.report(self.settle(key))
        # What supervisors ran that the store never saw start (held attempts that started
        # while no daemon recorded it): reported as news, so the dispatcher claims them for
        # the attempt they are, or stops them. Ends already recorded are acknowledged there.
        for hello in hellos:
            for item in hello.running:
                if item.key not in open_keys:
                    self.report(translate.started(item))
        for key, final in done.items():
            if key not in open_keys:
                self.report(translate.ended_from_final(final))
        # And what dead supervisors' journals say about such attempts (they exit once idle
        # without a daemon, keeping the journal while an outcome is unacknowledged).
        known = open_keys | done.keys() | self.owner.keys()
        for key in self.journals.unknown_to(known):
            self.report(self.settle(key))

    def settle(self, key: Key) -> Ended:
        """The end of an attempt whose supervisor is gone, from that supervisor's journal."""
        self.owner.pop(key, None)
        return self.journals.settle(key)
