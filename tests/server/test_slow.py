"""A client that stops reading is closed with 1013; everyone else keeps receiving."""

from __future__ import annotations

import base64
import errno
import json
import os
import select
import socket
from typing import Any

import anyio
import anyio.abc
import pytest

from chatcore import Config
from chatcore_server import Limits

from .conftest import (
    GUARD,
    JSON,
    Running,
    close_code,
    recv,
    recv_until,
    serving,
    welcome,
    ws_connect,
    ws_connect_small_buffer,
)

pytestmark = pytest.mark.anyio

TEXT = "x" * 32_000
# A reader that stops is given up once the room's window has moved past it: a
# small window keeps the floods below short (the default holds 1,000 messages).
WINDOW = 100


async def test_slow_reader_is_closed_1013_and_others_get_everything() -> None:
    config = Config(
        history_window=WINDOW,
        rate_burst=1_000_000,
        rate_per_second=1_000_000.0,
        request_burst=1_000_000,
        request_per_second=1_000_000.0,
    )
    async with (
        serving(config=config, limits=Limits(close_timeout=GUARD)) as srv,
        ws_connect(f"{srv.ws}?user=alice&room=general", **JSON) as alice,
        ws_connect(f"{srv.ws}?user=bob&room=general", **JSON) as bob,
        # A small receive buffer, so the kernel cannot absorb the whole flood.
        ws_connect_small_buffer(
            f"{srv.ws}?user=slow&room=general", 16384, max_queue=1, **JSON
        ) as slow,
    ):
        for conn in (alice, bob, slow):
            await welcome(conn)
        await recv_until(alice, lambda e: e.get("user") == "slow")
        await recv_until(bob, lambda e: e.get("user") == "slow")
        sent = 0
        received: list[int] = []
        caught_up = anyio.Event()

        async def bob_reads() -> None:
            nonlocal caught_up
            while True:
                event = await recv(bob)
                if event["type"] == "message":
                    received.append(event["offset"])
                    if len(received) >= sent:
                        caught_up.set()
                    if event["text"] == "done":
                        return

        async def alice_reads() -> None:
            while True:
                await recv(alice)

        with anyio.fail_after(GUARD * 3):
            async with anyio.create_task_group() as tg:
                tg.start_soon(alice_reads)
                bob_done = anyio.Event()

                async def bob_task() -> None:
                    await bob_reads()
                    bob_done.set()

                tg.start_soon(bob_task)
                # Flood as fast as bob reads (a batch at a time, well inside his
                # outbox) until the server gives up on the slow reader (bounded).
                while srv.server.connections == 3 and sent < 3000:
                    caught_up = anyio.Event()
                    for _ in range(20):
                        await alice.send(
                            json.dumps({"type": "send", "room": "general", "text": TEXT})
                        )
                        sent += 1
                    await caught_up.wait()
                assert srv.server.connections == 2, "the slow reader was never closed"
                for _ in range(20):  # the room goes on at full speed
                    await alice.send(json.dumps({"type": "send", "room": "general", "text": TEXT}))
                    sent += 1
                await alice.send(json.dumps({"type": "send", "room": "general", "text": "done"}))
                sent += 1
                await bob_done.wait()
                tg.cancel_scope.cancel()
        assert received == list(range(1, sent + 1))
        # The slow reader, reading at last, finds what fitted and then the close.
        assert await close_code(slow) == 1013


UNLIMITED = {
    "rate_burst": 1_000_000,
    "rate_per_second": 1_000_000.0,
    "request_burst": 1_000_000,
    "request_per_second": 1_000_000.0,
}


def _frames(data: bytes) -> tuple[int, int | None]:
    """Payload bytes of the text frames in ``data``, and the close code if one came."""
    i = total = 0
    while i + 2 <= len(data):
        opcode, n = data[i] & 0x0F, data[i + 1] & 0x7F
        i += 2
        if n == 126:
            n, i = int.from_bytes(data[i : i + 2], "big"), i + 2
        elif n == 127:
            n, i = int.from_bytes(data[i : i + 8], "big"), i + 8
        payload, i = data[i : i + n], i + n
        if opcode == 0x8:
            return total, int.from_bytes(payload[:2], "big")
        total += len(payload)
    return total, None


async def _stalled_reader(srv: Running, alice: Any) -> tuple[anyio.abc.SocketStream, bytes]:
    """A raw client with the kernel's default buffers, upgraded, that will read nothing
    more; and the bytes that followed the 101. ``alice`` has seen it join."""
    stream = await anyio.connect_tcp("127.0.0.1", srv.port)
    key = base64.b64encode(os.urandom(16)).decode()
    await stream.send(
        (
            "GET /ws?user=slow&room=general HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Protocol: chatcore.v1\r\n\r\n"
        ).encode()
    )
    head = b""
    with anyio.fail_after(GUARD):
        while b"\r\n\r\n" not in head:
            head += await stream.receive()
    assert head.startswith(b"HTTP/1.1 101"), head
    await recv_until(alice, lambda e: e.get("user") == "slow")
    return stream, head.split(b"\r\n\r\n", 1)[1]


async def _flood_until_closed(srv: Running, alice: Any) -> None:
    """Send big messages to the room until the server drops one of its two members."""
    sent = 0
    while srv.server.connections == 2 and sent < 2000:
        for _ in range(10):
            await alice.send(json.dumps({"type": "send", "room": "general", "text": TEXT}))
            sent += 1
        await anyio.sleep(0)  # let the server run between batches
    assert srv.server.connections == 1, "the stalled reader was never closed"


async def test_a_reader_that_stops_with_default_buffers_is_closed_after_a_bounded_backlog() -> None:
    """The kernel's buffers on loopback would take megabytes of a stalled reader's
    messages before the engine's outbox saw any of it; the server bounds its share,
    so what the reader was ever sent (kernel and server buffers: memory the server's
    host pays for) stays near the outbox bound, and then comes close 1013."""
    outbox = 256 * 1024
    limits = Limits(close_timeout=GUARD)
    async with (
        serving(
            config=Config(outbox_bytes=outbox, history_window=WINDOW, **UNLIMITED), limits=limits
        ) as srv,
        # alice floods and takes everything back (max_queue=None: she is no slow reader).
        ws_connect(f"{srv.ws}?user=alice&room=general", max_queue=None, **JSON) as alice,
    ):
        await welcome(alice)
        slow, data = await _stalled_reader(srv, alice)
        async with slow:
            with anyio.fail_after(GUARD * 2):
                await _flood_until_closed(srv, alice)
                # Reading at last: everything it was ever handed, then the close.
                raw = slow.extra(anyio.abc.SocketAttribute.raw_socket)
                rcvbuf = raw.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
                while True:
                    try:
                        data += await slow.receive(1 << 20)
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        break
        backlog, code = _frames(data)
        assert code == 1013
        # The outbox; the kernel's send buffer as asked for (Linux doubles it); the
        # reader's own receive buffer; asyncio's write buffer (its high-water mark and
        # one flush, at most an outbox); and the frame in flight. Unbounded, the kernel
        # alone took 1.7 MB (asyncio) and 4.3 MB (trio) here.
        send_buffer = limits.send_buffer or 0
        bound = 2 * outbox + 2 * send_buffer + rcvbuf + 64 * 1024 + 2 * len(TEXT)
        assert backlog <= bound, (backlog, bound)


async def test_a_reader_that_never_takes_its_close_frame_is_reset_after_the_close_timeout() -> None:
    """Closing a socket with unsent bytes would leave them, the close frame and the FIN
    queued in the kernel while the client reads nothing: it would never learn it was
    closed. After ``close_timeout`` the server resets the connection instead."""
    async with (
        serving(
            config=Config(history_window=WINDOW, **UNLIMITED), limits=Limits(close_timeout=0.2)
        ) as srv,
        ws_connect(f"{srv.ws}?user=alice&room=general", max_queue=None, **JSON) as alice,
    ):
        await welcome(alice)
        slow, _ = await _stalled_reader(srv, alice)
        async with slow:
            with anyio.fail_after(GUARD * 2):
                await _flood_until_closed(srv, alice)
            raw = slow.extra(anyio.abc.SocketAttribute.raw_socket)
            # Wait, still reading nothing, for the connection to end (hang-up or error).
            poll = select.poll()
            poll.register(raw.fileno(), select.POLLRDHUP)
            events = await anyio.to_thread.run_sync(poll.poll, GUARD * 1000)
            assert events, "the stalled reader's connection was never torn down"
            assert raw.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET


async def test_a_reader_that_keeps_up_with_big_messages_is_never_closed() -> None:
    """Big messages keep the server's socket buffer full while the reader keeps up:
    what the transport took and the reader then drained must be reported written, or
    the outbox would fill with frames long delivered and close a reader that is fine."""
    total, window = 300, 16  # 16 x 32 KB in flight: half the 1 MiB outbox
    async with (
        serving(config=Config(**UNLIMITED)) as srv,
        ws_connect(f"{srv.ws}?user=alice&room=general", max_queue=None, **JSON) as alice,
        ws_connect(f"{srv.ws}?user=bob&room=general", max_queue=None, **JSON) as bob,
    ):
        await welcome(alice)
        await welcome(bob)
        await recv_until(alice, lambda e: e.get("user") == "bob")
        received = 0
        progress = anyio.Event()

        async def bob_reads() -> None:
            nonlocal received, progress
            while received < total:
                event = await recv(bob)
                if event["type"] == "message":
                    received += 1
                    progress.set()

        with anyio.fail_after(GUARD * 3):
            async with anyio.create_task_group() as tg:
                tg.start_soon(bob_reads)
                for sent in range(total):
                    while sent - received >= window:
                        progress = anyio.Event()
                        await progress.wait()
                    await alice.send(json.dumps({"type": "send", "room": "general", "text": TEXT}))
        assert received == total
        assert srv.server.connections == 2
