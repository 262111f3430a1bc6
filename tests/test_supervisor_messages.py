"""The daemon-supervisor wire against frames and journal lines captured from the supervisor
before the message set was versioned (`fixtures/supervisor_wire_v0`): a newer daemon must keep
understanding an older supervisor that runs on after an upgrade, and its journal."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from taskctl.api import Outcome
from taskctl.paths import Paths
from taskctld.runner import (
    Ended,
    Link,
    Released,
    Report,
    Runner,
    RunnerSettings,
    Started,
    Unheld,
)
from taskctld.supervisor import SupervisorInfo, encode_frame, read_journal
from taskctld.supervisor import messages as wire

V0 = Path(__file__).parent / "fixtures" / "supervisor_wire_v0"


def _lines(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (V0 / name).read_text().splitlines()]


def _without_protocol(w: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in w.items() if k != "protocol"}


@pytest.mark.parametrize("frame", _lines("supervisor_frames.jsonl"), ids=lambda f: f["op"])
def test_every_frame_of_a_v0_supervisor_decodes_and_encodes_back_the_same(frame: Any) -> None:
    message = wire.decode_from_supervisor(frame)
    assert message is not None
    assert _without_protocol(message.to_wire()) == frame


def test_a_v0_hello_is_protocol_0_with_its_running_and_done_attempts() -> None:
    hello = wire.decode_from_supervisor(_lines("supervisor_frames.jsonl")[-2])
    assert isinstance(hello, wire.Hello) and hello.protocol == 0
    assert [r.key for r in hello.running] == [(1, 1)]
    assert [(d.key, d.outcome, d.exit_code) for d in hello.done] == [
        ((2, 1), "exited", 0),
        ((3, 1), "exited", 3),
    ]


@pytest.mark.parametrize("frame", _lines("daemon_frames.jsonl"), ids=lambda f: f["op"])
def test_every_frame_a_v0_daemon_sent_decodes_and_encodes_back_the_same(frame: Any) -> None:
    message = wire.decode_from_daemon(frame)
    assert message is not None
    assert _without_protocol(message.to_wire()) == frame


def test_a_v0_journal_decodes_and_encodes_back_the_same() -> None:
    journal = read_journal(V0 / "journal.jsonl")
    assert set(journal) == {(1, 1), (2, 1), (3, 1)}
    decoders = {"started": wire.StartedRecord, "ident": wire.Ident, "final": wire.Final}
    for records in journal.values():
        for kind, body in records.items():
            assert decoders[kind].from_wire(body).to_wire() == body
    assert wire.Final.from_wire(journal[(1, 1)]["final"]).outcome == "cancelled"
    assert wire.Ident.from_wire(journal[(1, 1)]["ident"]).start > 0


def test_unknown_ops_are_news_and_bad_fields_are_refused() -> None:
    assert wire.decode_from_supervisor({"op": "from-the-future", "x": 1}) is None
    assert wire.decode_from_daemon({"op": "from-the-future"}) is None
    with pytest.raises(wire.BadMessage):
        wire.decode_from_supervisor({"op": "started", "task_id": 1})
    with pytest.raises(wire.BadMessage):
        wire.decode_from_daemon({"op": "spawn", "spec": {"task_id": 1, "unknown": 2}})


def test_error_and_cause_are_on_the_wire_only_when_set() -> None:
    final = wire.Final(1, 2, "exited", exit_code=1, error="it hit", cause="memory_limit")
    assert wire.Final.from_wire(final.to_wire()) == final
    assert "error" not in wire.Final(1, 2, "exited").to_wire()


def test_the_runner_adopts_a_v0_supervisor_from_its_frames(tmp_path: Path) -> None:
    """Today's runner fed what a v0 supervisor said on its first connection (its reports),
    then on a second one (its hello, settled as adoption does)."""
    reports: list[Report] = []
    frames = _lines("supervisor_frames.jsonl")
    second = max(i for i, f in enumerate(frames) if f["op"] == "hello")
    info = SupervisorInfo(7420, 1, "boot", "sock", "t")

    async def run() -> tuple[Link, Runner]:
        paths = Paths(tmp_path / "rt", tmp_path / "st", tmp_path / "c.toml")
        runner = Runner(paths, RunnerSettings(), reports.append)
        runner.fleet.current = current = Link(runner, info)
        runner.fleet.watch.sent = 1.0
        current.data_received(b"".join(encode_frame(f) for f in frames[:second]))
        link = Link(runner, info)
        link.data_received(b"".join(encode_frame(f) for f in frames[second:]))
        runner.recover([], [link.hello.result()])
        return link, runner

    link, runner = asyncio.run(run())
    assert link.protocol == 0 and runner.fleet.watch.sent is None  # the pong was heard
    started = [(r.task_id, r.pid) for r in reports if isinstance(r, Started)]
    assert started[:3] == [(1, 7421), (2, 7422), (3, 7424)]
    assert (1, 7421) in started[3:]  # from the second hello: runs, unknown to an empty store
    assert Released(4, 1, token=104) in reports
    assert Unheld(5, 1, True, 105) in reports
    ends = [r for r in reports if isinstance(r, Ended)]
    assert ends[0].end.task_id == 2 and ends[0].next == (3, 1)
    assert ends[0].end.outcome is Outcome.EXITED and ends[0].end.exit_code == 0
    # 3 done; 1 cancelled (heard on the second link); then the hello's done, by recover
    assert [e.end.task_id for e in ends[1:]] == [3, 1, 2, 3]
    assert ends[2].end.outcome is Outcome.CANCELLED and ends[2].end.signal == 15
