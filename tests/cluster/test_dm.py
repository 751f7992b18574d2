"""A direct message reaches its recipient's open connection on another ``chatcore
serve`` process even when the bus failed it.

alice is on process A, bob on process B, and they share no room: B does not
hold their conversation, hears a direct message only on bob's channel, and no
head probe covers it. Three ways the bus fails it, each healed: bob gets the
message live on the connection he has, exactly once, within a bound.

* Redis itself (a server of the test's own, never the machine's) is stopped
  while alice sends, then started: both repairs meet (A publishes what failed
  again; B, subscribed again, asks the log for bob's inbox).
* Only A is cut off from Redis (a proxy in front of it closes A's connections
  and refuses new ones): A's publish fails, B heard nothing amiss and asks
  nothing; A's bus keeps the message and publishes it once its link works.
* Only B is cut off: A's publish succeeds but B is not subscribed; back on
  Redis, B's engine is fed ``BusResumed`` and asks the log for bob's inbox.

And the bus on its own: what failed goes out again in its order, within its
bounds (the oldest given up past them, and counted).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

import anyio
import anyio.abc
import pytest

from chatcore import RoomHeld, bus_message
from chatcore_host import RedisBus

from .conftest import REDIS_URL, Client, Cluster, PrivateRedis, Server, clients, metric, subscribed
from .conftest import http_get as get
from .test_bus import message, prefix, running
from .test_live import dm_room

pytestmark = [pytest.mark.anyio, pytest.mark.postgres, pytest.mark.redis]

ROOM = dm_room("alice", "bob")
BOUND = 5.0
"""Seconds from healing until bob has the message: a reconnect (0.25 s apart), a
publish (under 0.5 s) or an inbox query and a room load; generous for a noisy machine."""


class Cutter:
    """A TCP proxy in front of Redis for one process, which can cut it off: every
    connection through it is closed at once and new ones are closed on arrival,
    until it heals. Redis and the other processes are untouched."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.cut_off = False
        self._links: set[anyio.CancelScope] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def cut(self) -> None:
        self.cut_off = True
        for link in self._links:
            link.cancel()

    def heal(self) -> None:
        self.cut_off = False

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
            self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
            task_status.started()
            await listener.serve(self._relay)

    async def _relay(self, client: anyio.abc.SocketStream) -> None:
        async with client:
            if self.cut_off:
                return
            async with await anyio.connect_tcp("127.0.0.1", self.target_port) as upstream:
                with anyio.CancelScope() as link:
                    self._links.add(link)
                    try:
                        async with anyio.create_task_group() as tg:
                            tg.start_soon(_pump, client, upstream)
                            tg.start_soon(_pump, upstream, client)
                    finally:
                        self._links.discard(link)


async def _pump(src: anyio.abc.SocketStream, dst: anyio.abc.SocketStream) -> None:
    with contextlib.suppress(
        anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError
    ):
        async for chunk in src:
            await dst.send(chunk)


async def counter(server: Server, name: str) -> float:
    _, text = await anyio.to_thread.run_sync(get, server, "/metrics")
    return metric(text, name)


async def until_counter(server: Server, name: str, at_least: float) -> None:
    with anyio.fail_after(20):
        while await counter(server, name) < at_least:
            await anyio.sleep(0.05)


@contextlib.asynccontextmanager
async def behind_cutter(
    cluster: Cluster, which: int
) -> AsyncIterator[tuple[Server, Server, Cutter]]:
    """Processes A and B on the machine's Redis, process ``which`` through a Cutter."""
    port = int(REDIS_URL.rsplit(":", 1)[1].split("/", maxsplit=1)[0])
    cutter = Cutter(port)
    async with anyio.create_task_group() as tg:
        await tg.start(cutter.serve)
        servers = []
        for i in range(2):
            cluster.redis_url = cutter.url if i == which else REDIS_URL
            servers.append(await cluster.start())
        cluster.redis_url = REDIS_URL
        try:
            yield servers[0], servers[1], cutter
        finally:
            tg.cancel_scope.cancel()


async def dm_sent_while_broken(alice: Client, bob: Client, texts: list[str]) -> None:
    for i, text in enumerate(texts):
        await alice.send({"type": "dm", "to": "bob", "text": text, "id": f"d{i}"})
    await alice.until(lambda c: len(c.of("ack", ROOM)) == len(texts), "the acks: the log is up")
    await anyio.sleep(0.5)  # (the publishes failed, or went unheard, by now)
    assert not bob.messages(ROOM)


async def arrives_once(alice: Client, bob: Client, texts: list[str], healed: float) -> float:
    """bob gets the messages live within the bound, in order, then one sent
    afterwards, and nothing twice; the seconds it took after healing."""
    with anyio.fail_after(BOUND):
        await bob.until(lambda c: bool(c.messages(ROOM)), texts[0])
    took = time.monotonic() - healed
    await anyio.sleep(1.0)  # a second copy (a republish meeting a recheck) would be here
    await alice.send({"type": "dm", "to": "bob", "text": "after", "id": "after"})
    await bob.until(lambda c: any(m["text"] == "after" for m in c.messages(ROOM)), "after")
    assert [m["text"] for m in bob.messages(ROOM)] == [*texts, "after"]
    assert [m["offset"] for m in bob.messages(ROOM)] == list(range(1, len(texts) + 2))
    assert not bob.closed  # the same connection all along
    return took


@pytest.mark.redis_outage
async def test_a_direct_message_sent_while_redis_was_down_reaches_the_recipient_live(
    cluster: Cluster, private_redis: PrivateRedis
) -> None:
    cluster.redis_url = private_redis.url
    a, b = await cluster.start_many(2)
    async with clients([a.ws("alice"), b.ws("bob")]) as (alice, bob):
        await subscribed(a, 2)  # control and alice's channel
        await subscribed(b, 2)
        await private_redis.stop()
        await dm_sent_while_broken(alice, bob, ["psst"])
        await private_redis.start()
        took = await arrives_once(alice, bob, ["psst"], time.monotonic())
    print(f"redis restarted: bob had it {took:.2f} s after")


async def test_a_direct_message_whose_publish_failed_is_published_again(cluster: Cluster) -> None:
    async with (
        behind_cutter(cluster, 0) as (a, b, cutter),
        clients([a.ws("alice"), b.ws("bob")]) as (alice, bob),
    ):
        await subscribed(a, 2)
        await subscribed(b, 2)
        resyncs = await counter(b, "chatcore_bus_resyncs_total")
        cutter.cut()
        # Three: B loads the conversation on the first it hears and delivers from
        # there, so they must come in their order.
        texts = ["one", "two", "three"]
        await dm_sent_while_broken(alice, bob, texts)
        await until_counter(a, "chatcore_bus_publish_failures_total", 3)
        cutter.heal()
        took = await arrives_once(alice, bob, texts, time.monotonic())
        assert await counter(a, "chatcore_bus_republished_total") >= 3
        assert await counter(b, "chatcore_bus_resyncs_total") == resyncs  # B never lost Redis
    print(f"A's publish failed: bob had it {took:.2f} s after A's link healed")


async def test_a_direct_message_published_while_the_recipient_s_process_was_off_redis(
    cluster: Cluster,
) -> None:
    async with (
        behind_cutter(cluster, 1) as (a, b, cutter),
        clients([a.ws("alice"), b.ws("bob")]) as (alice, bob),
    ):
        await subscribed(a, 2)
        await subscribed(b, 2)
        cutter.cut()
        with anyio.fail_after(20):  # B noticed: its subscription is gone
            while await counter(b, "chatcore_bus_channels") > 0:
                await anyio.sleep(0.05)
        await dm_sent_while_broken(alice, bob, ["psst", "again"])
        assert await counter(a, "chatcore_bus_publish_failures_total") == 0
        cutter.heal()
        took = await arrives_once(alice, bob, ["psst", "again"], time.monotonic())
        assert await counter(b, "chatcore_bus_resyncs_total") >= 1
    print(f"B was off Redis: bob had it {took:.2f} s after B's link healed")


@pytest.mark.parametrize("bound", ["count", "bytes"])
async def test_the_bus_publishes_what_failed_again_in_order_within_its_bounds(
    services: None, bound: str
) -> None:
    port = int(REDIS_URL.rsplit(":", 1)[1].split("/", maxsplit=1)[0])
    cutter = Cutter(port)
    pre = prefix()
    size = len(f"{'x' * 16}\n".encode() + bus_message(message(1)).encode())
    # Room for four of the six either way.
    kept, kept_bytes = (4, 1 << 20) if bound == "count" else (100, 4 * size + 3)
    async with anyio.create_task_group() as tg:
        await tg.start(cutter.serve)
        a = RedisBus(
            cutter.url, prefix=pre, process_id="x" * 16, max_kept=kept, max_kept_bytes=kept_bytes
        )
        b = RedisBus(REDIS_URL, prefix=pre)
        b.carry(RoomHeld(room="r"))
        async with running(a, b) as (_, sb):
            await anyio.sleep(0.2)
            cutter.cut()
            for offset in range(1, 7):
                a.publish(message(offset))
            with anyio.fail_after(20):
                while a.tally.publish_failures < 6:
                    await anyio.sleep(0.01)
            cutter.heal()
            await sb.until(lambda s: len(s.messages) >= 4)
            a.publish(message(7))
            await sb.until(lambda s: len(s.messages) >= 5)
            await anyio.sleep(0.3)
            assert [m.offset for m in sb.messages] == [3, 4, 5, 6, 7]  # the oldest went
            assert (a.tally.publishes_dropped, a.tally.republished) == (2, 4)
            assert a.tally.publishes == 5
        tg.cancel_scope.cancel()
