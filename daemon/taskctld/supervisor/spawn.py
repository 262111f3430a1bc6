"""Starting a command: its own process group (and cgroup), stdin /dev/null, output into pipes.

posix_spawn (vfork+exec) is the cheapest way to start a process from Python; a task with a
memory limit forks instead, so that RLIMIT_AS holds from the command's first instruction.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
from pathlib import Path

from taskctld.containment import Cgroups
from taskctld.supervisor.messages import AttemptSpec
from taskctld.supervisor.output import LogSink

# Signals we handle or ignore here; the command must start with the default for each.
DEFAULT_IN_CHILD = (
    signal.SIGPIPE,
    signal.SIGXFSZ,
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGCHLD,
)


def start_process(
    spec: AttemptSpec, cgroups: Cgroups | None, cgroup: Path | None
) -> tuple[int, list[LogSink]]:
    """Start the command (inside `cgroup`, when given) with its output piped into two sinks,
    stdout's and stderr's. Raises OSError when it cannot start (see `spawn_message`)."""
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    spawn = spawn_fast if spec.memory_limit is None else spawn_limited
    try:
        if cgroup is None or cgroups is None:
            pid = spawn(spec, out_w, err_w)
        else:
            with cgroups.inside(cgroup):
                pid = spawn(spec, out_w, err_w)
    except BaseException:
        os.close(out_r)
        os.close(err_r)
        raise
    finally:
        os.close(out_w)  # the command holds the write ends now
        os.close(err_w)
    sinks = [
        LogSink(fd=out_r, path=spec.stdout_path, cap=spec.log_cap),
        LogSink(
            fd=err_r,
            path=spec.stderr_path,
            cap=spec.log_cap,
            keep_tail=spec.memory_limit is not None,
        ),
    ]
    for sink in sinks:
        os.set_blocking(sink.fd, False)
    return pid, sinks


def spawn_fast(spec: AttemptSpec, out_w: int, err_w: int) -> int:
    """posix_spawn (vfork+exec). It cannot change directory, so we do (this process is
    single-threaded and uses absolute paths). Every descriptor of ours is close-on-exec
    (PEP 446), so the command gets only 0, 1, 2."""
    try:
        os.chdir(spec.cwd)
    except OSError as e:
        raise OSError(e.errno, e.strerror, spec.cwd) from None
    program = resolve(spec.argv[0], spec.env.get("PATH", os.defpath))  # after chdir: ./x works
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_DUP2, out_w, 1),
        (os.POSIX_SPAWN_DUP2, err_w, 2),
    ]
    return os.posix_spawn(
        program, spec.argv, spec.env, file_actions=actions, setpgroup=0, setsigdef=DEFAULT_IN_CHILD
    )


def resolve(name: str, path: str) -> str:
    """The program to execute, looked up in the task's PATH (not ours), like execvp."""
    if "/" in name:
        return name
    for folder in path.split(os.pathsep):
        candidate = os.path.join(folder or ".", name)
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return candidate
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)


def spawn_limited(spec: AttemptSpec, out_w: int, err_w: int) -> int:
    """With a memory limit: a pre-exec hook sets RLIMIT_AS, so it holds from the command's
    first instruction (this path forks instead of vforking; only limited tasks pay for it)."""
    limit = spec.memory_limit or resource.RLIM_INFINITY

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    proc = subprocess.Popen(
        spec.argv,
        cwd=spec.cwd,
        env=spec.env,
        stdin=subprocess.DEVNULL,
        stdout=out_w,
        stderr=err_w,
        process_group=0,
        close_fds=True,
        preexec_fn=apply,
    )
    proc.returncode = 0  # we reap it with wait4 ourselves; Popen must not try
    return proc.pid


def spawn_message(error: OSError, spec: AttemptSpec) -> str:
    """A readable reason for a command that could not start."""
    if error.errno == errno.ENOENT and error.filename == spec.cwd:
        return f"working directory {spec.cwd!r} does not exist"
    if error.errno == errno.ENOENT:
        return f"no such program: {spec.argv[0]!r}"
    if error.errno == errno.EACCES:
        return f"permission denied: {error.filename or spec.argv[0]!r}"
    if error.errno == errno.ENOTDIR:
        return f"not a directory: {error.filename or spec.cwd!r}"
    if error.errno == errno.E2BIG:
        return "argument list and environment too long for execve (E2BIG)"
    return f"cannot start {spec.argv[0]!r}: {error.strerror or error}"
