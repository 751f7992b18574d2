"""What a websocat user does, over real sockets: type lines, then quit."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
import sniffio

from chatcore import Config

from .conftest import GUARD, JSON, http_get, recv, recv_until, serving, welcome, ws_connect

pytestmark = pytest.mark.anyio


async def close_without_a_code(conn: Any) -> None:
    """Close with an empty close frame, as websocat does on quit (the server reads 1005)."""
    if sniffio.current_async_library() == "trio":
        await conn.aclose(None)
    else:
        await conn.close(None)


async def test_lines_typed_in_plain_text_mode_lose_their_line_ending() -> None:
    async with (
        serving() as srv,
        ws_connect(f"{srv.ws}?user=alice&room=general", **JSON) as alice,
        ws_connect(f"{srv.ws}?user=carol&room=general") as carol,
    ):
        await welcome(alice)
        await recv(carol)  # In the room: ...
        async with ws_connect(f"{srv.ws}?user=bob&room=general") as bob:
            await recv(bob)
            await bob.send("hi\n")
            await bob.send("from windows\r\n")
            got = await recv_until(alice, lambda e: e.get("from") == "bob" and e["offset"] == 2)
            assert [e["text"] for e in got if e["type"] == "message"] == ["hi", "from windows"]
            got = await recv_until(carol, lambda line: line.startswith("bob: from"))
            assert got[-2:] == ["bob: hi", "bob: from windows"]
        status, _, body = await http_get(f"{srv.url}rooms/general/messages")
        assert status == 200
        assert [m["text"] for m in json.loads(body)["messages"]] == ["hi", "from windows"]


async def test_a_close_without_a_code_leaves_the_room_at_once() -> None:
    async with (
        serving(config=Config(grace_period=60)) as srv,
        ws_connect(f"{srv.ws}?user=alice&room=general", **JSON) as alice,
    ):
        await welcome(alice)
        async with ws_connect(f"{srv.ws}?user=bob&room=general") as bob:
            assert await recv(bob) == "In the room: alice, bob"
            await recv_until(alice, lambda e: e["type"] == "joined")
            with anyio.fail_after(GUARD):
                await close_without_a_code(bob)
        # Well within the 60 s grace period: bob said goodbye.
        got = await recv_until(alice, lambda e: e["type"] == "left")
        assert got[-1] == {"type": "left", "room": "general", "user": "bob"}
