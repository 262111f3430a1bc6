"""Nodes: the daemons that share this store, and taking one out of service (drain) or back.

On SQLite there is one node, this daemon; on PostgreSQL every node is a row of the store,
with its heartbeat (see `taskctld.cluster`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from taskctl import __version__
from taskctl.errors import InvalidRequest, NotFound
from taskctld.config import Config
from taskctld.dispatcher import Dispatcher
from taskctld.store import NodeStore

STATES = {"drain": "draining", "resume": "up"}


@dataclass
class NodeService:
    nodes: NodeStore | None  # None: a single daemon on SQLite
    dispatcher: Dispatcher
    config: Config

    def list(self) -> list[dict[str, Any]]:
        if self.nodes is None:
            return [self._alone()]
        return [
            {
                "name": n.name,
                "version": n.version,
                "state": n.state,
                "heartbeat_age": round(n.age_ms / 1000, 1),
                "running": n.running,
                "slots": n.slots,
                "queues": n.queues,
                "this": n.name == self.config.node,
            }
            for n in self.nodes.nodes()
        ]

    def _alone(self) -> dict[str, Any]:
        return {
            "name": self.config.node,
            "version": __version__,
            "state": "up" if self.dispatcher.accepting else "draining",
            "heartbeat_age": 0.0,
            "running": self.dispatcher.running_count(),
            "slots": self.config.concurrency,
            "queues": self.config.queues,
            "this": True,
        }

    def set_state(self, name: str, action: str) -> dict[str, Any]:
        """`drain`: the node takes no new work (what it runs finishes); `resume`: it does."""
        if self.nodes is None:
            raise InvalidRequest(
                "this daemon is not part of a cluster (its store is SQLite); "
                "to stop it taking work, set hold = true in config.toml"
            )
        if not self.nodes.set_node_state(name, STATES[action]):
            raise NotFound(f"no node named {name!r} that is up or draining")
        if name == self.config.node:
            self.dispatcher.wake()
        return next(n for n in self.list() if n["name"] == name)
