"""The chat server: h11 and wsproto over anyio sockets, around one engine host.

:class:`ChatServer` listens with anyio (asyncio or trio), speaks HTTP with h11
and WebSocket with wsproto, and runs a :class:`chatcore_host.EngineHost`,
which feeds the engine, keeps its timer and runs the history store. The
server is the host's :class:`~chatcore_host.Transport`: what it owns is what
is specific to sockets:

* on asyncio over plain TCP, asyncio's server accepts and a connection whose
  first request is a complete, acceptable WebSocket upgrade is upgraded from
  its protocol's callbacks, with no task (``_door``); every other request,
  refusal or error goes to ``_handle_tcp``'s task, the only path TLS and trio
  take, which reads the connection from its start;
* every event from a socket becomes one command fed to the host, which
  carries out its effects at once, without awaiting;
* fan-out (:meth:`ChatServer.deliver`) builds each frame once and appends
  the same bytes to every recipient's queue; once per event-loop iteration
  every peer with queued bytes gets one write, and the engine hears of all
  of them in one ``Drained`` (see ``_peer``); only a saturated process
  holds that write back a little (see ``_saturation``). The first fan-out
  of an iteration is held whole instead, and the flush writes it straight
  to each recipient with nothing else queued (one message per flush, the
  common case below saturation, costs no queue per recipient, and when
  every recipient can take it, no bytecode per recipient: ``_write_all``);
  anything else queued to a peer first puts it in the queues, so order holds;
* a failure while writing to one peer ends that peer alone (reset, logged
  with its traceback); the other peers of the same flush are written.

Chat rules live in the engine, hosting in ``chatcore_host``, not here.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import socket
import ssl
import sys
import time
from asyncio.trsock import TransportSocket
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass
from itertools import repeat
from operator import itemgetter
from pathlib import Path
from typing import Any, NamedTuple, cast
from urllib.parse import parse_qsl, urlsplit

import anyio
import anyio.abc
import h11
from anyio.abc import TaskStatus
from anyio.streams.tls import TLSListener
from wsproto.connection import Connection as WebSocket
from wsproto.connection import ConnectionType
from wsproto.utilities import generate_accept_token

from chatcore import (
    Config,
    Connect,
    Disconnected,
    Drained,
    Engine,
    HandshakeError,
    IdSource,
    Pong,
    Receive,
    Shutdown,
    Written,
    parse_connect,
    select_mode,
)
from chatcore_host import (
    MAX_ADMIN_BODY,
    AuthError,
    Bus,
    EngineHost,
    RecordFile,
    ScreenHook,
    authenticate,
    origin_allowed,
    parse_origin,
    repeated_header,
)
from chatcore_host._controls import ChatControls
from chatcore_host._metrics import TransportTally, metrics_registry
from chatcore_host._routes import answer
from chatcore_host._tally import RefusalTally
from chatcore_store import HistoryStore

from . import _http
from ._frames import MessageBound, text_frame
from ._http import Reply, error
from ._peer import ByteTally, Peer, adopt_asyncio, attach_transport
from ._saturation import CoreUse, flush_delay, schedstat_busy

__all__ = ["ChatServer", "Limits"]

log = logging.getLogger("chatcore_server")

# Upgrade headers that must appear once (h11 already refuses a repeated Host).
_SINGLE_HEADERS = (b"origin", b"sec-websocket-key", b"sec-websocket-version")
# The fields ``ChatServer._handshake`` reads (authentication reads its own).
_HANDSHAKE_FIELDS = frozenset(
    (*_SINGLE_HEADERS, b"host", b"upgrade", b"connection", b"sec-websocket-protocol")
)
_CLOSE_ERRORS = (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError)


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Transport bounds; the engine's own bounds are in :class:`chatcore.Config`."""

    max_connections: int = 10_000
    """Open TCP connections; a request beyond this gets 503 and is not upgraded."""
    handshake_timeout: float = 10.0
    """Seconds to receive a complete request (and TLS handshake); else the socket is closed."""
    max_request_bytes: int = 16 * 1024
    """Request line plus headers (h11's bound): more gets 431."""
    max_headers: int = 100
    """Header fields in one request: more gets 431 (however small they are)."""
    max_fragments: int = 64
    """Frames one incoming message may span; more closes the connection with 1009.

    Each continuation frame also counts its header (6 to 14 bytes) against
    ``Config.max_frame_bytes``, so that no fragment is free.
    """
    close_timeout: float = 3.0
    """Seconds a closing connection gets to take its last frames and answer the close."""
    send_buffer: int | None = 64 * 1024
    """``SO_SNDBUF`` asked for on every upgraded socket (Linux keeps twice this).

    On Linux over plain TCP it is set on the listening socket, whose accepted
    sockets inherit it (HTTP requests' sockets as well as upgraded ones).

    Bytes the kernel has taken count as written for the engine, so this is the
    kernel's share of a slow reader's backlog: kept modest, the engine's outbox
    (``Config.outbox_frames``/``outbox_bytes``) is the bound that decides when a
    reader is too slow. ``None`` leaves the kernel's autotuning, which on
    loopback lets one stalled socket absorb megabytes (``net.ipv4.tcp_wmem``)
    before the engine sees any backpressure. Chat-sized frames lose nothing
    by it; a server streaming big messages to fast readers may want more
    (32 KB messages on loopback cost ~15-30% more server CPU per byte at 64 KiB).
    """
    shutdown_timeout: float = 10.0
    """Seconds a graceful shutdown may take in all."""
    retention_interval: float = 60.0
    """Seconds between passes that cut stored rooms down to their retention limits."""
    retain_messages: int | None = None
    """The newest messages a stored room keeps when it has no count limit of its own
    (``chatcore rooms retention``); None keeps them all."""
    retain_age: float | None = None
    """Seconds a stored message is kept when its room has no age limit of its own;
    None keeps it for ever."""


class ChatServer(ChatControls):
    """A WebSocket chat server around one engine and one history store.

    ``await server.serve()`` runs until :meth:`shutdown` (or cancellation);
    ``url = await task_group.start(server.serve)`` gives the address once the
    listener is up, which is how tests and embedding programs start it.
    ``screen`` and ``record`` are :class:`chatcore_host.EngineHost`'s hooks:
    a message filter, and a record of the run for ``chatcore replay``. The
    embedding API (``post``, ``create_room``, ``remove``, ``mute``, ``ban``,
    ``unban``, ``delete_message``) is :class:`chatcore_host.ChatControls`'.
    ``bus`` (a :class:`chatcore_host.RedisBus`) joins this server to others
    that share its PostgreSQL log: see the README's "Several processes".
    """

    def __init__(
        self,
        *,
        config: Config | None = None,
        store: HistoryStore | None = None,
        host: str = "127.0.0.1",
        port: int = 8000,
        ssl_context: ssl.SSLContext | None = None,
        jwt_secret: str | None = None,
        allow_origins: Sequence[str] = (),
        limits: Limits | None = None,
        static_dir: Path | None = None,
        ids: IdSource | None = None,
        ice_servers: Sequence[Mapping[str, Any]] = (),
        metrics_token: str | None = None,
        admin_token: str | None = None,
        screen: ScreenHook | None = None,
        record: RecordFile | None = None,
        bus: Bus | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.limits = limits or Limits()
        self.engine_host = EngineHost(
            self,
            config=config,
            store=store,
            ids=ids,
            retention_every=self.limits.retention_interval,
            retain_messages=self.limits.retain_messages,
            retain_age=self.limits.retain_age,
            screen=screen,
            record=record,
            bus=bus,
        )
        self.config = self.engine_host.config
        self.engine: Engine = self.engine_host.engine
        self.store: HistoryStore = self.engine_host.store
        self.host = host
        self.port = port
        self.reuse_port = reuse_port
        """Listen with ``SO_REUSEPORT``: several processes (each a ChatServer with this
        set) share ``host:port`` and the kernel spreads new connections over them."""
        self.ssl_context = ssl_context
        self.jwt_secret = jwt_secret
        self.admin_token = admin_token
        """``Authorization: Bearer`` this for ``/admin/`` (see docs/protocol.md, "Admin API")."""
        for entry in allow_origins:
            if entry != "*" and parse_origin(entry) is None:
                raise ValueError(f"not an origin: {entry!r} (http[s]://HOST[:PORT], or *)")
        self.allow_origins = tuple(allow_origins)
        self.static_dir = static_dir or _http.STATIC_DIR
        # RTCIceServer entries the browser page uses for calls (GET /config.json).
        self.ice_servers = tuple(dict(entry) for entry in ice_servers)
        self.url = ""
        self._peers: dict[int, Peer] = {}
        self._tcp = 0
        self._next_id = 0
        self._stop: anyio.Event | None = None
        self._stopping = False
        self._drained: anyio.Event | None = None
        self._ws_running = 0
        # Peers with queued bytes, flushed once per turn (a read, a store batch, a tick).
        self.dirty: list[Peer] = []
        # A fan-out not put in its recipients' queues yet: the flush writes it straight
        # to every recipient that has nothing else queued (see ``deliver``).
        self._fanout: tuple[tuple[int, ...], bytes] | None = None
        # The ``direct`` peers, id -> socket descriptor (kept by each peer, see
        # ``Peer.end_direct``): the held fan-out goes to them from C-level loops.
        self._ready: dict[int, int] = {}
        self._flushing = False
        # A queue this long is flushed at once, turn or not, to stay inside the outbox bound.
        self._high_water = max(1, self.config.outbox_frames // 4)
        self._pressure = False
        self._flush_pending = False
        self._flush_wake: anyio.Event | None = None
        # How long the last flush took, and the process's use of its core: a write
        # waits only when that use says the server is saturated (see _saturation).
        self._flush_cost = 0.0
        self._core = CoreUse(time.monotonic(), _loop_busy())
        self._flush_delay_next = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writers: anyio.abc.TaskGroup | None = None
        self._adopted: set[Peer] = set()  # asyncio peers driven by callbacks, not tasks
        # Accepted, first request not read yet: each with its deadline (see _at_door).
        self._doors: dict[asyncio.Protocol, float] = {}
        self._door_timer: asyncio.TimerHandle | None = None
        # Accepted sockets carry TCP_NODELAY and SO_SNDBUF from their listener (Linux).
        self._options_inherited = False
        # Metrics: read at scrape time from the engine, the host and these two.
        self._opened = 0
        self._bytes = ByteTally()
        self._refused = RefusalTally()
        self.metrics = metrics_registry(self.engine_host, self.transport_tally)
        """The registry ``/metrics`` shows (this server's own, not prometheus-client's global)."""
        self.metrics_token = metrics_token
        """Bearer token ``/metrics`` requires; None: served to anyone who can reach it."""

    # -- running -------------------------------------------------------------------

    @property
    def connections(self) -> int:
        """Open WebSocket connections."""
        return len(self._peers)

    def transport_tally(self) -> TransportTally:
        """What the sockets did, for metrics."""
        return TransportTally(
            open=len(self._peers),
            opened=self._opened,
            bytes_written=self._bytes.written,
            refused=self._refused.counts,
        )

    def _refuse(self, reason: str, reply: Reply) -> Reply:
        """``reply`` refuses a connection before the engine sees it: counted by ``reason``."""
        self._refused.count(reason)
        return reply

    @property
    def stopping(self) -> bool:
        """Shutting down: no new WebSocket connections."""
        return self._stopping

    async def serve(self, *, task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen, serve until :meth:`shutdown`, then close everything gracefully."""
        self._stop = anyio.Event()
        listener: anyio.abc.Listener[Any] = await anyio.create_tcp_listener(
            local_host=self.host, local_port=self.port, reuse_port=self.reuse_port
        )
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        if self.ssl_context is not None:
            listener = TLSListener(
                listener,
                self.ssl_context,
                standard_compatible=False,
                handshake_timeout=self.limits.handshake_timeout,
            )
        scheme = "https" if self.ssl_context is not None else "http"
        name = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"{scheme}://{name}:{port}/"
        if self.jwt_secret is None:
            log.warning("no --jwt-secret: clients are trusted to name themselves (unauthenticated)")
        try:
            async with self.engine_host.running(), anyio.create_task_group() as service:
                try:
                    self._loop = asyncio.get_running_loop()
                except RuntimeError:  # not asyncio (trio): a task does the flushing
                    self._loop = None
                    service.start_soon(self._flush_loop)
                async with anyio.create_task_group() as conns:
                    self._writers = conns
                    accept = anyio.CancelScope()
                    conns.start_soon(self._accept, listener, conns, accept)
                    log.info("chatcore listening on %s", self.url)
                    task_status.started(self.url)
                    await self._stop.wait()
                    accept.cancel()
                    with anyio.move_on_after(max(0.1, self.limits.shutdown_timeout - 2)):
                        await self._close_all()
                    conns.cancel_scope.cancel()
                    for peer in list(self._adopted):
                        peer.abort()
                service.cancel_scope.cancel()
            # Leaving engine_host.running() handed the store what was pending and closed it.
        finally:
            for peer in list(self._adopted):  # cancelled rather than shut down
                peer.abort()
            for door in list(self._doors):
                door.shut()  # type: ignore[attr-defined]
            if self._door_timer is not None:
                self._door_timer.cancel()
                self._door_timer = None
            log.info("chatcore stopped")

    def shutdown(self) -> None:
        """Stop accepting, close every client with 1001, flush the store, return from serve."""
        if self._stop is not None:
            self._stop.set()

    async def _accept(
        self,
        listener: anyio.abc.Listener[Any],
        conns: anyio.abc.TaskGroup,
        scope: anyio.CancelScope,
    ) -> None:
        with scope:
            sockets = _plain_sockets(listener) if self.ssl_context is None else None
            if self._loop is not None and sockets and (door := _asyncio_door()) is not None:
                await self._accept_asyncio(self._loop, sockets, door, conns)
            else:
                await listener.serve(self._handle_tcp, conns)
        await listener.aclose()

    async def _accept_asyncio(
        self,
        loop: asyncio.AbstractEventLoop,
        sockets: list[socket.socket],
        door: tuple[type[asyncio.Protocol], Any],
        conns: anyio.abc.TaskGroup,
    ) -> None:
        """Accept with asyncio's own server, on asyncio over plain TCP.

        anyio's ``listener.serve`` accepts one connection per await chain (a
        checkpoint, a cancel scope, a future for the accept and another for the
        transport) and gives each a task. Here asyncio's server accepts every
        pending connection in one callback, with the transport and protocol
        anyio would make, and a connection whose first request is a complete,
        acceptable WebSocket upgrade is upgraded from the protocol's callbacks
        (``_door``): no task at all. Anything else (another route, a refusal,
        a malformed request, EOF) goes to ``_handle_tcp`` on an anyio stream
        over the same transport, which reads it from its start and answers it
        as ever. A connection that sends no whole request within
        ``handshake_timeout`` is closed, as ``_http`` closes one.
        """
        protocol, stream = door
        server = self
        start = conns.start_soon
        handle = self._handle_tcp
        at_door = self._at_door
        left_door = self._doors.pop
        max_size = self.limits.max_request_bytes
        inherited = _set_on_listeners(sockets, self.limits.send_buffer)
        self._options_inherited = inherited
        nodelay = not inherited

        class Accepted(protocol):  # type: ignore[valid-type, misc]
            """anyio's protocol, whose own state is made only if ``_handle_tcp`` takes
            the connection over (``to_task``): an upgrade at the door never needs it."""

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                if nodelay:
                    # asyncio sets TCP_NODELAY only on sockets whose proto says TCP,
                    # and an accepted socket of a listener made with proto 0 says 0:
                    # without it, Nagle holds every small frame back until the last
                    # one is acked. (Set on the listener instead where it carries over.)
                    _no_delay(transport)
                _small_reads(transport)
                self.door: asyncio.Transport | None = cast(asyncio.Transport, transport)
                self.task = False
                self.data: bytes | bytearray = b""
                server._tcp += 1
                at_door(self)  # too slow to send a whole request: closed, as _http closes one

            def data_received(self, data: bytes) -> None:
                transport = self.door
                if transport is None:
                    if self.task:
                        super().data_received(data)
                    return
                searched = len(self.data)
                if not searched:
                    self.data = data
                elif type(self.data) is bytes:
                    self.data = bytearray(self.data) + data
                else:
                    self.data += data
                try:
                    done = server._door(self.data, searched, transport, max_size)
                except Exception:  # a bug before any peer exists:
                    done = False  # _handle_tcp reads the request again, answers or logs it
                if done is not None:
                    self.leave(transport, upgraded=done)

            def eof_received(self) -> bool | None:
                if self.door is not None:
                    self.to_task()
                return cast("bool | None", super().eof_received())

            def connection_lost(self, exc: Exception | None) -> None:
                if self.door is not None:  # gone before a whole request came
                    self.leave(self.door, upgraded=True)
                    server._tcp -= 1
                elif self.task:
                    super().connection_lost(exc)

            def pause_writing(self) -> None:
                if self.task:
                    super().pause_writing()

            def resume_writing(self) -> None:
                if self.task:
                    super().resume_writing()

            def to_task(self) -> None:
                if self.door is not None:
                    self.leave(self.door, upgraded=False)

            def shut(self) -> None:
                """Close a connection that has not sent a whole request."""
                if (transport := self.door) is not None:
                    self.connection_lost(None)
                    transport.close()

            def leave(self, transport: asyncio.Transport, *, upgraded: bool) -> None:
                self.door = None
                left_door(self, None)
                data, self.data = self.data, b""
                if not upgraded:  # _handle_tcp counts it again (an upgraded peer stays counted)
                    server._tcp -= 1
                    self.task = True
                    super().connection_made(transport)  # anyio's state, made only now
                    if data:
                        super().data_received(bytes(data))  # read from its start
                    start(handle, stream(transport, self))

        # (anyio listens with a backlog of 65536; asyncio would set its own 100.)
        servers = [await loop.create_server(Accepted, sock=s, backlog=65536) for s in sockets]
        try:
            await anyio.sleep_forever()
        finally:
            for each in servers:
                each.close()  # stops accepting (the listener's aclose closes the sockets)

    async def _close_all(self) -> None:
        self._stopping = True
        self.engine_host.feed(Shutdown())
        # Engine closes came with Close effects; peers finish within close_timeout.
        while self._peers or self._ws_running:
            self._drained = anyio.Event()
            await self._drained.wait()

    # -- the host's transport: effects to peers ------------------------------------------

    def deliver(self, to: tuple[int, ...], text: str) -> None:
        # One frame for all recipients. The first fan-out of a flush is kept whole: a
        # recipient with nothing else queued gets it from the flush, written as is,
        # with no queue of its own (one message per flush, below saturation). Anything
        # else queued to a peer first puts that fan-out in the queues (``_spill``), so
        # every peer's bytes keep their order.
        frame = text_frame(text.encode())
        if self._fanout is None and len(to) > 1 and not self._flushing:
            self._fanout = (to, frame)
            return
        self._spill()
        self._queue(to, frame)

    def _spill(self) -> None:
        """The fan-out held for the flush goes into its recipients' queues."""
        if (fanout := self._fanout) is not None:
            self._fanout = None
            self._queue(*fanout)

    def _queue(self, to: tuple[int, ...], frame: bytes) -> None:
        # The hot loop of fan-out: one append per recipient. The engine counts the
        # frames; a flush works out what it wrote from the queue it took.
        get = self._peers.get
        mark = self.dirty.append
        high = self._high_water
        for conn in to:
            peer = get(conn)
            if peer is None:
                continue
            out = peer.out
            out.append(frame)
            if not peer.dirty:
                peer.dirty = True
                mark(peer)
            elif len(out) >= high and not (peer.paused or peer.writer):
                # (A blocked peer cannot take more now: flushing early won't help.)
                self._pressure = True

    def close(self, conn: int, code: int, reason: str) -> None:
        self._spill()  # (what was sent to it before goes out before the close frame)
        peer = self._peers.pop(conn, None)
        if peer is not None:
            peer.close(code, reason)

    def ping(self, conn: int) -> None:
        peer = self._peers.get(conn)
        if peer is not None:
            peer.ping()

    def end_turn(self, *, nested: bool) -> None:
        if self._flushing:
            return  # the flush under way writes what its Drained queued
        if self._pressure:
            self._flush()  # a queue reached the high-water mark: do not wait
        elif not nested:
            self._schedule_flush()

    # -- writes: coalesced, one per peer per flush -------------------------------------

    def _schedule_flush(self) -> None:
        """Flush once, after everything else ready in this loop iteration has run.

        Only a saturated process waits a little longer (``_saturation.flush_delay``),
        so that each peer's one write carries several iterations' messages.
        """
        if self._flush_pending or not (self.dirty or self._fanout):
            return
        self._flush_pending = True
        core, now = self._core, time.monotonic()
        if core.due(now):
            core.close(now, _loop_busy())
        delay = flush_delay(core.saturated(now), self._flush_cost)
        if self._loop is not None:
            if delay:
                self._loop.call_later(delay, self._scheduled_flush)
            else:
                self._loop.call_soon(self._scheduled_flush)
        else:
            self._flush_delay_next = delay
            if (wake := self._flush_wake) is not None:
                self._flush_wake = None
                wake.set()

    def _scheduled_flush(self) -> None:
        self._flush_pending = False
        try:
            self._flush()
        except Exception:
            # Never out of here: on trio this runs in a task of the server's own.
            log.critical("internal error flushing; the server goes on", exc_info=True)

    async def _flush_loop(self) -> None:
        """The flush on backends without ``call_soon`` (trio): one wake-up per iteration."""
        while True:
            if not self._flush_pending:
                wake = self._flush_wake = anyio.Event()
                await wake.wait()
            if self._flush_delay_next:
                await anyio.sleep(self._flush_delay_next)
            self._scheduled_flush()

    def _flush(self) -> None:
        """Write every dirty peer's queue (one send each), report them all written.

        A peer whose flush raises is a bug of ours on that connection: it is
        logged with its traceback and that peer alone is dropped (reset); the
        others are written as usual.
        """
        if self._flushing:
            return
        self._flushing = True
        self._pressure = False
        started = time.monotonic()
        try:
            write = os.write
            ready = self._ready
            while self.dirty or self._fanout:
                dirty, self.dirty = self.dirty, []
                drained: list[int] = []
                add = drained.append
                lost: list[Peer] = []
                reached: tuple[int, ...] = ()
                written = 0
                if (fanout := self._fanout) is not None:
                    self._fanout = None
                    to, frame = fanout
                    # The recipients' sockets, if every one can take the frame straight
                    # away: ``direct`` (in ``ready``) with nothing queued (a ``direct``
                    # peer with bytes queued is ``dirty``: out of ``ready`` meanwhile).
                    # Once as many peers are dirty as there are recipients (a burst,
                    # whose fan-outs went into the queues), the loop costs less.
                    fds = None
                    if len(dirty) < len(to):
                        for peer in dirty:
                            ready.pop(peer.id, None)
                        try:  # (a held fan-out has two recipients or more: a tuple)
                            fds = itemgetter(*to)(ready)
                        except KeyError:  # one cannot
                            fds = None
                        for peer in dirty:
                            if peer.direct:
                                ready[peer.id] = peer.transport_fd
                    if fds is None:
                        written = self._fan_out_each(to, frame, dirty, drained, lost)
                    else:
                        # The common case below saturation: no bytecode per recipient.
                        results = _write_all(fds, frame)
                        if results.count(len(frame)) == len(results):
                            reached, written = to, len(frame) * len(to)
                        else:
                            reached, written = self._not_whole(to, results, frame, lost)
                for peer in dirty:
                    try:
                        if peer.direct:
                            # ``Peer.flush``'s path to the socket, inline: once per
                            # recipient of every flush (see ``Peer.direct``).
                            peer.dirty = False
                            out = peer.out
                            if out:
                                data = out[0] if len(out) == 1 else b"".join(out)
                                peer.out = []
                                try:
                                    sent = write(peer.transport_fd, data)
                                except OSError:
                                    sent = 0
                                size = len(data)
                                written += size
                                if sent < size:
                                    peer.short_write(data, sent)
                                add(peer.id)
                        elif peer.flush(lost):
                            add(peer.id)
                    except Exception:
                        self._failed(peer, lost)
                self._bytes.written += written
                if drained:
                    reached += tuple(drained)
                if reached:
                    self.engine_host.feed_or_log(Drained(conns=reached))
                for peer in lost:
                    self._drop(peer)
        finally:
            self._flushing = False
            self._flush_cost = time.monotonic() - started

    def _fan_out_each(
        self,
        to: tuple[int, ...],
        frame: bytes,
        dirty: list[Peer],
        drained: list[int],
        lost: list[Peer],
    ) -> int:
        """The held fan-out, one recipient at a time; the bytes written.

        Straight to a recipient with nothing else queued (the transport takes what
        its socket does not), which joins ``drained``; after what waits in the queue
        of any other, which joins ``dirty``.
        """
        add = drained.append
        size = len(frame)
        written = 0
        write = os.write
        get = self._peers.get
        for conn in to:
            if (peer := get(conn)) is None:
                continue
            try:
                if peer.direct and not peer.out:
                    try:
                        sent = write(peer.transport_fd, frame)
                    except OSError:
                        sent = 0
                    written += size
                    if sent < size:
                        peer.short_write(frame, sent)
                    add(conn)
                    continue
            except Exception:
                self._failed(peer, lost)
                continue
            # Something waits before it: queued after it, written below.
            peer.out.append(frame)
            if not peer.dirty:
                peer.dirty = True
                dirty.append(peer)
        return written

    def _not_whole(
        self,
        to: tuple[int, ...],
        results: list[int | Exception],
        frame: bytes,
        lost: list[Peer],
    ) -> tuple[tuple[int, ...], int]:
        """``_write_all``'s ``results`` for ``to``, some of them not the whole ``frame``:
        the recipients written to and the bytes.

        What a socket did not take, and an ``OSError``, its transport takes (and
        meets the error as usual, see ``Peer.short_write``). Any other exception is
        a bug of ours on that connection, which is dropped alone.
        """
        size = len(frame)
        reached: list[int] = []
        for conn, result in zip(to, results, strict=True):
            if result != size and (peer := self._peers.get(conn)) is not None:
                try:
                    if isinstance(result, Exception) and not isinstance(result, OSError):
                        raise result
                    peer.short_write(frame, result if isinstance(result, int) else 0)
                except Exception:
                    self._failed(peer, lost)
                    continue
            reached.append(conn)
        return tuple(reached), size * len(reached)

    def _failed(self, peer: Peer, lost: list[Peer]) -> None:
        """Writing to ``peer`` raised what it never should (called in an ``except``
        block): a bug of ours on that connection, logged with its traceback; the
        peer is dropped once the flush is done."""
        log.exception("internal error writing to conn=%d user=%s", peer.id, peer.user)
        peer.close_seen = True  # its state is not to be trusted: read no more
        lost.append(peer)

    def _drop(self, peer: Peer) -> None:
        """A peer lost while flushing: the engine hears of it, its socket is reset."""
        try:
            self.peer_lost(peer)
        except Exception:
            log.exception("internal error dropping conn=%d user=%s", peer.id, peer.user)
            peer.abort()

    # -- what peers report (their PeerOwner) --------------------------------------------

    def turn(self) -> AbstractContextManager[None]:
        return self.engine_host.turn()

    def queued(self, peer: Peer) -> None:
        self._spill()
        if not peer.dirty:
            peer.dirty = True
            self.dirty.append(peer)

    def flush_now(self) -> None:
        self._flush()

    def flush_peer(self, peer: Peer) -> None:
        """A paused transport drained: write what waited (outside any turn)."""
        if not peer.dirty:
            peer.dirty = True
            self.dirty.append(peer)
        self._schedule_flush()

    def spawn_writer(self, peer: Peer) -> None:
        if self._writers is not None:
            self._writers.start_soon(peer.write_loop)

    def peer_received(self, peer: Peer, text: str) -> None:
        self.engine_host.feed(Receive(conn=peer.id, text=text))

    def peer_alive(self, peer: Peer) -> None:
        if not peer.closing:
            self.engine_host.feed(Pong(conn=peer.id))

    def peer_written(self, peer: Peer, frames: int, nbytes: int) -> None:
        self.engine_host.feed(Written(conn=peer.id, frames=frames, nbytes=nbytes))

    def peer_left(self, peer: Peer, code: int) -> None:
        """The client sent a close frame (1000: its session ends, no grace period)."""
        peer.closing = True
        if self._peers.pop(peer.id, None) is not None:
            self.engine_host.feed(Disconnected(conn=peer.id, code=code))

    def peer_refused(self, peer: Peer, code: int, reason: str) -> None:
        """The client broke a rule the transport enforces (size, UTF-8, binary)."""
        peer.close(code, reason)
        if self._peers.pop(peer.id, None) is not None:
            self.engine_host.feed(Disconnected(conn=peer.id))

    def peer_lost(self, peer: Peer) -> None:
        """EOF, reset or a failed write."""
        if self._peers.pop(peer.id, None) is not None:
            self.engine_host.feed(Disconnected(conn=peer.id))
        peer.abort()

    def peer_finished(self, peer: Peer) -> None:
        if peer.finished:
            return
        peer.finished = True
        if peer.transport is not None:
            self._tcp -= 1
            self._adopted.discard(peer)
        if self._peers.pop(peer.id, None) is not None:
            self.engine_host.feed(Disconnected(conn=peer.id))
        self._ws_running -= 1
        code = 1006 if peer.aborted and peer.close_code == 1006 else peer.close_code
        log.info("closed conn=%d user=%s code=%d", peer.id, peer.user, code)
        if self._drained is not None and not self._peers and not self._ws_running:
            self._drained.set()

    # -- HTTP ------------------------------------------------------------------------------

    async def _handle_tcp(self, stream: anyio.abc.ByteStream) -> None:
        """One TCP connection's task: nothing it meets may end the server.

        A bug while serving it is logged with its traceback and ends this
        connection alone (``Peer.fail`` once upgraded: close 1011).
        """
        self._tcp += 1
        peer: Peer | None = None
        adopted = False
        try:
            upgraded = await self._http(stream)
            if upgraded is not None:
                # Run the WebSocket from here, so the HTTP parser and request are freed.
                peer, trailing = upgraded
                # A peer the engine refused at once is closing with a writer task on the
                # stream already: it stays on the stream until its close is done.
                if peer.fd >= 0 and not peer.closing:
                    pending = adopt_asyncio(peer, stream)
                    if pending is not None:
                        # From now on asyncio callbacks drive it: this task ends here.
                        adopted = True
                        self._adopted.add(peer)
                        peer.fd = -1
                        peer.feed(trailing + pending)
                        return
                await peer.run(trailing)
        except _CLOSE_ERRORS:
            pass
        except Exception:
            # A bug, not the peer's doing: log it and lose this connection, not the server.
            log.exception("internal error on a connection")
        finally:
            if not adopted:
                self._tcp -= 1
                if peer is not None and not peer.finished:
                    self._forget(peer)  # failed between the upgrade and its read loop
                with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                    await stream.aclose()

    def _forget(self, peer: Peer) -> None:
        """Drop an upgraded peer whose task ended before it could finish it."""
        peer.close_seen = peer.aborted = peer.closing = True
        peer.end_direct()
        peer.fd = -1
        try:
            self.peer_finished(peer)
        except Exception:
            log.exception("internal error dropping conn=%d user=%s", peer.id, peer.user)

    async def _http(self, stream: anyio.abc.ByteStream) -> tuple[Peer, bytes] | None:
        """Answer HTTP requests; the upgraded peer and its first bytes, if any."""
        http = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_request_bytes)
        while True:
            request: h11.Request | None = None
            body = bytearray()
            with anyio.move_on_after(self.limits.handshake_timeout):
                try:
                    request = await _read_request(stream, http, body)
                except h11.RemoteProtocolError as exc:
                    status = exc.error_status_hint
                    reply = (
                        self._refuse(
                            "request_too_large", error(431, "request header fields too large")
                        )
                        if status == 431
                        else self._refuse(
                            "malformed_request", error(status, "malformed HTTP request")
                        )
                    )
                    await _send_reply(stream, http, reply, head=False, close=True)
                    return None
            if request is None:
                return None  # EOF, or too slow to send a request
            # One pass over h11's headers (each of its items is a call): the checks
            # below read this list many times.
            headers = list(request.headers)
            if (
                _request_size(request.target, headers) > self.limits.max_request_bytes
                or len(headers) > self.limits.max_headers
            ):
                # h11 bounds only what arrives in pieces; one big read is bounded here,
                # and so is the number of header fields, however small.
                reply = self._refuse(
                    "request_too_large", error(431, "request header fields too large")
                )
                await _send_reply(stream, http, reply, head=False, close=True)
                return None
            method = request.method.decode("ascii", "replace")
            parts = urlsplit(request.target.decode("latin-1"))
            path = parts.path
            head = method == "HEAD"
            if self._tcp > self.limits.max_connections:
                reply = self._refuse(
                    "server_full", error(503, "too many connections", ("retry-after", "5"))
                )
                await _send_reply(stream, http, reply, head=head, close=True)
                return None
            if path == "/ws":
                checked = self._handshake(request.method, headers, parts.query)
                if isinstance(checked, _Upgrade):
                    peer = self._open_peer(checked, stream, _raw_socket(stream))
                    self.engine_host.feed(checked.connect)
                    trailing, _ = http.trailing_data
                    return peer, bytes(trailing)
                reply = self._refuse(*checked)
            else:
                reply = await answer(self, method, path, parts.query, headers, bytes(body))
            close = http.their_state is not h11.DONE or reply.status >= 500 or self._stopping
            if not await _send_reply(stream, http, reply, head=head, close=close):
                return None
            if http.our_state is h11.MUST_CLOSE or close:
                return None
            try:
                http.start_next_cycle()
            except h11.LocalProtocolError:
                return None

    # -- the WebSocket handshake --------------------------------------------------------------

    def _handshake(
        self, method: bytes, headers: list[tuple[bytes, bytes]], query: str
    ) -> _Upgrade | tuple[str, Reply]:
        """What accepting an upgrade request needs, or why it is refused and the reply
        (to count with ``_refuse``). Changes nothing: the door asks it too."""
        # One pass over the fields the checks read (names are lower case, as h11 and
        # the door give them); the checks then read this, in the order they always had.
        fields: dict[bytes, list[bytes]] = {}
        for name, value in headers:
            if name in _HANDSHAKE_FIELDS:
                if (seen := fields.get(name)) is None:
                    fields[name] = [value]
                else:
                    seen.append(value)
        upgrade = [t.lower() for t in _tokens(fields.get(b"upgrade"))]
        connection = [t.lower() for t in _tokens(fields.get(b"connection"))]
        if "websocket" not in upgrade or "upgrade" not in connection:
            return "bad_handshake", error(
                426,
                "this endpoint speaks WebSocket only",
                ("upgrade", "websocket"),
                ("sec-websocket-version", "13"),
            )
        if method != b"GET":
            return "bad_handshake", error(
                405, "a WebSocket upgrade must be a GET", ("allow", "GET")
            )
        if self._stopping:
            return "shutting_down", error(503, "shutting down", ("retry-after", "5"))
        if any(len(fields.get(name, ())) > 1 for name in _SINGLE_HEADERS):
            repeated = repeated_header(headers, _SINGLE_HEADERS) or b"?"
            return "bad_handshake", error(400, f"more than one {repeated.decode()} header")
        scheme = "https" if self.ssl_context is not None else "http"
        origin = _first(fields.get(b"origin"))
        if origin is not None and not origin_allowed(
            origin, _first(fields.get(b"host")), scheme, self.allow_origins
        ):
            return "origin_not_allowed", error(403, "origin not allowed")
        if _first(fields.get(b"sec-websocket-version")) != "13":
            return "bad_handshake", error(
                426, "WebSocket version 13 only", ("sec-websocket-version", "13")
            )
        key = _first(fields.get(b"sec-websocket-key"))
        if key is None or not _valid_key(key):
            return "bad_handshake", error(400, "missing or invalid Sec-WebSocket-Key")
        user: str | None = None
        if self.jwt_secret is not None:
            try:
                user = authenticate(headers, parse_qsl(query), self.jwt_secret)
            except AuthError as exc:
                return "unauthorized", error(401, str(exc), ("www-authenticate", "Bearer"))
        mode, subprotocol = select_mode(_tokens(fields.get(b"sec-websocket-protocol")))
        try:
            connect = parse_connect(self._next_id + 1, query, mode, user=user)
        except HandshakeError as exc:
            return "bad_query", error(exc.status, exc.reason)
        return _Upgrade(connect, _switching_protocols(key, subprotocol))

    def _open_peer(
        self, upgrade: _Upgrade, stream: anyio.abc.ByteStream | None, raw: socket.socket | None
    ) -> Peer:
        """Register the peer of an accepted upgrade, the 101 queued; the caller then
        feeds its ``Connect`` (once the peer is attached to its transport)."""
        connect = upgrade.connect
        self._next_id = conn = connect.conn
        if raw is not None and self.limits.send_buffer is not None and not self._options_inherited:
            with suppress(OSError):
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.limits.send_buffer)
        fd = -1 if raw is None or stream is None or self.ssl_context is not None else raw.fileno()
        ws = WebSocket(ConnectionType.SERVER)
        bound = MessageBound(self.config.max_frame_bytes, self.limits.max_fragments)
        peer = Peer(
            conn,
            connect.user,
            stream,
            fd,
            ws,
            self,
            bound=bound,
            close_timeout=self.limits.close_timeout,
            tally=self._bytes,
            ready=self._ready,
        )
        # The 101 leads the peer's queue: it goes out in one write with the welcome.
        peer.queue(upgrade.accept)
        self._peers[conn] = peer
        self._ws_running += 1
        self._opened += 1
        if log.isEnabledFor(logging.INFO):
            log.info(
                "opened conn=%d user=%s mode=%s from=%s",
                conn,
                connect.user,
                connect.mode.value,
                _address(raw),
            )
        return peer

    # -- the door: the happy path of a WebSocket upgrade without a task (asyncio) ----------

    def _door(
        self,
        data: bytes | bytearray,
        searched: int,
        transport: asyncio.Transport,
        max_size: int,
    ) -> bool | None:
        """Upgrade a connection from callbacks alone, if its first request is a
        complete, acceptable WebSocket upgrade: True once upgraded, None to wait
        for more bytes, False to hand the connection to ``_handle_tcp``, which
        reads it from its start with h11 (every other request, every refusal,
        every error, anything ``read_upgrade_head`` does not read: one place
        answers those).
        """
        head = _http.read_upgrade_head(data, max_size, searched)
        if head is None or head is False:
            return head
        headers = head.headers
        if (
            head.size > max_size
            or len(headers) > self.limits.max_headers
            or self._tcp > self.limits.max_connections
        ):
            return False
        checked = self._handshake(b"GET", headers, head.query)
        if not isinstance(checked, _Upgrade):
            return False
        peer = self._open_peer(checked, None, transport.get_extra_info("socket"))
        attach_transport(peer, transport)
        self._adopted.add(peer)
        try:
            self.engine_host.feed(checked.connect)
            if head.rest:
                peer.feed(head.rest)
        except Exception:
            # A bug, not the peer's doing: this connection alone is lost.
            log.exception("internal error on a connection")
            if not peer.finished:
                self._forget(peer)
            transport.abort()
        return True

    # -- waiting at the door: one timer for every connection's handshake timeout ---------

    def _at_door(self, door: asyncio.Protocol) -> None:
        """``door`` waits for its first request; closed if it is not whole in time.

        Every door has the same timeout, so the dict's order is its deadlines'
        order, and one timer, armed for the oldest door, serves them all
        (a timer per connection cost a handle and a heap entry each, left in
        asyncio's heap for the whole timeout once cancelled).
        """
        loop = self._loop
        if loop is None:  # (no door without an asyncio loop)
            return
        deadline = loop.time() + self.limits.handshake_timeout
        self._doors[door] = deadline
        if self._door_timer is None:
            self._door_timer = loop.call_at(deadline, self._door_sweep)

    def _door_sweep(self) -> None:
        self._door_timer = None
        loop = self._loop
        if loop is None:
            return
        now = loop.time()
        late: list[asyncio.Protocol] = []
        for door, deadline in self._doors.items():
            if deadline > now:
                self._door_timer = loop.call_at(deadline, self._door_sweep)
                break
            late.append(door)
        for door in late:
            door.shut()  # type: ignore[attr-defined]


class _Upgrade(NamedTuple):
    """An upgrade request that passed every check: its ``Connect`` and its 101."""

    connect: Connect
    accept: bytes


async def _read_request(
    stream: anyio.abc.ByteStream, http: h11.Connection, body: bytearray
) -> h11.Request | None:
    """The next request, or None at EOF. Its body goes into ``body``, up to one
    byte past ``MAX_ADMIN_BODY`` (only the admin API takes a body; more is 413)."""
    request: h11.Request | None = None
    while True:
        event = http.next_event()
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive(65536)
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                data = b""
            http.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            request = event
            continue
        if isinstance(event, h11.Data):
            if len(body) <= MAX_ADMIN_BODY:
                body += event.data[: MAX_ADMIN_BODY + 1 - len(body)]
            continue  # the rest of a body too big: read and dropped
        if isinstance(event, h11.EndOfMessage) or event is h11.PAUSED:
            return request
        if isinstance(event, h11.ConnectionClosed):
            return None
        return None


async def _send_reply(
    stream: anyio.abc.ByteStream, http: h11.Connection, reply: Reply, *, head: bool, close: bool
) -> bool:
    try:
        data = _http.render(reply, http, head=head, close=close)
    except h11.LocalProtocolError:
        return False
    try:
        await stream.send(data)
    except _CLOSE_ERRORS:
        return False
    return True


def _write_all(fds: Sequence[int], data: bytes) -> list[int | Exception]:
    """``os.write(fd, data)`` to each of ``fds``: what each took, or what it raised.

    The loop is C's (``list.extend`` over ``map``), not bytecode. ``extend`` keeps
    what ``map`` gave before a write raised, and ``map`` goes on with the next
    descriptor after it.
    """
    results: list[int | Exception] = []
    writes = map(os.write, fds, repeat(data))
    while True:
        try:
            results.extend(writes)
        except Exception as exc:  # (that write's alone)
            results.append(exc)
        else:
            return results


def _loop_busy() -> float:
    """Seconds the calling thread has run on a CPU (Linux ``schedstat``).

    Waiting for a CPU held by other work does not count (see ``_saturation``).
    Elsewhere, this thread's CPU time.
    """
    try:
        with open("/proc/thread-self/schedstat", "rb") as f:
            return schedstat_busy(f.read())
    except (OSError, ValueError):
        return time.thread_time()


def _no_delay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with suppress(OSError):  # gone already: it ends as ever
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


_READ_SIZE = 64 * 1024


def _small_reads(transport: asyncio.BaseTransport) -> None:
    """Read at most 64 KiB at a time from ``transport`` (as anyio's streams do).

    asyncio's socket transport reads into a new 256 KiB bytes object and then
    shrinks it to what came. Above glibc's 128 KiB threshold every such
    buffer is a fresh ``mmap`` (then ``mremap``, ``munmap`` and a page fault):
    six system calls per connect+close cycle, ~40% of the server's kernel time
    in it. 64 KiB comes from the heap. (An asyncio without this attribute,
    or another loop's transport, is left as it is.)
    """
    if getattr(transport, "max_size", None) == 256 * 1024:
        transport.max_size = _READ_SIZE  # type: ignore[attr-defined]


def _set_on_listeners(sockets: list[socket.socket], send_buffer: int | None) -> bool:
    """Set TCP_NODELAY and ``SO_SNDBUF`` on the listening sockets, where accepted
    sockets inherit them (Linux copies a listener's options into each socket it
    accepts): two system calls per connection fewer. True if they were set there;
    False elsewhere, where each accepted socket gets them as before."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        for sock in sockets:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if send_buffer is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    except OSError:
        return False
    return True


def _asyncio_door() -> tuple[type[asyncio.Protocol], Any] | None:
    """anyio's asyncio protocol and stream classes for an accepted socket, or None
    if this anyio does not have them under these names (then anyio accepts)."""
    try:
        from anyio._backends._asyncio import SocketStream, StreamProtocol
    except ImportError:
        return None
    if not (isinstance(StreamProtocol, type) and issubclass(StreamProtocol, asyncio.Protocol)):
        return None
    return StreamProtocol, SocketStream


def _plain_sockets(listener: anyio.abc.Listener[Any]) -> list[socket.socket] | None:
    """The listening sockets of an anyio TCP listener, or None if it is something else."""
    found: list[socket.socket] = []
    for each in getattr(listener, "listeners", [listener]):
        raw = getattr(each, "_raw_socket", None)
        if not isinstance(raw, socket.socket):
            return None
        found.append(raw)
    return found or None


def _request_size(target: bytes, headers: list[tuple[bytes, bytes]]) -> int:
    return len(target) + sum(len(k) + len(v) + 4 for k, v in headers)


def _raw_socket(stream: anyio.abc.ByteStream) -> socket.socket | None:
    """The stream's socket (None through TLS).

    anyio's ``stream.extra(SocketAttribute.raw_socket)`` builds every socket
    attribute to hand out one, a ``getpeername`` call included: once per
    connection that is a visible share of a connect+close cycle, so a plain
    asyncio stream is asked its transport directly.
    """
    transport = getattr(stream, "_transport", None)
    if isinstance(transport, asyncio.Transport):
        raw = transport.get_extra_info("socket")
        if isinstance(raw, socket.socket | TransportSocket):
            return cast(socket.socket, raw)
    return stream.extra(anyio.abc.SocketAttribute.raw_socket, None)


def _first(values: list[bytes] | None) -> str | None:
    """The first value of a field (``chatcore_host.header``'s answer)."""
    return None if values is None else bytes(values[0]).decode("latin-1")


def _tokens(values: list[bytes] | None) -> list[str]:
    """The comma-separated tokens of a field's values (``header_tokens``' answer)."""
    if values is None:
        return []
    items: list[str] = []
    for value in values:
        items.extend(t.strip() for t in bytes(value).decode("latin-1").split(",") if t.strip())
    return items


def _valid_key(key: str) -> bool:
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


def _switching_protocols(key: str, subprotocol: str | None) -> bytes:
    """The 101 that accepts a checked upgrade request.

    Built here rather than through h11: the connection leaves HTTP at this point,
    so h11's state after it is never used, and this is one format per connection.
    """
    accept = generate_accept_token(key.encode("ascii"))
    protocol = (
        b"" if subprotocol is None else b"Sec-WebSocket-Protocol: %s\r\n" % subprotocol.encode()
    )
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: %s\r\n%s\r\n" % (accept, protocol)
    )


def _address(raw: socket.socket | None) -> str:
    try:
        address = raw.getpeername() if raw is not None else "?"
    except OSError:
        return "?"
    if isinstance(address, tuple):
        return f"{address[0]}:{address[1]}"
    return str(address)
