"""Hostile and unlucky peers: whatever one connection does, or whatever breaks
while serving it, ends that connection alone with its documented answer.

Raw sockets write exactly the bytes a hostile client would; ``websockets``
clients stand for everyone else, who must not notice.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import pytest

from chatcore import Command, Config, Drained, Effect, Engine
from chatcore_server import ChatServer, Limits
from chatcore_server._peer import Peer

from .conftest import (
    GUARD,
    JSON,
    Running,
    close_code,
    ended,
    recv_until,
    serving,
    welcome,
    ws_connect,
)
from .test_limits import still_serving

pytestmark = pytest.mark.anyio

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def upgrade(query: str, *headers: str, host: str = "127.0.0.1") -> bytes:
    """A complete WebSocket upgrade request for ``/ws?QUERY``."""
    lines = [
        f"GET /ws?{query} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {KEY}",
        "Sec-WebSocket-Version: 13",
        *headers,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def client_frame(opcode: int, payload: bytes = b"", *, fin: bool = True) -> bytes:
    """A masked client frame (zero mask key, which RFC 6455 allows)."""
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    if n <= 125:
        head = struct.pack("!BB", first, 0x80 | n)
    elif n <= 0xFFFF:
        head = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, n)
    return head + b"\0\0\0\0" + payload


def close_frame(code: int) -> bytes:
    return client_frame(0x8, struct.pack("!H", code))


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """The complete (opcode, payload) frames in what the server sent after its 101."""
    frames = []
    while len(data) >= 2:
        n = data[1] & 0x7F
        start = 2
        if n == 126:
            n, start = struct.unpack("!H", data[2:4])[0], 4
        elif n == 127:
            n, start = struct.unpack("!Q", data[2:10])[0], 10
        if len(data) < start + n:
            break
        frames.append((data[0] & 0x0F, data[start : start + n]))
        data = data[start + n :]
    return frames


def close_of(frames: list[tuple[int, bytes]]) -> tuple[int, str] | None:
    """The code and reason of the close frame among ``frames``, if any."""
    for opcode, payload in frames:
        if opcode == 0x8:
            return struct.unpack("!H", payload[:2])[0], payload[2:].decode()
    return None


async def read_all(stream: anyio.abc.SocketStream) -> bytes:
    """Everything the server sends until it closes (a reset ends it too)."""
    out = b""
    with anyio.fail_after(GUARD):
        while True:
            try:
                out += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                return out


async def exchange(
    port: int, data: bytes, *, eof: bool = False
) -> tuple[bytes, list[tuple[int, bytes]]]:
    """Send ``data`` on a new connection (then EOF, if asked); the status line and
    frames of the answer."""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(data)
        if eof:
            await stream.send_eof()
        out = await read_all(stream)
    head, _, rest = out.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0], server_frames(rest)


async def reset_after(port: int, data: bytes) -> None:
    """Send ``data`` on a new connection, then drop it with a reset at once."""
    stream = await anyio.connect_tcp("127.0.0.1", port)
    raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    if data:
        await stream.send(data)
    await stream.aclose()


@asynccontextmanager
async def sessions(srv: Running, user: str, n: int) -> AsyncIterator[list[Any]]:
    """``n`` open JSON sessions of ``user`` in room ``lobby``, welcomed."""
    async with AsyncExitStack() as stack:
        conns = []
        for _ in range(n):
            conn = await stack.enter_async_context(
                ws_connect(f"{srv.ws}?user={user}&room=lobby", **JSON)
            )
            await welcome(conn)
            conns.append(conn)
        yield conns


async def all_hear(conns: list[Any], text: str) -> None:
    """The first connection sends ``text`` to ``lobby``: it is stored (ack) and every
    other one of them gets it."""
    await conns[0].send(json.dumps({"type": "send", "room": "lobby", "text": text, "id": text}))
    await recv_until(conns[0], lambda e: e.get("type") == "ack" and e.get("id") == text)
    for conn in conns[1:]:
        await recv_until(conn, lambda e: e.get("text") == text)


def assert_logged(records: list[logging.LogRecord], planted: str) -> None:
    """The first of ``records`` carries the traceback of the planted failure."""
    failures = [r for r in records if r.exc_info is not None]
    assert failures, "the failure was not logged with its traceback"
    logged = failures[0].exc_info
    assert logged is not None
    assert planted in str(logged[1])


def internal_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "chatcore_server" and r.levelno >= logging.ERROR]


# -- item 1: the seventeenth session of one user -------------------------------------------------


async def test_sessions_over_the_limit_are_refused_and_the_others_keep_chatting(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with serving() as srv, sessions(srv, "probe", 16) as probes:
        for _ in range(4):
            async with ws_connect(f"{srv.ws}?user=probe&room=lobby", **JSON) as extra:
                assert await close_code(extra) == 1008
        await all_hear(probes, "the sixteen are still here")
        await still_serving(srv)
    assert internal_errors(caplog) == []


# -- connections that end in every state ---------------------------------------------------------

REQUEST_START = b"GET /ws?user=x&room=lobby HTTP/1.1\r\nHost: 127.0.0.1\r\nUpg"


async def ends_mid_request(port: int) -> None:
    status, _frames = await exchange(port, REQUEST_START, eof=True)
    assert status == b"HTTP/1.1 400 Bad Request"  # h11: the request was cut short


async def resets_mid_request(port: int) -> None:
    await reset_after(port, REQUEST_START)


async def refused_then_resets_at_once(port: int) -> None:
    await reset_after(port, upgrade("user=probe&room=lobby"))


async def refused_and_never_answers_the_close(port: int) -> None:
    # No EOF, no close frame: the server hangs up by itself after close_timeout.
    status, frames = await exchange(port, upgrade("user=probe&room=lobby"))
    assert status == b"HTTP/1.1 101 Switching Protocols"
    assert close_of(frames) == (1008, "too many sessions")


async def refused_with_a_message_and_close_in_the_same_write(port: int) -> None:
    hello = json.dumps({"type": "send", "room": "lobby", "text": "sneaky"}).encode()
    status, frames = await exchange(
        port,
        upgrade("user=probe&room=lobby", "Sec-WebSocket-Protocol: chatcore.v1")
        + client_frame(0x1, hello)
        + close_frame(1000),
    )
    assert status == b"HTTP/1.1 101 Switching Protocols"
    assert close_of(frames) == (1008, "too many sessions")


async def accepted_with_a_message_and_close_in_the_same_write(port: int) -> None:
    hello = json.dumps({"type": "send", "room": "lobby", "text": "hi and bye"}).encode()
    status, frames = await exchange(
        port,
        upgrade("user=quick&room=lobby", "Sec-WebSocket-Protocol: chatcore.v1")
        + client_frame(0x1, hello)
        + close_frame(1000),
    )
    assert status == b"HTTP/1.1 101 Switching Protocols"
    assert json.loads(frames[0][1])["type"] == "welcome"
    assert close_of(frames) == (1000, "")


async def accepted_then_resets_at_once(port: int) -> None:
    await reset_after(port, upgrade("user=quick&room=lobby"))


async def closes_while_the_server_closes(port: int) -> None:
    # A binary frame makes the server close (1003); the client's own close crosses it.
    status, frames = await exchange(
        port, upgrade("user=quick&room=lobby") + client_frame(0x2, b"\x00") + close_frame(1000)
    )
    assert status == b"HTTP/1.1 101 Switching Protocols"
    assert close_of(frames) == (1003, "binary frames are not supported")


async def resets_while_the_server_closes(port: int) -> None:
    await reset_after(port, upgrade("user=quick&room=lobby") + client_frame(0x2, b"\x00"))


@pytest.mark.parametrize(
    "scenario",
    [
        ends_mid_request,
        resets_mid_request,
        refused_then_resets_at_once,
        refused_and_never_answers_the_close,
        refused_with_a_message_and_close_in_the_same_write,
        accepted_with_a_message_and_close_in_the_same_write,
        accepted_then_resets_at_once,
        closes_while_the_server_closes,
        resets_while_the_server_closes,
    ],
)
async def test_a_connection_ending_in_any_state_leaves_the_others_alone(
    scenario: Callable[[int], Awaitable[None]], caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        serving(limits=Limits(close_timeout=0.5)) as srv,
        sessions(srv, "probe", 16) as probes,
    ):
        for _ in range(3):  # the same again finds the server in the same shape
            await scenario(srv.port)
        await all_hear(probes, "nothing happened")
        await still_serving(srv)
        with anyio.fail_after(GUARD):  # every connection of the scenario is gone
            while srv.server.connections > 16:
                await anyio.sleep(0.01)
    assert internal_errors(caplog) == []


# -- a bug while serving one connection ends that connection, not the server --------------------


async def test_a_failure_reading_one_connection_closes_it_1011_and_spares_the_rest(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    receive = Peer._receive  # (the whole read: whole text frames never reach _events)

    def broken_for_victim(self: Peer, data: bytes) -> None:
        if self.user == "victim":
            raise RuntimeError("planted bug")
        receive(self, data)

    async with serving() as srv, sessions(srv, "probe", 3) as probes:
        async with ws_connect(f"{srv.ws}?user=victim&room=lobby", **JSON) as victim:
            await welcome(victim)
            monkeypatch.setattr(Peer, "_receive", broken_for_victim)
            await victim.send(json.dumps({"type": "send", "room": "lobby", "text": "boom"}))
            assert await close_code(victim) == 1011
        await all_hear(probes, "still fine")
        await still_serving(srv)
    assert_logged(internal_errors(caplog), "planted bug")


async def test_a_failure_writing_to_one_connection_drops_it_and_spares_the_rest(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    write = Peer._write

    async def broken_for_victim(self: Peer, stream: anyio.abc.ByteStream) -> None:
        if self.user == "victim":
            raise RuntimeError("planted bug")
        await write(self, stream)

    monkeypatch.setattr(Peer, "_write", broken_for_victim)
    # One session per user: the victim's second connection is refused, which hands
    # its close to a writer task (the task that used to end the whole server). On
    # asyncio the door would upgrade it without a task (its close then goes through
    # the transport): turned off, so that asyncio runs the task path too.
    monkeypatch.setattr("chatcore_server._server._asyncio_door", lambda: None)
    async with (
        serving(config=Config(max_sessions_per_user=1)) as srv,
        sessions(srv, "victim", 1),
        sessions(srv, "probe", 1) as probes,
        sessions(srv, "other", 1) as others,
    ):
        for _ in range(3):
            status, _frames = await exchange(srv.port, upgrade("user=victim&room=lobby"))
            assert status in (b"", b"HTTP/1.1 101 Switching Protocols")
        await all_hear(probes + others, "still fine")
        await still_serving(srv)
    failures = [r for r in internal_errors(caplog) if r.exc_info is not None]
    assert len(failures) == 3, failures


async def test_a_failure_flushing_one_connection_drops_it_and_spares_the_rest(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The bug is planted in the write itself, which every way of flushing a peer
    # takes (``Peer.flush``, and the flush's own path straight to the socket).
    write = os.write
    victim_fds: set[int] = set()

    def broken_for_victim(fd: int, data: Any) -> int:
        if fd in victim_fds:
            raise RuntimeError("planted bug")
        return write(fd, data)

    # Sessions on both sides of the victim: all of them are flushed in the same loop.
    async with serving() as srv, sessions(srv, "before", 2) as before:
        async with ws_connect(f"{srv.ws}?user=victim&room=lobby", **JSON) as victim:
            await welcome(victim)
            async with sessions(srv, "after", 2) as after:
                for peer in srv.server._peers.values():
                    if peer.user == "victim":
                        victim_fds.update(fd for fd in (peer.fd, peer.transport_fd) if fd >= 0)
                assert victim_fds
                monkeypatch.setattr(os, "write", broken_for_victim)
                await all_hear(before + after, "still fine")
                assert (await ended(victim)).rcvd is None  # the victim alone: a reset
                victim_fds.clear()  # (closed: its number may come back for another socket)
                await all_hear(after + before, "and again")
        await still_serving(srv)
    assert_logged(internal_errors(caplog), "planted bug")


async def test_an_engine_failure_after_a_flush_is_logged_and_the_server_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    handle = Engine.handle
    planted = [True]

    def broken_once(self: Engine, command: Command, now: float) -> list[Effect]:
        if planted and isinstance(command, Drained):
            planted.clear()
            raise RuntimeError("planted engine bug")
        return handle(self, command, now)

    async with serving() as srv, sessions(srv, "probe", 3) as probes:
        monkeypatch.setattr(Engine, "handle", broken_once)
        await all_hear(probes, "through the failure")
        assert not planted, "the fault was not reached"
        await all_hear(probes, "after it")
        await still_serving(srv)
    critical = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert_logged(critical, "planted engine bug")


# -- items 3 and 4: frame headers are bounded before their payload arrives ------------------------


def frame_header(opcode: int, n: int, *, fin: bool = True) -> bytes:
    """A masked client frame header announcing ``n`` payload bytes (zero mask key)."""
    first = (0x80 if fin else 0) | opcode
    if n <= 125:
        return struct.pack("!BB", first, 0x80 | n) + b"\0\0\0\0"
    if n <= 0xFFFF:
        return struct.pack("!BBH", first, 0x80 | 126, n) + b"\0\0\0\0"
    return struct.pack("!BBQ", first, 0x80 | 127, n) + b"\0\0\0\0"


def send_frame(text: str) -> bytes:
    return json.dumps({"type": "send", "room": "lobby", "text": text, "id": text}).encode()


def fragments(payload: bytes, count: int) -> bytes:
    """``payload`` as one text message in ``count`` frames (the first ``count - 1``
    one byte each)."""
    pieces = [payload[i : i + 1] for i in range(count - 1)] + [payload[count - 1 :]]
    frames = [client_frame(0x1 if i == 0 else 0x0, p, fin=False) for i, p in enumerate(pieces)]
    frames[-1] = client_frame(0x1 if count == 1 else 0x0, pieces[-1])
    return b"".join(frames)


def acked(frames: list[tuple[int, bytes]], cid: str) -> bool:
    return any(
        op == 0x1 and json.loads(p).get("type") == "ack" and json.loads(p).get("id") == cid
        for op, p in frames
    )


async def test_a_header_announcing_64_mib_is_closed_1009_before_any_payload() -> None:
    async with serving(limits=Limits(close_timeout=0.5)) as srv:
        for n in (64 * 1024 * 1024, Config().max_frame_bytes + 1):
            # The header alone: no payload follows, so only the header can be judged.
            status, frames = await exchange(
                srv.port, upgrade("user=big&room=lobby") + frame_header(0x1, n)
            )
            assert status == b"HTTP/1.1 101 Switching Protocols"
            assert status == b"HTTP/1.1 101 Switching Protocols"
        assert close_of(frames) == (1009, "message too big")
        await still_serving(srv)


async def test_a_message_may_span_64_frames_and_no_more() -> None:
    async with serving(limits=Limits(close_timeout=0.5)) as srv:
        request = upgrade("user=frag&room=lobby", "Sec-WebSocket-Protocol: chatcore.v1")
        status, frames = await exchange(
            srv.port, request + fragments(send_frame("in 64"), 64) + close_frame(1000)
        )
        assert status == b"HTTP/1.1 101 Switching Protocols"
        assert acked(frames, "in 64")
        assert close_of(frames) == (1000, "")
        status, frames = await exchange(
            srv.port, request + fragments(send_frame("in 65"), 65) + close_frame(1000)
        )
        assert status == b"HTTP/1.1 101 Switching Protocols"
        assert not acked(frames, "in 65")
        assert close_of(frames) == (1009, "message in too many fragments")
        await still_serving(srv)


async def test_empty_continuation_frames_are_not_free() -> None:
    async with serving(limits=Limits(close_timeout=0.5)) as srv:
        request = upgrade("user=frag&room=lobby", "Sec-WebSocket-Protocol: chatcore.v1")
        # A flood of empty continuations, as many as the socket takes: closed after 64.
        flood = client_frame(0x1, b"{", fin=False) + client_frame(0x0, fin=False) * 10_000
        status, frames = await exchange(srv.port, request + flood)
        assert status == b"HTTP/1.1 101 Switching Protocols"
        assert close_of(frames) == (1009, "message in too many fragments")
        # Within the fragment bound, each continuation's 6-byte header counts too.
        limit = Config().max_frame_bytes
        body = client_frame(0x1, b"x" * (limit - 6 * 10), fin=False)
        status, frames = await exchange(
            srv.port, request + body + client_frame(0x0, fin=False) * 11
        )
        assert status == b"HTTP/1.1 101 Switching Protocols"
        assert close_of(frames) == (1009, "message too big")
        await still_serving(srv)


# -- item 5: the handshake ------------------------------------------------------------------------


async def test_header_fields_are_bounded_in_number_as_well_as_size() -> None:
    async with serving() as srv:

        def request(fields: int) -> bytes:
            # Host plus ``fields - 1`` tiny fields: far under the 16 KiB bound.
            extra = "".join(f"X-{i}: a\r\n" for i in range(fields - 1))
            return f"GET /healthz HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()

        async def status_of(data: bytes) -> bytes:
            async with await anyio.connect_tcp("127.0.0.1", srv.port) as stream:
                await stream.send(data)
                out = b""
                with anyio.fail_after(GUARD):
                    while b"\r\n" not in out:
                        out += await stream.receive()
            return out.split(b"\r\n", 1)[0]

        assert len(request(300)) < 4096
        assert await status_of(request(100)) == b"HTTP/1.1 200 OK"
        assert await status_of(request(101)) == b"HTTP/1.1 431 Request Header Fields Too Large"
        assert await status_of(request(300)) == b"HTTP/1.1 431 Request Header Fields Too Large"
        assert await status_of(upgrade("user=a&room=r", *(f"X-{i}: a" for i in range(300)))) == (
            b"HTTP/1.1 431 Request Header Fields Too Large"
        )
        await still_serving(srv)


async def test_a_repeated_origin_is_refused_whichever_comes_first() -> None:
    async with serving(allow_origins=["https://chat.example"]) as srv:
        for origins in (
            ("https://chat.example", "http://evil.example"),
            ("http://evil.example", "https://chat.example"),
            ("https://chat.example", "https://chat.example"),
        ):
            headers = [f"Origin: {o}" for o in origins]
            status, _frames = await exchange(srv.port, upgrade("user=a&room=r", *headers))
            assert status == b"HTTP/1.1 400 Bad Request"
        for name, value in (("Sec-WebSocket-Key", KEY), ("Sec-WebSocket-Version", "13")):
            status, _frames = await exchange(srv.port, upgrade("user=a&room=r", f"{name}: {value}"))
            assert status == b"HTTP/1.1 400 Bad Request"
        await still_serving(srv)


async def test_by_default_only_the_servers_own_pages_may_connect() -> None:
    async with serving() as srv:
        own = srv.url.rstrip("/")  # http://127.0.0.1:PORT
        refused = [
            "http://localhost:3000",
            f"http://localhost:{srv.port + 1}",
            f"http://127.0.0.1:{srv.port + 1}",
            f"https://127.0.0.1:{srv.port}",
            "http://127.0.0.1",
            "null",
            "http://evil.example",
        ]
        host = f"127.0.0.1:{srv.port}"  # what a browser sends
        for origin in refused:
            status, _frames = await exchange(
                srv.port, upgrade("user=a&room=r", f"Origin: {origin}", host=host)
            )
            assert status == b"HTTP/1.1 403 Forbidden", origin
        for origin in (own, None):
            async with ws_connect(f"{srv.ws}?user=a&room=r", origin=origin, **JSON) as ok:
                await welcome(ok)
        await still_serving(srv)
    # --allow-origin widens it, to exactly the origins listed.
    async with serving(allow_origins=["http://localhost:3000"]) as srv:
        async with ws_connect(
            f"{srv.ws}?user=a&room=r", origin="http://localhost:3000", **JSON
        ) as ok:
            await welcome(ok)
        status, _frames = await exchange(
            srv.port, upgrade("user=a&room=r", "Origin: http://localhost:3001")
        )
        assert status == b"HTTP/1.1 403 Forbidden"
    with pytest.raises(ValueError, match="not an origin"):
        ChatServer(allow_origins=["chat.example"])
