"""The supervisor's loop: one selector over the daemon's connection, the output pipes, a signal
wake-up pipe and a heap of deadlines; single-threaded. Each turn it handles what is readable,
reaps what exited, and runs what is due. The attempts themselves, from spawn to final record,
are `running.Running`'s.
"""

from __future__ import annotations

import contextlib
import ctypes
import heapq
import os
import selectors
import signal
import socket
import time
from typing import Any

from taskctld.containment import Cgroups
from taskctld.supervisor import messages as m
from taskctld.supervisor.attempt import vm_hwm
from taskctld.supervisor.connection import DaemonLink
from taskctld.supervisor.holds import Holds
from taskctld.supervisor.journal import Journal
from taskctld.supervisor.running import Running

PR_SET_CHILD_SUBREAPER = 36
UNATTACHED_LIMIT = 60.0  # seconds a fresh supervisor waits for its first daemon
Key = m.Key


class Supervisor:
    """The loop, and one handler per message the daemon sends (`_on_*`)."""

    def __init__(
        self,
        listener: socket.socket,
        journal: Journal,
        boot_id: str,
        token: str,
        cgroups: Cgroups | None,
        containment: str,
    ) -> None:
        self.containment = containment  # what hello tells the daemon, for `health`
        self.sel = selectors.DefaultSelector()
        self.link = DaemonLink(
            listener, token, self.sel, self._handle, self._on_attach, self._on_drop, self._wake_at
        )
        self.holds = Holds()
        self.timers: list[tuple[float, Key | None]] = []
        self.attempts = Running(
            journal, boot_id, cgroups, self.sel, self.link, self.holds, self._wake_at
        )
        self.ever_attached = False
        self.born = time.monotonic()
        self.wake_r = -1
        self.handlers: dict[type, Any] = {
            m.Auth: self._on_auth,
            m.Ping: self._on_ping,
            m.Spawn: self._on_spawn,
            m.Unhold: self._on_unhold,
            m.Signal: self._on_signal,
            m.Ack: self._on_ack,
            m.Retire: self._on_retire,
        }

    # -- the loop -------------------------------------------------------------------------------

    def serve(self) -> int:
        self.wake_r = _install_signals()
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
        self.link.listen()
        self.sel.register(self.wake_r, selectors.EVENT_READ, "wake")
        self.attempts.upkeep.own_hwm = vm_hwm(os.getpid())
        while not self._finished():
            idle = None if self.ever_attached else UNATTACHED_LIMIT
            for key, mask in self.sel.select(_timeout(self.timers, idle)):
                self._dispatch(key, mask)
            self.attempts.reap()
            self._run_timers()
            if self.link.wants_flush():
                self.link.flush()
        return 0

    def _finished(self) -> bool:
        if self.attempts.running or self.attempts.unjournaled:
            return False
        if self.attempts.retired or (self.ever_attached and self.link.conn is None):
            return not self.link.outbox or self.link.conn is None
        return not self.ever_attached and time.monotonic() - self.born > UNATTACHED_LIMIT

    def _dispatch(self, key: selectors.SelectorKey, mask: int) -> None:
        tag = key.data
        if tag == "wake":
            _drain(self.wake_r)
        elif isinstance(tag, str):
            self.link.on_event(tag, key.fileobj, mask)  # type: ignore[arg-type]
        else:
            self.attempts.pump(*tag)

    # -- the daemon's messages, one handler each ------------------------------------------------

    def _handle(self, message: m.DaemonMessage) -> None:
        self.handlers[type(message)](message)

    def _on_attach(self) -> None:
        """A daemon proved itself: tell it what runs and which ends it has not acknowledged."""
        self.ever_attached = True
        attempts = self.attempts
        running = [m.Started(*a.key, a.pid, a.started_at) for a in attempts.running.values()]
        hello = m.Hello(os.getpid(), running, list(attempts.done.values()), self.containment)
        self.link.send(hello)

    def _on_drop(self) -> None:
        self.holds.clear()  # held specs are that daemon's; the next one decides again

    def _on_auth(self, message: m.Auth) -> None:
        """Already proven: a repeated auth says nothing new."""

    def _on_ping(self, message: m.Ping) -> None:
        self.link.send(m.Pong(message.seq))

    def _on_spawn(self, message: m.Spawn) -> None:
        if message.after is None:
            self.attempts.spawn(message.spec)
        else:
            self._hold(message.spec, message.after, message.hold)

    def _on_unhold(self, message: m.Unhold) -> None:
        """The daemon takes a held spec back (cancelled, its queue paused): drop it, and give
        back what was held after it. The answer, `unheld`, says whether it was still held
        (`taken`: it will never start); if not, it started (and `started` went out before
        this) or had been given back."""
        key = (message.task_id, message.attempt)
        taken = key in self.holds
        if taken:
            for released, token in self.holds.withdraw(key):
                self.link.send(m.Released(*released, token))
        self.link.send(m.Unheld(*key, taken, message.hold))

    def _on_signal(self, message: m.Signal) -> None:
        attempt = self.attempts.running.get((message.task_id, message.attempt))
        reason = {"cancel": "cancelled", "interrupt": "interrupted"}.get(message.kind)
        if attempt is not None and attempt.alive and reason:
            self.attempts.stop(attempt, reason)

    def _on_ack(self, message: m.Ack) -> None:
        self.attempts.acknowledged((message.task_id, message.attempt))

    def _on_retire(self, message: m.Retire) -> None:
        self.attempts.retire()
        self.holds.clear()

    def _hold(self, spec: m.AttemptSpec, after: Key, token: Any) -> None:
        """Keep `spec` to start when `after` ends, if `after` is running or itself held;
        otherwise give it back (the daemon's view was behind ours)."""
        key = spec.key
        waiting = after in self.attempts.running or after in self.holds
        known = self.attempts.knows(key) or key in self.holds
        if self.attempts.retired or not waiting or not self.holds.can_follow(after) or known:
            self.link.send(m.Released(*key, token))
            return
        self.holds.add(spec, after, token)

    # -- timers ---------------------------------------------------------------------------------

    def _wake_at(self, when: float, key: Key | None = None) -> None:
        """Run `tick` of attempt `key` (None: `_periodic`) at monotonic time `when`."""
        heapq.heappush(self.timers, (when, key))

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _, key = heapq.heappop(self.timers)
            if key is None:
                self._periodic(now)
            elif (attempt := self.attempts.running.get(key)) is not None:
                self.attempts.tick(attempt, now)

    def _periodic(self, now: float) -> None:
        if self.link.strangers:
            self.link.expire_strangers(now)
        self.attempts.upkeep.run_due(now)


def _install_signals() -> int:
    """Signals wake the loop (the returned pipe end becomes readable); none does more."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    # We outlive the daemon: signals meant for it (a terminal's Ctrl-C, a service stop) are
    # not for us. Handled (not ignored), so that commands get the default back at exec.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: None)
    return r


def _timeout(timers: list[tuple[float, Key | None]], idle: float | None) -> float | None:
    """How long the loop may wait: until the first timer, else `idle`."""
    return max(0.0, timers[0][0] - time.monotonic()) if timers else idle


def _prctl(option: int, value: int | bytes) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 4096):
            pass
