"""Connecting (protocol.md section 1): the handshake, ``welcome``, ``members``, plain-text mode."""

from __future__ import annotations

import re
from urllib.parse import quote

import pytest

from .conftest import Server
from .wire import (
    SUBPROTOCOL,
    raw_http,
    recv,
    recv_until,
    say,
    unique,
    upgrade_request,
    welcome,
    ws_open,
)

pytestmark = pytest.mark.anyio


async def test_welcome_comes_first_then_members_for_each_room(server: Server) -> None:
    alice, first, second = unique("alice"), unique("room"), unique("room")
    async with ws_open(server.ws(f"user={alice}&room={first}&room={second}")) as conn:
        assert conn.subprotocol == SUBPROTOCOL
        hello = await recv(conn)
        assert hello["type"] == "welcome"
        assert hello["user"] == alice
        assert hello["resumed"] is False
        assert isinstance(hello["session"], str)
        assert hello["session"]
        assert isinstance(hello["resume"], str)
        assert hello["resume"]
        assert set(hello["rooms"]) == {first, second}
        for state in hello["rooms"].values():
            assert isinstance(state["offset"], int)
            assert state["offset"] >= 0
            assert isinstance(state["read"], int)
            assert "epoch" in state
        members = [await recv(conn), await recv(conn)]
        assert {m["type"] for m in members} == {"members"}
        assert {m["room"] for m in members} == {first, second}
        for m in members:
            assert alice in m["users"]
            assert m["offset"] == hello["rooms"][m["room"]]["offset"]
            assert m["epoch"] == hello["rooms"][m["room"]]["epoch"]


async def test_welcome_offset_is_the_rooms_newest_message(server: Server) -> None:
    alice, bob, room = unique("alice"), unique("bob"), unique("room")
    async with ws_open(server.ws(f"user={alice}&room={room}")) as conn:
        await welcome(conn)
        await say(conn, room, "one")
        last = await say(conn, room, "two")
        async with ws_open(server.ws(f"user={bob}&room={room}")) as late:
            hello = await welcome(late)
            # Every message after this offset will be delivered: only newer ones.
            assert hello["rooms"][room]["offset"] == last
            await say(conn, room, "three")
            message = (await recv_until(late, lambda e: e["type"] == "message"))[-1]
            assert (message["offset"], message["text"]) == (last + 1, "three")


async def test_join_answers_members_and_others_see_joined(server: Server) -> None:
    alice, bob, room = unique("alice"), unique("bob"), unique("room")
    async with (
        ws_open(server.ws(f"user={alice}&room={room}")) as first,
        ws_open(server.ws(f"user={bob}")) as second,
    ):
        await welcome(first)
        hello = await welcome(second)
        assert hello["rooms"] == {}
        await second.send(f'{{"type":"join","room":"{room}"}}')
        members = (await recv_until(second, lambda e: e["type"] == "members"))[-1]
        assert members["room"] == room
        assert set(members["users"]) == {alice, bob}
        joined = (await recv_until(first, lambda e: e["type"] == "joined"))[-1]
        assert joined == {"type": "joined", "room": room, "user": bob}


async def test_leave_is_confirmed_and_others_see_left(server: Server) -> None:
    alice, bob, room = unique("alice"), unique("bob"), unique("room")
    async with (
        ws_open(server.ws(f"user={alice}&room={room}")) as first,
        ws_open(server.ws(f"user={bob}&room={room}")) as second,
    ):
        await welcome(first)
        await welcome(second)
        await second.send(f'{{"type":"leave","room":"{room}"}}')
        mine = (await recv_until(second, lambda e: e["type"] == "left"))[-1]
        assert mine == {"type": "left", "room": room, "user": bob}
        theirs = (await recv_until(first, lambda e: e["type"] == "left"))[-1]
        assert theirs == {"type": "left", "room": room, "user": bob}


@pytest.mark.parametrize(
    "query",
    [
        "room=general",  # no user
        "user=bad%20name&room=general",  # a space is not allowed in a name
        "user=" + "u" * 65,  # over 64 characters
        "user=alice&room=" + quote("no/slash", safe=""),
    ],
    ids=["no-user", "bad-user", "long-user", "bad-room"],
)
async def test_a_bad_query_is_refused_400_before_the_upgrade(server: Server, query: str) -> None:
    status, _, body = await raw_http(server.port, upgrade_request(server.port, f"/ws?{query}"))
    assert status == 400
    assert body["error"]["status"] == 400
    assert isinstance(body["error"]["message"], str)


async def test_a_query_over_8_kib_is_refused_414(server: Server) -> None:
    query = f"user={unique('alice')}&" + "&".join(f"room=r{i:05}" for i in range(1200))
    assert len(query) > 8 * 1024
    status, _, body = await raw_http(server.port, upgrade_request(server.port, f"/ws?{query}"))
    assert status == 414
    assert body["error"]["status"] == 414


async def test_headers_over_the_bounds_are_refused_431(server: Server) -> None:
    target = f"/ws?user={unique('alice')}"
    big = upgrade_request(server.port, target, {"X-Filler": "x" * (17 * 1024)})
    assert (await raw_http(server.port, big))[0] == 431
    many = upgrade_request(server.port, target, {f"X-Filler-{i}": "x" for i in range(101)})
    assert (await raw_http(server.port, many))[0] == 431


@pytest.mark.parametrize("name", ["Origin", "Sec-WebSocket-Key", "Sec-WebSocket-Version"])
async def test_a_repeated_handshake_header_is_refused_400(server: Server, name: str) -> None:
    values = {
        "Origin": server.url.rstrip("/"),
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    request = upgrade_request(
        server.port, f"/ws?user={unique('alice')}", {name: [values[name]] * 2}
    )
    assert (await raw_http(server.port, request))[0] == 400


@pytest.mark.parametrize(
    ("origin", "status"),
    [
        ("{own}", 101),
        ("http://127.0.0.1:1", 403),  # another port of the same host
        ("http://localhost:{port}", 403),  # another name for the same host
        ("https://127.0.0.1:{port}", 403),  # another scheme
        ("http://chat.example", 403),
    ],
    ids=["own", "other-port", "localhost", "https", "foreign"],
)
async def test_only_the_servers_own_origin_may_connect(
    server: Server, origin: str, status: int
) -> None:
    origin = origin.format(own=server.url.rstrip("/"), port=server.port)
    target = f"/ws?user={unique('alice')}"
    request = upgrade_request(server.port, target, {"Origin": origin})
    assert (await raw_http(server.port, request))[0] == status


async def test_plain_text_mode_without_subprotocol(server: Server) -> None:
    alice, bob, room = unique("alice"), unique("bob"), unique("room")
    query = f"user={alice}&room={room}"
    async with ws_open(server.ws(query), json_mode=False) as plain:
        assert plain.subprotocol is None
        assert await recv(plain) == f"In the room: {alice}"
        async with ws_open(server.ws(f"user={bob}&room={room}")) as other:
            await welcome(other)
            assert await recv(plain) == f"{bob} joined the room"
            await plain.send("hi\n")  # one line end is not part of the message
            message = (await recv_until(other, lambda e: e["type"] == "message"))[-1]
            assert (message["from"], message["text"]) == (alice, "hi")
            await say(other, room, "hello")
            assert await recv(plain) == f"{bob}: hello"
            await plain.send("\n")
            assert re.match(r"error: ", await recv(plain))
        assert await recv(plain) == f"{bob} left the room"
