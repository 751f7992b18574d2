"""The Redis bus: how processes that share one log hear each other.

:class:`RedisBus` carries out the engine's bus effects (docs/engine.md,
"Several processes") over Redis, with redis-py's asyncio client. It is never
the record: PostgreSQL (the log) numbers and keeps every message before
anything is published, so a publish that fails or a subscriber that misses
one costs only latency; the engine reads the gap from the log (a later
message, or a probe of the room's head after :class:`chatcore.BusResumed`).

What it keeps in Redis, all under one prefix (two chats, or two test runs,
on one Redis pick different ones):

* ``PREFIX:{room:NAME}`` and ``PREFIX:{user:NAME}``: the channels the engine
  names (``chatcore.bus_channels``), subscribed on ``RoomHeld``/``UserHeld``.
  The braces are a Redis Cluster hash tag: a room's traffic stays on one shard.
  Each payload is ``ORIGIN\\nTEXT``: the publishing process's id, then the
  engine's own encoding (``bus_message``, ``bus_fact``), encoded once per
  message or fact, never per member. A process skips its own.
* ``PREFIX:proc:ID``: this process's control channel. The liveness probe
  publishes to it and expects its echo (no echo within ``probe_timeout``: the
  subscription went deaf, and is opened again; a probe that could not even be
  published, because Redis is unreachable, counts as unechoed); a process that
  claimed one of our sessions says ``taken\\nITS_ID\\nTOKEN`` there, and one that
  was handed a token with no parked record asks ``ask\\nITS_ID\\nTOKEN\\nUSER``
  (fed to the engine as ``SessionAsked``: the owner, if it is us, parks the
  session at once).
* ``PREFIX:alive:ID``: this process's heartbeat, a key with a TTL. A process
  whose key has been missing for the grace period is fed to the engine as
  ``ProcessGone`` (its members leave), once.
* ``PREFIX:session:{TOKEN}``: a parked session (``SessionParked``), ``OWNER\\n
  RECORD`` with the grace period as TTL. ``ClaimSession`` takes it with one
  Lua script (read, check the user, delete: atomic), ``SessionGone`` deletes
  it only while this process owns it. With no record at all the session may be
  live elsewhere: the claimer asks every process with a heartbeat and takes the
  record its owner parks, trying again with growing pauses for up to
  ``claim_timeout`` (1 s); then it answers ``ClaimRefused`` (a fresh session).

Every Redis call is bounded by ``publish_timeout`` (under a second). A
message whose publish failed is kept and published again, before anything
newer, once the link works (tried again every ``reconnect_delay``): the log
has it, but a process that does not hold its room (the recipient's process of
a direct message) would not learn of it otherwise. What is kept is bounded
(``max_kept`` publishes, ``max_kept_bytes`` of payload; past either the oldest
are given up and counted); receivers drop a message they delivered already,
so one that Redis took although the call failed costs only its bytes. Facts
(presence) are not kept: they are exchanged again after a reconnect. Every
time the subscription is (re)established the engine is fed ``BusResumed``, so
every held room checks its head against the log and every user here has their
direct messages checked. Every channel Redis confirms is fed as ``Subscribed``
(the engine takes up only rooms and users it had not heard confirmed: that
room alone checks its head, asks for members and tells its own; that user's
direct messages are checked).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol

import anyio
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from chatcore import (
    BusResumed,
    ClaimRefused,
    ClaimSession,
    Command,
    Config,
    Message,
    ProcessGone,
    RoomHeld,
    RoomReleased,
    SessionAsked,
    SessionGone,
    SessionParked,
    SessionTaken,
    Share,
    Shared,
    Subscribed,
    UserHeld,
    UserReleased,
    bus_channels,
    bus_fact,
    bus_message,
    parked_record,
    parse_bus,
    parse_parked,
    user_channel,
)

from ._host import BusEffect
from ._tally import BusTally

__all__ = ["BusSink", "RedisBus"]

log = logging.getLogger("chatcore_host.bus")

PUBLISH_TIMEOUT = 0.5
"""Seconds one Redis call (a batch of publishes) may take before it counts as failed."""
MAX_QUEUED = 100_000
"""Publishes waiting; past this the oldest are dropped (and counted as failures)."""
MAX_KEPT = 10_000
"""Message publishes that failed, kept to be published again; past this the oldest go."""
MAX_KEPT_BYTES = 32 * 1024 * 1024
"""Bytes of payload kept to be published again (a direct message's two channels share
one payload but count twice); past this the oldest go."""
_BATCH = 512  # publishes sent in one pipeline (one round trip)
_FEED_BATCH = 256  # bus payloads fed to the engine in one turn
_POLL = 0.05  # seconds the subscriber waits for a message before it looks around

CLAIM_TIMEOUT = 1.0
"""Seconds a claim that found no record waits for the session's owner to park it."""

# Take a parked session: only the named user's, read and deleted in one step.
# No record: nil (the claimer asks the owner); one that is not the user's: 0.
_CLAIM = """
local v = redis.call('GET', KEYS[1])
if not v then return false end
local nl = string.find(v, '\\n', 1, true)
if not nl then return 0 end
local ok, rec = pcall(cjson.decode, string.sub(v, nl + 1))
if not ok or type(rec) ~= 'table' or rec['u'] ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return v
"""
# Forget a parked session only while this process owns it (another may have claimed
# it and parked it again under the same token).
_FORGET = """
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. '\\n' then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class BusSink(Protocol):
    """What the bus feeds: the engine's host."""

    config: Config

    def bus_feed(self, commands: Sequence[Command]) -> None:
        """Hand these commands to the engine, in order, in one turn."""
        ...


class _Deaf(Exception):
    """The liveness probe's echo did not come back."""


class RedisBus:
    """The engine's bus effects over Redis (see the module docstring).

    ``url`` is a ``redis://`` URL; every channel and key starts with
    ``prefix``. Run it with ``await bus.run(sink)`` (the host does, inside
    ``running()``); :meth:`publish` and :meth:`carry` never block.
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
        process_grace: float | None = None,
        claim_timeout: float = CLAIM_TIMEOUT,
        max_kept: int = MAX_KEPT,
        max_kept_bytes: int = MAX_KEPT_BYTES,
    ) -> None:
        if not 0 < publish_timeout < 1:
            raise ValueError("publish_timeout must be within (0, 1) seconds")
        if claim_timeout <= 0:
            raise ValueError("claim_timeout must be positive")
        if max_kept < 1 or max_kept_bytes < 1:
            raise ValueError("max_kept and max_kept_bytes must be positive")
        if probe_timeout <= 0 or probe_interval <= 0 or heartbeat_ttl <= probe_interval:
            raise ValueError("need 0 < probe_interval < heartbeat_ttl and probe_timeout > 0")
        if not prefix or any(c in prefix for c in "{} *?[]\n"):
            raise ValueError(f"bad bus prefix {prefix!r}")
        self.url = url
        self.prefix = prefix
        self.process_id = process_id or secrets.token_hex(8)
        self.publish_timeout = publish_timeout
        self.heartbeat_ttl = heartbeat_ttl
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.reconnect_delay = reconnect_delay
        self.process_grace = process_grace
        self.claim_timeout = claim_timeout
        """Seconds a process's heartbeat may be missing before it is gone (default: the
        engine's grace period)."""
        self.max_kept = max_kept
        """Message publishes that failed kept to be made again (past it the oldest go)."""
        self.max_kept_bytes = max_kept_bytes
        """Bytes of payload kept so (past it the oldest go)."""
        self.tally = BusTally()
        self.listening = False
        """True while the subscription is in place (for ``/readyz``)."""
        self.control = f"{prefix}:proc:{self.process_id}"
        self.alive_key = self._alive(self.process_id)
        self._origin = self.process_id.encode() + b"\n"
        self._queue: deque[tuple[str, bytes, bool]] = deque()
        self._queue_wake: anyio.Event | None = None
        self._kept: deque[tuple[str, bytes]] = deque()  # failed message publishes, oldest first
        self._kept_bytes = 0
        self._records: deque[SessionParked | SessionGone | ClaimSession] = deque()
        self._records_wake: anyio.Event | None = None
        self._held: dict[str, int] = {}  # channel -> how many holds (a room and a user may share)
        self._confirmed: set[str] = set()  # channels Redis confirmed on the current link
        self._again: list[str] = []  # channels let go and held again before the subscriber saw
        self._probe_sent: float | None = None  # monotonic time of the unanswered probe
        self._seen: dict[str, float] = {}  # other processes -> monotonic time last seen alive
        self._redis: Redis | None = None
        self._sink: BusSink | None = None

    # -- names ----------------------------------------------------------------------------

    def channel(self, name: str) -> str:
        """The Redis channel of an engine channel name (``room:X``, ``user:Y``)."""
        return f"{self.prefix}:{{{name}}}"

    def _alive(self, process: str) -> str:
        return f"{self.prefix}:alive:{process}"

    def _session(self, token: str) -> str:
        return f"{self.prefix}:session:{{{token}}}"

    # -- what the host calls (never blocks) -----------------------------------------------

    def publish(self, message: Message) -> None:
        """Queue a message this process appended (the log stored it): encoded once,
        published once per channel of its room."""
        data = self._origin + bus_message(message).encode()
        for name in bus_channels(message.room):
            self._enqueue(self.channel(name), data, message=True)

    def carry(self, effect: BusEffect) -> None:
        """Carry out one of the engine's bus effects (queued; in order)."""
        match effect:
            case RoomHeld():
                if not effect.room.startswith("dm:"):  # those come on the user channels
                    self._hold(self.channel(f"room:{effect.room}"))
            case RoomReleased():
                if not effect.room.startswith("dm:"):
                    self._release(self.channel(f"room:{effect.room}"))
            case UserHeld():
                self._hold(self.channel(user_channel(effect.user)))
            case UserReleased():
                self._release(self.channel(user_channel(effect.user)))
            case Share():
                # (The engine asks for members only once it can hear the answers:
                # after Subscribed or BusResumed.)
                data = self._origin + bus_fact(self.process_id, effect.room, effect.fact).encode()
                for name in bus_channels(effect.room):
                    self._enqueue(self.channel(name), data, message=False)
            case SessionParked() | SessionGone() | ClaimSession():
                self._records.append(effect)
                if (wake := self._records_wake) is not None:
                    self._records_wake = None
                    wake.set()

    @property
    def held(self) -> frozenset[str]:
        """The Redis channels subscribed (or about to be)."""
        return frozenset(self._held)

    def _hold(self, channel: str) -> None:
        count = self._held.get(channel, 0)
        self._held[channel] = count + 1
        if count == 0 and channel in self._confirmed:
            # Released and held again: if the subscriber never let go of it, Redis
            # will confirm nothing new, yet the engine waits to hear it confirmed.
            self._again.append(channel)

    def _release(self, channel: str) -> None:
        count = self._held.get(channel, 0) - 1
        if count > 0:
            self._held[channel] = count
        else:
            self._held.pop(channel, None)

    def _enqueue(self, channel: str, data: bytes, *, message: bool) -> None:
        queue = self._queue
        queue.append((channel, data, message))
        if len(queue) > MAX_QUEUED:
            _, _, dropped = queue.popleft()
            self.tally.publish_failures += dropped
        if (wake := self._queue_wake) is not None:
            self._queue_wake = None
            wake.set()

    def _feed(self, commands: Sequence[Command]) -> None:
        if self._sink is not None and commands:
            self._sink.bus_feed(commands)

    # -- running --------------------------------------------------------------------------

    def _client(self, *, reader: bool = False, timed: bool = True) -> Redis:
        return Redis.from_url(
            self.url,
            socket_connect_timeout=self.publish_timeout,
            # The reader waits for messages as long as there are none; the probe finds
            # a dead link. The publisher bounds its batches itself (``timed=False``, see
            # there). Everything else gives up within the publish timeout.
            socket_timeout=self.publish_timeout if timed and not reader else None,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            single_connection_client=reader,
        )

    async def run(self, sink: BusSink) -> None:
        """Publish, subscribe, keep records and probe until cancelled."""
        self._sink = sink
        self._redis = self._client(reader=False)
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._publisher)
                tasks.start_soon(self._keeper)
                tasks.start_soon(self._heartbeat)
                tasks.start_soon(self._subscriber)
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

    def _connected(self) -> Redis:
        if self._redis is None:
            raise RuntimeError("the bus is not running")
        return self._redis

    async def _publisher(self) -> None:
        # A client of its own, without redis-py's socket timeout: redis-py bounds a
        # write by that timeout with asyncio.wait_for, which before Python 3.12 runs
        # the write in a new task, queued behind whatever this loop iteration already
        # scheduled: the fan-out of the same message to this process's own members
        # (7-9 ms for 500 of them), so every publish left that much later. Written
        # inline instead, the publish goes out first; move_on_after bounds it as before.
        redis = self._client(timed=False)
        try:
            await self._publish_batches(redis)
        finally:
            with anyio.CancelScope(shield=True):
                await redis.aclose()

    async def _publish_batches(self, redis: Redis) -> None:
        queue = self._queue
        kept = self._kept
        while True:
            while not queue and not kept:
                wake = self._queue_wake = anyio.Event()
                await wake.wait()
            if kept:
                # A publish failed: messages wait behind it (one channel's order is
                # kept: a process that loads a direct-message room on the first
                # message it hears delivers from there, so an older one heard later
                # would be lost), facts do not wait.
                for channel, data, message in [queue.popleft() for _ in range(len(queue))]:
                    if message:
                        self.tally.publish_failures += 1
                        self._keep(channel, data)
                    else:
                        queue.append((channel, data, message))
            again = min(len(kept), _BATCH)
            batch = [(*kept.popleft(), True) for _ in range(again)]
            self._kept_bytes -= sum(len(data) for _, data, _ in batch)
            batch += [queue.popleft() for _ in range(min(len(queue), _BATCH - again))]
            messages = sum(item[2] for item in batch)
            ok = False
            with anyio.move_on_after(self.publish_timeout):
                try:
                    pipe = redis.pipeline(transaction=False)
                    for channel, data, _ in batch:
                        pipe.publish(channel, data)
                    await pipe.execute()
                    ok = True
                except (RedisError, OSError) as exc:
                    log.warning("bus publish failed (%d payloads): %s", len(batch), exc)
            if ok:
                self.tally.publishes += messages
                self.tally.republished += again
                self.tally.facts += len(batch) - messages
                continue
            self.tally.publish_failures += messages - again  # (each message once)
            for channel, data, message in reversed(batch):
                if message:  # back in front, in order
                    kept.appendleft((channel, data))
                    self._kept_bytes += len(data)
            self._bound_kept()
            # A hung connection would hang the next batch as well: start afresh, after
            # a pause (a refused connection fails at once).
            await _disconnect(redis)
            await anyio.sleep(self.reconnect_delay)

    def _keep(self, channel: str, data: bytes) -> None:
        self._kept.append((channel, data))
        self._kept_bytes += len(data)
        self._bound_kept()

    def _bound_kept(self) -> None:
        kept = self._kept
        while len(kept) > self.max_kept or self._kept_bytes > self.max_kept_bytes:
            _, data = kept.popleft()  # the oldest: the others catch up from the log
            self._kept_bytes -= len(data)
            self.tally.publishes_dropped += 1

    async def _keeper(self) -> None:
        """Parked sessions: records kept, forgotten and claimed, in the engine's order."""
        redis = self._connected()
        claim = redis.register_script(_CLAIM)
        forget = redis.register_script(_FORGET)
        records = self._records
        async with anyio.create_task_group() as asks:
            while True:
                while not records:
                    wake = self._records_wake = anyio.Event()
                    await wake.wait()
                effect = records.popleft()
                answer: Command | None = None
                if isinstance(effect, ClaimSession):
                    answer = ClaimRefused(ref=effect.ref)  # unless the claim below succeeds
                with anyio.move_on_after(self.publish_timeout):
                    try:
                        match effect:
                            case SessionParked():
                                ttl = int((effect.until - time.time()) * 1000)
                                if ttl > 0:
                                    value = self._origin + parked_record(effect).encode()
                                    await redis.set(self._session(effect.token), value, px=ttl)
                            case SessionGone():
                                key = self._session(effect.token)
                                await forget(keys=[key], args=[self.process_id])
                            case ClaimSession():
                                answer = await self._claim(redis, claim, effect)
                                if answer is None:  # (the others go on meanwhile)
                                    asks.start_soon(self._ask_owner, redis, claim, effect)
                    except (RedisError, OSError) as exc:
                        log.warning("bus: %s failed: %s", type(effect).__name__, exc)
                if answer is not None:
                    self._answer(answer)

    def _answer(self, answer: Command) -> None:
        if isinstance(answer, ClaimRefused):
            self.tally.claims_refused += 1
        else:
            self.tally.claims += 1
        self._feed([answer])

    async def _ask_owner(self, redis: Redis, claim: Any, effect: ClaimSession) -> None:
        """No parked record: the session may be live on another process whose client
        reconnected here before it noticed the old link died. Ask every process with
        a heartbeat; its owner parks it at once (closing the old connection); take
        the record once it is there. Nothing within ``claim_timeout`` (the owner is
        gone, cut off, or slower than that): ``ClaimRefused``, a fresh session."""
        answer: Command = ClaimRefused(ref=effect.ref)
        with anyio.move_on_after(self.claim_timeout):
            try:
                head = self._alive("")
                ask = b"ask\n" + self._origin + f"{effect.token}\n{effect.user}".encode()
                pipe = redis.pipeline(transaction=False)
                async for key in redis.scan_iter(match=f"{head}*", count=1000):
                    process = key.decode().removeprefix(head)
                    if process != self.process_id:
                        pipe.publish(f"{self.prefix}:proc:{process}", ask)
                await pipe.execute()
                pause = 0.01
                while True:
                    await anyio.sleep(pause)
                    taken = await self._claim(redis, claim, effect)
                    if taken is not None:
                        answer = taken
                        break
                    pause = min(pause * 2, 0.2)
            except (RedisError, OSError) as exc:
                log.warning("bus: asking for session failed: %s", exc)
        self._answer(answer)

    async def _claim(self, redis: Redis, claim: Any, effect: ClaimSession) -> Command | None:
        """Take the parked record: the answer, or None if there is no record at all."""
        taken = await claim(keys=[self._session(effect.token)], args=[effect.user])
        if taken is None:
            return None
        if not isinstance(taken, bytes):
            return ClaimRefused(ref=effect.ref)
        owner, _, record = taken.partition(b"\n")
        claimed = parse_parked(effect.ref, effect.user, record.decode())
        if claimed is None:
            return ClaimRefused(ref=effect.ref)
        if owner.decode() != self.process_id:
            # The owner forgets its copy (and closes its connection, if any).
            await redis.publish(
                f"{self.prefix}:proc:{owner.decode()}",
                b"taken\n" + self._origin + effect.token.encode(),
            )
        return claimed

    async def _heartbeat(self) -> None:
        """Refresh this process's heartbeat, probe the subscription, find gone processes."""
        redis = self._connected()
        ttl_ms = int(self.heartbeat_ttl * 1000)
        while True:
            # The probe counts from before the heartbeat: a Redis this process cannot
            # reach (a partition drops the packets, so the call only times out) leaves
            # it unechoed, and the subscriber, which hears nothing either way, gives up
            # its connection after ``probe_timeout`` instead of waiting on it forever.
            if self.listening and self._probe_sent is None:
                self._probe_sent = time.monotonic()
                probing = True
            else:
                probing = False
            with anyio.move_on_after(self.publish_timeout):
                try:
                    await redis.set(self.alive_key, b"1", px=ttl_ms)
                    if probing:
                        await redis.publish(self.control, b"probe")
                except (RedisError, OSError) as exc:
                    log.warning("bus heartbeat failed: %s", exc)
                    await _disconnect(redis)
            with anyio.move_on_after(self.publish_timeout * 2):
                try:
                    await self._find_gone(redis)
                except (RedisError, OSError) as exc:
                    log.warning("bus: reading heartbeats failed: %s", exc)
            await anyio.sleep(self.probe_interval)

    async def _find_gone(self, redis: Redis) -> None:
        head = self._alive("")
        alive: set[str] = set()
        async for key in redis.scan_iter(match=f"{head}*", count=1000):
            alive.add(key.decode().removeprefix(head))
        alive.discard(self.process_id)
        now = time.monotonic()
        for process in alive:
            self._seen[process] = now
        grace = self.process_grace
        if grace is None:
            grace = self._sink.config.grace_period if self._sink is not None else 30.0
        gone = [p for p, seen in self._seen.items() if p not in alive and now - seen > grace]
        for process in gone:
            del self._seen[process]  # once; heard from again later, it is new
            log.info("bus: process %s is gone (no heartbeat for %.0f s)", process, grace)
        self.tally.processes_gone += len(gone)
        self._feed([ProcessGone(origin=p) for p in gone])

    async def _subscriber(self) -> None:
        first = True
        while True:
            pubsub = self._client(reader=True).pubsub()
            try:
                await self._listen(pubsub, first=first)
            except (RedisError, OSError, _Deaf, TimeoutError) as exc:
                log.warning("bus subscription lost (%s); reconnecting", exc or type(exc).__name__)
            finally:
                self.listening = False
                self._probe_sent = None
                self._confirmed.clear()
                self._again.clear()  # (the next link confirms every channel anew)
                self.tally.channels = 0
                with (
                    anyio.CancelScope(shield=True),
                    anyio.move_on_after(self.publish_timeout),
                    contextlib.suppress(RedisError, OSError),
                ):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            first = False
            await anyio.sleep(self.reconnect_delay)

    async def _listen(self, pubsub: PubSub, *, first: bool) -> None:
        with anyio.fail_after(self.publish_timeout * 2):
            subscribed = set(self._held)
            await pubsub.subscribe(self.control, *subscribed)
            # Wait until Redis confirmed them all: only then is nothing published missed.
            pending = len(subscribed) + 1
            confirmed: list[str] = []
            while pending:
                confirm = await pubsub.get_message(timeout=self.publish_timeout)
                if confirm is not None and confirm["type"] == "subscribe":
                    pending -= 1
                    if (name := self._confirm(confirm["channel"])) is not None:
                        confirmed.append(name)
        self.listening = True
        if not first:
            self.tally.resyncs += 1
            log.info("bus subscription back: every held room checks its head")
        # Those channels only: one held since is confirmed by its own Subscribed.
        self._feed([BusResumed(), _subscribed(confirmed)])
        batch: list[Command] = []
        while True:
            fresh: list[str] = []  # engine channels newly confirmed
            if self._again:
                # Never unsubscribed (still in what Redis has): confirmed all along.
                again, self._again = self._again, []
                for channel in again:
                    name = self._name(channel)
                    if channel in subscribed and channel in self._confirmed and name is not None:
                        fresh.append(name)
            if self._held.keys() != subscribed:
                subscribed = await self._resubscribe(pubsub, subscribed)
            sent = self._probe_sent
            if sent is not None and time.monotonic() - sent > self.probe_timeout:
                self.tally.deaf += 1
                raise _Deaf("liveness probe not echoed")
            reply: dict[str, Any] | None = await pubsub.get_message(timeout=_POLL)
            while reply is not None:
                if reply.get("type") == "subscribe":
                    if (name := self._confirm(reply["channel"])) is not None:
                        fresh.append(name)
                elif reply.get("type") == "unsubscribe":
                    self._confirmed.discard(_text(reply["channel"]))
                    self.tally.channels = len(self._confirmed)
                else:
                    self._take(reply, batch)
                if len(batch) >= _FEED_BATCH:
                    break
                reply = await pubsub.get_message(timeout=0)
            if fresh:
                # Subscribed after the engine asked: whatever was published on these
                # channels before Redis confirmed them was missed. The engine asks the
                # log about these rooms and users now, not at the next probe.
                batch.append(_subscribed(fresh))
            if batch:
                self._feed(batch)
                batch = []

    def _confirm(self, channel: bytes | str) -> str | None:
        """Redis confirmed a subscription: the engine's name of the channel
        (``room:X``, ``user:Y``), None for this process's control channel."""
        name = _text(channel)
        self._confirmed.add(name)
        self.tally.channels = len(self._confirmed)
        return self._name(name)

    def _name(self, channel: str) -> str | None:
        """The engine's name of a Redis channel (None for the control channel)."""
        head = f"{self.prefix}:{{"
        if channel.startswith(head) and channel.endswith("}"):
            return channel[len(head) : -1]
        return None

    def _take(self, reply: dict[str, Any], batch: list[Command]) -> None:
        if reply.get("type") != "message" or not isinstance(data := reply["data"], bytes):
            return
        origin, sep, text = data.partition(b"\n")
        if reply["channel"] == self.control.encode():
            if data == b"probe":
                self._probe_sent = None  # the echo: we hear ourselves, so we hear others
            elif origin == b"taken" and sep:
                by, sep, token = text.partition(b"\n")
                if sep:
                    batch.append(SessionTaken(token=token.decode(errors="replace"), by=by.decode()))
            elif origin == b"ask" and sep:
                _, sep, rest = text.partition(b"\n")
                token, sep, user = rest.partition(b"\n")
                if sep:
                    batch.append(
                        SessionAsked(
                            token=token.decode(errors="replace"), user=user.decode(errors="replace")
                        )
                    )
            return
        if not sep or origin + b"\n" == self._origin:
            return  # our own: the engine has it already
        command = parse_bus(text.decode(errors="replace"))
        if command is None:
            log.warning("bus: a payload that is not chatcore's on %r; dropped", reply["channel"])
            return
        if isinstance(command, Shared):
            self._seen.setdefault(command.origin, time.monotonic())
            self.tally.facts_received += 1
        else:
            self.tally.received += 1
        batch.append(command)

    async def _resubscribe(self, pubsub: PubSub, have: set[str]) -> set[str]:
        want = set(self._held)
        with anyio.fail_after(self.publish_timeout * 2):
            if gone := have - want:
                await pubsub.unsubscribe(*gone)
            if new := want - have:
                await pubsub.subscribe(*new)
        return want


def _subscribed(names: list[str]) -> Subscribed:
    """The engine's command for channels Redis confirmed (``room:X``, ``user:Y``)."""
    rooms = tuple(n.removeprefix("room:") for n in names if n.startswith("room:"))
    users = tuple(n.removeprefix("user:") for n in names if n.startswith("user:"))
    return Subscribed(rooms=rooms, users=users)


def _text(channel: bytes | str) -> str:
    return channel.decode() if isinstance(channel, bytes) else channel


async def _disconnect(redis: Redis) -> None:
    with (
        anyio.CancelScope(shield=True),
        anyio.move_on_after(0.2),
        contextlib.suppress(RedisError, OSError),
    ):
        await redis.connection_pool.disconnect()
