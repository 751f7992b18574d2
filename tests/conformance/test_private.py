"""Private and direct-message rooms (protocol.md sections 1, 2 and 5): who may enter."""

from __future__ import annotations

import pytest

from .conftest import Options, Server
from .wire import is_type, recv, recv_until, say, send, unique, welcome, ws_open

pytestmark = pytest.mark.anyio

SERVER_OPTIONS = Options(private_rooms={"vault": ("alice", "bob")})


def dm_room(a: str, b: str) -> str:
    first, second = sorted([a, b])
    return f"dm:{first}:{second}"


async def test_users_on_the_list_enter_and_talk(server: Server) -> None:
    async with (
        ws_open(server.ws("user=alice&room=vault")) as alice,
        ws_open(server.ws("user=bob")) as bob,
    ):
        hello = await welcome(alice)
        assert "vault" in hello["rooms"]
        await welcome(bob)
        await send(bob, type="join", room="vault")
        members = (await recv_until(bob, is_type("members", room="vault")))[-1]
        assert {"alice", "bob"} <= set(members["users"])
        offset = await say(alice, "vault", "for bob only")
        message = (await recv_until(bob, is_type("message", room="vault")))[-1]
        assert (message["offset"], message["text"]) == (offset, "for bob only")


async def test_a_join_off_the_list_is_forbidden_and_gives_nothing(server: Server) -> None:
    carol = unique("carol")
    async with ws_open(server.ws(f"user={carol}")) as conn:
        await welcome(conn)
        await send(conn, type="join", room="vault")
        error = (await recv_until(conn, is_type("error")))[-1]
        assert (error["code"], error["ref"]) == ("forbidden", "vault")
        # Not a member: no history, no sending.
        await send(conn, type="history", room="vault", limit=10)
        error = (await recv_until(conn, is_type("error")))[-1]
        assert (error["code"], error["ref"]) == ("forbidden", "vault")
        await send(conn, type="send", room="vault", text="let me in", id="c-1")
        error = (await recv_until(conn, is_type("error")))[-1]
        assert error["code"] in ("forbidden", "not_member")
        assert error["ref"] == "c-1"


async def test_a_private_room_in_the_query_is_refused_the_rest_joined(server: Server) -> None:
    carol, lobby = unique("carol"), unique("lobby")
    async with ws_open(server.ws(f"user={carol}&room=vault&room={lobby}")) as conn:
        hello = await recv(conn)
        assert hello["type"] == "welcome"
        assert set(hello["rooms"]) == {lobby}
        events = await recv_until(conn, is_type("members", room=lobby))
        errors = [e for e in events if e["type"] == "error"]
        assert [(e["code"], e["ref"]) for e in errors] == [("forbidden", "vault")]
        assert not [e for e in events if e.get("room") == "vault" and e["type"] != "error"]


async def test_a_dm_room_admits_its_two_users_only(server: Server) -> None:
    alice, bob, carol = unique("alice"), unique("bob"), unique("carol")
    room = dm_room(alice, bob)
    async with (
        ws_open(server.ws(f"user={alice}")) as a,
        ws_open(server.ws(f"user={carol}")) as c,
    ):
        await welcome(a)
        await welcome(c)
        await send(a, type="join", room=room)
        assert (await recv_until(a, is_type("members")))[-1]["room"] == room
        await send(c, type="join", room=room)
        error = (await recv_until(c, is_type("error")))[-1]
        assert (error["code"], error["ref"]) == ("forbidden", room)
        await send(c, type="history", room=room, limit=10)
        error = (await recv_until(c, is_type("error")))[-1]
        assert (error["code"], error["ref"]) == ("forbidden", room)


async def test_a_dm_sent_while_away_waits_in_the_welcome(server: Server) -> None:
    alice, bob = unique("alice"), unique("bob")
    room = dm_room(alice, bob)
    async with ws_open(server.ws(f"user={alice}")) as a:
        await welcome(a)
        await send(a, type="dm", to=bob, text="are you there?", id="dm-1")
        ack = (await recv_until(a, lambda e: e["type"] in ("ack", "error")))[-1]
        assert ack == {
            "type": "ack",
            "room": room,
            "offset": ack["offset"],
            "epoch": ack["epoch"],
            "id": "dm-1",
        }
    async with ws_open(server.ws(f"user={bob}")) as b:
        hello = await welcome(b)
        assert room in hello["rooms"]
        assert hello["rooms"][room]["epoch"] == ack["epoch"]  # the ack named the room's life
        await send(b, type="history", room=room, limit=10)
        page = (await recv_until(b, is_type("history")))[-1]
        assert [(m["from"], m["text"]) for m in page["messages"]] == [(alice, "are you there?")]
        # Replying counts as reading: the conversation no longer waits for bob.
        await send(b, type="dm", to=alice, text="yes", id="dm-2")
        await recv_until(b, is_type("ack"))
    async with ws_open(server.ws(f"user={bob}")) as b:
        assert room not in (await welcome(b))["rooms"]
