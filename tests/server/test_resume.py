"""Dropped connections: resume within the grace period, or leave after it."""

from __future__ import annotations

import json

import anyio
import pytest

from chatcore import Config

from .conftest import GUARD, JSON, close_with, kill, recv, recv_until, serving, welcome, ws_connect

pytestmark = pytest.mark.anyio


def send(room: str, text: str) -> str:
    return json.dumps({"type": "send", "room": room, "text": text})


async def test_resume_within_grace_replays_exactly_what_was_missed() -> None:
    async with (
        serving(config=Config(grace_period=30)) as srv,
        ws_connect(f"{srv.ws}?user=alice&room=general", **JSON) as alice,
    ):
        await welcome(alice)
        async with ws_connect(f"{srv.ws}?user=bob&room=general", **JSON) as bob:
            w = await welcome(bob)
            token = w["resume"]
            await recv_until(alice, lambda e: e["type"] == "joined")
            for i in range(3):
                await alice.send(send("general", f"before{i}"))
            seen = await recv_until(bob, lambda e: e.get("text") == "before2")
            last = seen[-1]["offset"]
            await kill(bob)
        for i in range(5):
            await alice.send(send("general", f"missed{i}"))
        await recv_until(alice, lambda e: e["type"] == "ack" and e["offset"] == last + 5)
        query = f"user=bob&room=general&resume={token}&offset=general:{last}"
        async with ws_connect(f"{srv.ws}?{query}", **JSON) as bob2:
            w2 = await recv(bob2)
            assert w2["type"] == "welcome"
            assert w2["resumed"] is True
            assert w2["rooms"]["general"]["offset"] == last
            await alice.send(send("general", "after"))
            got = await recv_until(bob2, lambda e: e.get("text") == "after")
            texts = [e["text"] for e in got if e["type"] == "message"]
            assert texts == [f"missed{i}" for i in range(5)] + ["after"]
            offsets = [e["offset"] for e in got if e["type"] == "message"]
            assert offsets == list(range(last + 1, last + 7))
            # Alice never saw bob leave: the session outlived the connection.
            await alice.send(send("general", "check"))
            got = await recv_until(alice, lambda e: e["type"] == "ack")
            assert not [e for e in got if e["type"] == "left"]


async def test_past_grace_others_see_left_and_resume_is_refused() -> None:
    async with (
        serving(config=Config(grace_period=0.5)) as srv,
        ws_connect(f"{srv.ws}?user=alice&room=general", **JSON) as alice,
    ):
        await welcome(alice)
        async with ws_connect(f"{srv.ws}?user=bob&room=general", **JSON) as bob:
            token = (await welcome(bob))["resume"]
            await recv_until(alice, lambda e: e["type"] == "joined")
            await kill(bob)
        # Bounded wait for the grace period to run out, seen by alice.
        await recv_until(alice, lambda e: e == {"type": "left", "room": "general", "user": "bob"})
        async with ws_connect(f"{srv.ws}?user=bob&room=general&resume={token}", **JSON) as bob2:
            w = await recv(bob2)
            assert w["type"] == "welcome"
            assert w["resumed"] is False
            assert w["resume"] != token


async def test_a_client_closing_with_1000_leaves_at_once_and_1001_may_resume() -> None:
    async with (
        serving(config=Config(grace_period=30)) as srv,
        ws_connect(f"{srv.ws}?user=alice&room=general", **JSON) as alice,
    ):
        await welcome(alice)
        async with ws_connect(f"{srv.ws}?user=carol&room=general", **JSON) as carol:
            token = (await welcome(carol))["resume"]
            await recv_until(
                alice, lambda e: e == {"type": "joined", "room": "general", "user": "carol"}
            )
            await close_with(carol, 1001)  # going away: the session waits for carol
        async with ws_connect(f"{srv.ws}?user=bob&room=general", **JSON) as bob:
            await welcome(bob)
            await recv_until(
                alice, lambda e: e == {"type": "joined", "room": "general", "user": "bob"}
            )
        # bob's client closed with 1000 on leaving the block: alice sees him go now, not in 30 s.
        got = await recv_until(alice, lambda e: e["type"] == "left")
        assert got[-1] == {"type": "left", "room": "general", "user": "bob"}
        async with ws_connect(f"{srv.ws}?user=carol&room=general&resume={token}", **JSON) as c2:
            w = await recv(c2)
            assert w["type"] == "welcome"
            assert w["resumed"] is True


async def test_python_client_resumes_by_itself() -> None:
    from chatcore_server import connect

    async with (
        serving(config=Config(grace_period=30)) as srv,
        ws_connect(f"{srv.ws}?user=alice&room=general", **JSON) as alice,
        connect(srv.ws, user="bob", rooms=["general"], backoff=0.05) as bob,
    ):
        await welcome(alice)
        with anyio.fail_after(GUARD):
            assert (await bob.receive())["type"] == "welcome"
            await alice.send(send("general", "one"))
            async for event in bob:
                if event.get("text") == "one":
                    break
            assert bob.offsets["general"] == 1
            stream = bob._stream
            assert stream is not None
            await stream.aclose()  # the transport dies under the client
            for text in ("two", "three"):
                await alice.send(send("general", text))
            texts = []
            resumed = None
            async for event in bob:
                if event["type"] == "welcome":
                    resumed = event["resumed"]
                if event["type"] == "message":
                    texts.append(event["text"])
                if event.get("text") == "three":
                    break
        assert resumed is True
        assert texts == ["two", "three"]
        assert bob.reconnects == 1
        sent = await bob.send("general", "back")
        got = await recv_until(alice, lambda e: e.get("text") == "back")
        assert got[-1]["id"] == sent
