"""What a websocat user does, over real sockets: type lines, then quit."""

from __future__ import annotations

import json

import pytest

from .conftest import JSON, http_get, recv, recv_until, serving, welcome, ws_connect

pytestmark = pytest.mark.anyio


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
