"""The supervisor: the parent of every command, independent of the daemon.

One supervisor process per daemon generation starts the commands (vfork+exec, each in its own
process group and, where one can be made, its own cgroup; stdin from /dev/null, output piped
into capped per-attempt log files), enforces timeouts, kills whole process trees on cancel or
timeout, reaps them with `wait4` (exit status, CPU time, peak RSS), and journals each attempt.

Why not one Python worker per task: forking an interpreter costs about 0.8-1 ms here, more than
starting the command itself (`bench/fork_cost.py`); a shared supervisor pays only the vfork.

It outlives the daemon. The daemon starts it as a fresh interpreter (`python -m
taskctld.supervisor`, importing only this package, `procfs` and `containment`: standard library
only, so it is small and single-threaded) and talks to it over a Unix socket. When the daemon
dies, the supervisor keeps running its tasks and keeps their outcomes (in memory and in its
journal); the next daemon connects, receives a `hello` listing what runs and what ended, and
tells it to retire: it takes no new work and exits once its last task has ended. A new
supervisor takes the new work (so an upgrade runs new tasks with new code).

The package:
  messages    the closed, versioned set of frames and journal records, encoded in one place
  connection  who may talk to it (SO_PEERCRED, the `auth` secret) and the daemon's outbox
  loop        `Supervisor`: the selector loop and one handler per message
  running     `Running`: the attempts it runs, from spawn through reaping to the final record
  attempt     one attempt and its explicit phases (RUNNING, STOPPING, EXITED, CLEANING, ENDED)
  holds       specs held to start the moment another attempt ends
  spawn       starting a command (posix_spawn, or fork with a memory limit)
  output      copying its output into capped log files
  outcome     its final record, as pure functions of what was observed
  journal     the append-only journal and `read_journal`
  launch      `launch_supervisor`, `known_supervisors`, and the process's `main`

A held spawn (`after`, with a `hold` token) starts the moment attempt `after` ends: its slot
passes on without a round trip through the daemon, and `done` of `after` names it in `next`.
"""

from taskctld.supervisor.journal import JOURNAL_COMPACT_AT, Journal, read_journal
from taskctld.supervisor.launch import (
    EXIT_NO_SPACE,
    SupervisorInfo,
    known_supervisors,
    launch_supervisor,
)
from taskctld.supervisor.loop import Supervisor
from taskctld.supervisor.messages import (
    HEADER,
    PROTOCOL,
    AttemptSpec,
    Final,
    FrameReader,
    encode_frame,
)
from taskctld.supervisor.running import now_ms
from taskctld.supervisor.spawn import spawn_message

__all__ = [
    "EXIT_NO_SPACE",
    "HEADER",
    "JOURNAL_COMPACT_AT",
    "PROTOCOL",
    "AttemptSpec",
    "Final",
    "FrameReader",
    "Journal",
    "Supervisor",
    "SupervisorInfo",
    "encode_frame",
    "known_supervisors",
    "launch_supervisor",
    "now_ms",
    "read_journal",
    "spawn_message",
]
