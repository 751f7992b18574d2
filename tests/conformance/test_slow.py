"""A slow consumer (protocol.md sections 3 to 5): closed 1013, then a resume that loses nothing.

The server keeps 1,000 messages of a room in memory by default: a reader
that stops reading is closed once the room has moved that far past it. The
flood comes from many short-lived senders, each within its burst of 10
messages, so that no rate limit slows it down.

The reader must still see the close frame: once the server closes, it waits
a few seconds for the reader to take what is buffered before it and answer
(``chatcore serve``: 3 s), then drops the TCP connection. So the flood stops
soon after the close must have come, and the reader then reads at full speed.
Against ``chatcore serve`` about 200 messages reach the reader before its
close (socket buffers and the outbox); ``FLOOD`` leaves 200 more. A server
whose buffers hold more than that fails with "closed with None after N".
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import anyio
import pytest
from websockets.exceptions import ConnectionClosed

from .conftest import Server
from .wire import GUARD, is_type, recv, recv_until, say, send, unique, ws_open

pytestmark = pytest.mark.anyio

WINDOW = 1000  # protocol.md section 5: "than the server keeps in memory [1,000 messages]"
FLOOD = WINDOW + 400  # past the window and whatever the socket buffers hold
TEXT = "x" * 2000
BURST = 10  # messages one session may send at once
SENDERS = 10  # senders at a time


async def _sender(server: Server, room: str, texts: list[str], acked: dict[int, str]) -> None:
    """Join, send ``texts`` at once, read until each is acked, leave (close 1000)."""
    async with ws_open(server.ws(f"user={unique('flood')}&room={room}")) as conn:
        await recv_until(conn, is_type("members"))
        for text in texts:
            await send(conn, type="send", room=room, text=text, id=text[:16])
        pending = len(texts)
        while pending:
            event = await recv(conn)
            if event["type"] == "ack":
                acked[event["offset"]] = event["id"]
                pending -= 1
            assert event["type"] != "error", event


async def _flood(server: Server, room: str, count: int) -> dict[int, str]:
    """``count`` messages to ``room``: offset -> client id (also the text's start)."""
    acked: dict[int, str] = {}
    texts = [f"{n:016d}{TEXT}" for n in range(count)]
    batches = [texts[i : i + BURST] for i in range(0, count, BURST)]
    limiter = anyio.CapacityLimiter(SENDERS)

    async def one(batch: list[str]) -> None:
        async with limiter:
            await _sender(server, room, batch, acked)

    async with anyio.create_task_group() as tg:
        for batch in batches:
            tg.start_soon(one, batch)
    return acked


async def test_a_reader_that_stops_is_closed_1013_then_resumes_losing_nothing(
    server: Server,
) -> None:
    alice, room = unique("slow"), unique("room")
    sock = socket.socket()
    # A small receive buffer, so that the kernel cannot take the whole flood in its stead.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
    seen: list[tuple[int, str]] = []
    async with ws_open(
        server.ws(f"user={alice}&room={room}"), sock=sock, max_queue=1, max_size=None
    ) as slow:
        hello = await recv(slow)
        start = hello["rooms"][room]["offset"]
        await recv_until(slow, is_type("members"))
        acked = await _flood(server, room, FLOOD)
        # Now read what reached us: some of the flood, then the close.
        code = None
        with anyio.fail_after(GUARD):
            try:
                while True:
                    event: Any = await recv(slow)
                    if event["type"] == "message":
                        seen.append((event["offset"], event["text"][:16]))
            except ConnectionClosed as exc:
                code = None if exc.rcvd is None else exc.rcvd.code
    assert code == 1013, f"closed with {code} after {len(seen)} of {FLOOD} messages"
    assert sorted(acked) == list(range(start + 1, start + FLOOD + 1))
    assert seen == [(o, acked[o]) for o in range(start + 1, start + len(seen) + 1)]
    last = seen[-1][0] if seen else start
    # Resume from the last message seen: the rest comes, in order, once, then live traffic.
    query = f"user={alice}&resume={hello['resume']}&offset={room}:{last}"
    async with ws_open(server.ws(query), max_size=None) as again:
        back = await recv(again)
        assert back["type"] == "welcome"
        assert (back["resumed"], back["session"]) == (True, hello["session"])
        async with ws_open(server.ws(f"user={unique('late')}&room={room}")) as other:
            await recv_until(other, is_type("members"))
            live = await say(other, room, "live")
            events = await recv_until(again, is_type("message", text="live"))
    replayed = [(e["offset"], e["text"][:16]) for e in events if e["type"] == "message"]
    expected = [(o, acked[o]) for o in range(last + 1, start + FLOOD + 1)]
    assert replayed == [*expected, (live, "live")]
