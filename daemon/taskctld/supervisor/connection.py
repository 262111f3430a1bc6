"""The supervisor's end of the daemon's connection: who may talk, and what is queued to send.

Only its daemon may talk to it. A connection from another uid (SO_PEERCRED) is refused and
logged; one of our uid must first prove it is the daemon with the secret the daemon handed us
at launch (`auth`, its first frame). Until it does, it is a stranger: it gets no `hello`, and
it never displaces the daemon's link. A proven connection replaces the link of a vanished one.
"""

from __future__ import annotations

import hmac
import os
import selectors
import socket
import struct
import time
from collections.abc import Callable

from taskctld.supervisor import messages
from taskctld.supervisor.messages import Auth, DaemonMessage, FrameReader, Wire
from taskctld.supervisor.say import say

READ_SIZE = 65536
AUTH_LIMIT = 5.0  # seconds a new connection has to prove it is the daemon
AUTH_FRAME_LIMIT = 4096  # bytes a connection may send before it has proved it


class DaemonLink:
    """The listening socket, the strangers on it, and at most one proven daemon connection.

    Callbacks: `on_attach()` when a daemon proves itself (it sends `hello`), `on_drop()` when
    that connection goes, `on_message(m)` for each message it sends, `schedule(when)` to be
    woken (monotonic time) to expire strangers."""

    def __init__(
        self,
        listener: socket.socket,
        token: str,
        sel: selectors.BaseSelector,
        on_message: Callable[[DaemonMessage], None],
        on_attach: Callable[[], None],
        on_drop: Callable[[], None],
        schedule: Callable[[float], None],
    ) -> None:
        self.listener = listener
        self.token = token.encode()
        self.sel = sel
        self.on_message, self.on_attach, self.on_drop = on_message, on_attach, on_drop
        self.schedule = schedule
        self.strangers: dict[socket.socket, tuple[FrameReader, float]] = {}  # not yet proven
        self.conn: socket.socket | None = None
        self.reader = FrameReader()
        self.outbox = bytearray()
        self.conn_events = selectors.EVENT_READ

    def listen(self) -> None:
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, "accept")

    def on_event(self, tag: str, fileobj: socket.socket, mask: int) -> None:
        """A selector event for one of ours ("accept", "stranger", "conn")."""
        if tag == "accept":
            self._accept()
        elif tag == "stranger":
            self._read_stranger(fileobj)
        else:
            if mask & selectors.EVENT_READ:
                self._read_conn()
            if mask & selectors.EVENT_WRITE and self.conn is not None:
                self.flush()

    # -- strangers ------------------------------------------------------------------------------

    def _accept(self) -> None:
        """A new connection: refused at once unless it is of our uid, and a stranger (heard
        only for its `auth`) until it proves it is the daemon."""
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        pid, uid = peer_of(conn)
        if uid != os.getuid():
            say(f"refused a connection from uid {uid} (pid {pid}): not our user")
            conn.close()
            return
        conn.setblocking(False)
        deadline = time.monotonic() + AUTH_LIMIT
        self.strangers[conn] = (FrameReader(), deadline)
        self.sel.register(conn, selectors.EVENT_READ, "stranger")
        self.schedule(deadline)

    def _read_stranger(self, conn: socket.socket) -> None:
        reader, _ = self.strangers[conn]
        data = _recv(conn)
        if data is None:
            return
        try:
            frames = reader.feed(data)
        except ValueError:
            frames = [{}]
        if data and not frames and len(reader.buf) <= AUTH_FRAME_LIMIT:
            return  # the rest of its first frame is still on its way
        self._forget_stranger(conn)
        if frames and self._proves(frames[0]):
            self._attach(conn, reader)
            self._deliver(frames[1:])
            return
        pid, _ = peer_of(conn)
        say(f"refused a connection from pid {pid}: it did not prove it is the daemon")
        conn.close()

    def _proves(self, frame: Wire) -> bool:
        try:
            auth = messages.decode_from_daemon(frame)
        except messages.BadMessage:
            return False
        return isinstance(auth, Auth) and hmac.compare_digest(auth.token.encode(), self.token)

    def _forget_stranger(self, conn: socket.socket) -> None:
        self.strangers.pop(conn, None)
        self.sel.unregister(conn)

    def expire_strangers(self, now: float) -> None:
        for conn, (_, deadline) in list(self.strangers.items()):
            if now >= deadline:
                self._forget_stranger(conn)
                say("refused a connection that did not prove it is the daemon in time")
                conn.close()

    # -- the daemon -----------------------------------------------------------------------------

    def _attach(self, conn: socket.socket, reader: FrameReader) -> None:
        if self.conn is not None:
            self.drop()
        self.conn = conn
        self.reader = reader
        self.outbox = bytearray()
        self.sel.register(conn, selectors.EVENT_READ, "conn")
        self.conn_events = selectors.EVENT_READ
        self.on_attach()

    def drop(self) -> None:
        if self.conn is not None:
            self.sel.unregister(self.conn)
            self.conn.close()
            self.conn = None
            self.outbox = bytearray()
            self.on_drop()

    def _read_conn(self) -> None:
        assert self.conn is not None
        data = _recv(self.conn)
        if data is None:
            return
        if not data:
            self.drop()
            return
        self._deliver(self.reader.feed(data))

    def _deliver(self, frames: list[Wire]) -> None:
        for frame in frames:
            try:
                message = messages.decode_from_daemon(frame)
            except messages.BadMessage as e:
                say(f"ignored a message from the daemon: {e}")
                continue
            if message is not None:
                self.on_message(message)

    def send(self, message: messages.SupervisorMessage) -> None:
        """Queue a message; the loop sends what is queued once per turn (one write for an
        end and the start that followed it). Without a daemon it is dropped: the journal has
        it, and `hello` repeats it to the next one."""
        if self.conn is not None:
            self.outbox += messages.encode(message)

    def wants_flush(self) -> bool:
        """Whether there is something to send and the socket was not full last time (when it
        was, the selector says when to go on)."""
        return (
            bool(self.outbox) and self.conn is not None and self.conn_events == selectors.EVENT_READ
        )

    def flush(self) -> None:
        assert self.conn is not None
        try:
            sent = self.conn.send(self.outbox)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.drop()
            return
        del self.outbox[:sent]
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.outbox else 0)
        if events != self.conn_events:  # a syscall: only when it changes
            self.sel.modify(self.conn, events, "conn")
            self.conn_events = events


def _recv(conn: socket.socket) -> bytes | None:
    """What the peer sent; b"" at its end (or on an error); None when nothing is there yet."""
    try:
        return conn.recv(READ_SIZE)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def peer_of(conn: socket.socket) -> tuple[int, int]:
    """The pid and uid of the process at the other end of a Unix socket."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _ = struct.unpack("3i", creds)
    return pid, uid
