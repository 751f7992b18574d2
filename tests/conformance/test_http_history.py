"""History over HTTP (protocol.md section 6), authentication off: who may read what."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest

from .conftest import Options, Server
from .wire import http_get, is_type, recv_until, say, unique, welcome, ws_open

pytestmark = pytest.mark.anyio

SERVER_OPTIONS = Options(private_rooms={"archive": ("alice",)})


def messages_url(server: Server, room: str, query: str = "") -> str:
    return f"{server.url}rooms/{quote(room, safe='')}/messages" + (f"?{query}" if query else "")


def assert_error(status: int, body: Any, expected: int) -> None:
    assert status == expected
    assert body["error"]["status"] == expected
    assert isinstance(body["error"]["message"], str)


async def test_a_public_room_pages_like_a_history_frame(server: Server) -> None:
    alice, room = unique("alice"), unique("room")
    async with ws_open(server.ws(f"user={alice}&room={room}")) as conn:
        await welcome(conn)
        offsets = [await say(conn, room, f"p{n}", f"id-{n}") for n in range(5)]
    status, _, page = await http_get(messages_url(server, room, "limit=3"))
    assert status == 200
    assert page["type"] == "history"
    assert page["room"] == room
    assert page["more"] is True
    assert [(m["offset"], m["text"]) for m in page["messages"]] == [
        (o, f"p{n}") for n, o in list(enumerate(offsets))[2:]
    ]
    first = page["messages"][0]
    assert first["type"] == "message"
    assert (first["room"], first["from"], first["id"]) == (room, alice, "id-2")
    assert {"epoch", "ts"} <= set(first)
    status, _, older = await http_get(messages_url(server, room, f"before={offsets[2]}&limit=10"))
    assert status == 200
    assert [m["text"] for m in older["messages"]] == ["p0", "p1"]
    assert older["more"] is False


async def test_a_room_never_created_is_empty(server: Server) -> None:
    status, _, page = await http_get(messages_url(server, unique("nowhere")))
    assert status == 200
    assert page["messages"] == []
    assert page["more"] is False


async def test_a_public_room_is_readable_by_a_named_reader_too(server: Server) -> None:
    room = unique("room")
    async with ws_open(server.ws(f"user={unique('alice')}&room={room}")) as conn:
        await welcome(conn)
        await say(conn, room, "hello")
    status, _, page = await http_get(messages_url(server, room, f"user={unique('zed')}"))
    assert status == 200
    assert [m["text"] for m in page["messages"]] == ["hello"]


async def test_a_private_room_is_read_by_its_list_only(server: Server) -> None:
    async with ws_open(server.ws("user=alice&room=archive")) as conn:
        await welcome(conn)
        await say(conn, "archive", "kept here")
    status, _, body = await http_get(messages_url(server, "archive"))
    assert_error(status, body, 401)
    status, _, body = await http_get(messages_url(server, "archive", "user=mallory"))
    assert_error(status, body, 403)
    status, _, page = await http_get(messages_url(server, "archive", "user=alice"))
    assert status == 200
    assert "kept here" in [m["text"] for m in page["messages"]]


async def test_a_dm_room_is_read_by_its_two_users_only(server: Server) -> None:
    alice, bob, mallory = unique("alice"), unique("bob"), unique("mallory")
    async with ws_open(server.ws(f"user={alice}")) as conn:
        await welcome(conn)
        await conn.send(f'{{"type":"dm","to":"{bob}","text":"just us","id":"d-1"}}')
        await recv_until(conn, is_type("ack"))
    room = f"dm:{min(alice, bob)}:{max(alice, bob)}"
    status, _, body = await http_get(messages_url(server, room))
    assert_error(status, body, 401)
    status, _, body = await http_get(messages_url(server, room, f"user={mallory}"))
    assert_error(status, body, 403)
    for reader in (alice, bob):
        status, _, page = await http_get(messages_url(server, room, f"user={reader}"))
        assert status == 200
        assert [(m["from"], m["text"]) for m in page["messages"]] == [(alice, "just us")]


async def test_a_stranger_learns_nothing_from_a_dm_room(server: Server) -> None:
    """403 for somebody else's DM room whether or not its users ever wrote."""
    alice, bob, mallory = unique("alice"), unique("bob"), unique("mallory")
    room = f"dm:{min(alice, bob)}:{max(alice, bob)}"
    silent = await http_get(messages_url(server, room, f"user={mallory}"))
    async with ws_open(server.ws(f"user={alice}")) as conn:
        await welcome(conn)
        await conn.send(f'{{"type":"dm","to":"{bob}","text":"secret","id":"d-2"}}')
        await recv_until(conn, is_type("ack"))
    written = await http_get(messages_url(server, room, f"user={mallory}"))
    assert silent[0] == written[0] == 403
    assert silent[2] == written[2]


async def test_an_invalid_reader_name_is_400(server: Server) -> None:
    status, _, body = await http_get(messages_url(server, unique("room"), "user=bad%21name"))
    assert_error(status, body, 400)
