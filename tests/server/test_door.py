"""The door: on asyncio over plain TCP, a complete and acceptable WebSocket upgrade
is accepted from the protocol's callbacks, without a task (``ChatServer._door``);
everything else goes to ``_http`` as ever. The two paths must not be told apart
from outside: same bytes answered, same refusals counted once, same timeouts.
Run on both backends (trio has no door: the same expectations hold for it).
"""

from __future__ import annotations

import json
import os
import socket

import anyio
import anyio.abc
import pytest

from chatcore_server import Limits

from .conftest import GUARD, serving
from .test_hostile import client_frame, read_all, send_frame, server_frames, upgrade

pytestmark = pytest.mark.anyio

JSON_UPGRADE = "Sec-WebSocket-Protocol: chatcore.v1"


async def frames_after(stream: anyio.abc.SocketStream, want: int) -> list[tuple[int, bytes]]:
    """The first ``want`` server frames after the 101 (the 101 itself checked)."""
    out = b""
    with anyio.fail_after(GUARD):
        while True:
            out += await stream.receive()
            head, sep, rest = out.partition(b"\r\n\r\n")
            if sep and len(server_frames(rest)) >= want:
                assert head.startswith(b"HTTP/1.1 101 ")
                return server_frames(rest)


def texts(frames: list[tuple[int, bytes]]) -> list[dict[str, object]]:
    return [json.loads(p) for op, p in frames if op == 1]


@pytest.mark.parametrize("pieces", [1, 7, 10_000])
async def test_an_upgrade_with_a_frame_behind_it_is_the_same_whole_or_byte_by_byte(
    pieces: int,
) -> None:
    # Invariant (h11's): how the bytes are cut up changes nothing. The request and a
    # chat frame behind it in the same bytes: welcome, members, then the message's ack.
    data = upgrade("user=ann&room=lobby", JSON_UPGRADE) + client_frame(1, send_frame("hello"))
    size = max(1, len(data) // pieces)
    async with serving() as srv, await anyio.connect_tcp("127.0.0.1", srv.port) as stream:
        for i in range(0, len(data), size):
            await stream.send(data[i : i + size])
        events = texts(await frames_after(stream, 3))
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["welcome", "members"]
    assert "message" in kinds or "ack" in kinds


async def test_a_page_then_an_upgrade_on_one_connection() -> None:
    # The first request is not an upgrade: _http answers it, then upgrades the next.
    page = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    async with serving() as srv, await anyio.connect_tcp("127.0.0.1", srv.port) as stream:
        await stream.send(page + upgrade("user=bo&room=lobby", JSON_UPGRADE))
        out = b""
        with anyio.fail_after(GUARD):
            while b"101 Switching Protocols" not in out or b'"members"' not in out:
                out += await stream.receive()
    assert out.startswith(b"HTTP/1.1 ")
    assert out.index(b"HTTP/1.1 101") > 0


async def test_a_refused_upgrade_is_answered_and_counted_once() -> None:
    async with serving() as srv:
        async with await anyio.connect_tcp("127.0.0.1", srv.port) as stream:
            await stream.send(upgrade("room=lobby"))  # no user
            out = await read_all(stream)
        assert out.startswith(b"HTTP/1.1 400 ")
        assert srv.server.transport_tally().refused["bad_query"] == 1
        assert srv.server.transport_tally().refused["bad_handshake"] == 0


async def test_half_a_request_is_closed_after_the_handshake_timeout() -> None:
    async with serving(limits=Limits(handshake_timeout=0.3)) as srv:
        async with await anyio.connect_tcp("127.0.0.1", srv.port) as stream:
            await stream.send(b"GET /ws?user=cy HTTP/1.1\r\nHost: x\r\n")
            with anyio.fail_after(GUARD):
                assert await read_all(stream) == b""  # closed, nothing said
        async with await anyio.connect_tcp("127.0.0.1", srv.port) as idle:
            with anyio.fail_after(GUARD):
                assert await read_all(idle) == b""  # nothing sent at all: the same
        assert srv.server._tcp == 0


async def test_a_close_right_behind_the_upgrade_ends_the_session_cleanly() -> None:
    data = upgrade("user=dee&room=lobby", JSON_UPGRADE) + client_frame(8, b"\x03\xe8")
    async with serving() as srv:
        async with await anyio.connect_tcp("127.0.0.1", srv.port) as stream:
            await stream.send(data)
            out = await read_all(stream)
        assert out.startswith(b"HTTP/1.1 101 ")
        _, _, rest = out.partition(b"\r\n\r\n")
        assert server_frames(rest)[-1] == (8, b"\x03\xe8")
        with anyio.fail_after(GUARD):
            while srv.server.connections or srv.server._tcp:
                await anyio.sleep(0.01)
        assert srv.server.engine.stats()["sessions"] == 0


async def test_shutdown_closes_connections_that_sent_nothing() -> None:
    async with serving() as srv:
        stream = await anyio.connect_tcp("127.0.0.1", srv.port)
        await anyio.sleep(0.05)  # accepted, waiting at the door
    with anyio.fail_after(GUARD):
        assert await read_all(stream) == b""
    await stream.aclose()


def _server_side_option(client_address: tuple[str, int], level: int, option: int) -> int:
    """An option of this process's socket whose peer is ``client_address`` (the
    server runs in this process: its side of the connection is one of our fds)."""
    for name in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue
        with sock:
            try:
                if sock.type != socket.SOCK_STREAM or sock.getpeername() != client_address:
                    continue
            except OSError:
                continue
            return sock.getsockopt(level, option)
    raise AssertionError(f"no server socket with peer {client_address}")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads /proc/self/fd")
async def test_an_accepted_connection_writes_small_frames_at_once() -> None:
    # asyncio sets TCP_NODELAY only where a socket's proto says TCP, and an accepted
    # socket of a listener made with proto 0 says 0; without it Nagle held each small
    # frame until the one before was acked (the benchmark's p50 at 20,000 deliveries/s,
    # 100 clients, went from 1.3 to 5.6 ms).
    async with serving() as srv, await anyio.connect_tcp("127.0.0.1", srv.port) as stream:
        await stream.send(upgrade("user=ann&room=lobby", JSON_UPGRADE))
        await frames_after(stream, 2)
        local = stream.extra(anyio.abc.SocketAttribute.local_address)
        assert isinstance(local, tuple)
        address = (str(local[0]), int(local[1]))
        assert _server_side_option(address, socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads /proc/self/fd")
@pytest.mark.parametrize("send_buffer", [32 * 1024, 96 * 1024])
async def test_an_upgraded_socket_has_the_send_buffer_asked_for(send_buffer: int) -> None:
    # Set once on the listener where accepted sockets inherit it (Linux), else on
    # each socket: either way the kernel's share of a slow reader's backlog is bounded.
    async with (
        serving(limits=Limits(send_buffer=send_buffer)) as srv,
        await anyio.connect_tcp("127.0.0.1", srv.port) as stream,
    ):
        await stream.send(upgrade("user=ann&room=lobby", JSON_UPGRADE))
        await frames_after(stream, 2)
        local = stream.extra(anyio.abc.SocketAttribute.local_address)
        assert isinstance(local, tuple)
        address = (str(local[0]), int(local[1]))
        got = _server_side_option(address, socket.SOL_SOCKET, socket.SO_SNDBUF)
        assert send_buffer <= got <= 2 * send_buffer  # (Linux reports twice what was asked)


async def test_each_connection_at_the_door_gets_its_own_handshake_timeout() -> None:
    # One timer serves every door: the first is closed at its deadline and the one
    # that came later is not closed with it, but at its own deadline after.
    async with serving(limits=Limits(handshake_timeout=0.4)) as srv:
        async with await anyio.connect_tcp("127.0.0.1", srv.port) as first:
            await first.send(b"GET /ws?user=cy HTTP/1.1\r\nHost: x\r\n")
            await anyio.sleep(0.25)
            async with await anyio.connect_tcp("127.0.0.1", srv.port) as second:
                await second.send(b"GET /ws?user=di HTTP/1.1\r\n")
                with anyio.fail_after(GUARD):
                    assert await read_all(first) == b""
                with anyio.move_on_after(0.05) as still_open:
                    await second.receive()
                assert still_open.cancelled_caught
                with anyio.fail_after(GUARD):
                    assert await read_all(second) == b""
        with anyio.fail_after(GUARD):
            while srv.server._tcp:
                await anyio.sleep(0.01)


async def test_an_upgraded_connection_reads_into_buffers_the_heap_can_hold(
    anyio_backend: str,
) -> None:
    # asyncio's transport reads into a fresh 256 KiB buffer: above glibc's mmap threshold,
    # that was an mmap, mremap and munmap (and a page fault) for every read of every
    # connection, ~40% of the server's kernel time in a connect+close cycle (strace -c).
    if anyio_backend != "asyncio":
        pytest.skip("asyncio's transports only")
    async with serving() as srv, await anyio.connect_tcp("127.0.0.1", srv.port) as stream:
        await stream.send(upgrade("user=ann&room=lobby", JSON_UPGRADE))
        await frames_after(stream, 2)
        [peer] = srv.server._adopted
        assert peer.transport is not None
        assert getattr(peer.transport, "max_size", 0) <= 128 * 1024
