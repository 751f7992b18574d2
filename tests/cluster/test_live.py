"""Everything but messages, across three ``chatcore serve`` processes.

Each test puts the users it watches on different processes, so what they see
of each other can only have crossed the bus (or been claimed through Redis):
member lists, ``joined``/``left``, typing, read marks, direct messages and the
direct-message inbox, and a session resumed on another process.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio
import pytest

from .conftest import GUARD, Client, Cluster, Server, clients, subscribed

pytestmark = [pytest.mark.anyio, pytest.mark.postgres, pytest.mark.redis]

ROOM = "hall"


def view(client: Client, room: str = ROOM) -> set[str]:
    """Who the client believes is in ``room``: its last ``members`` list, then every
    ``joined``/``left`` after it, as a client program would keep it."""
    users: set[str] = set()
    for event in client.events:
        if event.get("room") != room:
            continue
        if event["type"] == "members":
            users = set(event["users"])
        elif event["type"] == "joined":
            users.add(event["user"])
        elif event["type"] == "left":
            users.discard(event["user"])
    return users


@contextlib.asynccontextmanager
async def one_by_one(
    places: Sequence[tuple[Server, str]], rooms: Sequence[str] = (ROOM,)
) -> AsyncIterator[list[Client]]:
    """Connect each user to its server in turn, each after the previous one's
    process is subscribed to its channels.

    These tests are about what crosses once processes listen; taking rooms and
    users up at the same instant is test_rooms.py's.
    """
    users: dict[int, set[str]] = {}
    async with contextlib.AsyncExitStack() as stack:
        made: list[Client] = []
        for server, user in places:
            (client,) = await stack.enter_async_context(clients([server.ws(user, rooms)]))
            for room in rooms:
                await client.until(lambda c, r=room: bool(c.of("members", r)), "members")
            users.setdefault(server.port, set()).add(user)
            await subscribed(server, 1 + len(users[server.port]) + len(rooms))
            made.append(client)
        yield made


def presence(client: Client, kind: str, user: str, room: str = ROOM) -> int:
    return sum(e["user"] == user for e in client.of(kind, room))


async def test_member_lists_and_presence_span_processes(cluster: Cluster) -> None:
    s0, s1, s2 = await cluster.start_many(3)
    async with one_by_one([(s0, "ann")]) as (ann,):
        async with one_by_one([(s1, "bob")]) as (bob,):
            await ann.until(lambda c: presence(c, "joined", "bob") == 1, "joined bob")
            await bob.until(lambda c: view(c) == {"ann", "bob"}, "bob sees ann")
            async with one_by_one([(s2, "carl")]) as (carl,):
                # carl's process had nobody in the room: it asks the others who is there.
                await carl.until(lambda c: view(c) == {"ann", "bob", "carl"}, "carl sees all")
                for other in (ann, bob):
                    await other.until(lambda c: presence(c, "joined", "carl") == 1, "joined")
                await bob.send({"type": "leave", "room": ROOM})
                await bob.until(lambda c: presence(c, "left", "bob") == 1, "bob's own left")
                for other in (ann, carl):
                    await other.until(lambda c: presence(c, "left", "bob") == 1, "left bob")
            # carl closed (1000): his session ended, he is a member nowhere.
            await ann.until(lambda c: presence(c, "left", "carl") == 1, "left carl")
            await ann.until(lambda c: view(c) == {"ann"}, "ann alone")
        # Nobody was announced twice, and the list ann keeps matches the truth.
        assert presence(ann, "joined", "bob") == presence(ann, "left", "bob") == 1
        assert presence(ann, "joined", "carl") == presence(ann, "left", "carl") == 1


async def test_a_second_session_elsewhere_is_not_a_new_member(cluster: Cluster) -> None:
    s0, s1, s2 = await cluster.start_many(3)
    async with one_by_one([(s0, "ann"), (s1, "bob")]) as (ann, bob):
        await ann.until(lambda c: view(c) == {"ann", "bob"}, "ann sees bob")
        async with one_by_one([(s2, "bob")]) as (bob2,):
            await bob2.until(lambda c: view(c) == {"ann", "bob"}, "bob's second session")
            await bob.send({"type": "typing", "room": ROOM})  # something after, in order
            await ann.until(lambda c: bool(c.of("typing", ROOM)), "typing")
        # One of bob's two sessions ended; he is still in the room (on s1).
        await bob.send({"type": "typing", "room": ROOM})
        await ann.until(lambda c: len(c.of("typing", ROOM)) >= 2, "second typing")
        assert presence(ann, "joined", "bob") == 1
        assert presence(ann, "left", "bob") == 0


async def test_typing_and_read_marks_reach_members_on_other_processes(cluster: Cluster) -> None:
    s0, s1, s2 = await cluster.start_many(3)
    async with one_by_one([(s0, "ann"), (s1, "bob"), (s2, "carl")]) as (ann, bob, carl):
        for member in (ann, bob, carl):
            await member.until(lambda c: view(c) == {"ann", "bob", "carl"}, "everyone")
        await ann.send({"type": "typing", "room": ROOM})
        for other in (bob, carl):
            await other.until(
                lambda c: any(e["user"] == "ann" and e["active"] for e in c.of("typing", ROOM)),
                "ann is typing",
            )
        await ann.send({"type": "send", "room": ROOM, "text": "hi", "id": "a1"})
        await ann.until(lambda c: bool(c.of("ack", ROOM)), "ack")
        offset = ann.of("ack", ROOM)[0]["offset"]
        await bob.until(lambda c: bool(c.messages(ROOM)), "message")
        await bob.send({"type": "read", "room": ROOM, "offset": offset})
        for other in (ann, carl):
            await other.until(
                lambda c: (
                    {"room": ROOM, "user": "bob", "offset": offset}
                    in [{k: e[k] for k in ("room", "user", "offset")} for e in c.of("read", ROOM)]
                ),
                "bob's read mark",
            )
        # carl's process keeps the mark: bob's next session there starts from it.
        async with clients([s2.ws("bob", [ROOM])]) as (again,):
            assert again.welcome["rooms"][ROOM]["read"] == offset


def dm_room(a: str, b: str) -> str:
    return "dm:" + ":".join(sorted((a, b)))


async def test_a_direct_message_reaches_every_session_of_its_recipient(cluster: Cluster) -> None:
    s0, s1, s2 = await cluster.start_many(3)
    room = dm_room("ann", "bob")
    # bob on two other processes, in no room at all: only his user channel carries it.
    places = [(s0, "ann"), (s1, "bob"), (s2, "bob")]
    async with one_by_one(places, rooms=()) as (ann, bob1, bob2):
        await ann.send({"type": "dm", "to": "bob", "text": "psst", "id": "d1"})
        await ann.until(lambda c: bool(c.of("ack", room)), "ack")
        ack = ann.of("ack", room)[0]
        for bob in (bob1, bob2):
            await bob.until(lambda c: bool(c.messages(room)), "the dm")
            (got,) = bob.messages(room)
            assert (got["from"], got["text"], got["offset"]) == ("ann", "psst", ack["offset"])
        await bob2.send({"type": "dm", "to": "ann", "text": "hey", "id": "d2"})
        await ann.until(lambda c: bool(c.messages(room)), "the reply")
        assert [m["text"] for m in ann.messages(room)] == ["hey"]
        await bob1.until(lambda c: len(c.messages(room)) == 2, "bob's own reply, elsewhere")
        assert [m["text"] for m in bob1.messages(room)] == ["psst", "hey"]


async def test_the_inbox_holds_a_direct_message_sent_through_another_process(
    cluster: Cluster,
) -> None:
    s0, s1, _ = await cluster.start_many(3)
    room = dm_room("carl", "dave")
    async with clients([s0.ws("carl")]) as (carl,):  # dave is not connected anywhere
        await carl.send({"type": "dm", "to": "dave", "text": "call me", "id": "c1"})
        await carl.until(lambda c: bool(c.of("ack", room)), "ack")
        offset = carl.of("ack", room)[0]["offset"]
        async with clients([s1.ws("dave")]) as (dave,):
            assert dave.welcome["rooms"][room]["offset"] == offset
            assert dave.welcome["rooms"][room]["read"] < offset
            # dave is in the conversation on s1 now: carl's next one arrives live.
            await carl.send({"type": "dm", "to": "dave", "text": "now?", "id": "c2"})
            await dave.until(lambda c: bool(c.messages(room)), "live dm")
            assert [m["text"] for m in dave.messages(room)] == ["now?"]


def last_seen(client: Client, room: str = ROOM) -> tuple[int, str]:
    """The highest offset the client saw in ``room`` and its epoch."""
    seen: list[dict[str, Any]] = client.messages(room) + client.of("ack", room)
    best = max(seen, key=lambda e: e["offset"])
    epoch = client.welcome["rooms"][room]["epoch"]
    return best["offset"], best.get("epoch", epoch)


async def send_and_ack(client: Client, text: str, cid: str) -> int:
    await client.send({"type": "send", "room": ROOM, "text": text, "id": cid})
    await client.until(lambda c: any(a.get("id") == cid for a in c.of("ack", ROOM)), "ack")
    return next(a["offset"] for a in client.of("ack", ROOM) if a.get("id") == cid)


async def test_a_session_dropped_on_one_process_resumes_on_another(cluster: Cluster) -> None:
    s0, s1, s2 = await cluster.start_many(3)
    async with one_by_one([(s1, "bob")]) as (bob,):
        async with one_by_one([(s0, "ann")]) as (ann,):
            await bob.until(lambda c: presence(c, "joined", "ann") == 1, "joined ann")
            for i in range(3):
                await send_and_ack(bob, f"before {i}", f"b{i}")
            await ann.until(lambda c: len(c.messages(ROOM)) == 3, "three messages")
            seen = last_seen(ann)
            await ann.conn.close(code=1001)  # a page reload: the session is kept
        missed = [await send_and_ack(bob, f"missed {i}", f"m{i}") for i in range(4)]
        token = ann.welcome["resume"]
        url = s2.ws("ann", [ROOM], resume=token, offsets={ROOM: seen})
        async with clients([url]) as (back,):
            assert back.welcome["resumed"] is True, back.welcome
            assert back.welcome["session"] == ann.welcome["session"]
            await back.until(lambda c: len(c.messages(ROOM)) == len(missed), "replay")
            live = await send_and_ack(bob, "live", "l0")
            await back.until(lambda c: len(c.messages(ROOM)) == len(missed) + 1, "live")
            # Exactly what it missed, once, in order, then live traffic.
            assert [m["offset"] for m in back.messages(ROOM)] == [*missed, live]
            assert [m["text"] for m in back.messages(ROOM)][:4] == [f"missed {i}" for i in range(4)]
            await bob.until(lambda c: view(c) == {"ann", "bob"}, "ann still there")
            # She only moved: bob, on a third process, saw her arrive once and never leave.
            await send_and_ack(bob, "after the move", "l1")  # what crossed meanwhile is in
            await back.until(lambda c: len(c.messages(ROOM)) == len(missed) + 2, "after")
            assert presence(bob, "joined", "ann") == 1
            assert presence(bob, "left", "ann") == 0


async def test_a_resume_elsewhere_closes_the_old_connection(cluster: Cluster) -> None:
    s0, s1, s2 = await cluster.start_many(3)
    places = [(s0, "ann"), (s1, "bob"), (s2, "carl")]
    async with one_by_one(places) as (ann, bob, carl):
        for member in (ann, bob, carl):
            await member.until(lambda c: view(c) == {"ann", "bob", "carl"}, "everyone")
        offset = await send_and_ack(bob, "one", "o1")
        await ann.until(lambda c: bool(c.messages(ROOM)), "message")
        epoch = ann.messages(ROOM)[0]["epoch"]
        joins = [presence(c, "joined", "ann") for c in (bob, carl)]
        # ann's link died unnoticed: her client reconnects through another process
        # while s0 still holds her connection open.
        url = s1.ws("ann", [ROOM], resume=ann.welcome["resume"], offsets={ROOM: (offset, epoch)})
        async with clients([url]) as (moved,):
            assert moved.welcome["resumed"] is True
            assert moved.welcome["session"] == ann.welcome["session"]
            await ann.until(lambda c: c.closed, "the old connection closed")
            assert (ann.conn.close_code, ann.conn.close_reason) == (
                1000,
                "session resumed elsewhere",
            )
            await send_and_ack(bob, "two", "o2")
            await moved.until(lambda c: len(c.messages(ROOM)) == 1, "live on the new process")
            await send_and_ack(carl, "three", "o3")  # after whatever the move shared
            await bob.until(lambda c: len(c.messages(ROOM)) == 1, "carl's")
            await moved.until(lambda c: len(c.messages(ROOM)) == 2, "carl's")
            # She only moved: nobody saw her leave or arrive again.
            for watcher, before in zip((bob, carl), joins, strict=True):
                assert presence(watcher, "left", "ann") == 0
                assert presence(watcher, "joined", "ann") == before
                assert view(watcher) == {"ann", "bob", "carl"}


async def test_members_of_a_killed_process_leave_once(cluster: Cluster) -> None:
    # Grace 1 s: the killed process's heartbeat key (10 s) expires, then its members
    # leave on the others after the grace period, once.
    cluster.extra = (*cluster.extra, "--grace", "1")
    s0, s1, _ = await cluster.start_many(3)
    async with one_by_one([(s0, "ann"), (s1, "bob")]) as (ann, bob):
        await bob.until(lambda c: view(c) == {"ann", "bob"}, "bob sees ann")
        s0.kill()
        await ann.until(lambda c: c.closed or False, "ann's connection gone")
        with anyio.fail_after(GUARD * 2):  # the heartbeat's TTL, then the grace period
            while presence(bob, "left", "ann") == 0:
                await anyio.sleep(0.1)
        await send_and_ack(bob, "still here", "s1")  # later traffic: nothing more about ann
        await anyio.sleep(3)  # two more heartbeat scans: she is not announced again
        assert presence(bob, "left", "ann") == 1
        assert view(bob) == {"bob"}
