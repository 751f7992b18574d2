"""A reader that stops reading, behind uvicorn and hypercorn: closed (1013), its queue freed.

ASGI's only backpressure is that ``await send(...)`` waits; ChatApp reports
to the engine only what ``send`` took, so the engine's outbox bound holds.
The server listens on a socket with a small send buffer (as ``uvicorn --fd``
and ``hypercorn --bind fd://`` would) and the reader has a small receive
buffer, so the kernel holds little: what the server holds for the reader is
then the ASGI server's own write buffer, ChatApp's queue (half the outbox:
past it messages wait in the room's window) and the window itself, and the
close must come within ``MAX_FLOOD`` messages. The others in the room go on
unaffected.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import os
import re
import socket
import weakref

import anyio
import httpx
import pytest

from chatcore import Config
from chatcore_asgi import ChatApp
from conformance.wire import is_type, recv, recv_until, send, ws_open

from .conftest import serve

pytestmark = pytest.mark.anyio

TEXT = "x" * 16_000
WINDOW = 100  # Config.history_window: how far the reader may fall behind its room
SEND_BUFFER = 16 * 1024  # the server's SO_SNDBUF (Linux keeps twice this)
RECEIVE_BUFFER = 4096  # the stalled reader's SO_RCVBUF
ASGI_BUFFER = 64 * 1024  # what uvicorn and hypercorn buffer before send waits
MAX_FLOOD = (
    WINDOW
    + (Config().outbox_bytes // 2 + ASGI_BUFFER + 2 * SEND_BUFFER + 2 * RECEIVE_BUFFER) // len(TEXT)
    + 16
)
"""Messages by which the reader must be closed: the window, then what the buffers above
hold of 16 KB messages (+16: frames in flight, slack). A server or writer that buffers
without bound takes the whole flood instead."""


def _fast_config(**fields: int) -> Config:
    return Config(
        **fields,
        rate_burst=100_000,
        rate_per_second=100_000.0,
        request_burst=100_000,
        request_per_second=100_000.0,
    )


async def _stalled_reader(port: int, query: str) -> socket.socket:
    """A WebSocket handshake on a small receive buffer; then it never reads again."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    await loop.sock_sendall(
        sock,
        f"GET /ws?{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Protocol: chatcore.v1\r\n\r\n".encode(),
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += await loop.sock_recv(sock, 1)  # byte by byte: nothing after the 101 is read
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


async def _slow_consumer_closes(url: str) -> int:
    async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
        page = (await client.get(f"{url}/metrics")).text
    found = re.search(r"^chatcore_slow_consumer_closes_total (\S+)$", page, re.MULTILINE)
    assert found is not None, page
    return int(float(found.group(1)))


@pytest.mark.parametrize("kind", ["uvicorn", "hypercorn"])
async def test_a_reader_that_stops_is_closed_1013_and_its_queue_freed(kind: str) -> None:
    chat = ChatApp(config=_fast_config(history_window=WINDOW), close_timeout=1.0)
    async with serve(kind, chat, send_buffer=SEND_BUFFER) as url:
        port = int(url.rsplit(":", 1)[1])
        ws = url.replace("http", "ws", 1) + "/ws"
        slow = await _stalled_reader(port, "user=slow&room=r")
        try:
            with anyio.fail_after(10):
                while chat.connections < 1:
                    await anyio.sleep(0.01)
            (conn,) = chat._links  # the stalled reader's link
            link = weakref.ref(chat._links[conn])
            async with (
                ws_open(f"{ws}?user=flood&room=r") as flood,
                ws_open(f"{ws}?user=other&room=r") as other,
            ):
                await recv_until(flood, is_type("members"))
                await recv_until(other, is_type("members"))
                sent = 0
                queued = 0  # the most frames ChatApp held for the stalled reader
                with anyio.fail_after(60):
                    while (held := chat._links.get(conn)) is not None and sent < MAX_FLOOD:
                        queued = max(queued, len(held.queue))
                        await send(flood, type="send", room="r", text=TEXT, id=f"m{sent}")
                        await recv_until(flood, is_type("ack"))
                        # A reader that reads gets each message while the stalled one waits.
                        await recv_until(other, is_type("message", text=TEXT))
                        sent += 1
                print(f"{kind}: {sent} messages of 16 KB sent until the close (bound {MAX_FLOOD})")
                # The writer reports only what send took: the outbox bounds the queue.
                assert queued <= chat.config.outbox_frames
                assert queued * len(TEXT) <= chat.config.outbox_bytes
                assert conn not in chat._links, f"still open after {sent} messages"
                assert await _slow_consumer_closes(url) == 1  # closed for being slow: 1013
                # The others go on: the next message reaches a reader that reads.
                await send(flood, type="send", room="r", text="after", id="after")
                await recv_until(other, is_type("message", text="after"))
                # The close frame cannot reach a reader that takes nothing: after
                # close_timeout the connection's app call ends and its queue goes.
                with anyio.fail_after(10):
                    while chat.connections > 2 or link() is not None:
                        await anyio.sleep(0.05)
                        gc.collect()
            # The reader's stream ends: what the server had taken, then the connection is
            # dropped (its close frame could not be taken while nobody read).
            tail = b""
            with anyio.fail_after(20):
                while True:
                    try:
                        data = slow.recv(1 << 20)
                    except BlockingIOError:
                        await anyio.sleep(0.01)
                        continue
                    except ConnectionResetError:
                        break
                    if not data:
                        break
                    tail = (tail + data)[-4096:]
            assert tail, "nothing reached the stalled reader"
        finally:
            slow.close()


@pytest.mark.parametrize("kind", ["uvicorn", "hypercorn"])
async def test_a_reader_that_reads_gets_everything(kind: str) -> None:
    """The writer's reports keep a fast reader's outbox empty: no false 1013."""
    chat = ChatApp(config=_fast_config())
    async with serve(kind, chat, send_buffer=SEND_BUFFER) as url:
        ws = url.replace("http", "ws", 1) + "/ws"
        async with ws_open(f"{ws}?user=a&room=r") as a, ws_open(f"{ws}?user=b&room=r") as b:
            await recv_until(a, is_type("members"))
            await recv_until(b, is_type("members"))
            for batch in range(6):  # over twice the outbox's 256 frames
                for n in range(batch * 100, batch * 100 + 100):
                    await send(a, type="send", room="r", text=f"m{n}")
                for _ in range(100):
                    await recv_until(a, is_type("ack"))
            texts = []
            while len(texts) < 600:
                event = await recv(b)
                if event["type"] == "message":
                    texts.append(event["text"])
            assert texts == [f"m{n}" for n in range(600)]
