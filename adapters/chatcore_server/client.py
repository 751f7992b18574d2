"""A Python client for chatcore servers, with resume built in.

::

    async with connect("ws://127.0.0.1:8000/ws", user="bot", rooms=["general"]) as chat:
        await chat.send("general", "hello")
        async for event in chat:
            print(event)

Events are the ``chatcore.v1`` JSON objects as dicts (``welcome``,
``message``, ``joined``...). The client hides a lost connection: it
reconnects with its resume token and the last offset it handed on per room,
and what the program reads goes on as if nothing happened (:func:`connect`
lists the guarantees). It gives up on a close the server means for good
(1000, 1002, 1003, 1007, 1008, 1009, 1010) or after ``retries`` failed
attempts in a row; iteration then ends and :attr:`Chat.closed` says why.

Two parts: :class:`_Ledger` decides, without I/O, which server events the
program gets and which history pages fill a gap; :class:`Chat` moves bytes,
keeps the sends that wait for their ``ack``, and replaces dead connections.
"""

from __future__ import annotations

import json
import math
import os
import random
import secrets
import ssl
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
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
from wsproto.utilities import LocalProtocolError

from .e2e import Device, PeerDevice, Undecryptable

__all__ = ["Chat", "ChatClosed", "ChatRejected", "connect"]

_FINAL = frozenset({1000, 1002, 1003, 1007, 1008, 1009, 1010})
_STREAM_ERRORS = (
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
    OSError,
)
_PAGE = 100  # the largest history page docs/protocol.md promises
_PAGE_GAP = 0.05  # seconds between two gap-filling pages: well inside the request rate
_PAGE_WAIT = 30.0  # seconds a page may take before the connection is given up
_RESEND_UNAVAILABLE = 1.0  # seconds before a send the store refused goes again
_GAVE_UP = 4001  # our close code when we abandon a connection that still lives
_KEYS_WAIT = 10.0  # seconds a claim_keys answer may take


class ChatClosed(Exception):
    """The chat is over: closed by either side, or it could not reconnect."""


class ChatRejected(ChatClosed):
    """The server refused the WebSocket handshake (``status``, JSON ``body``)."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"handshake refused: {status} {body[:200]!r}")
        self.status = status
        self.body = body


class _ServerFault(Exception):
    """The server sent something that is not chatcore.v1: the chat ends with 1002."""


# -- what the program sees: no I/O below this line until Chat ---------------------------


@dataclass
class _Fill:
    """A room whose messages after ``offsets[room]`` up to ``target`` must come from
    history (a new session does not replay). Paged forward a window of at most
    ``_PAGE`` messages at a time; inside a window, backwards until it is whole, so
    that a server with a smaller page limit than ours cannot make us skip any."""

    target: int
    window_end: int  # the window is (offsets[room], window_end)
    before: int  # the page being asked for: offsets below this
    pages: list[list[dict[str, Any]]] = field(default_factory=list)  # newest page last
    held: list[dict[str, Any]] = field(default_factory=list)  # live events, until filled


class _Ledger:
    """What the program has been handed, per room, and what it still lacks.

    ``offsets`` maps a room to the highest offset handed on (a ``message`` or the
    ``ack`` of our own send): the resume point. Every other event passes
    untouched. Per room, ``message`` and ``ack`` events come out in offset order,
    each offset once, whether it came live, replayed on a resume, or from a
    history page after a ``resumed: false`` welcome.
    """

    def __init__(self, offsets: dict[str, int]) -> None:
        self.offsets = offsets
        self.epochs: dict[str, str] = {}
        self.me = ""
        self.fills: dict[str, _Fill] = {}
        self.asked: str | None = None  # the room whose history page is awaited
        # Who is in each room, as the server told it (protocol.md, "presence").
        self.members: dict[str, set[str]] = {}

    def welcome(self, event: dict[str, Any]) -> None:
        """A new connection. ``resumed: false`` after an earlier session: each room
        we had, still in the same epoch, is filled from history up to the welcome's
        offset. Answers and held events of the old connection are void."""
        self.me = str(event["user"])
        self.fills.clear()
        self.asked = None
        rooms: dict[str, Any] = event["rooms"]
        resumed = bool(event["resumed"])
        starts: dict[str, int] = {}
        for room, position in rooms.items():
            offset, epoch = int(position["offset"]), str(position["epoch"])
            known = self.offsets.get(room)
            if known is None or self.epochs.get(room) != epoch:
                # New to us, or its history was lost and numbering restarted: like the
                # browser, start over at the server's position (offsets restart).
                starts[room] = offset
            elif resumed:
                starts[room] = max(known, offset)  # the server replays the rest
            else:
                starts[room] = known
                if offset > known:
                    end = min(known + 1 + _PAGE, offset + 1)
                    self.fills[room] = _Fill(target=offset, window_end=end, before=end)
            self.epochs[room] = epoch
        if not resumed:  # a new session is in exactly the welcome's rooms
            for room in set(self.offsets) - set(rooms):
                self.forget(room)
        self.offsets.update(starts)

    def take(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """The events to hand on, in order, for one event from the server."""
        kind = event.get("type")
        if kind in ("message", "ack"):
            fill = self.fills.get(event["room"])
            if fill is not None:
                fill.held.append(event)
                return []
            return self._pass(event)
        if kind == "history" and event["room"] == self.asked:
            return self._page(event["room"], event)
        if kind == "members":
            self.offsets.setdefault(event["room"], int(event["offset"]))
            self.epochs.setdefault(event["room"], str(event["epoch"]))
            self.members[event["room"]] = set(event["users"])
        elif kind == "left" and event["user"] == self.me:
            self.forget(event["room"])
        elif kind in ("joined", "left", "presence"):
            self._presence(event)
        return [event]

    def _presence(self, event: dict[str, Any]) -> None:
        """Set operations, in the order received: each name is where that user is now."""
        users = self.members.get(event["room"])
        if users is None:
            return
        if event["type"] == "joined":
            users.add(event["user"])
        elif event["type"] == "left":
            users.discard(event["user"])
        else:
            users.update(event["joins"])
            users.difference_update(event["leaves"])

    def next_page(self) -> dict[str, Any] | None:
        """The history request to send now (one at a time), or None."""
        if self.asked is not None:
            return None
        for room, fill in self.fills.items():
            self.asked = room
            limit = fill.before - self.offsets[room] - 1
            return {"type": "history", "room": room, "before": fill.before, "limit": limit}
        return None

    def forget(self, room: str) -> None:
        self.offsets.pop(room, None)
        self.members.pop(room, None)
        self.epochs.pop(room, None)
        self.fills.pop(room, None)
        if self.asked == room:
            self.asked = None

    def _pass(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        room, offset = event["room"], int(event["offset"])
        epoch = event.get("epoch")
        if epoch is not None and self.epochs.setdefault(room, str(epoch)) != epoch:
            # The room's history restarted under a live connection: follow the new
            # numbering from this message on, as the browser does.
            self.epochs[room] = str(epoch)
        elif offset <= self.offsets.get(room, 0):
            return []  # handed on already (a replay, a page, or our ack came first)
        self.offsets[room] = offset
        return [event]

    def _page(self, room: str, event: dict[str, Any]) -> list[dict[str, Any]]:
        self.asked = None
        fill = self.fills[room]
        last = self.offsets[room]
        messages: list[dict[str, Any]] = list(event["messages"])
        page = [m for m in messages if last < int(m["offset"]) < fill.before]
        page.sort(key=lambda m: int(m["offset"]))
        fill.pages.append(page)
        whole = (
            not page
            or int(page[0]["offset"]) == last + 1
            or len(page) < len(messages)  # the server went below the window: no hole
            or not event.get("more")
        )
        if not whole:  # the server's pages are smaller than ours: ask for the rest
            fill.before = int(page[0]["offset"])
            return []
        out = [m for p in reversed(fill.pages) for m in p]
        fill.pages.clear()
        self.offsets[room] = fill.window_end - 1
        if fill.window_end <= fill.target:
            fill.window_end = min(fill.window_end + _PAGE, fill.target + 1)
            fill.before = fill.window_end
            return out
        del self.fills[room]
        for held in fill.held:
            out.extend(self._pass(held))
        return out


# -- the connection ---------------------------------------------------------------------


class Chat:
    """One chat session over a WebSocket that may be replaced on the way.

    Build it with :func:`connect`. ``offsets`` holds the last offset handed on per
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
        self._max_unacked = max_queue
        self._stream: anyio.abc.ByteStream | None = None
        self._ws: WSConnection | None = None
        self._ledger = _Ledger(self.offsets)
        # Sends not yet acknowledged, in the order made: client id -> encoded frame.
        self._unacked: dict[str, str] = {}
        self._acked = anyio.Event()  # set (and replaced) whenever an ack frees a place
        self._send_lock = anyio.Lock()
        self._live = False  # the current connection has had its welcome
        self._generation = 0  # welcomes so far: tells one connection from the next
        self._changed = anyio.Event()  # set (and replaced) on welcome, loss, fill, close
        self._done = False
        self._tasks: anyio.abc.TaskGroup | None = None
        self._asked_at = -math.inf  # when the last gap-filling page was asked for
        self._partial: list[str] = []
        out: tuple[
            MemoryObjectSendStream[dict[str, Any]], MemoryObjectReceiveStream[dict[str, Any]]
        ]
        out = anyio.create_memory_object_stream[dict[str, Any]](max_queue)
        self._out, self._in = out
        self._device: Device | None = None  # end-to-end encryption, once enabled
        self._peers: dict[str, list[PeerDevice]] = {}  # claimed devices, per user
        self._claims: dict[str, anyio.Event] = {}  # claim_keys awaiting their answer

    # -- what a program does ---------------------------------------------------------

    def members(self, room: str) -> frozenset[str]:
        """Who is in ``room`` as far as the server has said (empty if not a member).

        Kept from ``members``, ``joined``, ``left`` and a crowded room's
        ``presence`` frames, applied as set operations (protocol.md section 3)."""
        return frozenset(self._ledger.members.get(room, ()))

    @property
    def unacked(self) -> tuple[str, ...]:
        """Ids of the sends the server has not acknowledged yet, oldest first."""
        return tuple(self._unacked)

    async def send(self, room: str, text: str, *, id: str | None = None) -> str:
        """Send a message to ``room``; returns its id (made up if not given).

        Returns once the message is written, or kept for the next connection if
        there is none: it is sent again, with the same id, after every reconnect
        until its ``ack`` comes. Waits while ``max_queue`` sends await their ack.
        """
        cid = id or secrets.token_hex(8)
        await self._submit(cid, {"type": "send", "room": room, "text": text, "id": cid})
        return cid

    async def dm(self, to: str, text: str, *, id: str | None = None) -> str:
        """A direct message to user ``to``; kept and retried like :meth:`send`.

        With :meth:`enable_e2e`, it is end-to-end encrypted when ``to`` has
        published keys (plain otherwise: :meth:`send_dm_encrypted` refuses that)."""
        if self._device is not None and await self._devices_of(to):
            return await self.send_dm_encrypted(to, text, id=id)
        cid = id or secrets.token_hex(8)
        await self._submit(cid, {"type": "dm", "to": to, "text": text, "id": cid})
        return cid

    # -- end-to-end encryption ------------------------------------------------------------

    async def enable_e2e(self, path: str | os.PathLike[str], *, device: str | None = None) -> str:
        """Encrypt and decrypt direct messages with this device's keys, kept in the
        file ``path`` (created with new keys if missing; keep it private). Publishes
        the public identity key and a stock of prekeys; returns the device id.

        From then on, an encrypted ``message`` is handed on with its ``text``
        decrypted and ``encrypted: True``; one this device cannot read (sent before
        it existed, not addressed to it, or altered on the way) comes instead as
        ``{"type": "undecryptable", "room", "offset", "from", "id", "reason"}``.
        """
        if self.me == "":
            raise ChatClosed("enable_e2e needs the user name: connect with user= or a token")
        self._device = Device(path, user=self.me, device=device)
        await self._request(self._device.publish_frame(), retry=True)
        return self._device.device

    async def send_dm_encrypted(self, to: str, text: str, *, id: str | None = None) -> str:
        """An end-to-end encrypted direct message to ``to``, sealed for each device of
        ``to`` and each other device of ours. Raises ``ValueError`` if ``to`` has
        published no keys. Kept and retried (the same ciphertext) like :meth:`send`."""
        device = self._device
        if device is None:
            raise ValueError("call enable_e2e first")
        peers = await self._devices_of(to)
        if not peers:
            raise ValueError(f"{to} has published no keys")
        ours = [d for d in await self._devices_of(self.me) if d.device != device.device]
        room = "dm:" + ":".join(sorted((self.me, to)))
        enc = device.seal(room, text, peers + ours if to != self.me else ours)
        cid = id or secrets.token_hex(8)
        await self._submit(cid, {"type": "dm", "to": to, "enc": enc, "id": cid})
        return cid

    async def _devices_of(self, user: str, *, fresh: bool = False) -> list[PeerDevice]:
        """``user``'s devices with a prekey each, claimed once per chat (each claim
        takes a prekey of every device), or again when ``fresh``."""
        if user in self._peers and not fresh:
            return self._peers[user]
        waiting = self._claims.get(user)
        if waiting is None:
            waiting = self._claims[user] = anyio.Event()
            await self._request({"type": "claim_keys", "user": user}, retry=True)
        with anyio.move_on_after(_KEYS_WAIT):
            await waiting.wait()
        return self._peers.get(user, [])

    def _keys(self, obj: dict[str, Any]) -> None:
        """A ``keys`` answer: remember the devices, wake whoever claimed them."""
        user = str(obj["user"])
        self._peers[user] = [
            PeerDevice(
                user=user,
                device=str(d["device"]),
                identity=str(d["identity"]),
                prekey_id=None if d.get("prekey") is None else int(d["prekey"]["id"]),
                prekey=None if d.get("prekey") is None else str(d["prekey"]["key"]),
            )
            for d in obj["devices"]
        ]
        waiting = self._claims.pop(user, None)
        if waiting is not None:
            waiting.set()

    def _reveal(self, event: dict[str, Any]) -> dict[str, Any]:
        """An encrypted message decrypted for the program, or an ``undecryptable``
        marker in its place; anything else as it came."""
        if self._device is None:
            return event
        if event.get("type") == "history":
            messages = [self._reveal(m) for m in event["messages"]]
            return {**event, "messages": messages}
        if "enc" not in event:
            return event
        try:
            text = self._device.open(str(event["room"]), str(event["from"]), event["enc"])
        except Undecryptable as exc:
            return {
                "type": "undecryptable",
                "room": event["room"],
                "offset": event["offset"],
                "from": event["from"],
                "id": event.get("id"),
                "reason": exc.reason,
            }
        shown = {k: v for k, v in event.items() if k != "enc"}
        shown["text"] = text
        shown["encrypted"] = True
        return shown

    async def _restock(self) -> None:
        """Our device runs low on prekeys: publish a new batch."""
        if self._device is not None:
            with suppress(ChatClosed):
                await self._request(self._device.publish_frame(), retry=True)

    async def join(self, room: str) -> None:
        if room not in self.rooms:
            self.rooms.append(room)
        await self._request({"type": "join", "room": room}, retry=True)

    async def leave(self, room: str) -> None:
        if room in self.rooms:
            self.rooms.remove(room)
        await self._request({"type": "leave", "room": room}, retry=False)

    async def typing(self, room: str) -> None:
        await self._request({"type": "typing", "room": room}, retry=False)

    async def mark_read(self, room: str, offset: int) -> None:
        await self._request({"type": "read", "room": room, "offset": offset}, retry=False)

    async def history(self, room: str, *, before: int | None = None, limit: int = 50) -> None:
        """Ask for older messages; they arrive as a ``history`` event. While the
        client is filling a gap in ``room`` itself, the request waits for it."""
        await self._request(
            {"type": "history", "room": room, "before": before, "limit": limit},
            retry=True,
            after_fill=room,
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
        self._set_changed()
        self._acked.set()
        ws, stream = self._ws, self._stream
        if ws is not None and stream is not None:
            with anyio.move_on_after(2, shield=True):
                try:
                    async with self._send_lock:
                        await stream.send(ws.send(CloseConnection(code=code)))
                except (*_STREAM_ERRORS, LocalProtocolError):
                    pass
            with anyio.move_on_after(1, shield=True):
                await stream.aclose()
        if self.closed is None:
            self.closed = (code, "closed by client")
        self._out.close()

    # -- sending ---------------------------------------------------------------------

    @staticmethod
    def _encode(obj: dict[str, Any]) -> str:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))

    async def _write(self, text: str) -> bool:
        """Write one frame on the current connection (hold ``_send_lock``).
        False if there is none or it failed: the reader finds out and reconnects."""
        stream, ws = self._stream, self._ws
        if stream is None or ws is None:
            return False
        try:
            await stream.send(ws.send(TextMessage(data=text)))
        except (*_STREAM_ERRORS, LocalProtocolError):
            return False
        return True

    async def _submit(self, cid: str, obj: dict[str, Any]) -> None:
        while len(self._unacked) >= self._max_unacked and not self._done:
            await self._acked.wait()
        if self._done:
            raise ChatClosed(f"chat closed: {self.closed}")
        frame = self._encode(obj)
        async with self._send_lock:
            # Kept before it is written: whatever happens to this connection, the
            # welcome of the next one sends it again (the server stores an id once).
            self._unacked[cid] = frame
            if self._live:
                await self._write(frame)

    async def _request(
        self, obj: dict[str, Any], *, retry: bool, after_fill: str | None = None
    ) -> None:
        frame = self._encode(obj)
        seen = -1  # the connection a failed attempt was made on
        for _ in range(2 if retry else 1):
            while not self._done and (
                not self._live
                or self._generation == seen
                or (after_fill is not None and after_fill in self._ledger.fills)
            ):
                await self._changed.wait()
            if self._done:
                break
            seen = self._generation
            async with self._send_lock:
                if await self._write(frame):
                    return
        raise ChatClosed(f"chat closed: {self.closed}")

    async def _resend_later(self, cid: str, delay: float) -> None:
        await anyio.sleep(delay)
        async with self._send_lock:
            frame = self._unacked.get(cid)
            if frame is not None and self._live:
                await self._write(frame)

    def _set_changed(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    # -- the connection ------------------------------------------------------------------

    def _target(self, *, resume: bool) -> str:
        query: list[tuple[str, str]] = []
        if self.user is not None:
            query.append(("user", self.user))
        query.extend(("room", r) for r in self.rooms)
        if resume and self.resume_token is not None:
            query.append(("resume", self.resume_token))
            query.extend(("offset", f"{r}:{n}") for r, n in self.offsets.items())
            epochs = self._ledger.epochs  # so that another life of a room is not replayed
            query.extend(("epoch", f"{r}:{epochs[r]}") for r in self.offsets if r in epochs)
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
        self._partial.clear()

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
                self._live = False
                self._set_changed()
                self.closed = (code, reason)
                if self._done or code in _FINAL or not await self._reconnect():
                    return
        finally:
            self._done = True
            self._set_changed()
            self._acked.set()
            self._out.close()

    async def _reconnect(self) -> bool:
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
        """Serve one connection until it ends: its close code and reason."""
        stream, ws = self._stream, self._ws
        if stream is None or ws is None:
            return 1006, "not connected"
        try:
            return await self._serve(stream, ws)
        except _ServerFault as exc:
            await self._give_up(stream, ws, 1002, str(exc))
            return 1002, str(exc)
        except anyio.ClosedResourceError:  # aclose() ended the events under us
            return self.closed or (1000, "closed by client")
        finally:
            with anyio.CancelScope(shield=True):
                await stream.aclose()

    async def _serve(self, stream: anyio.abc.ByteStream, ws: WSConnection) -> tuple[int, str]:
        for event in ws.events():  # frames that came with the handshake answer
            if (closed := await self._event(ws, stream, event)) is not None:
                return closed
        pinged = False  # a keepalive ping is out and nothing came since
        while True:
            if (ask := await self._ask_page()) is not None:
                return ask
            wait = self._keepalive or math.inf
            if self._ledger.asked is not None:
                wait = min(wait, self._asked_at + _PAGE_WAIT - anyio.current_time())
            data = b""
            try:
                with anyio.move_on_after(max(wait, 0.0)):
                    data = await stream.receive()
                if not data:
                    if self._ledger.asked is not None and (
                        anyio.current_time() >= self._asked_at + _PAGE_WAIT
                    ):
                        # Never a partial catch-up: resume on a new connection.
                        await self._give_up(stream, ws, _GAVE_UP, "history page unanswered")
                        return _GAVE_UP, "history page unanswered"
                    if pinged:  # silent for two keepalive periods
                        raise anyio.BrokenResourceError("no answer to a keepalive ping")
                    pinged = True
                    async with self._send_lock:
                        await stream.send(ws.send(Ping(b"keepalive")))
                    continue
            except (*_STREAM_ERRORS, LocalProtocolError):
                return 1006, "connection lost"
            pinged = False
            ws.receive_data(data)
            for event in ws.events():
                if (closed := await self._event(ws, stream, event)) is not None:
                    return closed

    async def _give_up(
        self, stream: anyio.abc.ByteStream, ws: WSConnection, code: int, reason: str
    ) -> None:
        with anyio.move_on_after(1, shield=True):
            try:
                async with self._send_lock:
                    await stream.send(ws.send(CloseConnection(code=code, reason=reason)))
            except (*_STREAM_ERRORS, LocalProtocolError):
                pass

    async def _ask_page(self) -> tuple[int, str] | None:
        """Ask for the next history page a gap needs, if none is awaited."""
        if self._ledger.asked is not None or not self._ledger.fills:
            return None
        # Paced, so that filling a long gap stays inside the server's request rate.
        await anyio.sleep(max(0.0, self._asked_at + _PAGE_GAP - anyio.current_time()))
        request = self._ledger.next_page()
        if request is None:
            return None
        self._asked_at = anyio.current_time()
        async with self._send_lock:
            if not await self._write(self._encode(request)):
                return 1006, "connection lost"
        return None

    async def _event(
        self, ws: WSConnection, stream: anyio.abc.ByteStream, event: object
    ) -> tuple[int, str] | None:
        if isinstance(event, TextMessage):
            self._partial.append(event.data)
            if event.message_finished:
                text = "".join(self._partial)
                self._partial.clear()
                try:
                    obj = json.loads(text)
                    if not isinstance(obj, dict):
                        raise _ServerFault("a frame that is not a JSON object")
                    closed = await self._frame(obj)
                except (KeyError, TypeError, ValueError) as exc:
                    raise _ServerFault(f"a malformed frame: {exc!r}"[:120]) from exc
                if closed is not None:
                    await self._give_up(stream, ws, *closed)
                return closed
        elif isinstance(event, Ping):
            try:
                async with self._send_lock:
                    await stream.send(ws.send(event.response()))
            except (*_STREAM_ERRORS, LocalProtocolError):
                return 1006, "connection lost"
        elif isinstance(event, CloseConnection):
            try:
                async with self._send_lock:
                    await stream.send(ws.send(event.response()))
            except (*_STREAM_ERRORS, LocalProtocolError):
                pass
            return event.code, event.reason or ""
        return None

    async def _frame(self, obj: dict[str, Any]) -> tuple[int, str] | None:
        """One JSON event from the server: bookkeeping, then hand on what the ledger says."""
        kind = obj.get("type")
        if kind == "welcome":
            await self._welcome(obj)
            await self._out.send(obj)
            return None
        if kind == "ack" or (kind == "message" and obj.get("from") == self.me):
            if self._unacked.pop(str(obj.get("id")), None) is not None:
                self._acked.set()
                self._acked = anyio.Event()
        elif kind == "error":
            if (closed := self._error(obj)) is not None:
                await self._out.send(obj)
                return closed
        elif kind == "keys":
            self._keys(obj)
        elif (
            kind == "keys_low"
            and self._device is not None
            and obj.get("device") == self._device.device
            and self._tasks is not None
        ):
            self._tasks.start_soon(self._restock)
        elif kind == "members" and obj["room"] not in self.rooms:
            self.rooms.append(obj["room"])  # a new session joins it again
        elif kind == "left" and obj.get("user") == self.me and obj["room"] in self.rooms:
            self.rooms.remove(obj["room"])
        filling = len(self._ledger.fills)
        for event in self._ledger.take(obj):
            await self._out.send(self._reveal(event))
        if len(self._ledger.fills) != filling:
            self._set_changed()  # a history request waiting for the fill may go
        return None

    async def _welcome(self, obj: dict[str, Any]) -> None:
        self.resume_token, self.session = str(obj["resume"]), str(obj["session"])
        self.me = str(obj["user"])  # with a token, the server says who we are
        self._ledger.welcome(obj)
        for room in obj["rooms"]:
            if room not in self.rooms:
                self.rooms.append(room)  # e.g. a DM room the server joined us to
        async with self._send_lock:
            # Every send without an ack goes again, in the order made, before any new
            # one: the server answers one it has already stored with its first ack.
            for frame in list(self._unacked.values()):
                if not await self._write(frame):
                    break
            self._live = True
            self._generation += 1
        self._set_changed()

    def _error(self, obj: dict[str, Any]) -> tuple[int, str] | None:
        """An ``error`` event: retry a send it refused for now, forget one it refused
        for good. A close code if the connection must be replaced."""
        ref, code = obj.get("ref"), obj.get("code")
        if isinstance(ref, str) and (claim := self._claims.pop(ref, None)) is not None:
            claim.set()  # a claim refused: no devices known for that user
        if isinstance(ref, str) and ref in self._unacked:
            if code in ("rate_limited", "unavailable") and self._tasks is not None:
                delay = obj.get("retry_after")
                wait = float(delay) if isinstance(delay, int | float) else _RESEND_UNAVAILABLE
                self._tasks.start_soon(self._resend_later, ref, max(wait, 0.0))
            else:
                del self._unacked[ref]
                self._acked.set()
                self._acked = anyio.Event()
            return None
        asked = self._ledger.asked
        if asked is not None and (
            (code == "rate_limited" and ref is None) or (code == "unavailable" and ref == asked)
        ):
            # Our page may be the request the server dropped, and an answer cannot be
            # told from a late one: resume on a new connection, where the server
            # replays from the offset we reached (the session is still in its grace).
            return _GAVE_UP, f"history page refused: {code}"
        return None


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
    client stops reading and the server, in time, closes it as too slow. As many
    sends may wait for their ack; one more waits for a place.
    ``keepalive``: seconds of silence before a ping, and as many again before
    the connection counts as dead and is replaced (None: wait for the server).
    Raises :class:`ChatRejected` if the server refuses the first handshake.

    What survives a lost connection, until the chat ends:

    * **Sends.** :meth:`Chat.send` and :meth:`Chat.dm` keep each message until
      its ``ack``. After every reconnect the unacknowledged ones go again, in the
      order made and before any new one, with the same client id, so the server
      stores each once. A send refused with ``rate_limited`` or ``unavailable``
      goes again after ``retry_after`` (or a second); any other error drops it.
      :attr:`Chat.unacked` lists what still waits; a send the server stored
      shows up once, as its ``ack`` or, if a replay or history page brings it
      first, as a ``message`` from you with its id.
    * **Messages.** Per room, ``message`` and ``ack`` events come in offset
      order and each offset once. Within the server's grace period the server
      replays what was missed. After it (``welcome`` with ``resumed: false``,
      as after a server restart), the client pages the missed messages with
      ``history`` from its last offsets up to the welcome's, and hands them on
      as ``message`` events before the room's live ones. It does not show the
      ``history`` answers, and a :meth:`Chat.history` of that room waits until
      the gap is filled. Unlike the browser, which fetches at most 100 missed
      messages, the client fills any gap.
    * **Epochs.** If a room's ``epoch`` changed (its history was lost and
      numbering restarted), there is nothing to fill: like the browser, the
      client starts that room over at the server's offset in the new epoch, so
      offsets go back down. Ask :meth:`Chat.history` for what the new epoch
      held before.

    Other requests (join, leave, typing, read marks, history) are not kept: one
    written into a link that turns out to be dead is lost with it. A new session
    joins every room the client knows again from its connect query.

    A dead link with no FIN is found by ``keepalive``. A history page not
    answered within 30 s, or refused (``unavailable``, or ``rate_limited``
    without a ``ref`` while a page is awaited: the client cannot tell which
    request was dropped), makes the client resume on a new connection (close
    code 4001), where the server replays from where the client got to.
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
        chat._tasks = tg
        tg.start_soon(chat._run)
        try:
            yield chat
        finally:
            await chat.aclose()
            tg.cancel_scope.cancel()
