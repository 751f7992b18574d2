"""One WebSocket connection after the upgrade: its reader, its writer, its queue.

A peer owns the socket and a wsproto connection. It never talks to the
engine itself: it calls back into the server (``on_receive``, ``on_written``,
``on_lost``, ...), which feeds the engine and carries out the effects.

Writes are coalesced: fan-out appends the shared frame bytes to ``out`` and
wakes the writer, which sends everything queued in one ``send`` call and then
reports how many frames and payload bytes it wrote.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import anyio
import anyio.abc
import anyio.lowlevel
from wsproto.connection import Connection as WebSocket
from wsproto.connection import ConnectionState
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    TextMessage,
)

if TYPE_CHECKING:
    from ._server import ChatServer

__all__ = ["Peer"]

log = logging.getLogger("chatcore_server")

_STREAM_ERRORS = (
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
    OSError,
)
_READ_SIZE = 16384  # bounds the frames one read can queue for a whole room


class Peer:
    """The transport side of one engine connection id."""

    __slots__ = (
        "id",
        "user",
        "address",
        "stream",
        "ws",
        "server",
        "out",
        "frames",
        "nbytes",
        "wake",
        "closing",
        "aborted",
        "close_code",
        "close_seen",
        "close_waiter",
        "send_scope",
        "parts",
        "part_bytes",
        "sending",
        "writer_done",
        "done_event",
    )

    def __init__(
        self,
        conn: int,
        user: str,
        address: str,
        stream: anyio.abc.ByteStream,
        ws: WebSocket,
        server: ChatServer,
    ) -> None:
        self.id = conn
        self.user = user
        self.address = address
        self.stream = stream
        self.ws = ws
        self.server = server
        self.out: list[bytes] = []
        self.frames = 0  # engine frames in ``out`` (pings and close frames are not counted)
        self.nbytes = 0
        self.wake: anyio.Event | None = None
        self.closing = False
        self.aborted = False
        self.close_code = 1006
        self.close_seen = False  # the client's close frame arrived (or cannot any more)
        self.close_waiter: anyio.Event | None = None
        self.send_scope: anyio.CancelScope | None = None
        self.parts: list[str] = []
        self.part_bytes = 0
        self.sending = False  # the writer is inside stream.send
        self.writer_done = False
        self.done_event: anyio.Event | None = None

    # -- called by the server while carrying out effects (never blocks) ----------

    def deliver(self, frame: bytes, size: int) -> None:
        self.out.append(frame)
        self.frames += 1
        self.nbytes += size
        if self.frames >= self.server.high_water and not self.sending:
            # A burst of input filled a queue faster than its writer got to run.
            self.server.backlogged = True
        if (wake := self.wake) is not None:
            self.wake = None
            wake.set()

    def ping(self) -> None:
        if self.ws.state is ConnectionState.OPEN:
            self._queue(self.ws.send(Ping()))

    def close(self, code: int, reason: str) -> None:
        """Send a close frame after what is queued, then close the socket.

        A writer stuck on a peer that does not read gets ``close_timeout``
        more seconds, then the socket is aborted.
        """
        if self.closing:
            return
        self.closing = True
        self.close_code = code
        if self.ws.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            self._queue(self.ws.send(CloseConnection(code=code, reason=reason)))
        if self.send_scope is not None:
            self.send_scope.deadline = anyio.current_time() + self.server.limits.close_timeout
        self._wake()

    def abort(self) -> None:
        """The transport is gone: drop what is queued and stop both loops."""
        self.closing = True
        self.aborted = True
        self.out.clear()
        if self.send_scope is not None:
            self.send_scope.cancel()
        self._wake()

    def _queue(self, data: bytes) -> None:
        self.out.append(data)
        self._wake()

    def _wake(self) -> None:
        if (wake := self.wake) is not None:
            self.wake = None
            wake.set()

    # -- the two loops ------------------------------------------------------------

    async def run(self, trailing: bytes, writers: anyio.abc.TaskGroup) -> None:
        """Read in this task; the writer runs in ``writers`` (no task group per connection).

        The writer ends the connection: it closes the stream, which wakes this
        reader if it still waits for data.
        """
        writers.start_soon(self._write_loop)
        try:
            if trailing:
                self.ws.receive_data(trailing)
                await self._events()
            if not self.close_seen:
                await self._read_loop()
            if not self.writer_done:  # it sends what is left, the close frame last
                self.done_event = anyio.Event()
                await self.done_event.wait()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                await self.stream.aclose()
            self.server.peer_finished(self)

    async def _read_loop(self) -> None:
        stream = self.stream
        ws = self.ws
        while True:
            try:
                data = await stream.receive(_READ_SIZE)
            except _STREAM_ERRORS:
                self.server.peer_lost(self)
                return
            ws.receive_data(data)
            await self._events()
            if self.close_seen:
                return

    async def _events(self) -> None:
        server = self.server
        for event in self.ws.events():
            if isinstance(event, TextMessage):
                if server.backlogged:
                    # Let the woken writers send before this message fans out more.
                    server.backlogged = False
                    await anyio.lowlevel.checkpoint()
                if self.closing:
                    continue
                data = event.data
                size = len(data) if data.isascii() else len(data.encode())
                if self.part_bytes + size > server.config.max_frame_bytes:
                    self.parts.clear()
                    server.peer_refused(self, 1009, "message too big")
                    continue
                if event.message_finished and not self.parts:
                    server.peer_received(self, data)
                elif event.message_finished:
                    self.parts.append(data)
                    text = "".join(self.parts)
                    self.parts.clear()
                    self.part_bytes = 0
                    server.peer_received(self, text)
                else:
                    self.parts.append(data)
                    self.part_bytes += size
            elif isinstance(event, Ping):
                if self.ws.state is ConnectionState.OPEN:
                    self._queue(self.ws.send(event.response()))
                server.peer_alive(self)
            elif isinstance(event, Pong):
                server.peer_alive(self)
            elif isinstance(event, CloseConnection):
                self.close_seen = True
                if self.close_waiter is not None:
                    self.close_waiter.set()
                if self.ws.state is ConnectionState.REMOTE_CLOSING:
                    # The client closed: answer with its code, then hang up.
                    if not self.closing:
                        self.close_code = event.code
                        self._queue(self.ws.send(event.response()))
                        server.peer_left(self)
                elif self.ws.state is ConnectionState.OPEN:
                    # wsproto found a protocol error (bad UTF-8: 1007, ...).
                    server.peer_refused(self, event.code, event.reason or "protocol error")
                return
            elif isinstance(event, BytesMessage) and not self.closing:
                server.peer_refused(self, 1003, "binary frames are not supported")

    async def _write_loop(self) -> None:
        try:
            await self._write()
        finally:
            self.writer_done = True
            with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                await self.stream.aclose()  # wakes the reader
            if self.done_event is not None:
                self.done_event.set()

    async def _write(self) -> None:
        stream = self.stream
        server = self.server
        while True:
            if self.aborted:
                return
            while not self.out:
                if self.closing:
                    await self._finish()
                    return
                wake = self.wake = anyio.Event()
                await wake.wait()
            out = self.out
            frames, nbytes = self.frames, self.nbytes
            self.out = []
            self.frames = self.nbytes = 0
            data = out[0] if len(out) == 1 else b"".join(out)
            with anyio.CancelScope() as scope:
                if self.closing:
                    scope.deadline = anyio.current_time() + server.limits.close_timeout
                self.send_scope = scope
                self.sending = True
                try:
                    await stream.send(data)
                except _STREAM_ERRORS:
                    server.peer_lost(self)
                    return
                finally:
                    self.send_scope = None
                    self.sending = False
            if scope.cancelled_caught:  # closing, and the peer does not read
                self.abort()
                return
            if frames and not self.closing:
                server.peer_written(self, frames, nbytes)

    async def _finish(self) -> None:
        """Everything is sent, the close frame last: wait for the client's reply."""
        if not self.aborted and not self.close_seen:
            self.close_waiter = anyio.Event()
            with anyio.move_on_after(self.server.limits.close_timeout):
                await self.close_waiter.wait()
