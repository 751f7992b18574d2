"""Taking rooms and users up across ``chatcore serve`` processes, in the instant
before Redis subscribed them to their channels.

Redis subscribes asynchronously: a process hears nothing on a channel until its
SUBSCRIBE reached Redis, and a welcome goes out before that. To act inside
that window every time, one process talks to Redis through a proxy that can
hold back its SUBSCRIBE commands (its publishes pass): processes taking a room
up in the worst order, and a direct message sent while its recipient's new
session is not yet listening.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import anyio
import anyio.abc
import pytest

from .conftest import REDIS_URL, Cluster, Server, clients, subscribed
from .test_live import dm_room, view

pytestmark = [pytest.mark.anyio, pytest.mark.postgres, pytest.mark.redis]


class SubscribeGate:
    """A TCP proxy in front of Redis that, while closed, holds back every SUBSCRIBE
    (and what follows on that connection) until it opens; other connections, and
    publishes, pass."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._open = anyio.Event()
        self._open.set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def close(self) -> None:
        self._open = anyio.Event()

    def open(self) -> None:
        self._open.set()

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
            self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
            task_status.started()
            await listener.serve(self._relay)

    async def _relay(self, client: anyio.abc.SocketStream) -> None:
        async with client, await anyio.connect_tcp("127.0.0.1", self.target_port) as upstream:

            async def outgoing() -> None:
                with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                    async for chunk in client:
                        if b"SUBSCRIBE" in chunk.upper():
                            await self._open.wait()
                        await upstream.send(chunk)

            async def incoming() -> None:
                with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                    async for chunk in upstream:
                        await client.send(chunk)

            async with anyio.create_task_group() as tg:
                tg.start_soon(outgoing)
                tg.start_soon(incoming)


@contextlib.asynccontextmanager
async def gated(cluster: Cluster) -> AsyncIterator[tuple[Server, Server, SubscribeGate]]:
    """Two servers: the first on Redis, the second behind a :class:`SubscribeGate`."""
    port = int(REDIS_URL.rsplit(":", 1)[1].split("/", maxsplit=1)[0])
    gate = SubscribeGate(port)
    async with anyio.create_task_group() as tg:
        await tg.start(gate.serve)
        direct = await cluster.start()
        cluster.redis_url = gate.url
        behind = await cluster.start()
        cluster.redis_url = REDIS_URL
        await subscribed(direct, 1)  # both listen on their control channels
        await subscribed(behind, 1)
        try:
            yield direct, behind, gate
        finally:
            tg.cancel_scope.cancel()


async def test_processes_taking_a_room_up_in_the_worst_order_learn_each_other_s_members(
    cluster: Cluster,
) -> None:
    async with gated(cluster) as (s0, s1, gate):
        gate.close()
        # bob's process loads the room and says bob arrived, but is not listening yet;
        # ann's process then takes the room up and asks who is there: nobody hears it.
        async with (
            clients([s1.ws("bob", ("hall",))]) as (bob,),
            clients([s0.ws("ann", ("hall",))]) as (ann,),
        ):
            await subscribed(s0, 3)  # control, ann, the room
            await anyio.sleep(0.2)  # (its question is out)
            gate.open()  # now bob's process listens: each must learn the other
            await ann.until(lambda c: view(c) == {"ann", "bob"}, "bob")
            await bob.until(lambda c: view(c) == {"ann", "bob"}, "ann")


async def test_a_direct_message_sent_as_its_recipient_connects_elsewhere_arrives_live(
    cluster: Cluster,
) -> None:
    room = dm_room("ann", "bob")
    async with gated(cluster) as (s0, s1, gate), clients([s0.ws("ann")]) as (ann,):
        await subscribed(s0, 2)  # control and ann's channel
        # The first time bob's process holds nothing of the conversation; the
        # second, the first message is unread, so bob's session is in it at once.
        for n in range(2):
            gate.close()
            async with clients([s1.ws("bob")]) as (bob,):
                await ann.send({"type": "dm", "to": "bob", "text": f"psst{n}", "id": f"d{n}"})
                await ann.until(lambda c, n=n: len(c.of("ack", room)) > n, "ack")
                await anyio.sleep(0.2)  # published, and not heard by bob's process
                gate.open()
                await bob.until(lambda c: bool(c.messages(room)), f"psst{n}")
                assert [m["text"] for m in bob.messages(room)] == [f"psst{n}"]
