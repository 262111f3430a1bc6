"""`/v1/nodes`: the daemons sharing this store; drain and resume one."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path as PathParam
from fastapi.responses import Response

from taskctl.api import QUEUE_NAME_PATTERN, NodeInfo
from taskctld.http.routing import ERRORS, V1, Routes, get, json_response, post
from taskctld.services.nodes import NodeService

NodeName = Annotated[str, PathParam(pattern=QUEUE_NAME_PATTERN)]


class NodeRoutes(Routes):
    tags = ["nodes"]

    def __init__(self, nodes: NodeService) -> None:
        self.nodes = nodes

    @get(f"{V1}/nodes", response_model=list[NodeInfo])
    async def list_nodes(self) -> Response:
        """Every node: its state, heartbeat age, what it runs, the queues it serves."""
        return json_response(self.nodes.list())

    @post(f"{V1}/nodes/{{name}}/drain", response_model=NodeInfo, responses=ERRORS)
    async def drain_node(self, name: NodeName) -> Response:
        """The node takes no new work; what it runs finishes."""
        return json_response(self.nodes.set_state(name, "drain"))

    @post(f"{V1}/nodes/{{name}}/resume", response_model=NodeInfo, responses=ERRORS)
    async def resume_node(self, name: NodeName) -> Response:
        """The node takes work again."""
        return json_response(self.nodes.set_state(name, "resume"))
