"""Messages (protocol.md sections 2, 3): routing, per-room order, ``ack``, no echo, client ids."""

from __future__ import annotations

import re
from typing import Any

import anyio
import pytest

from .conftest import Server
from .wire import is_type, recv, recv_until, say, send, unique, welcome, ws_open

pytestmark = pytest.mark.anyio

ISO_UTC_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


async def test_a_message_reaches_every_other_member_with_its_fields(server: Server) -> None:
    alice, bob, carol, room = unique("alice"), unique("bob"), unique("carol"), unique("room")
    async with (
        ws_open(server.ws(f"user={alice}&room={room}")) as a,
        ws_open(server.ws(f"user={bob}&room={room}")) as b,
        ws_open(server.ws(f"user={carol}&room={room}")) as c,
    ):
        hello = await welcome(a)
        await welcome(b)
        await welcome(c)
        await send(a, type="send", room=room, text="hello 👋", id="m-1")
        ack = (await recv_until(a, is_type("ack")))[-1]
        start = hello["rooms"][room]["offset"]
        epoch = hello["rooms"][room]["epoch"]
        want = {"type": "ack", "room": room, "offset": start + 1, "epoch": epoch, "id": "m-1"}
        assert ack == want
        for conn in (b, c):
            message = (await recv_until(conn, is_type("message")))[-1]
            assert message["room"] == room
            assert message["offset"] == start + 1
            assert message["epoch"] == hello["rooms"][room]["epoch"]
            assert message["from"] == alice
            assert message["text"] == "hello 👋"
            assert message["id"] == "m-1"
            assert ISO_UTC_MS.fullmatch(message["ts"]), message["ts"]


async def test_without_id_the_ack_and_message_carry_null(server: Server) -> None:
    alice, bob, room = unique("alice"), unique("bob"), unique("room")
    async with (
        ws_open(server.ws(f"user={alice}&room={room}")) as a,
        ws_open(server.ws(f"user={bob}&room={room}")) as b,
    ):
        await welcome(a)
        await welcome(b)
        await send(a, type="send", room=room, text="no id")
        ack = (await recv_until(a, is_type("ack")))[-1]
        assert ack["id"] is None
        message = (await recv_until(b, is_type("message")))[-1]
        assert (message["text"], message["id"]) == ("no id", None)


async def test_the_sender_gets_an_ack_not_its_own_message(server: Server) -> None:
    alice, bob, room = unique("alice"), unique("bob"), unique("room")
    async with (
        ws_open(server.ws(f"user={alice}&room={room}")) as a,
        ws_open(server.ws(f"user={bob}&room={room}")) as b,
    ):
        await welcome(a)
        await welcome(b)
        mine = await say(a, room, "mine", "a-1")
        theirs = await say(b, room, "theirs", "b-1")
        assert theirs == mine + 1
        # In order, once: an echo of "mine" would come before "theirs".
        message = (await recv_until(a, is_type("message")))[-1]
        assert (message["offset"], message["text"]) == (theirs, "theirs")


async def test_the_senders_other_connections_do_receive_it(server: Server) -> None:
    alice, room = unique("alice"), unique("room")
    async with (
        ws_open(server.ws(f"user={alice}&room={room}")) as tab1,
        ws_open(server.ws(f"user={alice}&room={room}")) as tab2,
    ):
        await welcome(tab1)
        await welcome(tab2)
        offset = await say(tab1, room, "from tab 1")
        message = (await recv_until(tab2, is_type("message")))[-1]
        assert (message["offset"], message["from"], message["text"]) == (
            offset,
            alice,
            "from tab 1",
        )


async def test_every_member_sees_one_gapless_order(server: Server) -> None:
    """Three members send at once: each sees every message once, in one shared order."""
    room = unique("room")
    users = [unique("u") for _ in range(3)]
    per_user = 8  # within the burst of 10: no rate limiting
    async with (
        ws_open(server.ws(f"user={users[0]}&room={room}")) as c0,
        ws_open(server.ws(f"user={users[1]}&room={room}")) as c1,
        ws_open(server.ws(f"user={users[2]}&room={room}")) as c2,
    ):
        conns = [c0, c1, c2]
        start = [(await welcome(c))["rooms"][room]["offset"] for c in conns]
        # Later arrivals' welcomes list the room as it was: all start before any send.
        total = per_user * len(conns)
        views: list[dict[int, tuple[str, str]]] = [{} for _ in conns]
        arrival: list[list[int]] = [[] for _ in conns]

        async def member(i: int) -> None:
            conn = conns[i]
            for n in range(per_user):
                await send(conn, type="send", room=room, text=f"{users[i]}:{n}", id=f"{i}-{n}")
            acks = 0
            while acks < per_user or len(views[i]) < total:
                event = await recv(conn)
                if event["type"] == "ack":
                    acks += 1
                    views[i][event["offset"]] = (users[i], f"{users[i]}:{event['id'][2:]}")
                elif event["type"] == "message":
                    assert event["from"] != users[i], "an echo of the sender's own message"
                    assert event["offset"] not in views[i], "delivered twice"
                    arrival[i].append(event["offset"])
                    views[i][event["offset"]] = (event["from"], event["text"])

        async with anyio.create_task_group() as tg:
            for i in range(len(conns)):
                tg.start_soon(member, i)
        base = max(start)
        for i in range(len(conns)):
            assert sorted(views[i]) == list(range(base + 1, base + total + 1))
            assert arrival[i] == sorted(arrival[i]), "messages out of offset order"
            assert views[i] == views[0]
        # Each sender's own messages keep the order it sent them in.
        for user in users:
            mine = [views[0][o][1] for o in sorted(views[0]) if views[0][o][0] == user]
            assert mine == [f"{user}:{n}" for n in range(per_user)]


async def test_the_same_client_id_twice_is_stored_once_and_acked_twice(server: Server) -> None:
    alice, bob, room = unique("alice"), unique("bob"), unique("room")
    async with (
        ws_open(server.ws(f"user={alice}&room={room}")) as a,
        ws_open(server.ws(f"user={bob}&room={room}")) as b,
    ):
        await welcome(a)
        await welcome(b)
        first = await say(a, room, "once", "retry-1")
        second = await say(a, room, "once", "retry-1")
        assert second == first
        after = await say(a, room, "next", "retry-2")
        assert after == first + 1  # the retry took no offset
        seen = await recv_until(b, lambda e: e.get("text") == "next")
        texts = [e["text"] for e in seen if e["type"] == "message"]
        assert texts == ["once", "next"]


async def test_a_retry_after_reconnecting_gets_the_original_ack(server: Server) -> None:
    """The client's ``send`` was stored but its ``ack`` lost with the connection."""
    alice, bob, room = unique("alice"), unique("bob"), unique("room")
    async with ws_open(server.ws(f"user={bob}&room={room}")) as b:
        await welcome(b)
        async with ws_open(server.ws(f"user={alice}&room={room}")) as a:
            await welcome(a)
            stored = await say(a, room, "lost ack", "lost-1")
        # A new connection (the old session ended with 1000): same id, same ack.
        async with ws_open(server.ws(f"user={alice}&room={room}")) as again:
            epoch = (await welcome(again))["rooms"][room]["epoch"]
            await send(again, type="send", room=room, text="lost ack", id="lost-1")
            ack = (await recv_until(again, lambda e: e["type"] in ("ack", "error")))[-1]
            want = {"type": "ack", "room": room, "offset": stored, "epoch": epoch, "id": "lost-1"}
            assert ack == want
            after = await say(again, room, "after", "after-1")
            assert after == stored + 1
        seen = await recv_until(b, lambda e: e.get("text") == "after")
        assert [e["text"] for e in seen if e["type"] == "message"] == ["lost ack", "after"]


async def test_history_frame_answers_ascending_pages(server: Server) -> None:
    alice, room = unique("alice"), unique("room")
    async with ws_open(server.ws(f"user={alice}&room={room}")) as a:
        start = (await welcome(a))["rooms"][room]["offset"]
        offsets = [await say(a, room, f"h{n}") for n in range(5)]
        assert offsets == list(range(start + 1, start + 6))
        await send(a, type="history", room=room, before=None, limit=3)
        page = (await recv_until(a, is_type("history")))[-1]
        assert page["room"] == room
        assert [m["text"] for m in page["messages"]] == ["h2", "h3", "h4"]
        assert page["more"] is True
        for m in page["messages"]:
            assert m["type"] == "message"
            assert m["from"] == alice
        await send(a, type="history", room=room, before=offsets[2], limit=100)
        older = (await recv_until(a, is_type("history")))[-1]
        assert [m["text"] for m in older["messages"]] == ["h0", "h1"]
        assert older["more"] is False


@pytest.mark.parametrize(
    ("frame", "code", "ref"),
    [
        ("not json", "invalid_json", None),
        ("[1, 2]", "invalid_json", None),
        ('{"type": "shout"}', "unknown_type", None),
        ('{"room": "x"}', "unknown_type", "x"),
        ('{"type": "send", "room": "{room}", "text": "", "id": "e-1"}', "invalid_field", "e-1"),
        ('{"type": "send", "room": "{room}", "text": 5}', "invalid_field", "{room}"),
        ('{"type": "join", "room": "no spaces"}', "invalid_name", "no spaces"),
        ('{"type": "send", "room": "{other}", "text": "hi", "id": "e-2"}', "not_member", "e-2"),
        ('{"type": "leave", "room": "{other}"}', "not_member", "{other}"),
        ('{"type": "history", "room": "{room}", "limit": 0}', "invalid_field", "{room}"),
    ],
)
async def test_a_bad_request_is_an_error_and_the_connection_goes_on(
    server: Server, frame: str, code: str, ref: str | None
) -> None:
    alice, room, other = unique("alice"), unique("room"), unique("room")
    names = {"{room}": room, "{other}": other}
    for key, value in names.items():
        frame = frame.replace(key, value)
        ref = ref.replace(key, value) if ref is not None else None
    async with ws_open(server.ws(f"user={alice}&room={room}")) as a:
        await welcome(a)
        await a.send(frame)
        error: Any = (await recv_until(a, is_type("error")))[-1]
        assert (error["code"], error["ref"]) == (code, ref)
        assert isinstance(error["message"], str)
        assert await say(a, room, "still here") > 0


async def test_text_over_64_kib_is_too_large_and_the_connection_goes_on(server: Server) -> None:
    alice, room = unique("alice"), unique("room")
    async with ws_open(server.ws(f"user={alice}&room={room}")) as a:
        await welcome(a)
        await send(a, type="send", room=room, text="x" * (64 * 1024 + 1), id="big")
        error = (await recv_until(a, is_type("error")))[-1]
        assert (error["code"], error["ref"]) == ("too_large", "big")
        await say(a, room, "x" * (64 * 1024))  # exactly the limit is fine


async def test_typing_and_read_reach_the_other_members(server: Server) -> None:
    alice, bob, room = unique("alice"), unique("bob"), unique("room")
    async with (
        ws_open(server.ws(f"user={alice}&room={room}")) as a,
        ws_open(server.ws(f"user={bob}&room={room}")) as b,
    ):
        await welcome(a)
        await welcome(b)
        await send(a, type="typing", room=room)
        typing = (await recv_until(b, is_type("typing")))[-1]
        assert typing == {"type": "typing", "room": room, "user": alice, "active": True}
        offset = await say(b, room, "read me")
        await send(a, type="read", room=room, offset=offset)
        read = (await recv_until(b, is_type("read")))[-1]
        assert read == {"type": "read", "room": room, "user": alice, "offset": offset}
