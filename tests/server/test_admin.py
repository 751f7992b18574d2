"""The embedding API (``ChatServer.post``, ``mute``, ``ban``, ...) does what the admin API does.

The admin API over HTTP (credentials, every action as a client sees it, bad
requests) is tested against every server, ``chatcore serve`` and ``ChatApp``
under uvicorn and hypercorn alike, in tests/conformance/test_admin.py.
"""

from __future__ import annotations

import time

import pytest

from chatcore import LocalProtocolError

from .conftest import JSON, close_code, recv_until, serving, welcome, ws_connect

pytestmark = pytest.mark.anyio


async def test_the_embedding_api_does_what_the_admin_api_does() -> None:
    async with (
        serving() as srv,
        ws_connect(f"{srv.ws}?user=alice&room=lobby", **JSON) as alice,
        ws_connect(f"{srv.ws}?user=bob&room=lobby", **JSON) as bob,
    ):
        server = srv.server
        await welcome(alice)
        await welcome(bob)
        server.post("lobby", "hello from the host", sender="bot")
        seen = await recv_until(alice, lambda e: e["type"] == "message")
        assert (seen[-1]["from"], seen[-1]["text"]) == ("bot", "hello from the host")
        server.delete_message("lobby", 1)
        seen = await recv_until(alice, lambda e: e["type"] == "deleted")
        server.mute("lobby", "bob", 30)
        assert server.engine.moderation("lobby")[1]["bob"] > time.time()
        server.ban("lobby", "bob")
        await recv_until(bob, lambda e: e["type"] == "removed")
        server.unban("lobby", "bob")
        assert server.engine.moderation("lobby")[0] == frozenset()
        server.remove("bob", reason="bye")
        assert await close_code(bob) == 4003


async def test_the_embedding_api_refuses_text_that_looks_encrypted() -> None:
    async with serving() as srv:
        with pytest.raises(LocalProtocolError, match="encryption marker"):
            srv.server.post("lobby", "\x01e2e:{}", sender="bot")
