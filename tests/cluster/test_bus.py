"""RedisBus on its own: two buses (two processes' worth) over a real Redis.

What a host relies on: a message published by one reaches the other's held
room once and never echoes back to its publisher; a publish gives up in under
a second when Redis is gone or hangs; the subscription comes back by itself
after Redis restarts and says so (the engine then resyncs every room); and a
subscription that went silently deaf is found by the liveness probe and
reopened (centrifugo #1189: a node that stopped hearing the others).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from chatcore import (
    Appended,
    BusResumed,
    ClaimRefused,
    ClaimSession,
    Command,
    Config,
    MemberArrived,
    Message,
    ParkedRoom,
    ProcessGone,
    RoomHeld,
    RoomReleased,
    SessionAsked,
    SessionClaimed,
    SessionGone,
    SessionParked,
    SessionTaken,
    Share,
    Shared,
    Subscribed,
    UserHeld,
)
from chatcore_host import RedisBus

from .conftest import REDIS_URL, Blackhole, PrivateRedis

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

GUARD = 10.0


class Sink:
    """Stands in for the host: records what the bus feeds."""

    def __init__(self) -> None:
        self.config = Config(grace_period=0.5)
        self.commands: list[Command] = []
        self._new = anyio.Event()

    def bus_feed(self, commands: Sequence[Command]) -> None:
        self.commands.extend(commands)
        self._poke()

    @property
    def messages(self) -> list[Message]:
        return [c.message for c in self.commands if isinstance(c, Appended)]

    @property
    def resumed(self) -> int:
        return sum(isinstance(c, BusResumed) for c in self.commands)

    def of(self, kind: type[Any]) -> list[Any]:
        return [c for c in self.commands if isinstance(c, kind)]

    def _poke(self) -> None:
        self._new.set()
        self._new = anyio.Event()

    async def until(self, pred: Callable[[Sink], bool]) -> None:
        with anyio.fail_after(GUARD):
            while not pred(self):
                await self._new.wait()


def message(offset: int, room: str = "r", text: str = "hi") -> Message:
    return Message(room=room, offset=offset, epoch="e1", sender="ann", text=text, ts=1)


def prefix() -> str:
    return f"test:bus:{os.getpid()}:{secrets.token_hex(4)}"


@asynccontextmanager
async def running(*buses: RedisBus) -> AsyncIterator[list[Sink]]:
    sinks = [Sink() for _ in buses]
    async with anyio.create_task_group() as tg:
        for bus, sink in zip(buses, sinks, strict=True):
            tg.start_soon(bus.run, sink)
        for sink in sinks:
            await sink.until(lambda s: s.resumed >= 1)
        try:
            yield sinks
        finally:
            tg.cancel_scope.cancel()


@pytest.fixture
def redis_url(services_redis: None) -> str:
    return REDIS_URL


@pytest.fixture(scope="session")
def services_redis() -> None:
    from .conftest import _unavailable, redis_problem

    if (problem := redis_problem()) is not None:
        _unavailable(problem)


async def test_message_reaches_the_other_process_once_and_not_its_own(redis_url: str) -> None:
    pre = prefix()
    a, b = RedisBus(redis_url, prefix=pre), RedisBus(redis_url, prefix=pre)
    a.carry(RoomHeld(room="r"))
    b.carry(RoomHeld(room="r"))
    async with running(a, b) as (sa, sb):
        await anyio.sleep(0.2)  # the subscriber applies held rooms within its poll
        a.publish(message(1))
        b.publish(message(2))
        await sb.until(lambda s: len(s.messages) >= 1)
        await sa.until(lambda s: len(s.messages) >= 1)
        await anyio.sleep(0.2)  # an echo of one's own would have arrived by now
        assert [m.offset for m in sb.messages] == [1]
        assert [m.offset for m in sa.messages] == [2]
        assert a.tally.publishes == 1
        assert b.tally.publishes == 1


async def test_rooms_not_held_are_not_heard(redis_url: str) -> None:
    pre = prefix()
    a, b = RedisBus(redis_url, prefix=pre), RedisBus(redis_url, prefix=pre)
    b.carry(RoomHeld(room="r"))
    async with running(a, b) as (_, sb):
        await anyio.sleep(0.2)
        a.publish(message(1, room="elsewhere"))
        a.publish(message(1, room="r"))
        await sb.until(lambda s: len(s.messages) >= 1)
        b.carry(RoomReleased(room="r"))
        await anyio.sleep(0.2)
        a.publish(message(2, room="r"))
        await anyio.sleep(0.3)
        assert [(m.room, m.offset) for m in sb.messages] == [("r", 1)]


async def test_a_channel_held_later_is_fed_as_subscribed_once_redis_confirmed_it(
    redis_url: str,
) -> None:
    pre = prefix()
    a, b = RedisBus(redis_url, prefix=pre), RedisBus(redis_url, prefix=pre)
    b.carry(RoomHeld(room="old"))
    async with running(a, b) as (_, sb):
        b.carry(RoomHeld(room="r"))
        b.carry(UserHeld(user="bob"))
        b.carry(RoomHeld(room="dm:ann:bob"))  # (no channel of its own)
        await sb.until(lambda s: len(s.of(Subscribed)) >= 2)
        a.publish(message(1, room="r"))  # confirmed: heard
        await sb.until(lambda s: len(s.messages) == 1)
        await anyio.sleep(0.2)
        first, *later = sb.of(Subscribed)
        assert first == Subscribed(rooms=("old",))  # with BusResumed, at the start
        assert sorted(r for c in later for r in c.rooms) == ["r"]
        assert [u for c in later for u in c.users] == ["bob"]
        assert sb.resumed == 1  # a new channel is not a reconnect: nothing else probed


async def test_a_room_let_go_and_held_again_at_once_is_confirmed_again(redis_url: str) -> None:
    bus = RedisBus(redis_url, prefix=prefix())
    bus.carry(RoomHeld(room="r"))
    async with running(bus) as (sink,):
        before = len(sink.of(Subscribed))
        # The engine dropped the room and took it up again within one poll: Redis
        # never stops sending it, and the engine hears it confirmed again.
        bus.carry(RoomReleased(room="r"))
        bus.carry(RoomHeld(room="r"))
        await sink.until(lambda s: len(s.of(Subscribed)) > before)
        assert sink.of(Subscribed)[-1] == Subscribed(rooms=("r",))


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # closed again: connecting is refused


async def _time_failed_publish(url: str) -> float:
    bus = RedisBus(url, prefix=prefix())
    sink = Sink()
    async with anyio.create_task_group() as tg:
        tg.start_soon(bus.run, sink)
        started = time.perf_counter()
        bus.publish(message(1))
        with anyio.fail_after(GUARD):
            while bus.tally.publish_failures < 1:
                await anyio.sleep(0.01)
        took = time.perf_counter() - started
        tg.cancel_scope.cancel()
    assert bus.tally.publishes == 0
    return took


async def test_publish_to_a_stopped_redis_fails_within_a_second() -> None:
    took = await _time_failed_publish(f"redis://127.0.0.1:{_closed_port()}/0")
    assert took < 1.0


async def test_publish_to_a_redis_that_never_answers_fails_within_a_second() -> None:
    # A listener that accepts and never says a word: what a hung Redis looks like.
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with anyio.create_task_group() as tg:

            async def mute(stream: anyio.abc.SocketStream) -> None:
                async with stream:
                    await anyio.sleep_forever()

            tg.start_soon(listener.serve, mute)
            took = await _time_failed_publish(f"redis://127.0.0.1:{port}/0")
            tg.cancel_scope.cancel()
    assert took < 1.0


@pytest.mark.redis_outage
async def test_subscription_comes_back_after_redis_restarts(private_redis: PrivateRedis) -> None:
    pre = prefix()
    a = RedisBus(private_redis.url, prefix=pre, probe_interval=0.3, probe_timeout=0.5)
    b = RedisBus(private_redis.url, prefix=pre, probe_interval=0.3, probe_timeout=0.5)
    b.carry(RoomHeld(room="r"))
    async with running(a, b) as (_, sb):
        await anyio.sleep(0.2)
        a.publish(message(1))
        await sb.until(lambda s: len(s.messages) == 1)
        await private_redis.stop()
        a.publish(message(2))  # fails: kept, and published again once Redis is back
        with anyio.fail_after(GUARD):
            while a.tally.publish_failures < 1:
                await anyio.sleep(0.01)
        await private_redis.start()
        await sb.until(lambda s: s.resumed >= 2)
        assert b.tally.resyncs >= 1
        with anyio.fail_after(GUARD):  # the publisher reconnects on its own too
            while not b.listening:
                await anyio.sleep(0.01)
        a.publish(message(3))
        await sb.until(lambda s: 3 in [m.offset for m in s.messages])
        # 2 went out before 3, heard if b listened by then (else the engine's probe
        # after BusResumed reads it from the log): never after 3, never twice.
        assert [m.offset for m in sb.messages] in ([1, 2, 3], [1, 3])


async def test_a_deaf_subscription_is_found_by_the_probe(redis_url: str) -> None:
    pre = prefix()
    proxy = Blackhole(int(redis_url.rsplit(":", 1)[1].split("/", maxsplit=1)[0]))
    async with anyio.create_task_group() as tg:
        await tg.start(proxy.serve)
        a = RedisBus(redis_url, prefix=pre)
        b = RedisBus(proxy.url, prefix=pre, probe_interval=0.3, probe_timeout=0.6)
        b.carry(RoomHeld(room="r"))
        async with running(a, b) as (_, sb):
            await anyio.sleep(0.2)
            a.publish(message(1))
            await sb.until(lambda s: len(s.messages) == 1)
            proxy.silence()  # b's links stop passing bytes; no error reaches b
            a.publish(message(2))
            await sb.until(lambda s: s.resumed >= 2)
            assert b.tally.deaf >= 1
            a.publish(message(3))
            await sb.until(lambda s: any(m.offset == 3 for m in s.messages))
            # 2 was published while b was deaf: the bus lost it, the resync is how
            # the engine gets it from the log.
            assert [m.offset for m in sb.messages] == [1, 3]
        tg.cancel_scope.cancel()


async def test_a_direct_message_travels_on_the_users_channels(redis_url: str) -> None:
    pre = prefix()
    a, b = RedisBus(redis_url, prefix=pre), RedisBus(redis_url, prefix=pre)
    b.carry(UserHeld(user="bob"))  # bob is on b; b does not hold the dm room (yet)
    async with running(a, b) as (_, sb):
        await anyio.sleep(0.2)
        a.publish(message(1, room="dm:ann:bob"))
        await sb.until(lambda s: len(s.messages) == 1)
        assert sb.messages[0].room == "dm:ann:bob"
        with anyio.fail_after(GUARD):  # counted once Redis answered the publisher
            while a.tally.publishes < 2:
                await anyio.sleep(0.01)
        await anyio.sleep(0.2)
        assert a.tally.publishes == 2  # one per party's channel, never per session
        assert len(sb.messages) == 1  # b holds bob's channel only, and hears it once


async def test_facts_reach_others_with_their_origin_and_never_come_back(redis_url: str) -> None:
    pre = prefix()
    a, b = RedisBus(redis_url, prefix=pre), RedisBus(redis_url, prefix=pre)
    a.carry(RoomHeld(room="r"))
    b.carry(RoomHeld(room="r"))
    async with running(a, b) as (sa, sb):
        await anyio.sleep(0.2)
        a.carry(Share(room="r", fact=MemberArrived(user="ann")))
        await sb.until(lambda s: bool(s.of(Shared)))
        await anyio.sleep(0.2)
        assert sb.of(Shared) == [
            Shared(origin=a.process_id, room="r", fact=MemberArrived(user="ann"))
        ]
        assert sa.of(Shared) == []


def parked(token: str, user: str = "ann", until: float | None = None) -> SessionParked:
    return SessionParked(
        token=token,
        id="s1",
        user=user,
        rooms=(ParkedRoom(room="r", offset=4, epoch="e1", read=2),),
        until=time.time() + 30 if until is None else until,
    )


async def test_a_parked_session_is_claimed_once_and_only_by_its_user(redis_url: str) -> None:
    pre = prefix()
    a, b, c = (RedisBus(redis_url, prefix=pre) for _ in range(3))
    async with running(a, b, c) as (sa, sb, sc):
        token = secrets.token_hex(8)
        a.carry(parked(token))
        await anyio.sleep(0.2)
        b.carry(ClaimSession(ref=1, token=token, user="eve"))  # not hers: refused, kept
        await sb.until(lambda s: bool(s.of(ClaimRefused)))
        b.carry(ClaimSession(ref=2, token=token, user="ann"))
        c.carry(ClaimSession(ref=3, token=token, user="ann"))  # a race: one of them wins
        await sb.until(lambda s: bool(s.of(SessionClaimed) or len(s.of(ClaimRefused)) > 1))
        await sc.until(lambda s: bool(s.of(SessionClaimed) or s.of(ClaimRefused)))
        claimed = sb.of(SessionClaimed) + sc.of(SessionClaimed)
        assert claimed == [
            SessionClaimed(
                ref=claimed[0].ref,
                id="s1",
                token=token,
                user="ann",
                rooms=(ParkedRoom(room="r", offset=4, epoch="e1", read=2),),
            )
        ]
        await sa.until(lambda s: bool(s.of(SessionTaken)))  # the owner is told
        winner = b if sb.of(SessionClaimed) else c
        assert sa.of(SessionTaken) == [SessionTaken(token=token, by=winner.process_id)]


async def test_only_the_owner_forgets_a_parked_session(redis_url: str) -> None:
    pre = prefix()
    a, b = RedisBus(redis_url, prefix=pre), RedisBus(redis_url, prefix=pre)
    async with running(a, b) as (_, sb):
        token = secrets.token_hex(8)
        a.carry(parked(token))
        b.carry(SessionGone(token=token))  # b does not own it: the record stays
        await anyio.sleep(0.2)
        b.carry(ClaimSession(ref=1, token=token, user="ann"))
        await sb.until(lambda s: bool(s.of(SessionClaimed) or s.of(ClaimRefused)))
        assert sb.of(SessionClaimed)
        gone = secrets.token_hex(8)
        a.carry(parked(gone))
        a.carry(SessionGone(token=gone))
        await anyio.sleep(0.2)
        b.carry(ClaimSession(ref=2, token=gone, user="ann"))
        await sb.until(lambda s: bool(s.of(ClaimRefused)))


async def test_a_claim_with_no_record_asks_the_owner_and_takes_what_it_parks(
    redis_url: str,
) -> None:
    pre = prefix()
    a, b = RedisBus(redis_url, prefix=pre), RedisBus(redis_url, prefix=pre)
    async with running(a, b) as (sa, sb):
        await anyio.sleep(0.2)  # (each has seen the other's heartbeat key by now)
        token = secrets.token_hex(8)
        b.carry(ClaimSession(ref=1, token=token, user="ann"))  # live on a: no record
        await sa.until(lambda s: bool(s.of(SessionAsked)))
        assert sa.of(SessionAsked) == [SessionAsked(token=token, user="ann")]
        assert not sb.of(SessionAsked)  # never its own
        a.carry(parked(token))  # what a's engine does: park it at once
        await sb.until(lambda s: bool(s.of(SessionClaimed) or s.of(ClaimRefused)))
        assert [c.token for c in sb.of(SessionClaimed)] == [token]
        await sa.until(lambda s: bool(s.of(SessionTaken)))


async def test_a_claim_nobody_hands_over_is_refused_within_its_bound(redis_url: str) -> None:
    bus = RedisBus(redis_url, prefix=prefix(), claim_timeout=0.3)
    async with running(bus) as (sink,):
        started = time.monotonic()
        bus.carry(ClaimSession(ref=1, token=secrets.token_hex(8), user="ann"))
        await sink.until(lambda s: bool(s.of(ClaimRefused)))
        assert 0.3 <= time.monotonic() - started < 1.0
    with pytest.raises(ValueError, match="claim_timeout"):
        RedisBus(redis_url, claim_timeout=0)


async def test_a_process_whose_heartbeat_stops_is_gone_once(redis_url: str) -> None:
    pre = prefix()
    a = RedisBus(redis_url, prefix=pre, probe_interval=0.2, heartbeat_ttl=0.5)
    b = RedisBus(redis_url, prefix=pre, probe_interval=0.2, heartbeat_ttl=0.5)
    sink = Sink()  # grace 0.5 s
    async with anyio.create_task_group() as outer:
        outer.start_soon(a.run, sink)
        async with running(b):
            with anyio.fail_after(GUARD):
                while b.process_id not in a._seen:
                    await anyio.sleep(0.05)
        # b stopped: its heartbeat key is gone; after the grace period a says so, once.
        await sink.until(lambda s: bool(s.of(ProcessGone)))
        await anyio.sleep(1.0)
        assert sink.of(ProcessGone) == [ProcessGone(origin=b.process_id)]
        outer.cancel_scope.cancel()


async def test_a_publish_leaves_before_the_write_to_the_processs_own_members(
    redis_url: str,
) -> None:
    # The host queues the publish, then ends its turn, which schedules the write of
    # the same message to this process's own members: with 500 of them, 7-9 ms with
    # the loop held. The publish must be on its way to Redis before that write, not
    # after it (redis-py's socket timeout, via asyncio.wait_for, used to put it after).
    import redis

    bus = RedisBus(redis_url, prefix=prefix())
    listener = redis.Redis.from_url(redis_url).pubsub()
    try:
        listener.subscribe(bus.channel("room:r"))
        assert listener.get_message(timeout=GUARD) is not None  # the confirmation
        async with running(bus):
            bus.publish(message(1))  # connects
            with anyio.fail_after(GUARD):
                while bus.tally.publishes < 1:
                    await anyio.sleep(0.01)
            assert listener.get_message(timeout=GUARD) is not None
            heard: list[dict[str, Any] | None] = []

            def own_members() -> None:  # holds the loop, as a write to 500 sockets does
                heard.append(listener.get_message(timeout=1.0))

            bus.publish(message(2))
            asyncio.get_running_loop().call_soon(own_members)
            with anyio.fail_after(GUARD):  # (published late, it may also time out)
                while bus.tally.publishes + bus.tally.publish_failures < 2:
                    await anyio.sleep(0.01)
        assert heard
        assert heard[0] is not None, "the publish left after the loop's next turn"
        assert heard[0]["type"] == "message"
    finally:
        listener.close()
