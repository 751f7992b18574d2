"""Shutdown (protocol.md section 5): SIGTERM closes every client with 1001 ``going away``."""

from __future__ import annotations

import signal
from collections.abc import Callable

import pytest

from .conftest import Options, Server
from .wire import close_code, recv, welcome, ws_open

pytestmark = pytest.mark.anyio


async def test_sigterm_closes_every_client_1001(start_server: Callable[[Options], Server]) -> None:
    server = start_server(Options())
    async with (
        ws_open(server.ws("user=alice&room=general")) as alice,
        ws_open(server.ws("user=bob&room=general&room=other")) as bob,
        ws_open(server.ws("user=carol&room=general"), json_mode=False) as carol,
    ):
        await welcome(alice)
        await welcome(bob)
        await recv(carol)  # "In the room: ..."
        server.process.send_signal(signal.SIGTERM)
        for conn in (alice, bob, carol):
            assert await close_code(conn) == 1001
            assert conn.close_reason == "going away"
