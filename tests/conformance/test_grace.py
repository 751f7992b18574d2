"""Resuming after the grace period (protocol.md section 4): a new session; history has the rest."""

from __future__ import annotations

import pytest

from .conftest import Options, Server
from .wire import is_type, kill, recv, recv_until, say, send, unique, welcome, ws_open

pytestmark = pytest.mark.anyio

SERVER_OPTIONS = Options(grace=0.3)


async def test_after_grace_others_see_left_and_the_resume_starts_afresh(server: Server) -> None:
    alice, bob, room = unique("alice"), unique("bob"), unique("room")
    async with ws_open(server.ws(f"user={bob}&room={room}")) as b:
        await welcome(b)
        async with ws_open(server.ws(f"user={alice}&room={room}")) as a:
            hello = await welcome(a)
            read = await say(b, room, "read this")
            await recv_until(a, is_type("message"))
            await send(a, type="read", room=room, offset=read)
            await recv_until(b, is_type("read", user=alice))
            kill(a)
        missed = [await say(b, room, f"missed {n}") for n in range(3)]
        # The grace period is over once the others are told the user left.
        await recv_until(b, is_type("left", room=room, user=alice))
        query = f"user={alice}&resume={hello['resume']}&offset={room}:{read}&room={room}"
        async with ws_open(server.ws(query)) as again:
            back = await welcome(again)
            assert back["resumed"] is False
            assert back["session"] != hello["session"]
            assert back["resume"] != hello["resume"]
            assert back["rooms"][room]["offset"] == missed[-1]  # joined afresh
            assert back["rooms"][room]["read"] == read  # the read mark was kept
            await recv_until(b, is_type("joined", room=room, user=alice))
            # What was missed is paged with history, not replayed.
            await send(again, type="history", room=room, before=None, limit=100)
            events = await recv_until(again, is_type("history"))
            assert [e for e in events if e["type"] == "message"] == []
            page = events[-1]
            got = [(m["offset"], m["text"]) for m in page["messages"] if m["offset"] > read]
            assert got == [(o, f"missed {n}") for n, o in enumerate(missed)]


async def test_the_spent_token_also_fails_on_a_second_try(server: Server) -> None:
    alice, room = unique("alice"), unique("room")
    async with ws_open(server.ws(f"user={alice}&room={room}")) as a:
        hello = await welcome(a)
        kill(a)
    async with ws_open(server.ws(f"user={unique('watcher')}&room={room}")) as w:
        await recv(w)  # welcome
        members = (await recv_until(w, is_type("members")))[-1]
        if alice in members["users"]:  # her grace period is not over yet
            await recv_until(w, is_type("left", room=room, user=alice))
    for _ in range(2):
        query = f"user={alice}&resume={hello['resume']}&offset={room}:0"
        async with ws_open(server.ws(query)) as again:
            back = await recv(again)
            assert back["type"] == "welcome"
            assert back["resumed"] is False
