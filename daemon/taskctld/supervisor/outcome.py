"""The final record of an attempt, as pure functions of what was observed: its wait status and
rusage, why we stopped it (if we did), and what was sampled while it ran."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from taskctld.supervisor.messages import Final

OOM_HINTS = (b"MemoryError", b"Cannot allocate memory", b"out of memory", b"bad_alloc")


@dataclass
class Observed:
    """What the supervisor saw of one attempt, besides its wait status and rusage."""

    started_at: int
    stop_reason: str | None = None  # timeout, cancelled, interrupted: we stopped it
    log_problem: str | None = None  # why its output was not all saved
    memory_limit: int | None = None
    stderr_tail: bytes = b""
    sampled_rss: int = 0  # the peak RSS sampled from /proc while it ran (bytes)
    own_hwm: int = 0  # the supervisor's own peak RSS at the last sample (bytes)


def final_of(
    key: tuple[int, int], status: int, usage: Any | None, seen: Observed, ended_at: int
) -> Final:
    """The record of an attempt whose main process was reaped with `status` and `usage` (a
    `resource.struct_rusage`, or None): its outcome is why we stopped it if we did, else how
    it exited; `error` says why its output was not saved or, failing under a memory limit,
    that it hit it (`cause` memory_limit)."""
    exit_code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    outcome = seen.stop_reason or ("signaled" if sig is not None else "exited")
    final = Final(
        *key,
        outcome,
        started_at=seen.started_at,
        ended_at=ended_at,
        exit_code=exit_code,
        signal=sig,
        max_rss=peak_rss(usage.ru_maxrss * 1024 if usage else 0, seen.sampled_rss, seen.own_hwm),
        cpu_user=round(usage.ru_utime, 6) if usage else None,
        cpu_system=round(usage.ru_stime, 6) if usage else None,
        error=seen.log_problem,
    )
    if seen.memory_limit and outcome in ("exited", "signaled") and exit_code != 0:
        hint = memory_hint(status, seen.stderr_tail, seen.memory_limit)
        if hint:
            final.error, final.cause = hint, "memory_limit"
    return final


def peak_rss(reported: int, sampled: int, own_hwm: int) -> int | None:
    """wait4's peak RSS also counts the pages the command had before its exec, which were
    ours (vfork shares our memory). Above our own high-water mark it is the command's exact
    peak; at or below, the best we know is what we sampled (None: too brief to sample)."""
    if reported > own_hwm:
        return reported
    return sampled or None


def memory_hint(status: int, stderr_tail: bytes, memory_limit: int) -> str | None:
    """Why a task with a memory limit failed, when the evidence (a killing signal, or words of
    an allocation failure at the end of its stderr) says it hit the limit."""
    if os.WIFSIGNALED(status) or any(h in stderr_tail for h in OOM_HINTS):
        return f"it hit its memory limit of {memory_limit >> 20} MiB (address space)"
    return None
