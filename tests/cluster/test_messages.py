"""Messages across three ``chatcore serve`` processes on one PostgreSQL log and one Redis.

Members of one room connect to different processes and send through them:
every member receives every acked message once, at the offset its sender was
acked with, in the same order as every other member.
"""

from __future__ import annotations

import contextlib
from typing import Any

import anyio
import pytest
from websockets.exceptions import ConnectionClosed

from .conftest import GUARD, Client, Cluster, clients

pytestmark = [pytest.mark.anyio, pytest.mark.postgres, pytest.mark.redis]

ROOM = "hall"


def offsets(client: Client, room: str = ROOM) -> list[int]:
    return [m["offset"] for m in client.messages(room)]


async def send_all(client: Client, user: str, count: int, acks: dict[str, int]) -> None:
    """Send ``count`` messages with ids ``user-i`` (at most 3 in flight); wait for every ack."""
    mine = [f"{user}-{i}" for i in range(count)]
    for i, cid in enumerate(mine):
        await client.send({"type": "send", "room": ROOM, "text": f"{user} says {i}", "id": cid})
        in_flight_ok = i - 2
        await client.until(
            lambda c, n=in_flight_ok: sum(a.get("id") in mine for a in c.of("ack")) >= n, "acks"
        )
    await client.until(lambda c: sum(a.get("id") in mine for a in c.of("ack")) == count, "acks")
    for ack in client.of("ack"):
        if ack.get("id") in mine:
            acks[ack["id"]] = ack["offset"]


def check_delivered(members: list[Client], users: list[str], acks: dict[str, int]) -> None:
    """Every member has every acked message of the others once, at its acked offset,
    in offset order (its own come as acks, not as messages: the engine's default)."""
    for member, user in zip(members, users, strict=True):
        others = {cid: offset for cid, offset in acks.items() if not cid.startswith(f"{user}-")}
        got = member.messages(ROOM)
        assert [m["offset"] for m in got] == sorted(others.values())
        by_id: dict[Any, int] = {m["id"]: m["offset"] for m in got}
        assert by_id == others


async def test_messages_reach_members_on_every_process(cluster: Cluster) -> None:
    servers = await cluster.start_many(3)
    users = [f"u{i}" for i in range(6)]
    urls = [servers[i % 3].ws(user, [ROOM]) for i, user in enumerate(users)]
    async with clients(urls) as members:
        # Everyone is in the room on every process before anything is sent.
        for member in members:
            await member.until(lambda c: bool(c.of("members", ROOM)), "members")
        acks: dict[str, int] = {}
        async with anyio.create_task_group() as tg:
            for member, user in zip(members, users, strict=True):
                tg.start_soon(send_all, member, user, 5, acks)
        total = len(users) * 5
        assert sorted(acks.values()) == list(range(1, total + 1)), cluster.logs()
        for member in members:
            await member.until(lambda c: len(c.messages(ROOM)) >= total - 5, "messages")
        check_delivered(members, users, acks)
        epochs = {m["epoch"] for member in members for m in member.messages(ROOM)}
        assert len(epochs) == 1


async def stream(
    client: Client,
    user: str,
    acks: dict[str, int],
    stop: anyio.Event,
    *,
    limit: int = 400,
    pace: float = 0.01,
) -> None:
    """Send until ``stop`` (or ``limit``), one at a time, each acked before the next;
    record every ack. Ends quietly when the connection goes (its process was killed)."""
    i = 0
    while not stop.is_set() and i < limit and not client.closed:
        cid = f"{user}-{i}"
        try:
            await client.send({"type": "send", "room": ROOM, "text": f"{user} {i}", "id": cid})
            await client.until(lambda c, cid=cid: any(a.get("id") == cid for a in c.of("ack")))
        except (AssertionError, ConnectionClosed):
            return
        acks[cid] = next(a["offset"] for a in client.of("ack") if a.get("id") == cid)
        i += 1
        await anyio.sleep(pace)


async def test_kill_9_of_one_process_loses_no_acked_message(cluster: Cluster) -> None:
    servers = await cluster.start_many(3)
    users = [f"k{i}" for i in range(6)]
    urls = [servers[i % 3].ws(user, [ROOM]) for i, user in enumerate(users)]
    async with clients(urls) as members:
        for member in members:
            await member.until(lambda c: bool(c.of("members", ROOM)), "members")
        acks: dict[str, int] = {}
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            for member, user in zip(members, users, strict=True):
                tg.start_soon(stream, member, user, acks, stop)
            with anyio.fail_after(GUARD):
                while len(acks) < 30:
                    await anyio.sleep(0.01)
            servers[0].kill()  # mid-stream: sends in flight on it, others going on
            with anyio.fail_after(GUARD):
                while len(acks) < 90:
                    await anyio.sleep(0.01)
            stop.set()
        live = [(m, u) for i, (m, u) in enumerate(zip(members, users, strict=True)) if i % 3]
        assert len(set(acks.values())) == len(acks)  # one offset per acked message
        # Every live member has every acked message of the others, once and in order,
        # including those acked by the killed process before it died.
        for member, user in live:
            others = {cid: off for cid, off in acks.items() if not cid.startswith(f"{user}-")}
            want = set(others.values())
            with contextlib.suppress(TimeoutError):
                await member.until(
                    lambda c, want=want: want <= {m["offset"] for m in c.messages(ROOM)},
                    "every acked message",
                )
            missing = want - {m["offset"] for m in member.messages(ROOM)}
            assert not missing, f"{user} never got {sorted(missing)}\n{cluster.logs()}"
            got = [m["offset"] for m in member.messages(ROOM)]
            assert got == sorted(set(got)), "delivered twice or out of order"
            by_id = {m["id"]: m["offset"] for m in member.messages(ROOM)}
            assert {cid: by_id.get(cid) for cid in others} == others
