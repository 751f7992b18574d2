"""The Redis bus: how processes that share one log hear each other's messages.

:class:`RedisBus` carries what one process appended to every other process
holding the same room. It is never the record: PostgreSQL (the log) numbers
and keeps every message before anything is published, so a publish that fails
or a subscriber that misses one costs only latency; the engine finds the gap
(a later message, or a probe of the room's head) and reads it from the log.

What it owns, and nothing else:

* one channel per room, ``PREFIX:{ROOM}`` (the braces are a Redis Cluster hash
  tag: every key and channel of a room lands on one shard), subscribed while
  the engine holds the room;
* one control channel per process, ``PREFIX:proc:ID``: the liveness probe
  publishes to it and expects its own echo; no echo within
  ``probe_timeout`` means the subscription went deaf (the server restarted,
  a half-open TCP link, a proxy that dropped it) and it is opened again;
* a heartbeat key per process, ``PREFIX:alive:ID``, refreshed with a TTL, so
  other processes can tell a live process from a killed one;
* publishing, bounded: every publish gives up after ``publish_timeout``
  (under a second), is counted as failed and never retried (the log has it).

Every time the subscription is (re)established, the sink is told
(:meth:`BusSink.bus_resumed`), so the engine can check every held room's head
against the log: what was published while no one listened is read from there.

The wire form of a message is one JSON array, encoded once per message (never
per member): ``[process, room, offset, epoch, sender, text, ts, client_id,
deleted]``. A process skips its own messages (its engine has them already).
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import anyio
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from chatcore import Message

from ._tally import BusTally

__all__ = ["BusSink", "BusTally", "RedisBus", "decode_message", "encode_message"]

log = logging.getLogger("chatcore_host.bus")

PUBLISH_TIMEOUT = 0.5
"""Seconds one publish (one batch of them) may take before it counts as failed."""
MAX_QUEUED = 100_000
"""Messages waiting to be published; past this the oldest are dropped (and counted)."""
_BATCH = 512  # publishes sent in one pipeline (one round trip)
_FEED_BATCH = 256  # bus messages fed to the engine in one turn
_POLL = 0.05  # seconds the subscriber waits for a message before it looks around


class BusSink(Protocol):
    """What the bus feeds: the engine's host."""

    def bus_messages(self, messages: Sequence[Message]) -> None:
        """Messages other processes appended (in the order the bus delivered them)."""
        ...

    def bus_resumed(self) -> None:
        """The subscription is (again) in place: check every held room against the log."""
        ...


def encode_message(process: str, message: Message) -> bytes:
    """The bus's wire form of ``message`` (one JSON array)."""
    m = message
    return json.dumps(
        [process, m.room, m.offset, m.epoch, m.sender, m.text, m.ts, m.client_id, m.deleted],
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()


def decode_message(data: bytes) -> tuple[str, Message] | None:
    """``(process, message)`` from the wire form, None if it is not one."""
    try:
        p, room, offset, epoch, sender, text, ts, client_id, deleted = json.loads(data)
    except (ValueError, TypeError):
        return None
    if not (
        isinstance(p, str)
        and isinstance(room, str)
        and type(offset) is int
        and isinstance(epoch, str)
        and isinstance(sender, str)
        and isinstance(text, str)
        and type(ts) is int
        and (client_id is None or isinstance(client_id, str))
        and isinstance(deleted, bool)
    ):
        return None
    return p, Message(
        room=room,
        offset=offset,
        epoch=epoch,
        sender=sender,
        text=text,
        ts=ts,
        client_id=client_id,
        deleted=deleted,
    )


class _Deaf(Exception):
    """The liveness probe's echo did not come back."""


class RedisBus:
    """Messages between processes over Redis pub/sub (see the module docstring).

    ``url`` is a ``redis://`` URL; ``prefix`` starts every channel and key
    (two deployments, or two test runs, on one Redis pick different ones).
    Run it with ``await bus.run(sink)`` (the host does, inside ``running()``);
    :meth:`publish`, :meth:`hold` and :meth:`release` never block.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "chatcore",
        process_id: str | None = None,
        publish_timeout: float = PUBLISH_TIMEOUT,
        heartbeat_ttl: float = 10.0,
        probe_interval: float = 2.0,
        probe_timeout: float = 1.0,
        reconnect_delay: float = 0.25,
    ) -> None:
        if not 0 < publish_timeout < 1:
            raise ValueError("publish_timeout must be within (0, 1) seconds")
        if probe_timeout <= 0 or probe_interval <= 0 or heartbeat_ttl <= probe_interval:
            raise ValueError("need 0 < probe_interval < heartbeat_ttl and probe_timeout > 0")
        if not prefix or any(c in prefix for c in "{} *?[]"):
            raise ValueError(f"bad bus prefix {prefix!r}")
        self.url = url
        self.prefix = prefix
        self.process_id = process_id or secrets.token_hex(8)
        self.publish_timeout = publish_timeout
        self.heartbeat_ttl = heartbeat_ttl
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.reconnect_delay = reconnect_delay
        self.tally = BusTally()
        self.listening = False
        """True while the subscription is in place (for ``/readyz``)."""
        self.control = f"{prefix}:proc:{self.process_id}"
        self.alive_key = f"{prefix}:alive:{self.process_id}"
        self._queue: deque[tuple[str, bytes]] = deque()
        self._queue_wake: anyio.Event | None = None
        self._held: set[str] = set()
        self._probe_sent: float | None = None  # monotonic time of the unanswered probe
        self._redis: Redis | None = None

    # -- names ----------------------------------------------------------------------------

    def channel(self, room: str) -> str:
        """The room's channel (its name is a hash tag)."""
        return f"{self.prefix}:{{{room}}}"

    def _room_of(self, channel: str) -> str | None:
        head = f"{self.prefix}:{{"
        if channel.startswith(head) and channel.endswith("}"):
            return channel[len(head) : -1]
        return None

    # -- what the host calls (never blocks) -----------------------------------------------

    def publish(self, message: Message) -> None:
        """Queue ``message`` for its room's channel (encoded once, here)."""
        self._enqueue((self.channel(message.room), encode_message(self.process_id, message)))

    def hold(self, rooms: Iterable[str]) -> None:
        """Subscribe to these rooms' channels (soon; the subscriber task does it)."""
        self._held.update(rooms)

    def release(self, rooms: Iterable[str]) -> None:
        """Unsubscribe from these rooms' channels."""
        self._held.difference_update(rooms)

    @property
    def held(self) -> frozenset[str]:
        return frozenset(self._held)

    def _enqueue(self, item: tuple[str, bytes]) -> None:
        queue = self._queue
        queue.append(item)
        if len(queue) > MAX_QUEUED:
            queue.popleft()
            self.tally.publish_failures += 1
        if (wake := self._queue_wake) is not None:
            self._queue_wake = None
            wake.set()

    # -- running --------------------------------------------------------------------------

    def _client(self, *, reader: bool) -> Redis:
        return Redis.from_url(
            self.url,
            socket_connect_timeout=self.publish_timeout,
            # The reader waits for messages as long as there are none; the probe finds
            # a dead link. Everything else gives up within the publish timeout.
            socket_timeout=None if reader else self.publish_timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            single_connection_client=reader,
        )

    async def run(self, sink: BusSink) -> None:
        """Publish, subscribe and probe until cancelled."""
        self._redis = self._client(reader=False)
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._publisher)
                tasks.start_soon(self._heartbeat)
                tasks.start_soon(self._subscriber, sink)
        finally:
            with (
                anyio.CancelScope(shield=True),
                anyio.move_on_after(self.publish_timeout),
                contextlib.suppress(RedisError, OSError),
            ):
                await self._redis.delete(self.alive_key)
            with anyio.CancelScope(shield=True):
                await self._redis.aclose()

    async def ping(self) -> str | None:
        """None if Redis answers within the publish timeout, else why not (for ``/readyz``)."""
        redis = self._redis
        if redis is None:
            return "not running"
        if not self.listening:
            return "not subscribed"
        with anyio.move_on_after(self.publish_timeout):
            try:
                await redis.ping()
            except (RedisError, OSError) as exc:
                return f"{type(exc).__name__}: {exc}"
            return None
        return "timed out"

    async def _publisher(self) -> None:
        redis = self._redis
        if redis is None:
            raise RuntimeError("publisher started before run()")
        queue = self._queue
        while True:
            while not queue:
                wake = self._queue_wake = anyio.Event()
                await wake.wait()
            batch = [queue.popleft() for _ in range(min(len(queue), _BATCH))]
            ok = False
            with anyio.move_on_after(self.publish_timeout):
                try:
                    pipe = redis.pipeline(transaction=False)
                    for channel, data in batch:
                        pipe.publish(channel, data)
                    await pipe.execute()
                    ok = True
                except (RedisError, OSError) as exc:
                    log.warning("bus publish failed (%d messages): %s", len(batch), exc)
            if ok:
                self.tally.publishes += len(batch)
            else:
                self.tally.publish_failures += len(batch)
                # A hung connection would hang the next batch as well: start afresh.
                await _disconnect(redis)

    async def _heartbeat(self) -> None:
        """Refresh this process's heartbeat key and probe the subscription."""
        redis = self._redis
        if redis is None:
            raise RuntimeError("heartbeat started before run()")
        ttl_ms = int(self.heartbeat_ttl * 1000)
        while True:
            with anyio.move_on_after(self.publish_timeout):
                try:
                    await redis.set(self.alive_key, b"1", px=ttl_ms)
                    if self.listening and self._probe_sent is None:
                        self._probe_sent = time.monotonic()
                        await redis.publish(self.control, b"probe")
                except (RedisError, OSError) as exc:
                    log.warning("bus heartbeat failed: %s", exc)
                    self._probe_sent = None  # not sent: nothing to wait for
                    await _disconnect(redis)
            await anyio.sleep(self.probe_interval)

    async def alive(self) -> set[str]:
        """Process ids whose heartbeat key is still there (raises RedisError)."""
        redis = self._redis
        if redis is None:
            raise RuntimeError("bus not running")
        found: set[str] = set()
        head = f"{self.prefix}:alive:"
        with anyio.fail_after(self.publish_timeout * 4):
            async for key in redis.scan_iter(match=f"{head}*", count=1000):
                found.add(key.decode().removeprefix(head))
        return found

    async def _subscriber(self, sink: BusSink) -> None:
        first = True
        while True:
            pubsub = self._client(reader=True).pubsub()
            try:
                await self._listen(pubsub, sink, first=first)
            except (RedisError, OSError, _Deaf, TimeoutError) as exc:
                log.warning("bus subscription lost (%s); reconnecting", exc or type(exc).__name__)
            finally:
                self.listening = False
                self._probe_sent = None
                with (
                    anyio.CancelScope(shield=True),
                    anyio.move_on_after(self.publish_timeout),
                    contextlib.suppress(RedisError, OSError),
                ):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            first = False
            await anyio.sleep(self.reconnect_delay)

    async def _listen(self, pubsub: PubSub, sink: BusSink, *, first: bool) -> None:
        with anyio.fail_after(self.publish_timeout * 2):
            subscribed = set(self._held)
            await pubsub.subscribe(self.control, *(self.channel(r) for r in subscribed))
            # Wait until Redis confirmed them all: only then is nothing published missed.
            pending = len(subscribed) + 1
            while pending:
                reply = await pubsub.get_message(timeout=self.publish_timeout)
                if reply is not None and reply["type"] == "subscribe":
                    pending -= 1
        self.listening = True
        if not first:
            self.tally.resyncs += 1
            log.info("bus subscription back: resyncing %d rooms", len(subscribed))
        sink.bus_resumed()
        own = self.process_id
        batch: list[Message] = []
        while True:
            wanted = self._held
            if wanted != subscribed:
                await self._resubscribe(pubsub, subscribed, wanted)
                subscribed = set(wanted)
            sent = self._probe_sent
            if sent is not None and time.monotonic() - sent > self.probe_timeout:
                self.tally.deaf += 1
                raise _Deaf("liveness probe not echoed")
            reply = await self._next(pubsub)
            while reply is not None:
                self._take(reply, own, batch)
                if len(batch) >= _FEED_BATCH:
                    break
                reply = await pubsub.get_message(timeout=0)
            if batch:
                self.tally.received += len(batch)
                sink.bus_messages(batch)
                batch = []

    async def _next(self, pubsub: PubSub) -> dict[str, Any] | None:
        """The next message, or None after a short wait (to look at the held rooms and
        the probe again). A read with a timeout leaves the connection usable; a
        cancelled one would not."""
        reply: dict[str, Any] | None = await pubsub.get_message(timeout=_POLL)
        return reply

    def _take(self, reply: dict[str, Any], own: str, batch: list[Message]) -> None:
        if reply.get("type") != "message":
            return
        channel = reply["channel"]
        channel = channel.decode() if isinstance(channel, bytes) else str(channel)
        data = reply["data"]
        if channel == self.control:
            self._probe_sent = None  # the echo: we hear ourselves, so we hear others
            return
        decoded = decode_message(data) if isinstance(data, bytes) else None
        if decoded is None:
            log.warning("bus: not a message on %s; dropped", channel)
            return
        process, message = decoded
        if process == own or self._room_of(channel) != message.room:
            return
        batch.append(message)

    async def _resubscribe(self, pubsub: PubSub, have: set[str], want: set[str]) -> None:
        with anyio.fail_after(self.publish_timeout * 2):
            if gone := have - want:
                await pubsub.unsubscribe(*(self.channel(r) for r in gone))
            if new := want - have:
                await pubsub.subscribe(*(self.channel(r) for r in new))


async def _disconnect(redis: Redis) -> None:
    with (
        anyio.CancelScope(shield=True),
        anyio.move_on_after(0.2),
        contextlib.suppress(RedisError, OSError),
    ):
        await redis.connection_pool.disconnect()
