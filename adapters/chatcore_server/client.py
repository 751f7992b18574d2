"""A Python client for chatcore servers, with resume built in.

::

    async with connect("ws://127.0.0.1:8000/ws", user="bot", rooms=["general"]) as chat:
        await chat.send("general", "hello")
        async for event in chat:
            print(event)

Events are the ``chatcore.v1`` JSON objects as dicts (``welcome``,
``message``, ``joined``...). When the connection drops, the client reconnects
with its resume token and the last offset it saw per room, so the server
replays exactly what was missed; sends carry an id, so a send that raced the
drop is retried without being stored twice. It gives up on a close the
server means for good (1000, 1002, 1003, 1007, 1008, 1009) or after
``retries`` failed attempts; iteration then ends and :attr:`Chat.closed` says why.

A connection that dies without a word (a laptop lid, a NAT that forgot the
mapping) is found by the client itself: after ``keepalive`` seconds with
nothing received it sends a ping, and if ``keepalive`` more seconds bring
nothing either, it drops that connection and resumes on a new one.
"""

from __future__ import annotations

import json
import math
import random
import secrets
import ssl
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlencode, urlsplit

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from chatcore import follow_offsets

__all__ = ["Chat", "ChatClosed", "ChatRejected", "connect"]

_FINAL = frozenset({1000, 1002, 1003, 1007, 1008, 1009, 1010})
_STREAM_ERRORS = (
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
    OSError,
)


class ChatClosed(Exception):
    """The chat is over: closed by either side, or it could not reconnect."""


class ChatRejected(ChatClosed):
    """The server refused the WebSocket handshake (``status``, JSON ``body``)."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"handshake refused: {status} {body[:200]!r}")
        self.status = status
        self.body = body


class Chat:
    """One chat session over a WebSocket that may be replaced on the way.

    Build it with :func:`connect`. ``offsets`` holds the last offset seen per
    room, ``resume_token`` the token to resume with; both come from the events read.
    """

    def __init__(
        self,
        url: str,
        *,
        user: str | None,
        rooms: Iterable[str],
        token: str | None,
        ssl_context: ssl.SSLContext | None,
        retries: int,
        backoff: float,
        max_queue: int,
        keepalive: float | None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss"):
            raise ValueError(f"a chatcore URL starts with ws:// or wss://, not {url!r}")
        self.url = url
        self.user = user
        self.jwt = token
        self.rooms: list[str] = list(dict.fromkeys(rooms))
        self.resume_token: str | None = None
        self.session: str | None = None
        self.me = user or ""  # the user name, as the welcome confirms it
        self.offsets: dict[str, int] = {}
        self.closed: tuple[int, str] | None = None
        self.reconnects = 0
        self._parts = parts
        self._tls = parts.scheme == "wss"
        self._ssl = ssl_context
        self._retries = retries
        self._backoff = backoff
        self._keepalive = keepalive
        self._stream: anyio.abc.ByteStream | None = None
        self._ws: WSConnection | None = None
        self._send_lock = anyio.Lock()
        self._connected = anyio.Event()
        self._done = False
        self._partial: list[str] = []
        out: tuple[
            MemoryObjectSendStream[dict[str, Any]], MemoryObjectReceiveStream[dict[str, Any]]
        ]
        out = anyio.create_memory_object_stream[dict[str, Any]](max_queue)
        self._out, self._in = out

    # -- what a program does ---------------------------------------------------------

    async def send(self, room: str, text: str, *, id: str | None = None) -> str:
        """Send a message to ``room``; returns its id (made up if not given)."""
        cid = id or secrets.token_hex(8)
        await self._send({"type": "send", "room": room, "text": text, "id": cid}, retry=True)
        return cid

    async def dm(self, to: str, text: str, *, id: str | None = None) -> str:
        cid = id or secrets.token_hex(8)
        await self._send({"type": "dm", "to": to, "text": text, "id": cid}, retry=True)
        return cid

    async def join(self, room: str) -> None:
        if room not in self.rooms:
            self.rooms.append(room)
        await self._send({"type": "join", "room": room}, retry=True)

    async def leave(self, room: str) -> None:
        if room in self.rooms:
            self.rooms.remove(room)
        await self._send({"type": "leave", "room": room}, retry=False)

    async def typing(self, room: str) -> None:
        await self._send({"type": "typing", "room": room}, retry=False)

    async def mark_read(self, room: str, offset: int) -> None:
        await self._send({"type": "read", "room": room, "offset": offset}, retry=False)

    async def history(self, room: str, *, before: int | None = None, limit: int = 50) -> None:
        """Ask for older messages; they arrive as a ``history`` event."""
        await self._send(
            {"type": "history", "room": room, "before": before, "limit": limit}, retry=True
        )

    async def receive(self) -> dict[str, Any]:
        """The next event; raises :class:`ChatClosed` when the chat is over."""
        try:
            return await self._in.receive()
        except anyio.EndOfStream:
            raise ChatClosed(f"chat closed: {self.closed}") from None

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self

    async def __anext__(self) -> dict[str, Any]:
        try:
            return await self._in.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def aclose(self, code: int = 1000) -> None:
        """Close the connection for good. With 1000 (the default) the server ends the
        session at once; another code leaves it to its grace period."""
        self._done = True
        self._connected.set()
        ws, stream = self._ws, self._stream
        if ws is not None and stream is not None:
            with anyio.move_on_after(2, shield=True):
                try:
                    async with self._send_lock:
                        await stream.send(ws.send(CloseConnection(code=code)))
                except (*_STREAM_ERRORS, Exception):
                    pass
            with anyio.move_on_after(1, shield=True):
                await stream.aclose()
        if self.closed is None:
            self.closed = (code, "closed by client")
        self._out.close()

    # -- the connection ------------------------------------------------------------------

    def _target(self, *, resume: bool) -> str:
        query: list[tuple[str, str]] = []
        if self.user is not None:
            query.append(("user", self.user))
        query.extend(("room", r) for r in self.rooms)
        if resume and self.resume_token is not None:
            query.append(("resume", self.resume_token))
            query.extend(("offset", f"{r}:{n}") for r, n in self.offsets.items())
        own = urlencode(query)
        path = self._parts.path or "/ws"
        both = "&".join(q for q in (self._parts.query, own) if q)
        return f"{path}?{both}" if both else path

    async def _open(self, *, resume: bool) -> None:
        host = self._parts.hostname or "127.0.0.1"
        port = self._parts.port or (443 if self._tls else 80)
        if self._tls:
            stream: anyio.abc.ByteStream = await anyio.connect_tcp(
                host,
                port,
                tls=True,
                ssl_context=self._ssl or ssl.create_default_context(),
                tls_standard_compatible=False,
            )
        else:
            stream = await anyio.connect_tcp(host, port)
        try:
            ws = WSConnection(ConnectionType.CLIENT)
            headers = (
                [] if self.jwt is None else [(b"authorization", f"Bearer {self.jwt}".encode())]
            )
            await stream.send(
                ws.send(
                    Request(
                        host=self._parts.netloc,
                        target=self._target(resume=resume),
                        subprotocols=["chatcore.v1"],
                        extra_headers=headers,
                    )
                )
            )
            await self._handshake(stream, ws)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await stream.aclose()
            raise
        self._stream, self._ws = stream, ws
        self._connected.set()

    async def _handshake(self, stream: anyio.abc.ByteStream, ws: WSConnection) -> None:
        status = 0
        body = b""
        while True:
            try:
                data = await stream.receive()
            except _STREAM_ERRORS as exc:
                raise ChatClosed("connection lost during the handshake") from exc
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    return
                if isinstance(event, RejectConnection):
                    status = event.status_code
                    if not event.has_body:
                        raise ChatRejected(status, b"")
                elif isinstance(event, RejectData):
                    body += event.data
                    if event.body_finished:
                        raise ChatRejected(status, body)

    async def _run(self) -> None:
        """Read until the connection ends; reconnect and resume while that makes sense."""
        try:
            while True:
                code, reason = await self._read()
                self.closed = (code, reason)
                if self._done or code in _FINAL or not await self._reconnect():
                    return
        finally:
            self._done = True
            self._connected.set()
            self._out.close()

    async def _reconnect(self) -> bool:
        self._connected = anyio.Event()
        for attempt in range(self._retries):
            delay = min(self._backoff * 2**attempt, 10.0)
            await anyio.sleep(random.uniform(delay / 2, delay))
            try:
                await self._open(resume=True)
            except ChatRejected as exc:
                if exc.status < 500:
                    return False
            except (ChatClosed, *_STREAM_ERRORS):
                continue
            else:
                self.reconnects += 1
                return True
        return False

    async def _read(self) -> tuple[int, str]:
        stream, ws = self._stream, self._ws
        assert stream is not None
        assert ws is not None
        for event in ws.events():  # frames that came with the handshake answer
            if (closed := await self._event(ws, stream, event)) is not None:
                return closed
        pinged = False  # a keepalive ping is out and nothing came since
        while True:
            data = b""
            try:
                with anyio.move_on_after(self._keepalive or math.inf):
                    data = await stream.receive()
                if not data:  # silent for a whole keepalive period
                    if pinged:
                        raise anyio.BrokenResourceError("no answer to a keepalive ping")
                    pinged = True
                    async with self._send_lock:
                        await stream.send(ws.send(Ping(b"keepalive")))
                    continue
            except _STREAM_ERRORS:
                with anyio.CancelScope(shield=True):
                    await stream.aclose()
                return 1006, "connection lost"
            pinged = False
            ws.receive_data(data)
            for event in ws.events():
                if (closed := await self._event(ws, stream, event)) is not None:
                    with anyio.CancelScope(shield=True):
                        await stream.aclose()
                    return closed

    async def _event(
        self, ws: WSConnection, stream: anyio.abc.ByteStream, event: object
    ) -> tuple[int, str] | None:
        if isinstance(event, TextMessage):
            self._partial.append(event.data)
            if event.message_finished:
                text = "".join(self._partial)
                self._partial.clear()
                obj = json.loads(text)
                self._observe(obj)
                await self._out.send(obj)
        elif isinstance(event, Ping):
            try:
                async with self._send_lock:
                    await stream.send(ws.send(event.response()))
            except _STREAM_ERRORS:
                return 1006, "connection lost"
        elif isinstance(event, CloseConnection):
            try:
                async with self._send_lock:
                    await stream.send(ws.send(event.response()))
            except (*_STREAM_ERRORS, Exception):
                pass
            return event.code, event.reason or ""
        return None

    def _observe(self, event: dict[str, Any]) -> None:
        if event.get("type") == "welcome":
            self.resume_token, self.session = event["resume"], event["session"]
            self.me = event["user"]  # with a token, the server says who we are
        follow_offsets(self.offsets, self.me, event)

    async def _send(self, obj: dict[str, Any], *, retry: bool) -> None:
        frame = TextMessage(data=json.dumps(obj, ensure_ascii=False, separators=(",", ":")))
        for _ in range(2 if retry else 1):
            await self._connected.wait()
            stream, ws = self._stream, self._ws
            if self._done or stream is None or ws is None:
                break
            try:
                async with self._send_lock:
                    await stream.send(ws.send(frame))
                return
            except _STREAM_ERRORS:
                self._connected = anyio.Event()  # the reader reconnects, then we retry
        raise ChatClosed(f"chat closed: {self.closed}")


@asynccontextmanager
async def connect(
    url: str,
    *,
    user: str | None = None,
    rooms: Iterable[str] = (),
    token: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    retries: int = 8,
    backoff: float = 0.2,
    max_queue: int = 10_000,
    keepalive: float | None = 20.0,
) -> AsyncIterator[Chat]:
    """Open a chat session at ``url`` (``ws://HOST:PORT/ws``) as ``user`` in ``rooms``.

    ``token`` is a JWT for servers started with ``--jwt-secret`` (the user is
    then the token's ``sub``). ``retries`` bounds reconnection attempts after
    a drop, with exponential backoff from ``backoff`` seconds and jitter.
    ``max_queue`` events wait for the program to read them; beyond that the
    client stops reading and the server, in time, closes it as too slow.
    ``keepalive``: seconds of silence before a ping, and as many again before
    the connection counts as dead and is replaced (None: wait for the server).
    Raises :class:`ChatRejected` if the server refuses the first handshake.
    """
    chat = Chat(
        url,
        user=user,
        rooms=rooms,
        token=token,
        ssl_context=ssl_context,
        retries=retries,
        backoff=backoff,
        max_queue=max(1, max_queue),
        keepalive=keepalive,
    )
    await chat._open(resume=False)
    async with anyio.create_task_group() as tg:
        tg.start_soon(chat._run)
        try:
            yield chat
        finally:
            await chat.aclose()
            tg.cancel_scope.cancel()
