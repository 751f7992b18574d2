"""The client side of the conformance suite: only what any program on the network could do.

WebSocket through the ``websockets`` library (asyncio), HTTP through
``urllib`` (in a thread) or a raw socket, tokens built with ``hmac``. Nothing
here imports the server.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import socket
import struct
import urllib.error
import urllib.request
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import anyio
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

GUARD = 10.0
"""Seconds: a bound on every wait, so that a missing frame fails the test instead of hanging it.
Never a timing assertion."""

SUBPROTOCOL = "chatcore.v1"

_serial = itertools.count(1)


def unique(prefix: str) -> str:
    """A user or room name no other test of this run uses (tests share a server)."""
    return f"{prefix}{next(_serial)}"


def ws_open(url: str, *, json_mode: bool = True, **kwargs: Any) -> Any:
    """``async with ws_open(url) as conn``: a WebSocket client, JSON mode by default."""
    if json_mode:
        kwargs.setdefault("subprotocols", [SUBPROTOCOL])
    # Unbounded: a bounded queue makes websockets stop reading once it is full, and
    # then it never sees the server's answer to its close (a test that leaves
    # replies unread would wait out the close timeout).
    kwargs.setdefault("max_queue", None)
    kwargs.setdefault("proxy", None)
    kwargs.setdefault("compression", None)
    kwargs.setdefault("open_timeout", GUARD)
    kwargs.setdefault("close_timeout", GUARD)
    return connect(url, **kwargs)


# Frames that ``say`` read past while waiting for its ack, for the next ``recv``.
_backlog: weakref.WeakKeyDictionary[ClientConnection, deque[Any]] = weakref.WeakKeyDictionary()


async def recv(conn: ClientConnection) -> Any:
    """The next frame, JSON-decoded in JSON mode (a str in plain-text mode)."""
    waiting = _backlog.get(conn)
    if waiting:
        return waiting.popleft()
    with anyio.fail_after(GUARD):
        data = await conn.recv()
    if conn.subprotocol == SUBPROTOCOL:
        return json.loads(data)
    return data


async def recv_until(conn: ClientConnection, pred: Callable[[Any], bool]) -> list[Any]:
    """Frames up to and including the first that satisfies ``pred``."""
    seen = []
    with anyio.fail_after(GUARD):
        while True:
            event = await recv(conn)
            seen.append(event)
            if pred(event):
                return seen


async def welcome(conn: ClientConnection) -> dict[str, Any]:
    """The ``welcome``, after reading the ``members`` that follow it for each of its rooms."""
    first = await recv(conn)
    assert first["type"] == "welcome", first
    rooms = set(first["rooms"])
    while rooms:
        event = await recv(conn)
        if event["type"] == "members":
            rooms.discard(event["room"])
    return dict(first)


def is_type(kind: str, **fields: Any) -> Callable[[Any], bool]:
    """A predicate for ``recv_until``: an event of type ``kind`` with these field values."""

    def pred(event: Any) -> bool:
        return bool(event.get("type") == kind and all(event.get(k) == v for k, v in fields.items()))

    return pred


async def send(conn: ClientConnection, **frame: Any) -> None:
    """Send one JSON frame."""
    await conn.send(json.dumps(frame))


async def say(conn: ClientConnection, room: str, text: str, cid: str | None = None) -> int:
    """``send`` and wait for its ``ack``: the offset it was stored at. The frames that
    came before the ack are left for the next ``recv``."""
    frame: dict[str, Any] = {"type": "send", "room": room, "text": text}
    if cid is not None:
        frame["id"] = cid
    await conn.send(json.dumps(frame))
    events = await recv_until(conn, lambda e: e["type"] in ("ack", "error"))
    ack = events.pop()
    _backlog.setdefault(conn, deque()).extend(events)
    assert ack["type"] == "ack", ack
    offset: int = ack["offset"]
    return offset


async def close_code(conn: ClientConnection) -> int:
    """Read (and drop) frames until the server's close frame: its code."""
    with anyio.fail_after(GUARD):
        try:
            while True:
                await conn.recv()
        except ConnectionClosed as exc:
            closed = exc
    if closed.rcvd is None:
        raise AssertionError(f"closed without a close frame: {closed!r}")
    return closed.rcvd.code


def kill(conn: ClientConnection) -> None:
    """Lose the transport: a TCP reset, no close frame."""
    sock = conn.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.transport.abort()


def send_raw(conn: ClientConnection, data: bytes) -> None:
    """Write bytes under the WebSocket layer (what ``websockets`` would refuse to send)."""
    conn.transport.write(data)


def masked_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A client frame masked with a zero key (RFC 6455 allows any key)."""
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    if n < 126:
        head = bytes((first, 0x80 | n))
    elif n < 65536:
        head = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, n)
    return head + b"\0\0\0\0" + payload


async def http_get(
    url: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    """GET with urllib: status, headers (lower-case names), body (JSON-decoded when it is JSON)."""

    def get() -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(url, headers=headers or {})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=GUARD) as reply:
                found = {k.lower(): v for k, v in reply.headers.items()}
                return reply.status, found, reply.read()
        except urllib.error.HTTPError as exc:
            found = {k.lower(): v for k, v in exc.headers.items()}
            return exc.code, found, exc.read()

    status, found, body = await anyio.to_thread.run_sync(get)
    try:
        return status, found, json.loads(body)
    except ValueError:
        return status, found, body


async def raw_http(port: int, request: bytes) -> tuple[int, dict[str, str], Any]:
    """Send ``request`` as is: the answer's status, headers (lower-case names) and body
    (JSON-decoded when it is JSON). For what urllib would not send, such as an upgrade."""
    out = b""
    with anyio.fail_after(GUARD):
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(request)
            while True:
                head, found, body = out.partition(b"\r\n\r\n")
                if found:
                    lines = head.decode("latin-1").split("\r\n")
                    headers = dict(_header(line) for line in lines[1:])
                    if len(body) >= int(headers.get("content-length", "0")):
                        break
                try:
                    out += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = dict(_header(line) for line in lines[1:])
    try:
        return status, headers, json.loads(body)
    except ValueError:
        return status, headers, body


def _header(line: str) -> tuple[str, str]:
    name, _, value = line.partition(":")
    return name.strip().lower(), value.strip()


def upgrade_request(
    port: int, target: str, headers: Mapping[str, str | list[str]] | None = None
) -> bytes:
    """A WebSocket upgrade request for ``target`` as raw bytes; ``headers`` are added
    (a list value repeats the header)."""
    fields: dict[str, str | list[str]] = {
        "Host": f"127.0.0.1:{port}",
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        **(headers or {}),
    }
    lines = [f"GET {target} HTTP/1.1"]
    for name, value in fields.items():
        for one in [value] if isinstance(value, str) else value:
            lines.append(f"{name}: {one}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def hs256(secret: str, claims: dict[str, Any]) -> str:
    """An HS256 JSON Web Token (RFC 7519) for ``claims``, signed with ``secret``."""

    def part(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")

    header = part(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = part(json.dumps(claims).encode())
    signature = hmac.new(secret.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{part(signature)}"
