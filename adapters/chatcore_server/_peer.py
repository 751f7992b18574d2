"""One WebSocket connection after the upgrade: its reader, its queue, its writes.

A peer owns the socket and a wsproto connection. It never talks to the
engine itself: it calls back into its :class:`PeerOwner` (``peer_received``,
``peer_lost``, ...), which feeds the engine and carries out the effects. That
owner is all a peer knows of the server, so a test can feed a peer bytes
with an owner of its own.

Writes cost no task switch: fan-out appends the shared frame bytes to
``out`` and marks the peer dirty; once per turn the server flushes every
dirty peer with one non-blocking write of everything queued to the raw
socket (for a ``direct`` peer the server makes that write itself, see
``ChatServer._flush``; a ``direct`` peer is in its owner's ``ready``, so
that a fan-out can reach it with no call into it at all).
Only a peer whose socket is full (a slow reader), a TLS peer (whose bytes
must go through the TLS layer) or a closing peer gets a writer task, which
sends through the anyio stream from then on, so order is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections import deque
from contextlib import AbstractContextManager
from typing import Protocol

import anyio
import anyio.abc
from wsproto.connection import Connection as WebSocket
from wsproto.connection import ConnectionState
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    TextMessage,
)

from ._frames import MessageBound, read_text_frame

__all__ = ["Peer", "PeerOwner", "adopt_asyncio", "attach_transport"]

log = logging.getLogger("chatcore_server")

_STREAM_ERRORS = (
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
    OSError,
)
_READ_SIZE = 65536
_MAX_PARTS = 64  # pieces of one message kept apart before they are joined
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close sends RST


class PeerOwner(Protocol):
    """What a peer needs of its server: a turn to read in, writes, and what it reports.

    The ``peer_*`` calls report what the connection did; the owner feeds the
    engine and may call back into the peer (``queue``, ``close``, ``abort``).
    """

    def turn(self) -> AbstractContextManager[None]:
        """Engine calls made inside share one flush (one read's messages)."""
        ...

    def queued(self, peer: Peer) -> None:
        """``peer`` is about to queue bytes of its own (a pong, a close): put what the
        owner holds for it in its queue first, and flush it at the end of the turn."""
        ...

    def flush_peer(self, peer: Peer) -> None:
        """``peer``'s transport can take bytes again: flush it soon, outside any turn."""
        ...

    def flush_now(self) -> None:
        """Write every queued byte now (a closing peer's last frames)."""
        ...

    def spawn_writer(self, peer: Peer) -> None:
        """Run ``peer.write_loop`` as a task of the server's."""
        ...

    def peer_received(self, peer: Peer, text: str) -> None: ...

    def peer_alive(self, peer: Peer) -> None:
        """A ping or a pong came."""
        ...

    def peer_written(self, peer: Peer, frames: int, nbytes: int) -> None: ...

    def peer_left(self, peer: Peer, code: int) -> None:
        """The client sent a close frame with ``code``."""
        ...

    def peer_refused(self, peer: Peer, code: int, reason: str) -> None:
        """The client broke a rule the transport enforces: close it with ``code``."""
        ...

    def peer_lost(self, peer: Peer) -> None:
        """EOF, a reset or a failed write."""
        ...

    def peer_finished(self, peer: Peer) -> None:
        """The connection is closed and its socket released (called once)."""
        ...


class ByteTally:
    """Bytes written to the sockets of a server's peers, for metrics."""

    __slots__ = ("written",)

    def __init__(self) -> None:
        self.written = 0


class Peer:
    """The transport side of one engine connection id."""

    __slots__ = (
        "id",
        "user",
        "stream",
        "fd",
        "ws",
        "owner",
        "close_timeout",
        "out",
        "control",
        "control_bytes",
        "frames",
        "nbytes",
        "dirty",
        "writer",
        "wake",
        "closing",
        "aborted",
        "close_code",
        "close_seen",
        "close_waiter",
        "send_scope",
        "parts",
        "bound",
        "between",
        "done",
        "transport",
        "transport_fd",
        "buffered",
        "direct",
        "ready",
        "paused",
        "timer",
        "finished",
        "tally",
    )

    def __init__(
        self,
        conn: int,
        user: str,
        stream: anyio.abc.ByteStream | None,
        fd: int,
        ws: WebSocket,
        owner: PeerOwner,
        *,
        bound: MessageBound,
        close_timeout: float,
        tally: ByteTally | None = None,
        ready: dict[int, int] | None = None,
    ) -> None:
        self.tally = tally if tally is not None else ByteTally()
        self.id = conn
        self.user = user
        # None once asyncio callbacks drive the transport (see ``adopt_asyncio``), or
        # for a peer that is only fed bytes (``feed``) and whose queue is read directly.
        self.stream: anyio.abc.ByteStream | None = stream
        self.fd = fd  # -1: every write goes through the stream (TLS, or closed)
        self.ws = ws
        self.owner = owner
        self.close_timeout = close_timeout
        # Engine frames and the other bytes (101, ping, pong, close) in sending order.
        # Fan-out only appends: what a write carried is worked out when it is taken.
        self.out: list[bytes] = []
        self.control = 0  # items in ``out`` that are not engine frames
        self.control_bytes = 0
        # Engine frames written but not reported yet (a write cut short, see ``flush``).
        self.frames = 0
        self.nbytes = 0
        self.dirty = False  # reported ``queued`` to the owner, to be flushed
        self.writer = False  # a writer task owns the writes from now on
        self.wake: anyio.Event | None = None
        self.closing = False
        self.aborted = False
        self.close_code = 1006
        self.close_seen = False  # the client's close frame arrived (or cannot any more)
        self.close_waiter: anyio.Event | None = None
        self.send_scope: anyio.CancelScope | None = None
        # The message being received, in pieces (fragments, or a frame read in parts).
        self.parts: list[str] = []
        self.bound = bound
        # Everything wsproto was given ended at a frame boundary outside a message
        # (it holds nothing): the next whole text frames may be read without it.
        self.between = True
        self.done: anyio.Event | None = None
        # asyncio only: the transport this peer drives through callbacks, no task at all.
        self.transport: asyncio.Transport | None = None
        self.transport_fd = -2  # its socket's descriptor, looked up at the first write
        # The transport may hold bytes of ours (a write it took, or anyio's before
        # adoption): ask it before writing past it. False once it said it holds
        # none and nothing went to it since: no need to ask on every flush.
        self.buffered = True
        # The server may write this peer's queue itself (``ChatServer._flush``), with no
        # call into it: an adopted transport that holds nothing of ours, whose socket is
        # known, not closing, not paused, with only engine frames queued. Set only by
        # ``flush`` (which checks all of that), cleared by everything that ends one of them
        # (through ``end_direct``).
        self.direct = False
        # The owner's ``direct`` peers, id -> socket descriptor: this one is in it exactly
        # while it is ``direct``. The owner writes a fan-out to those of them with nothing
        # queued with no call into any peer (``ChatServer._flush``).
        self.ready = ready if ready is not None else {}
        self.paused = False  # the transport's buffer is above its high-water mark
        self.timer: asyncio.TimerHandle | None = None
        self.finished = False

    # -- called by the server while carrying out effects (never blocks) ----------

    def queue(self, data: bytes) -> None:
        """Queue bytes that are not engine frames (101, ping, pong, close)."""
        self.owner.queued(self)
        self.out.append(data)
        self.control += 1
        self.control_bytes += len(data)
        self.end_direct()  # (``flush`` counts what is not an engine frame)

    def ping(self) -> None:
        if self.ws.state is ConnectionState.OPEN:
            self.queue(self.ws.send(Ping()))

    def close(self, code: int, reason: str) -> None:
        """Send a close frame after what is queued, then close the socket.

        A peer that does not read gets ``close_timeout`` more seconds, then
        the socket is aborted.
        """
        if self.closing:
            return
        self.closing = True
        self.end_direct()
        self.close_code = code
        if self.ws.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            self.queue(self.ws.send(CloseConnection(code=code, reason=reason)))
        if self.transport is not None:
            loop = asyncio.get_running_loop()
            self.timer = loop.call_later(self.close_timeout, self.abort)
            return
        if self.send_scope is not None:
            self.send_scope.deadline = anyio.current_time() + self.close_timeout
        self.start_writer()

    def abort(self) -> None:
        """The transport is gone: drop what is queued and stop."""
        self.closing = True
        self.aborted = True
        self.end_direct()
        self.out.clear()
        self.control = self.control_bytes = 0
        if self.transport is not None:
            _reset_on_close(self.transport.get_extra_info("socket"))
            self.transport.abort()
            return
        if self.send_scope is not None:
            self.send_scope.cancel()
        self.start_writer()  # it closes the stream, which wakes the reader

    def _take(self) -> tuple[bytes, int, int]:
        """Everything queued as one write: its bytes, engine frames and their bytes.

        The frame count is exact. The byte count includes each frame's 2-10 byte
        header: reported, it can only free a little more than was queued, and the
        engine floors its count at zero, which is exact whenever the queue empties.
        """
        out = self.out
        data = out[0] if len(out) == 1 else b"".join(out)
        frames = len(out) - self.control
        nbytes = len(data) - self.control_bytes
        self.out = []
        self.control = self.control_bytes = 0
        return data, frames, nbytes

    def flush(self, lost: list[Peer]) -> bool:
        """Send what is queued without blocking; True if that emptied a queue that
        held engine frames (the engine hears it as ``Drained``: no counting)."""
        self.dirty = False
        transport = self.transport
        if transport is not None:  # (inline: once per recipient of every flush)
            if self.paused or transport.is_closing():
                return False  # kept (and counted by the engine) until the client reads again
            out = self.out
            if not out:
                return False
            # ``_take``, inlined: this runs once per recipient of every flush.
            data = out[0] if len(out) == 1 else b"".join(out)
            frames = len(out) - self.control
            self.out = []
            if self.control:
                self.control = self.control_bytes = 0
            # Taken by the transport counts as written: its buffer holds at most one flush
            # beyond its high-water mark, since nothing is written to it while paused.
            # (Holding frames until the buffer drains would report them late by a whole
            # flush, and close readers that keep up with big messages.)
            fd = self.transport_fd
            if fd == -2:
                sock = transport.get_extra_info("socket")
                fd = self.transport_fd = sock.fileno() if sock is not None else -1
            if fd >= 0 and not (self.buffered and transport.get_write_buffer_size()):
                self.buffered = False
                # Straight to the socket, as the transport would (its buffer is empty), but
                # without its checks: 1,800 instructions per write instead of 3,400, on
                # the path every delivery takes when each flush carries one message. What
                # the socket does not take, and any error, the transport takes as usual.
                # (The descriptor is the transport's own while it is not closing, checked
                # above: once it closes, no write comes here and the number may be reused.)
                try:
                    sent = os.write(fd, data)
                except OSError:
                    sent = 0
                if sent < len(data):
                    self.short_write(data, sent)
            else:
                transport.write(data)
                self.buffered = True
            self.tally.written += len(data)
            if self.closing and self.close_seen:
                transport.close()
            if self.buffered or self.closing or self.paused:
                self.end_direct()
            else:
                self.direct = True
                self.ready[self.id] = fd
            return frames > 0 and not self.closing
        out = self.out
        if not out:
            return False
        if self.writer or self.fd < 0:
            if not self.aborted:
                self.start_writer()
            return False
        data, frames, nbytes = self._take()
        try:
            sent = os.write(self.fd, data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            lost.append(self)
            return False
        self.tally.written += sent
        if sent < len(data):
            # The socket is full: a writer task waits for room from now on. The rest
            # is no frame of its own; its frames are reported once it is sent.
            self.frames += frames
            self.nbytes += nbytes
            rest = data[sent:]
            self.out = [rest]
            self.control, self.control_bytes = 1, len(rest)
            self.start_writer()
            return False
        frames += self.frames
        nbytes += self.nbytes
        self.frames = self.nbytes = 0
        return frames > 0

    def short_write(self, data: bytes, sent: int) -> None:
        """A write straight to the socket took ``sent`` bytes of ``data``: the transport
        takes the rest (and any error, as usual), and holds bytes of ours from now on."""
        if self.transport is not None:
            self.transport.write(data[sent:] if sent else data)
        self.buffered = True
        self.end_direct()

    def end_direct(self) -> None:
        """Every write goes through ``flush`` from now on (see ``direct``)."""
        self.direct = False
        self.ready.pop(self.id, None)

    def start_writer(self) -> None:
        if not self.writer:
            self.writer = True
            self.done = anyio.Event()
            self.owner.spawn_writer(self)
        elif (wake := self.wake) is not None:
            self.wake = None
            wake.set()

    # -- reading ---------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Bytes from an adopted asyncio transport (see ``adopt_asyncio``)."""
        if self.close_seen or self.aborted or not data:
            return
        try:
            self._receive(data)
        except Exception:
            self.fail()
            return
        if self.close_seen and self.closing and not self.out and self.transport is not None:
            self.transport.close()  # our close frame went out and the client answered

    def fail(self) -> None:
        """A bug while serving this connection: log it and end this connection alone.

        Called from an ``except`` block. Nothing more is read from the client;
        it gets close 1011 after what is queued, or a reset if even that fails.
        """
        log.exception("internal error on conn=%d user=%s", self.id, self.user)
        self.close_seen = True  # its state is not to be trusted: read nothing more
        try:
            self.owner.peer_refused(self, 1011, "internal error")
        except Exception:
            log.exception("conn=%d could not be closed cleanly; resetting it", self.id)
            self.abort()

    async def run(self, trailing: bytes) -> None:
        """Read until the connection ends; then wait for the writer to finish, if any."""
        owner = self.owner
        try:
            try:
                if trailing:
                    self._receive(trailing)
                if not self.close_seen:
                    await self._read_loop()
            except Exception:
                self.fail()
            if self.writer and self.done is not None:
                with anyio.move_on_after(self.close_timeout + 1):
                    await self.done.wait()
        finally:
            stream = self.stream
            if not self.writer and stream is not None:
                owner.flush_now()  # a close frame may still wait for the deferred flush
                self.fd = -1  # never write to a descriptor number that may be reused
                with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                    await stream.aclose()
            owner.peer_finished(self)

    async def _read_loop(self) -> None:
        stream = self.stream
        if stream is None:  # adopted by asyncio callbacks: they read, not this task
            return
        while True:
            try:
                data = await stream.receive(_READ_SIZE)
            except _STREAM_ERRORS:
                self.owner.peer_lost(self)
                return
            self._receive(data)
            if self.close_seen:
                return

    def _receive(self, data: bytes) -> None:
        bound = self.bound
        over = None if self.closing else bound.check(data)
        with self.owner.turn():
            if over is None:
                start = 0
                if self.between and self.ws.state is ConnectionState.OPEN:
                    # wsproto holds nothing: whole text frames are read here (see
                    # ``_frames.read_text_frame``); from the first other one on, wsproto.
                    owner = self.owner
                    while not self.closing and (got := read_text_frame(data, start)):
                        text, start = got
                        owner.peer_received(self, text)
                if start < len(data):
                    self.ws.receive_data(data[start:] if start else data)
                    self._events()
                self.between = bound.between_messages
                return
            self.between = False  # (closing: read by wsproto alone from now on)
            # A header over a bound: what came before it still counts, then 1009.
            at, reason = over
            at = max(at, 0)
            if at:
                self.ws.receive_data(data[:at])
                self._events()
            if not self.closing:
                self.parts.clear()
                self.owner.peer_refused(self, 1009, reason)
            if not self.close_seen:
                # Read on only to see the client's answer to the close (whatever it
                # sends meanwhile is dropped); close_timeout bounds the wait.
                self.ws.receive_data(data[at:])
                self._events()

    def _events(self) -> None:
        owner = self.owner
        for event in self.ws.events():
            if isinstance(event, TextMessage):
                # Sizes were checked on the frame headers (``MessageBound``).
                if self.closing:
                    continue
                parts = self.parts
                if event.message_finished and not parts:
                    owner.peer_received(self, event.data)
                elif event.message_finished:
                    parts.append(event.data)
                    text = "".join(parts)
                    parts.clear()
                    owner.peer_received(self, text)
                else:
                    parts.append(event.data)
                    if len(parts) >= _MAX_PARTS:
                        # A frame trickling in byte by byte: keep one string, not
                        # one object per read.
                        parts[:] = ["".join(parts)]
            elif isinstance(event, Ping):
                if self.ws.state is ConnectionState.OPEN:
                    self.queue(self.ws.send(event.response()))
                owner.peer_alive(self)
            elif isinstance(event, Pong):
                owner.peer_alive(self)
            elif isinstance(event, CloseConnection):
                self.close_seen = True
                if self.close_waiter is not None:
                    self.close_waiter.set()
                if self.ws.state is ConnectionState.REMOTE_CLOSING:
                    # The client closed: answer with its code, then hang up.
                    if not self.closing:
                        self.close_code = event.code
                        self.queue(self.ws.send(event.response()))
                        owner.peer_left(self, event.code)
                elif self.ws.state is ConnectionState.OPEN:
                    # wsproto found a protocol error (bad UTF-8: 1007, ...).
                    owner.peer_refused(self, event.code, event.reason or "protocol error")
                return
            elif isinstance(event, BytesMessage) and not self.closing:
                owner.peer_refused(self, 1003, "binary frames are not supported")

    # -- the writer task (slow, TLS or closing peers only) -------------------------------

    async def write_loop(self) -> None:
        stream = self.stream
        if stream is None:
            # Adopted by asyncio callbacks, which write themselves. (The server adopts
            # no peer that is already closing, the one way a writer could start first.)
            self.writer = False
            if self.done is not None:
                self.done.set()
            return
        try:
            await self._write(stream)
        except Exception:
            # A bug: this task is the server's, so it must not raise. The socket is
            # reset below (no close frame: this writer is what would send it).
            log.exception("internal error writing to conn=%d user=%s", self.id, self.user)
            self.close_seen = True
            self.aborted = True
            try:
                self.owner.peer_lost(self)
            except Exception:
                log.exception("conn=%d could not be dropped cleanly", self.id)
        finally:
            self.fd = -1
            if self.aborted:
                _reset_on_close(stream.extra(anyio.abc.SocketAttribute.raw_socket, None))
            with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                await stream.aclose()  # wakes the reader
            if self.done is not None:
                self.done.set()

    async def _write(self, stream: anyio.abc.ByteStream) -> None:
        owner = self.owner
        while True:
            if self.aborted:
                return
            if not self.out:
                if self.closing:
                    await self._finish()
                    return
                wake = self.wake = anyio.Event()
                await wake.wait()
                continue
            data, frames, nbytes = self._take()
            frames += self.frames
            nbytes += self.nbytes
            self.frames = self.nbytes = 0
            with anyio.CancelScope() as scope:
                if self.closing:
                    scope.deadline = anyio.current_time() + self.close_timeout
                self.send_scope = scope
                try:
                    await stream.send(data)
                    self.tally.written += len(data)
                except _STREAM_ERRORS:
                    owner.peer_lost(self)
                    return
                finally:
                    self.send_scope = None
            if scope.cancelled_caught:  # closing, and the peer does not read
                self.aborted = True
                return
            if frames and not self.closing:
                owner.peer_written(self, frames, nbytes)

    async def _finish(self) -> None:
        """Everything is sent, the close frame last: wait for the client's reply."""
        if not self.aborted and not self.close_seen:
            self.close_waiter = anyio.Event()
            with anyio.move_on_after(self.close_timeout):
                await self.close_waiter.wait()


def _reset_on_close(sock: socket.socket | None) -> None:
    """Make closing ``sock`` send a reset and drop what is unsent.

    A plain close of a socket whose reader stopped leaves the kernel holding
    the unsent bytes (up to the send buffer) in FIN-WAIT-1 for minutes, with
    the close frame and the FIN stuck behind them: the client never learns it
    was closed and the memory stays taken. Used only once a peer is given up.
    """
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


# -- asyncio: the connection driven by transport callbacks ---------------------------------


def adopt_asyncio(peer: Peer, stream: anyio.abc.ByteStream) -> bytes | None:
    """Move ``peer`` from anyio's stream to callbacks on its asyncio transport.

    Returns bytes anyio had read but not handed out yet, or None when the
    stream is not a plain asyncio socket stream (TLS, trio, or an anyio that
    changed its internals), in which case the peer runs with tasks instead.
    """
    transport = getattr(stream, "_transport", None)
    protocol = getattr(stream, "_protocol", None)
    queue = getattr(protocol, "read_queue", None)
    if (
        not isinstance(transport, asyncio.Transport)
        or not isinstance(queue, deque)
        or transport.is_closing()
        or getattr(protocol, "exception", None) is not None
        or getattr(protocol, "is_at_eof", False)
    ):
        return None
    pending = b"".join(queue)
    queue.clear()
    # Let anyio's stream go: its protocol's queue and events are ~2 KiB per connection.
    peer.stream = None
    attach_transport(peer, transport)
    return pending


def attach_transport(peer: Peer, transport: asyncio.Transport) -> None:
    """From now on callbacks on ``transport`` drive ``peer`` (it has no stream)."""
    peer.transport = transport
    transport.set_protocol(_Link(peer))
    transport.set_write_buffer_limits(high=64 * 1024, low=16 * 1024)
    if not transport.is_reading():
        transport.resume_reading()


class _Link(asyncio.Protocol):
    """asyncio callbacks for one adopted peer."""

    __slots__ = ("peer",)

    def __init__(self, peer: Peer) -> None:
        self.peer = peer

    def data_received(self, data: bytes) -> None:
        self.peer.feed(data)

    def eof_received(self) -> bool:
        try:
            self.peer.owner.peer_lost(self.peer)
        except Exception:
            self.peer.fail()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        peer = self.peer
        peer.end_direct()  # its socket is closed after this returns
        if peer.timer is not None:
            peer.timer.cancel()
        try:
            if not peer.closing:
                peer.owner.peer_lost(peer)
        except Exception:
            log.exception("internal error dropping conn=%d user=%s", peer.id, peer.user)
        peer.aborted = peer.aborted or not peer.close_seen
        peer.owner.peer_finished(peer)

    def pause_writing(self) -> None:
        self.peer.paused = True
        self.peer.end_direct()

    def resume_writing(self) -> None:
        peer = self.peer
        peer.paused = False
        if peer.out:
            peer.owner.flush_peer(peer)  # write what waited
