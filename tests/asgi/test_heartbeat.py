"""A link that goes silent behind an ASGI server: the server's own pings find it.

ASGI has no ping event (protocol.md section 8): uvicorn pings on its own and
ends a link that does not answer; the app hears a disconnect, the session
waits out its grace period, and the room sees the user leave.
"""

from __future__ import annotations

import anyio
import pytest

from chatcore import Config
from chatcore_asgi import ChatApp
from conformance.wire import is_type, recv_until, ws_open

from .conftest import serve
from .test_slow import _stalled_reader

pytestmark = pytest.mark.anyio


async def test_a_silent_link_is_dropped_by_the_servers_pings_and_leaves() -> None:
    chat = ChatApp(config=Config(grace_period=0.5))
    async with serve("uvicorn", chat, ws_ping_interval=0.3, ws_ping_timeout=0.3) as url:
        port = int(url.rsplit(":", 1)[1])
        ws = url.replace("http", "ws", 1) + "/ws"
        async with ws_open(f"{ws}?user=bob&room=r") as bob:
            await recv_until(bob, is_type("members"))
            silent = await _stalled_reader(port, "user=ghost&room=r")  # never answers a ping
            try:
                await recv_until(bob, is_type("joined", user="ghost"))
                with anyio.fail_after(5):
                    await recv_until(bob, is_type("left", user="ghost"))
                assert chat.connections == 1
            finally:
                silent.close()


async def test_without_the_servers_pings_a_silent_link_stays() -> None:
    """The control: what finds the silent link above is the server's ping, not the app."""
    chat = ChatApp(config=Config(grace_period=0.5))
    async with serve("uvicorn", chat, ws_ping_interval=None) as url:
        port = int(url.rsplit(":", 1)[1])
        ws = url.replace("http", "ws", 1) + "/ws"
        async with ws_open(f"{ws}?user=bob&room=r") as bob:
            await recv_until(bob, is_type("members"))
            silent = await _stalled_reader(port, "user=ghost&room=r")
            try:
                await recv_until(bob, is_type("joined", user="ghost"))
                await anyio.sleep(1.5)
                assert chat.connections == 2
            finally:
                silent.close()
