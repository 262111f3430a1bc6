"""The environment a task gets when it does not inherit its submitter's (`--no-env`, cron).

Shared by the CLI (which builds `--no-env` environments) and the daemon (its default when a
request carries no environment), so that both mean the same thing. Like cron's: a fixed PATH,
the user's identity and home, a UTF-8 locale.
"""

from __future__ import annotations

import functools
import os
import pwd

MINIMAL_PATH = "/usr/local/bin:/usr/bin:/bin"


def minimal_env() -> dict[str, str]:
    """A fresh copy (callers add to it)."""
    return dict(_minimal_env())


@functools.cache
def _minimal_env() -> dict[str, str]:
    try:
        entry = pwd.getpwuid(os.getuid())
        user, home = entry.pw_name, entry.pw_dir
    except KeyError:
        user, home = str(os.getuid()), os.environ.get("HOME", "/")
    return {
        "PATH": MINIMAL_PATH,
        "HOME": home,
        "USER": user,
        "LOGNAME": user,
        "SHELL": "/bin/sh",
        "LANG": "C.UTF-8",
    }


# Set by the daemon on every task it runs (the changed paths only for file triggers); never
# inherited from whoever started the daemon.
TASK_MARKERS = ("TASKCTL_TASK_ID", "TASKCTL_ATTEMPT", "TASKCTL_QUEUE", "TASKCTL_CHANGED_PATHS")
