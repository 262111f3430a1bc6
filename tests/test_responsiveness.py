"""Big work for one client does not stall the others: the socket keeps answering while the
daemon serves a big log tail or takes a big batch."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from taskctld.server import tail_offset

from conftest import Home, figure, http_get

BIG_LOG = 96 << 20  # under the default log_cap of 100 MiB


def _latencies_while(work: Callable[[], object], probe: Callable[[], object]) -> list[float]:
    """Run `work` in a thread and `probe` over and over until it ends; how long each probe
    that started before the end took."""
    done = threading.Event()
    thread = threading.Thread(target=lambda: (work(), done.set()))
    thread.start()
    taken = []
    while not done.is_set():
        started = time.monotonic()
        probe()
        taken.append(time.monotonic() - started)
    thread.join()
    return taken


@pytest.mark.parametrize(
    ("content", "lines", "tail"),
    [
        (b"", 3, b""),
        (b"a\nb\nc\n", 2, b"b\nc\n"),
        (b"a\nb\nc", 2, b"b\nc"),  # no final newline: the last line still counts
        (b"a\nb\nc\n", 10, b"a\nb\nc\n"),  # more lines asked than there are
        (b"a\nb\nc\n", 0, b""),
        (b"\n\n\n", 2, b"\n\n"),
        (b"x" * 50 + b"\n" + b"y" * 50 + b"\n" + b"z" * 50, 2, b"y" * 50 + b"\n" + b"z" * 50),
        (b"x" * 50, 1, b"x" * 50),  # one line, many blocks long, no newline at all
    ],
)
def test_a_tail_is_the_last_lines_whatever_the_block_size(
    tmp_path: Path, content: bytes, lines: int, tail: bytes
) -> None:
    log = tmp_path / "log"
    log.write_bytes(content)
    for block in (1, 3, 7, 1 << 16):  # lines longer than a block, newlines at block edges
        assert content[tail_offset(log, lines, block) :] == tail, block
    assert tail_offset(tmp_path / "missing", 1) == 0


def test_a_tail_of_a_big_log_without_newlines_does_not_stall_other_clients(
    daemon: Home,
) -> None:
    script = f"import sys; sys.stdout.buffer.write(b'x' * {BIG_LOG}); sys.stdout.flush()"
    task_id = daemon.submit(sys.executable, "-c", script)
    assert daemon.wait_final(task_id, timeout=60)["state"] == "succeeded"
    sock = str(daemon.path / "taskctld.sock")
    got: list[tuple[int, bytes]] = []

    def tail() -> None:
        got.append(http_get(sock, f"/v1/tasks/{task_id}/logs?tail=1"))

    taken = _latencies_while(tail, lambda: http_get(sock, "/healthz"))
    status, body = got[0]
    assert status == 200 and len(body) == BIG_LOG and body.count(b"x") == BIG_LOG
    figure(
        "healthz during a tail of a 96 MiB line, max", f"{max(taken):.3f}s ({len(taken)} probes)"
    )
    assert taken and max(taken) < 1.0, taken
