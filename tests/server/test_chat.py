"""Chatting through the server with the independent ``websockets`` client."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest

from chatcore import Config

from .conftest import JSON, recv, recv_until, serving, welcome, ws_connect

pytestmark = pytest.mark.anyio


def send(room: str, text: str, cid: str | None = None) -> str:
    frame: dict[str, Any] = {"type": "send", "room": room, "text": text}
    if cid is not None:
        frame["id"] = cid
    return json.dumps(frame)


async def test_with_echo_each_sender_gets_its_ack_before_its_own_message() -> None:
    """What the engine hands one connection in one step arrives in that order, even
    when a flush writes a fan-out straight to the sockets: with ``echo`` the sender's
    ack (its own frame) comes before the room's copy of its message (a fan-out)."""
    async with (
        serving(config=Config(echo=True)) as srv,
        ws_connect(f"{srv.ws}?user=alice&room=general", **JSON) as alice,
        ws_connect(f"{srv.ws}?user=bob&room=general", **JSON) as bob,
    ):
        await welcome(alice)
        await welcome(bob)
        await recv_until(alice, lambda e: e.get("user") == "bob")
        for i in range(5):
            await alice.send(send("general", f"a{i}", f"id{i}"))
            got = await recv_until(alice, lambda e, i=i: e.get("text") == f"a{i}")
            assert [e["type"] for e in got] == ["ack", "message"], got
            assert got[0]["offset"] == got[1]["offset"]
        got = await recv_until(bob, lambda e: e.get("text") == "a4")
        assert [e["text"] for e in got if e["type"] == "message"] == [f"a{i}" for i in range(5)]


async def test_messages_reach_exactly_the_room_members_in_order() -> None:
    async with (
        serving() as srv,
        ws_connect(f"{srv.ws}?user=alice&room=general", **JSON) as alice,
    ):
        w = await welcome(alice)
        assert w["user"] == "alice"
        assert w["resumed"] is False
        async with (
            ws_connect(f"{srv.ws}?user=bob&room=general", **JSON) as bob,
            ws_connect(f"{srv.ws}?user=carol&room=tech", **JSON) as carol,
        ):
            await welcome(bob)
            await welcome(carol)
            assert await recv(alice) == {"type": "joined", "room": "general", "user": "bob"}
            for i in range(5):
                await alice.send(send("general", f"a{i}", f"id{i}"))
            await carol.send(send("tech", "only tech"))
            for i in range(5):
                await bob.send(send("general", f"b{i}"))
            # Bob sees alice's five in order, then nothing from tech.
            got = await recv_until(bob, lambda e: e.get("text") == "a4")
            messages = [e for e in got if e["type"] == "message"]
            assert [m["text"] for m in messages] == [f"a{i}" for i in range(5)]
            assert [m["offset"] for m in messages] == [1, 2, 3, 4, 5]
            assert all(m["from"] == "alice" and m["room"] == "general" for m in messages)
            # Alice: her own acks, then bob's five (no echo of her own, none from tech).
            got = await recv_until(alice, lambda e: e.get("text") == "b4")
            assert [e["id"] for e in got if e["type"] == "ack"] == [f"id{i}" for i in range(5)]
            assert [e["text"] for e in got if e["type"] == "message"] == [f"b{i}" for i in range(5)]
            # Carol got only her ack; a later tech message proves nothing else was queued.
            async with ws_connect(f"{srv.ws}?user=dave&room=tech", **JSON) as dave:
                await welcome(dave)
                await dave.send(send("tech", "hello carol"))
                got = await recv_until(carol, lambda e: e.get("text") == "hello carol")
                assert [e["type"] for e in got] == ["ack", "joined", "message"]
            # Bob leaves general: alice sees the left line.
            await bob.send(json.dumps({"type": "leave", "room": "general"}))
            await recv_until(
                alice, lambda e: e == {"type": "left", "room": "general", "user": "bob"}
            )


async def test_plain_text_mode_without_subprotocol() -> None:
    async with (
        serving() as srv,
        ws_connect(f"{srv.ws}?user=alice&room=general", **JSON) as alice,
    ):
        await welcome(alice)
        async with ws_connect(f"{srv.ws}?user=bob&room=general") as bob:
            assert bob.subprotocol is None
            assert await recv(bob) == "In the room: alice, bob"
            await recv_until(alice, lambda e: e["type"] == "joined")
            await alice.send(send("general", "hi bob"))
            assert await recv(bob) == "alice: hi bob"
            await bob.send("hello from a terminal")
            got = await recv_until(alice, lambda e: e["type"] == "message")
            assert got[-1]["from"] == "bob"
            assert got[-1]["text"] == "hello from a terminal"
        # Bob's connection closed: after the grace period alice would see him leave.


async def test_history_page_over_the_websocket() -> None:
    async with (
        serving() as srv,
        ws_connect(f"{srv.ws}?user=alice&room=general", **JSON) as alice,
    ):
        await welcome(alice)
        for i in range(4):
            await alice.send(send("general", f"m{i}", f"c{i}"))
        await recv_until(alice, lambda e: e.get("id") == "c3")
        await alice.send(json.dumps({"type": "history", "room": "general", "limit": 2}))
        page = (await recv_until(alice, lambda e: e["type"] == "history"))[-1]
        assert [m["text"] for m in page["messages"]] == ["m2", "m3"]
        assert page["more"] is True


async def test_connect_with_several_rooms() -> None:
    """Regression: a connect naming 2+ unloaded rooms used to reload them forever."""
    rooms: list[str] = []
    async with (
        serving() as srv,
        ws_connect(f"{srv.ws}?user=alice&room=one&room=two", **JSON) as alice,
    ):
        with anyio.move_on_after(3):
            rooms = sorted((await recv(alice))["rooms"])
    assert rooms == ["one", "two"]
