"""Where things live: socket, database, logs, config.

`TASKCTL_HOME` puts everything in one folder (how tests isolate). Otherwise the XDG layout:
the socket under `$XDG_RUNTIME_DIR/taskctl/` (fallback `/tmp/taskctl-$UID/`), state (database,
logs, per-attempt run files) under `$XDG_STATE_HOME/taskctl/`, config in
`$XDG_CONFIG_HOME/taskctl/config.toml`.

Standard library only; computing paths never touches the disk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    runtime: Path  # sockets: control socket and the workers' notify socket
    state: Path  # database, daemon log, lock, run files
    config_file: Path

    @property
    def socket(self) -> Path:
        return self.runtime / "taskctld.sock"

    @property
    def notify_socket(self) -> Path:
        return self.runtime / "notify.sock"

    @property
    def database(self) -> Path:
        return self.state / "taskctl.db"

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    @property
    def run(self) -> Path:
        """Per-attempt run files written by workers; they outlive a daemon crash."""
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
