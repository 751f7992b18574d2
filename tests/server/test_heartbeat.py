"""The engine's heartbeat over real sockets: pings are answered or the client is dropped."""

from __future__ import annotations

import base64
import json
import os

import anyio
import pytest

from chatcore import Config

from .conftest import GUARD, JSON, recv_until, serving, welcome, ws_connect

pytestmark = pytest.mark.anyio


async def test_silent_client_is_closed_4000_and_a_live_one_stays() -> None:
    config = Config(ping_interval=0.2, pong_timeout=0.3)
    async with (
        serving(config=config) as srv,
        ws_connect(f"{srv.ws}?user=alive&room=r", **JSON) as alive,
    ):
        await welcome(alive)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET /ws?user=silent&room=r HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: chatcore.v1\r\n\r\n"
        ).encode()
        received = b""
        with anyio.fail_after(GUARD):
            async with await anyio.connect_tcp("127.0.0.1", srv.port) as silent:
                await silent.send(request)
                while True:  # read everything (pings included) but never answer
                    try:
                        received += await silent.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        break
        assert received.startswith(b"HTTP/1.1 101 ")
        assert b"\x89\x00" in received  # at least one ping
        assert b"\x88\x13\x0f\xa0heartbeat timeout" in received  # close 4000, then EOF
        # The client that answers pings outlived several intervals and still chats.
        await alive.send(json.dumps({"type": "send", "room": "r", "text": "still", "id": "s"}))
        await recv_until(alive, lambda e: e.get("id") == "s")
