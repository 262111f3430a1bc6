"""Why taskctl runs one supervisor per daemon instead of one Python worker per task.

Prints the cost of the primitives a per-task design pays, measured in this process:
forking a Python interpreter (what a per-task worker costs before it does anything)
against posix_spawn of /bin/true (what the command itself costs).
"""

from __future__ import annotations

import json  # noqa: F401 - make this process about the size of a launcher
import os
import socket  # noqa: F401
import subprocess  # noqa: F401
import time

N = 500


def per_op(fn) -> float:
    start = time.perf_counter()
    for _ in range(N):
        fn()
    return (time.perf_counter() - start) / N * 1e6


def fork_exit() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)


def spawn_true() -> None:
    os.waitpid(os.posix_spawn("/bin/true", ["true"], {}), 0)


def fork_then_spawn() -> None:
    pid = os.fork()
    if pid == 0:
        os.waitpid(os.posix_spawn("/bin/true", ["true"], {}), 0)
        os._exit(0)
    os.waitpid(pid, 0)


if __name__ == "__main__":
    for name, fn in (
        ("fork+exit of this interpreter", fork_exit),
        ("posix_spawn /bin/true", spawn_true),
        ("fork, then posix_spawn in the child", fork_then_spawn),
    ):
        print(f"{name:40s} {per_op(fn):7.0f} us")
