"""Where things live: socket, database, logs, config.

`TASKCTL_HOME` puts everything in one folder (how tests isolate). Otherwise the XDG layout:
the socket under `$XDG_RUNTIME_DIR/taskctl/` (fallback `/tmp/taskctl-$UID/`), state (database,
logs, per-attempt run files) under `$XDG_STATE_HOME/taskctl/`, config in
`$XDG_CONFIG_HOME/taskctl/config.toml`.

Standard library only; computing paths never touches the disk.
"""

from __future__ import annotations

import os
from pathlib import Path


class Paths:
    """The three roots; everything else is derived. (A plain class: `dataclasses` costs the
    CLI's start-up a millisecond.)"""

    __slots__ = ("config_file", "runtime", "state")

    def __init__(self, runtime: Path, state: Path, config_file: Path) -> None:
        self.runtime = runtime  # sockets: the API's and the supervisors'
        self.state = state  # database, logs, daemon log, lock, journals
        self.config_file = config_file

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Paths) and (self.runtime, self.state, self.config_file) == (
            other.runtime,
            other.state,
            other.config_file,
        )

    def __hash__(self) -> int:
        return hash((self.runtime, self.state, self.config_file))

    @property
    def socket(self) -> Path:
        return self.runtime / "taskctld.sock"

    @property
    def database(self) -> Path:
        return self.state / "taskctl.db"

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    @property
    def run(self) -> Path:
        """Supervisors' identity files and journals; they outlive a daemon crash."""
        return self.state / "run"

    @property
    def lock(self) -> Path:
        return self.state / "taskctld.lock"

    @property
    def daemon_log(self) -> Path:
        return self.state / "taskctld.log"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Paths:
        env = dict(os.environ) if env is None else env
        home = env.get("TASKCTL_HOME")
        if home:
            root = Path(home).absolute()
            return cls(runtime=root, state=root, config_file=root / "config.toml")
        user_home = Path(env.get("HOME") or Path.home())
        xdg_runtime = env.get("XDG_RUNTIME_DIR")
        runtime = (
            Path(xdg_runtime) / "taskctl"
            if xdg_runtime
            else Path("/tmp") / f"taskctl-{os.getuid()}"
        )
        state = Path(env.get("XDG_STATE_HOME") or user_home / ".local" / "state") / "taskctl"
        config = Path(env.get("XDG_CONFIG_HOME") or user_home / ".config") / "taskctl"
        return cls(runtime=runtime, state=state, config_file=config / "config.toml")
