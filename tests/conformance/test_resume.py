"""Resuming within the grace period (protocol.md section 4): the session, its rooms, no gap."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

from .conftest import Server
from .wire import (
    close_code,
    is_type,
    kill,
    masked_frame,
    recv,
    recv_until,
    say,
    send,
    send_raw,
    unique,
    welcome,
    ws_open,
)

pytestmark = pytest.mark.anyio


async def _reset(conn: ClientConnection) -> None:
    kill(conn)


async def _close_1001(conn: ClientConnection) -> None:
    await conn.close(1001)  # a page reload


async def _close_4000(conn: ClientConnection) -> None:
    await conn.close(4000, "any code but 1000")


DROPS: dict[str, Callable[[ClientConnection], Awaitable[None]]] = {
    "reset": _reset,
    "close-1001": _close_1001,
    "close-4000": _close_4000,
}


def _messages(events: list[Any]) -> list[tuple[int, str]]:
    return [(e["offset"], e["text"]) for e in events if e["type"] == "message"]


@pytest.mark.parametrize("drop", list(DROPS))
async def test_within_grace_the_missed_messages_come_once_in_order(
    server: Server, drop: str
) -> None:
    alice, bob, room = unique("alice"), unique("bob"), unique("room")
    async with ws_open(server.ws(f"user={bob}&room={room}")) as b:
        await welcome(b)
        async with ws_open(server.ws(f"user={alice}&room={room}")) as a:
            hello = await welcome(a)
            await recv_until(b, is_type("joined", user=alice))
            seen = await say(b, room, "before")
            assert (await recv_until(a, is_type("message")))[-1]["offset"] == seen
            await DROPS[drop](a)
        missed = [await say(b, room, f"missed {n}") for n in range(3)]
        query = f"user={alice}&resume={hello['resume']}&offset={room}:{seen}"
        async with ws_open(server.ws(query)) as again:
            back = await recv(again)
            assert back["type"] == "welcome"
            assert back["resumed"] is True
            assert back["session"] == hello["session"]
            assert back["user"] == alice
            assert room in back["rooms"]  # still a member, without asking
            live = await say(b, room, "live")
            events = await recv_until(again, is_type("message", text="live"))
            expected = [(o, f"missed {n}") for n, o in enumerate(missed)] + [(live, "live")]
            assert _messages(events) == expected
            # Others saw nothing of the drop and the return.
            after = await say(b, room, "after")
            events = await recv_until(again, is_type("message", text="after"))
            assert _messages(events) == [(after, "after")]
        presence = await recv_until(b, is_type("left", user=alice))
        assert not [e for e in presence if e["type"] == "joined"]
        assert [e for e in presence if e["type"] == "left"] == [
            {"type": "left", "room": room, "user": alice}
        ]


async def test_the_replay_includes_the_clients_own_messages(server: Server) -> None:
    """A client whose ``ack`` was lost resumes from before its own message: it gets it."""
    alice, bob, room = unique("alice"), unique("bob"), unique("room")
    async with ws_open(server.ws(f"user={bob}&room={room}")) as b:
        await welcome(b)
        async with ws_open(server.ws(f"user={alice}&room={room}")) as a:
            hello = await welcome(a)
            start = hello["rooms"][room]["offset"]
            mine = await say(a, room, "mine", "own-1")
            kill(a)
        theirs = await say(b, room, "theirs")
        query = f"user={alice}&resume={hello['resume']}&offset={room}:{start}"
        async with ws_open(server.ws(query)) as again:
            assert (await recv(again))["resumed"] is True
            events = await recv_until(again, is_type("message", text="theirs"))
            assert _messages(events) == [(mine, "mine"), (theirs, "theirs")]
            own = next(e for e in events if e.get("text") == "mine")
            assert (own["from"], own["id"]) == (alice, "own-1")


async def test_resume_in_several_rooms_replays_each_from_its_offset(server: Server) -> None:
    alice, bob = unique("alice"), unique("bob")
    r1, r2 = unique("room"), unique("room")
    async with ws_open(server.ws(f"user={bob}&room={r1}&room={r2}")) as b:
        await welcome(b)
        async with ws_open(server.ws(f"user={alice}&room={r1}&room={r2}")) as a:
            hello = await welcome(a)
            o1 = await say(b, r1, "r1 seen")
            o2 = await say(b, r2, "r2 seen")
            await recv_until(a, is_type("message", text="r2 seen"))
            kill(a)
        m1 = await say(b, r1, "r1 missed")
        m2 = await say(b, r2, "r2 missed")
        # The client saw r1 up to o1 but r2 only up to before o2.
        query = f"user={alice}&resume={hello['resume']}&offset={r1}:{o1}&offset={r2}:{o2 - 1}"
        async with ws_open(server.ws(query)) as again:
            assert (await recv(again))["resumed"] is True
            live = await say(b, r1, "live")
            events = await recv_until(again, is_type("message", text="live"))
            got = [(e["room"], e["offset"]) for e in events if e["type"] == "message"]
            assert sorted(got[:-1]) == sorted([(r1, m1), (r2, o2), (r2, m2)])
            assert got[-1] == (r1, live)
            assert [g for g in got if g[0] == r2] == [(r2, o2), (r2, m2)]


async def test_a_resume_takes_over_a_connection_still_open(server: Server) -> None:
    alice, bob, room = unique("alice"), unique("bob"), unique("room")
    async with (
        ws_open(server.ws(f"user={bob}&room={room}")) as b,
        ws_open(server.ws(f"user={alice}&room={room}")) as old,
    ):
        await welcome(b)
        hello = await welcome(old)
        start = hello["rooms"][room]["offset"]
        query = f"user={alice}&resume={hello['resume']}&offset={room}:{start}"
        async with ws_open(server.ws(query)) as new:
            back = await recv(new)
            assert (back["resumed"], back["session"]) == (True, hello["session"])
            assert await close_code(old) == 1000
            offset = await say(b, room, "to the new one")
            events = await recv_until(new, is_type("message"))
            assert _messages(events) == [(offset, "to the new one")]


async def test_closing_with_1000_ends_the_session_at_once(server: Server) -> None:
    alice, bob, room = unique("alice"), unique("bob"), unique("room")
    async with ws_open(server.ws(f"user={bob}&room={room}")) as b:
        await welcome(b)
        async with ws_open(server.ws(f"user={alice}&room={room}")) as a:
            hello = await welcome(a)
        # Leaving the block closed with 1000: the others see left, the token is spent.
        await recv_until(b, is_type("left", room=room, user=alice))
        query = f"user={alice}&resume={hello['resume']}&offset={room}:0&room={room}"
        async with ws_open(server.ws(query)) as again:
            back = await welcome(again)
            assert back["resumed"] is False
            assert back["session"] != hello["session"]
            assert back["resume"] != hello["resume"]


async def test_a_close_frame_without_a_code_ends_the_session(server: Server) -> None:
    alice, bob, room = unique("alice"), unique("bob"), unique("room")
    async with ws_open(server.ws(f"user={bob}&room={room}")) as b:
        await welcome(b)
        async with ws_open(server.ws(f"user={alice}&room={room}")) as a:
            hello = await welcome(a)
            send_raw(a, masked_frame(0x8, b""))  # a close frame without a code (websocat's)
            await close_code(a)
        await recv_until(b, is_type("left", room=room, user=alice))
        query = f"user={alice}&resume={hello['resume']}&offset={room}:0"
        async with ws_open(server.ws(query)) as again:
            assert (await recv(again))["resumed"] is False


@pytest.mark.parametrize("token", ["unknown", "another-users"])
async def test_a_token_that_is_not_yours_starts_a_new_session(server: Server, token: str) -> None:
    alice, mallory, room = unique("alice"), unique("mallory"), unique("room")
    async with ws_open(server.ws(f"user={alice}&room={room}")) as a:
        hello = await welcome(a)
        await say(a, room, "private thoughts")
        kill(a)
        resume = hello["resume"] if token == "another-users" else "no-such-token"
        joiner = mallory if token == "another-users" else alice
        query = f"user={joiner}&resume={resume}&offset={room}:0&room={room}"
        async with ws_open(server.ws(query)) as other:
            back = await recv(other)
            assert back["type"] == "welcome"
            assert back["resumed"] is False
            assert back["user"] == joiner
            assert back["session"] != hello["session"]
            assert back["resume"] != hello["resume"]
            # The rooms in the query are joined afresh: only new messages come.
            assert room in back["rooms"]
            await send(other, type="send", room=room, text="fresh", id="f-1")
            events = await recv_until(other, is_type("ack"))
            assert _messages(events) == []
