"""A throwaway PostgreSQL cluster of the tests' own, made from the machine's PostgreSQL server
binaries (initdb, pg_ctl): never the machine's databases.

Why not pytest-postgresql: it runs initdb as the current user, and initdb refuses to run as root,
which is how CI runs (and must, for the cgroup tests). This starts the server as an unprivileged
user when the tests are root, listening on 127.0.0.1 (and on every address when a test needs a
node in a network namespace to reach it), with durability off: a test cluster is thrown away.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

INSTALL = "the PostgreSQL server binaries (initdb, pg_ctl; Debian: apt install postgresql)"


def server_bindir() -> Path | None:
    """Where initdb and pg_ctl are: on PATH, by pg_config, or Debian's versioned folders."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True)
        folder = Path(out.stdout.strip())
        if (folder / "initdb").exists():
            return folder
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True)
    return versions[0].parent if versions else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """One postgres server in `root`, owned by an unprivileged user when we are root."""

    def __init__(self, root: Path, bindir: Path, *, listen: str = "127.0.0.1") -> None:
        self.root = root
        self.bindir = bindir
        self.data = root / "data"
        self.port = free_port()
        self.listen = listen
        self.user = "nobody" if os.geteuid() == 0 else None

    def _run(self, *args: str) -> None:
        subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            user=self.user,
            cwd=self.root,
            check=True,
            capture_output=True,
            timeout=120,
        )

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self.root.chmod(0o755)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        if self.listen != "127.0.0.1":  # nodes in network namespaces of the tests' own
            with (self.data / "pg_hba.conf").open("a") as hba:
                hba.write("host all all 0.0.0.0/0 trust\n")
        options = " ".join(
            [
                f"-p {self.port}",
                f"-c listen_addresses='{self.listen}'",
                f"-k {self.root}",
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
                "-c shared_buffers=32MB",
                "-c max_connections=200",
            ]
        )
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "log"), "-w", "start")  # fmt: skip

    def url(self, dbname: str = "postgres", host: str = "127.0.0.1") -> str:
        return f"postgresql://postgres@{host}:{self.port}/{dbname}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def running_cluster(root: Path, **kw: str) -> Iterator[Cluster]:
    bindir = server_bindir()
    if bindir is None:
        raise FileNotFoundError(INSTALL)
    cluster = Cluster(root, bindir, **kw)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def main(argv: list[str]) -> int:
    """`python tests/pgcluster.py start ROOT` starts a cluster in ROOT and prints its URL (a
    fresh database `taskctl`); `stop ROOT` stops it and removes ROOT. For `make demo`."""
    import sys

    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print("usage: pgcluster.py start|stop ROOT", file=sys.stderr)
        return 2
    root = Path(argv[1])
    bindir = server_bindir()
    if bindir is None:
        print(f"needs {INSTALL}", file=sys.stderr)
        return 1
    cluster = Cluster(root, bindir)
    if argv[0] == "stop":
        cluster.stop()
        return 0
    cluster.start()
    (root / "port").write_text(str(cluster.port))
    import psycopg

    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        conn.execute('CREATE DATABASE "taskctl"')
    print(cluster.url("taskctl"))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
