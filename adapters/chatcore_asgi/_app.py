"""The ASGI application: chatcore's WebSocket endpoint and pages inside any ASGI server.

:class:`ChatApp` is an ASGI 3 application and the host's
:class:`~chatcore_host.Transport`. It owns what is specific to ASGI:

* the handshake's refusals, answered before ``websocket.accept``: an HTTP
  response through the ``websocket.http.response`` extension where the
  server offers it, else accept-and-close with ``4000 + status``;
* one :class:`~chatcore_asgi._link.Link` per connection, whose writer awaits
  ``send`` and reports what it took back to the engine, batched once per
  event-loop pass (``Drained``/``WrittenMany``);
* heartbeats: ASGI has no ping event, so an engine ``Ping`` is answered here
  from what the writer sees (docs/protocol.md, "Behind an ASGI server");
* lifespan: standalone it runs the engine from the ``lifespan`` events; mounted
  inside another app, that app enters :meth:`ChatApp.running`.

The HTTP routes (page, static files, ``/healthz``, ``/readyz``, ``/metrics``,
``/rooms``, history, the admin API) are the standalone server's own,
``chatcore_host._routes.answer``; request policy is ``chatcore_host``'s. Chat
rules live in the engine, not here. Nothing here imports h11 or wsproto.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import anyio
import anyio.abc

from chatcore import (
    Config,
    Connect,
    Disconnected,
    Drained,
    HandshakeError,
    IdSource,
    Pong,
    Receive,
    Shutdown,
    WrittenMany,
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
    header,
    origin_allowed,
    parse_origin,
    repeated_header,
)
from chatcore_host._controls import ChatControls
from chatcore_host._metrics import TransportTally, metrics_registry
from chatcore_host._reply import STATIC_DIR, Reply, error
from chatcore_host._routes import answer
from chatcore_host._tally import RefusalTally
from chatcore_store import HistoryStore

from ._link import Link, Message, Send, Wake, send_close, wake_maker

__all__ = ["ChatApp", "Identify", "Scope"]

log = logging.getLogger("chatcore_asgi")

Scope = MutableMapping[str, Any]
ASGIReceive = Callable[[], Awaitable[Message]]

Identify = Callable[[Scope], "Awaitable[str | None] | str | None"]
"""Maps a request's ASGI scope to the chat user's name; None refuses it (401).

Raising :class:`chatcore_host.AuthError` refuses it with that message.
"""

_SINGLE_HEADERS = (b"origin", b"sec-websocket-key", b"sec-websocket-version")
_MAX_HEADERS = 100  # header fields of an upgrade request (as chatcore serve)
_MAX_REQUEST_BYTES = 16 * 1024  # its target and headers
_REFUSAL_CLOSE_BASE = 4000
"""Without ``websocket.http.response``: accept, then close ``4000 + status``."""
_SEND_STUCK = 5.0
"""Seconds a ``send`` may stay pending before the link no longer counts as alive."""


class ChatApp(ChatControls):
    """chatcore as an ASGI 3 application: ``/ws`` and every HTTP route of ``chatcore serve``.

    Standalone (``uvicorn module:app``) it starts and stops the engine from
    the server's lifespan events. Mounted in another app (Starlette and
    FastAPI do not pass lifespan events to mounted apps), enter
    ``async with chat.running():`` in that app's lifespan.

    ``identify(scope)`` (sync or async) names the chat user from the
    request (a cookie, a header, a session); without it an HS256 token is
    required when ``jwt_secret`` is set, and the ``user`` parameter is
    trusted otherwise.

    ``screen`` and ``record`` are :class:`chatcore_host.EngineHost`'s hooks
    (a message filter; a record for ``chatcore replay``), and the embedding
    API (``post``, ``create_room``, ``remove``, ``mute``, ``ban``, ``unban``,
    ``delete_message``) is :class:`chatcore_host.ChatControls`', as on
    ``ChatServer``.
    ``bus`` (a :class:`chatcore_host.RedisBus`) joins this app to other
    processes sharing its PostgreSQL log (see the README's "Several processes").
    """

    def __init__(
        self,
        *,
        config: Config | None = None,
        store: HistoryStore | None = None,
        jwt_secret: str | None = None,
        identify: Identify | None = None,
        allow_origins: Sequence[str] = (),
        static_dir: Path | None = None,
        max_connections: int = 10_000,
        admin_token: str | None = None,
        metrics_token: str | None = None,
        close_timeout: float = 3.0,
        shutdown_timeout: float = 10.0,
        ids: IdSource | None = None,
        retention_interval: float = 60.0,
        retain_messages: int | None = None,
        retain_age: float | None = None,
        screen: ScreenHook | None = None,
        record: RecordFile | None = None,
        bus: Bus | None = None,
    ) -> None:
        self.engine_host = EngineHost(
            self,
            config=config,
            store=store,
            ids=ids,
            retention_every=retention_interval,
            retain_messages=retain_messages,
            retain_age=retain_age,
            screen=screen,
            record=record,
            bus=bus,
        )
        self.config = self.engine_host.config
        self.jwt_secret = jwt_secret
        self.identify = identify
        for entry in allow_origins:
            if entry != "*" and parse_origin(entry) is None:
                raise ValueError(f"not an origin: {entry!r} (http[s]://HOST[:PORT], or *)")
        self.allow_origins = tuple(allow_origins)
        self.static_dir = static_dir or STATIC_DIR
        self.max_connections = max_connections
        self.close_timeout = close_timeout
        self.shutdown_timeout = shutdown_timeout
        self.admin_token = admin_token
        """Bearer token of the admin API (``/admin/...``); None: JWT admins only."""
        self.metrics_token = metrics_token
        """Bearer token ``/metrics`` requires; None: served to anyone who can reach it."""
        self.ice_servers: tuple[dict[str, Any], ...] = ()
        self.metrics = metrics_registry(self.engine_host, self._tally)
        self._opened = 0
        self._bytes_written = 0
        self._refused = RefusalTally()
        self._links: dict[int, Link] = {}
        self._open = 0  # accepted WebSocket connections whose app call is still running
        self._next_id = 0
        self._running = False
        self._stopping = False
        self._all_closed: anyio.Event | None = None
        # Writers' reports and pings answered here, fed once per event-loop pass.
        self._drained: list[int] = []
        self._written: list[tuple[int, int, int]] = []
        self._pongs: list[int] = []
        self._report_wake: Wake | None = None
        self._new_wake: Callable[[], Wake] = anyio.Event  # the running loop's, once running

    # -- what the routes need of their site -------------------------------------------

    @property
    def connections(self) -> int:
        """Open WebSocket connections."""
        return len(self._links)

    @property
    def stopping(self) -> bool:
        """Shutting down (or not started): no new WebSocket connections."""
        return self._stopping or not self._running

    def _tally(self) -> TransportTally:
        return TransportTally(
            open=len(self._links),
            opened=self._opened,
            bytes_written=self._bytes_written,
            refused=self._refused.counts,
        )

    def _refused_as(self, reason: str, reply: Reply) -> Reply:
        """``reply`` refuses a connection before the engine sees it: counted by ``reason``."""
        self._refused.count(reason)
        return reply

    # -- running ----------------------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[ChatApp]:
        """Run the engine (store, timer); serve WebSockets inside the block.

        Leaving it closes every client with 1001 (``going away``; up to
        ``shutdown_timeout``), hands the store what is pending and closes it.
        This is what a host app enters in its own lifespan when it mounts
        the chat app; standalone, the app does it from its lifespan events.
        """
        if self._running:
            raise RuntimeError("this ChatApp is running already")
        self._new_wake = wake_maker()
        async with self.engine_host.running(), anyio.create_task_group() as service:
            service.start_soon(self._report_loop)
            self._running, self._stopping = True, False
            try:
                yield self
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(self.shutdown_timeout):
                    await self._close_all()
                self._running = False
                service.cancel_scope.cancel()

    async def _close_all(self) -> None:
        self._stopping = True
        self.engine_host.feed_or_log(Shutdown())
        while self._open:
            self._all_closed = anyio.Event()
            await self._all_closed.wait()

    async def _lifespan(self, receive: ASGIReceive, send: Send) -> None:
        message = await receive()
        if message["type"] != "lifespan.startup":
            return
        started = False
        try:
            async with self.running():
                started = True
                await send({"type": "lifespan.startup.complete"})
                while (await receive())["type"] != "lifespan.shutdown":
                    pass
        except Exception as exc:
            if not started:
                await send({"type": "lifespan.startup.failed", "message": str(exc)})
                return
            raise
        await send({"type": "lifespan.shutdown.complete"})

    # -- ASGI -------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: ASGIReceive, send: Send) -> None:
        kind = scope["type"]
        if kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _http(self, scope: Scope, receive: ASGIReceive, send: Send) -> None:
        method = scope["method"]
        path = _route_path(scope)
        query = bytes(scope.get("query_string", b"")).decode("latin-1")
        if path == "/ws":
            reply = self._refused_as(
                "bad_handshake",
                error(
                    426,
                    "this endpoint speaks WebSocket only",
                    ("upgrade", "websocket"),
                    ("sec-websocket-version", "13"),
                ),
            )
        else:
            body = await _read_body(receive)
            if self.identify is not None and path.startswith("/rooms/"):
                query = await self._identified_query(scope, query)
            reply = await answer(self, method, path, query, scope["headers"], body)
        head, content = _response(reply)
        await send({"type": "http.response.start", "status": reply.status, "headers": head})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else content})

    # -- the WebSocket handshake --------------------------------------------------------

    async def _websocket(self, scope: Scope, receive: ASGIReceive, send: Send) -> None:
        if _route_path(scope) != "/ws":
            await self._refuse(scope, send, error(404, "not found"))
            return
        if (await receive())["type"] != "websocket.connect":
            return
        admitted = await self._admit(scope)
        if isinstance(admitted, Reply):
            await self._refuse(scope, send, admitted)
            return
        connect, subprotocol = admitted
        await send({"type": "websocket.accept", "subprotocol": subprotocol})
        link = Link(
            connect.conn,
            connect.user,
            send,
            close_timeout=self.close_timeout,
            new_wake=self._new_wake,
        )
        self._links[link.conn] = link
        self._open += 1
        self._opened += 1
        log.info("opened conn=%d user=%s mode=%s", link.conn, link.user, connect.mode.value)
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._write, link, tasks.cancel_scope)
                try:
                    self.engine_host.feed(connect)
                except Exception:
                    self._fail(link)
                await self._read(link, receive)
                tasks.cancel_scope.cancel()
        finally:
            self._forget(link, None)
            self._open -= 1
            if self._all_closed is not None and not self._open:
                self._all_closed.set()
            log.info("closed conn=%d user=%s", link.conn, link.user)

    async def _admit(self, scope: Scope) -> Reply | tuple[Connect, str | None]:
        """The registered connection's ``Connect`` and subprotocol, or the refusal."""
        headers = scope["headers"]
        query = bytes(scope.get("query_string", b"")).decode("latin-1")
        refused = self._refused_as
        if self.stopping:
            return refused("shutting_down", error(503, "shutting down", ("retry-after", "5")))
        if len(self._links) >= self.max_connections:
            return refused("server_full", error(503, "too many connections", ("retry-after", "5")))
        if len(headers) > _MAX_HEADERS or _request_size(scope) > _MAX_REQUEST_BYTES:
            return refused("request_too_large", error(431, "request header fields too large"))
        repeated = repeated_header(headers, _SINGLE_HEADERS)
        if repeated is not None:
            return refused("bad_handshake", error(400, f"more than one {repeated.decode()} header"))
        scheme = "https" if scope.get("scheme") in ("wss", "https") else "http"
        if not origin_allowed(
            header(headers, b"origin"), header(headers, b"host"), scheme, self.allow_origins
        ):
            return refused("origin_not_allowed", error(403, "origin not allowed"))
        try:
            user = await self._identify(scope, headers, query)
        except AuthError as exc:
            return refused("unauthorized", error(401, str(exc), ("www-authenticate", "Bearer")))
        mode, subprotocol = select_mode(list(scope.get("subprotocols") or ()))
        self._next_id += 1
        try:
            connect = parse_connect(self._next_id, query, mode, user=user)
        except HandshakeError as exc:
            return refused("bad_query", error(exc.status, exc.reason))
        return connect, subprotocol

    async def _identify(self, scope: Scope, headers: Any, query: str) -> str | None:
        """The authenticated user, or None when the ``user`` parameter is trusted."""
        if self.identify is not None:
            found = self.identify(scope)
            if inspect.isawaitable(found):
                found = await found
            if found is None:
                raise AuthError("not signed in")
            return found
        if self.jwt_secret is not None:
            return authenticate(headers, parse_qsl(query), self.jwt_secret)
        return None

    async def _identified_query(self, scope: Scope, query: str) -> str:
        """``query`` with its ``user`` replaced by the one ``identify`` names (none: anonymous).

        The history route trusts ``user=`` when tokens are off; with a hook, the
        hook's answer is the only one it sees.
        """
        try:
            user = await self._identify(scope, scope["headers"], query)
        except AuthError:
            user = None
        params = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != "user"]
        if user is not None:
            params.append(("user", user))
        return urlencode(params)

    async def _refuse(self, scope: Scope, send: Send, reply: Reply) -> None:
        """Refuse a WebSocket before accepting it: HTTP where the server can, else a close."""
        if "websocket.http.response" in (scope.get("extensions") or {}):
            head, body = _response(reply)
            await send(
                {"type": "websocket.http.response.start", "status": reply.status, "headers": head}
            )
            await send({"type": "websocket.http.response.body", "body": body})
            return
        message = _reason(reply)
        await send({"type": "websocket.accept"})
        await send_close(send, _REFUSAL_CLOSE_BASE + reply.status, message)

    # -- one connection -----------------------------------------------------------------

    async def _read(self, link: Link, receive: ASGIReceive) -> None:
        limit = self.config.max_frame_bytes
        feed = self.engine_host.feed
        conn = link.conn
        while True:
            message = await receive()
            kind = message["type"]
            if kind == "websocket.receive":
                if link.close_with is not None:
                    continue  # closing: what it still sends is not read
                text = message.get("text")
                if text is None:
                    self._refuse_frame(link, 1003, "binary frames are not accepted")
                elif len(text) * 4 > limit and len(text.encode()) > limit:
                    self._refuse_frame(link, 1009, "message too big")
                else:
                    try:
                        feed(Receive(conn=conn, text=text))
                    except Exception:
                        self._fail(link)
            elif kind == "websocket.disconnect":
                link.closed = True
                self._forget(link, _client_code(message))
                return

    async def _write(self, link: Link, scope: anyio.CancelScope) -> None:
        try:
            await link.write_loop(self._report)
        except Exception:
            # The server could not take a frame: the client is gone. (An error of ours
            # in the writer ends the same way: this connection alone, logged.)
            log.debug("send failed conn=%d", link.conn, exc_info=True)
            link.closed = True
            self._forget(link, None)
        scope.cancel()  # the close is sent (or the link is lost): stop reading

    def _refuse_frame(self, link: Link, code: int, reason: str) -> None:
        """The client broke a rule the transport enforces (binary, size)."""
        link.close(code, reason)
        self._forget(link, None)

    def _fail(self, link: Link) -> None:
        log.exception("internal error on conn=%d user=%s", link.conn, link.user)
        link.close(1011, "internal error")
        self._forget(link, None)

    def _forget(self, link: Link, code: int | None) -> None:
        """The engine hears that ``link`` is gone (once; not after its own Close)."""
        if self._links.pop(link.conn, None) is not None:
            self.engine_host.feed_or_log(Disconnected(conn=link.conn, code=code))

    # -- reports back to the engine -------------------------------------------------------

    def _report(self, link: Link, frames: int, nbytes: int, drained: bool) -> None:
        self._bytes_written += nbytes  # the text handed to send (the server adds frame headers)
        if drained:
            self._drained.append(link.conn)
        else:
            self._written.append((link.conn, frames, nbytes))
        if link.ping_waiting:
            link.ping_waiting = False
            self._pongs.append(link.conn)
        self._wake_reports()

    def _wake_reports(self) -> None:
        if (wake := self._report_wake) is not None:
            self._report_wake = None
            wake.set()

    async def _report_loop(self) -> None:
        """Feed the writers' reports and the pings answered, once per event-loop pass."""
        host = self.engine_host
        new_wake = self._new_wake
        while True:
            if not (self._drained or self._written or self._pongs):
                wake = self._report_wake = new_wake()
                await wake.wait()
            drained, self._drained = self._drained, []
            written, self._written = self._written, []
            pongs, self._pongs = self._pongs, []
            with host.turn():
                if drained:
                    host.feed_or_log(Drained(conns=tuple(drained)))
                if written:
                    host.feed_or_log(WrittenMany(reports=tuple(written)))
                for conn in pongs:
                    if conn in self._links:
                        host.feed_or_log(Pong(conn=conn))

    # -- the host's transport -----------------------------------------------------------

    def deliver(self, to: tuple[int, ...], text: str) -> None:
        get = self._links.get
        for conn in to:
            link = get(conn)
            if link is not None:
                link.push(text)

    def close(self, conn: int, code: int, reason: str) -> None:
        link = self._links.pop(conn, None)
        if link is not None:
            link.close(code, reason)

    def ping(self, conn: int) -> None:
        """ASGI cannot ping: a link whose writer is not stuck counts as alive.

        A ``send`` pending for over ``_SEND_STUCK`` seconds means the client
        takes nothing: the answer waits for that send to finish, and the
        engine closes the link (4000) if it does not within its pong timeout.
        A link silent both ways is the ASGI server's to find (its own pings).
        """
        link = self._links.get(conn)
        if link is None:
            return
        since = link.sending_since
        if since is None or time.monotonic() - since < _SEND_STUCK:
            self._pongs.append(conn)
            self._wake_reports()
        else:
            link.ping_waiting = True

    def end_turn(self, *, nested: bool) -> None:
        pass  # each link's writer wakes on its own queue


def _client_code(message: Message) -> int | None:
    """The close code the client sent; None when the connection was lost without one.

    The engine ends a session at once for 1000 and 1005 (a close frame without
    a code) and keeps it for a resume otherwise. uvicorn reports a lost
    connection as 1005 too, but without the ``reason`` key that a received
    close frame carries; hypercorn reports every end as 1006.
    """
    code = message.get("code", 1005)
    if code == 1005 and "reason" not in message:
        return None
    return int(code)


async def _read_body(receive: ASGIReceive) -> bytes:
    """The request's body, up to one byte past ``MAX_ADMIN_BODY`` (the rest is dropped).

    Only the admin API takes a body; one over the bound is answered 413.
    """
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return bytes(body)  # http.disconnect: answered anyway, to nobody
        if len(body) <= MAX_ADMIN_BODY:
            body += message.get("body", b"")[: MAX_ADMIN_BODY + 1 - len(body)]
        if not message.get("more_body", False):
            return bytes(body)


def _route_path(scope: Scope) -> str:
    """The path inside this app (a mount's prefix, ``root_path``, taken off)."""
    path: str = scope.get("path", "/")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path or "/"


def _request_size(scope: Scope) -> int:
    target = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
    return target + sum(len(k) + len(v) + 4 for k, v in scope["headers"])


def _response(reply: Reply) -> tuple[list[tuple[bytes, bytes]], bytes]:
    head = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers]
    head.append((b"content-length", str(len(reply.body)).encode()))
    return head, reply.body


def _reason(reply: Reply) -> str:
    """The error's message, cut to fit a close frame (123 bytes of UTF-8)."""
    try:
        message = str(json.loads(reply.body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = ""
    return message.encode()[:123].decode("utf-8", "ignore")
