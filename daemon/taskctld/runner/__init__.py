"""The runner: the daemon's side of the supervisors. It starts attempts, asks for them to be
stopped, and adopts what earlier daemons left running.

It never touches the database. What it learns (an attempt started, an attempt ended) becomes a
`Report` (`taskctld.launcher`) queued for the dispatcher, which applies reports in its next
transaction; only after that commit does the runner acknowledge the end to the supervisor
(`forget`).

At start-up it launches a fresh supervisor for new work and connects to every live supervisor
an earlier daemon left behind: each says in its `hello` what still runs and what ended while no
daemon listened, and is then retired (it exits once its last task has ended). An open attempt
that no supervisor knows is settled from its journal: its final record if it has one; `lost` if
it started and its supervisor is gone (its command, if alive, is killed: nothing runs
unsupervised); `interrupted` (not counted) if it never started.

Trust: the runner proves itself to each supervisor with that supervisor's secret (`auth`, the
first frame) and accepts only a supervisor of its own uid. Our own supervisor is pinged; one
that stops answering makes `health` unhealthy.

The package:
  runner     `Runner`: the dispatcher's `Launcher`; which supervisor runs or holds each attempt
  fleet      `Fleet`: launching ours (and replacing it), adopting and retiring earlier ones
  link       `Link`: one connection to one supervisor
  watch      `PingWatch`: is our supervisor answering?
  translate  supervisors' frames and records as reports (pure functions)
  journals   `DeadJournals`: settling what dead supervisors ran, from their journals
"""

from taskctld.launcher import Ended, Key, Released, Report, Started, Unheld
from taskctld.runner.link import Link
from taskctld.runner.runner import Runner, RunnerSettings

__all__ = [
    "Ended",
    "Key",
    "Link",
    "Released",
    "Report",
    "Runner",
    "RunnerSettings",
    "Started",
    "Unheld",
]
