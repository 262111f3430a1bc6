"""One connection to one supervisor: its peer check, our `auth`, its frames decoded."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from typing import Protocol

from taskctld.supervisor import FrameReader, SupervisorInfo
from taskctld.supervisor import messages as wire

log = logging.getLogger("taskctld.runner")


class Listener(Protocol):
    """Who hears what a link hears (the runner)."""

    def on_message(self, link: Link, message: wire.SupervisorMessage) -> None:
        """A message after the supervisor's hello."""

    def on_link_lost(self, link: Link) -> None:
        """The connection is gone."""


class Link(asyncio.Protocol):
    """One connection to one supervisor. Its first frame, `hello`, completes `hello`; every
    later message goes to the listener."""

    def __init__(self, listener: Listener, info: SupervisorInfo) -> None:
        self.listener = listener
        self.info = info
        self.reader = FrameReader()
        self.transport: asyncio.Transport | None = None
        self.hello: asyncio.Future[wire.Hello] = asyncio.get_running_loop().create_future()
        self.lost = False
        self.protocol = 0  # the supervisor's, from its hello

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _, uid, _ = struct.unpack("3i", creds)
        if uid != os.getuid():  # a socket planted by someone else: never hand it a command
            log.error("refusing supervisor socket %s: it belongs to uid %d", self.info.socket, uid)
            self.lost = True
            transport.close()
            return
        self.send(wire.Auth(self.info.token))

    def data_received(self, data: bytes) -> None:
        for frame in self.reader.feed(data):
            try:
                message = wire.decode_from_supervisor(frame)
            except wire.BadMessage as e:
                log.warning("ignoring a malformed supervisor message: %s", e)
                continue
            if isinstance(message, wire.Hello):
                self._on_hello(message)
            elif message is not None:
                self.listener.on_message(self, message)

    def _on_hello(self, hello: wire.Hello) -> None:
        """The first frame of a supervisor: says its protocol (0 when it predates the field;
        every version so far is read the same way). A later hello is ignored."""
        if self.hello.done():
            return
        self.protocol = hello.protocol
        if hello.protocol > wire.PROTOCOL:
            log.warning(
                "supervisor pid %d speaks protocol %d, newer than ours (%d)",
                self.info.pid,
                hello.protocol,
                wire.PROTOCOL,
            )
        self.hello.set_result(hello)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.hello.done():
            self.hello.set_exception(ConnectionError("the supervisor went away"))
        self.listener.on_link_lost(self)

    def send(self, message: wire.DaemonMessage) -> bool:
        if self.transport is None or self.lost:
            return False
        self.transport.write(wire.encode(message))
        return True

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
