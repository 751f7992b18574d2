"""Real sockets on 127.0.0.1: a ChatServer on an ephemeral port, and clients.

Every socket test runs on asyncio and on trio. The independent client is the
``websockets`` library (its asyncio or trio flavour, matching the backend);
plain HTTP goes through the standard library's ``urllib`` in a thread.
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import pytest
import sniffio
import websockets.asyncio.client
import websockets.trio.client
from websockets.exceptions import ConnectionClosed

from chatcore_server import ChatServer

GUARD = 10.0  # seconds: a bound on every wait, never a timing assertion


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@dataclass
class Running:
    server: ChatServer
    url: str  # http(s)://127.0.0.1:PORT/

    @property
    def ws(self) -> str:
        return self.url.replace("http", "ws", 1) + "ws"

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].strip("/"))


@asynccontextmanager
async def serving(**kwargs: Any) -> AsyncIterator[Running]:
    """A ChatServer listening on an ephemeral port for the block's duration."""
    kwargs.setdefault("port", 0)
    server = ChatServer(**kwargs)
    with anyio.fail_after(GUARD * 3):
        async with anyio.create_task_group() as tg:
            url = await tg.start(server.serve)
            try:
                yield Running(server, url)
            finally:
                server.shutdown()


def ws_connect(url: str, **kwargs: Any) -> Any:
    """``websockets`` connect for the running backend (async context manager)."""
    kwargs.setdefault("proxy", None)
    kwargs.setdefault("compression", None)
    kwargs.setdefault("open_timeout", GUARD)
    if sniffio.current_async_library() == "trio":
        return websockets.trio.client.connect(url, **kwargs)
    return websockets.asyncio.client.connect(url, **kwargs)


@asynccontextmanager
async def ws_connect_small_buffer(url: str, rcvbuf: int, **kwargs: Any) -> AsyncIterator[Any]:
    """``ws_connect`` over a socket whose receive buffer is set small before connecting
    (so the kernel cannot absorb a flood the client does not read)."""
    address = ("127.0.0.1", int(url.split(":")[2].split("/", maxsplit=1)[0]))
    if sniffio.current_async_library() == "trio":
        import trio

        tsock = trio.socket.socket()
        tsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await tsock.connect(address)
        kwargs["stream"] = trio.SocketStream(tsock)
    else:
        import asyncio

        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, address)
        kwargs["sock"] = sock
    async with ws_connect(url, **kwargs) as conn:
        yield conn


JSON = {"subprotocols": ["chatcore.v1"]}


async def recv(conn: Any) -> Any:
    """The next frame (JSON decoded when it is JSON), within the guard."""
    with anyio.fail_after(GUARD):
        data = await conn.recv()
    try:
        return json.loads(data)
    except ValueError:
        return data


async def recv_until(conn: Any, pred: Callable[[Any], bool]) -> list[Any]:
    """Frames up to and including the first that satisfies ``pred``."""
    seen = []
    with anyio.fail_after(GUARD):
        while True:
            event = await recv(conn)
            seen.append(event)
            if pred(event):
                return seen


async def welcome(conn: Any) -> dict[str, Any]:
    """Read up to the ``members`` of the last room listed in the welcome."""
    first = await recv(conn)
    assert first["type"] == "welcome", first
    for _ in first["rooms"]:
        await recv_until(conn, lambda e: e["type"] == "members")
    return dict(first)


def raw_socket(conn: Any) -> socket.socket:
    if sniffio.current_async_library() == "trio":
        sock: socket.socket = conn.stream.socket
    else:
        sock = conn.transport.get_extra_info("socket")
    return sock


async def kill(conn: Any) -> None:
    """Drop the TCP connection with a reset: no close frame, no FIN handshake."""
    sock = raw_socket(conn)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    if sniffio.current_async_library() == "trio":
        await conn.stream.aclose()
    else:
        conn.transport.abort()


async def close_with(conn: Any, code: int) -> None:
    """Close with a close frame carrying ``code`` and wait for the server's answer."""
    if sniffio.current_async_library() == "trio":
        await conn.aclose(code)
    else:
        await conn.close(code)


async def send_raw(conn: Any, data: bytes) -> None:
    """Write bytes below the WebSocket layer (to send what websockets would refuse)."""
    if sniffio.current_async_library() == "trio":
        await conn.stream.send_all(data)
    else:
        conn.transport.write(data)


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """A final client frame (masked with a zero key, which RFC 6455 allows)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + b"\0\0\0\0" + payload


async def http_get(
    url: str, headers: dict[str, str] | None = None, context: ssl.SSLContext | None = None
) -> tuple[int, dict[str, str], bytes]:
    """GET with urllib (in a thread): status, headers (lower-case), body."""

    def get() -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(url, headers=headers or {})
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )
        try:
            with opener.open(req, timeout=GUARD) as resp:
                hdrs = {k.lower(): v for k, v in resp.headers.items()}
                return resp.status, hdrs, resp.read()
        except urllib.error.HTTPError as exc:
            hdrs = {k.lower(): v for k, v in exc.headers.items()}
            return exc.code, hdrs, exc.read()

    return await anyio.to_thread.run_sync(get)


async def raw_exchange(port: int, data: bytes, *, read_until_close: bool = True) -> bytes:
    """Send raw bytes to the server and read what comes back until it closes."""
    with anyio.fail_after(GUARD):
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(data)
            out = b""
            while read_until_close:
                try:
                    out += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
            return out


async def ended(conn: Any) -> ConnectionClosed:
    """Read (and drop) frames until the connection ends; how it ended."""
    with anyio.fail_after(GUARD):
        try:
            while True:
                await conn.recv()
        except ConnectionClosed as exc:
            return exc


async def close_code(conn: Any) -> int:
    """Read (and drop) frames until the server's close frame; its code."""
    closed = await ended(conn)
    if closed.rcvd is None:
        raise AssertionError(f"closed without a close frame: {closed!r}")
    return closed.rcvd.code
