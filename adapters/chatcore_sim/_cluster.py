"""A simulated cluster: several engines over one log and one bus, on one virtual clock.

Each :class:`Node` is a whole process as the Redis adapter makes one: an engine
with ``Config(cluster=True)``, the shared :class:`MemoryStore` as its log, and
a connection to the :class:`Bus`. After its own append is stored the node
publishes the message (``chatcore.bus_message``) on the room's channels; it
subscribes as the engine says (``RoomHeld``, ``UserHeld``), shares facts
(``Share``), parks sessions in a registry any node can claim from (asking the
others, ``SessionAsked``, when there is no record: the session may be live on
one of them), and feeds back what others published. The bus is pub/sub with
seeded faults (:class:`Faults`): it drops (anything, or presence facts
only), delays (so reorders across publishers), fails a
publish after the commit, confirms subscriptions late (``Subscribed``; a node
hears nothing on a channel before), and can be cut from one node for a while
(or only that node's publishes fail: ``Cluster.mute``). A message whose publish
failed because its node was cut or muted is kept and published again, in
order, once the node's link works (as ``RedisBus`` does); one the bus lost
silently (``drop``, ``fail_publish``, ``drop_if``) is not. Nothing sleeps; the
same seed gives the same run.
"""

from __future__ import annotations

import heapq
import json
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from chatcore import (
    Appended,
    BusResumed,
    ClaimRefused,
    ClaimSession,
    Command,
    Config,
    Effect,
    HeadsLoaded,
    LoadHeads,
    Mode,
    ProcessGone,
    RoomHeld,
    RoomReleased,
    SessionAsked,
    SessionGone,
    SessionParked,
    SessionTaken,
    Share,
    Subscribed,
    UserHeld,
    UserReleased,
    bus_channels,
    bus_fact,
    bus_message,
    dm_users,
    parked_record,
    parse_bus,
    parse_parked,
    user_channel,
)
from chatcore_store import MemoryStore

from ._sim import START, SimClient, Simulation

__all__ = ["Bus", "Cluster", "Faults", "Node"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Faults:
    """Seeded faults of the bus. Probabilities are per delivery (``drop``), per
    publish (``fail_publish``: the message is stored, its publish is lost)."""

    drop: float = 0.0
    drop_presence: float = 0.0
    """Per delivery of a presence fact (a member arriving, leaving or moving, a
    members tell, ask or digest): dropped, while messages and the rest go
    through, as when a subscriber's buffer overflows on a busy presence channel."""
    fail_publish: float = 0.0
    max_delay: float = 0.0
    """Each delivery takes up to this long (seconds), so deliveries from two
    publishers arrive in any order; one publisher's stay in order, as on Redis."""
    subscribe_delay: float = 0.0
    """Each subscription is confirmed up to this long (seconds) after it was asked
    for; until then the node hears nothing on that channel (Redis subscribes
    asynchronously). The node is fed ``Subscribed`` when it is confirmed."""


class Bus:
    """Channels, their subscribers, and deliveries in flight."""

    def __init__(self, rng: random.Random, faults: Faults) -> None:
        self.faults = faults
        self._rng = rng
        self.subscribers: dict[str, set[Node]] = {}
        self._flight: list[tuple[float, int, Node, str]] = []
        self._seq = 0
        self._last: dict[tuple[str, str], float] = {}  # (publisher, subscriber) -> time
        self.cut: set[str] = set()  # nodes cut off from the bus
        self.muted: set[str] = set()  # nodes whose publishes fail (they still hear)
        self.drop_if: Callable[[str], bool] | None = None
        """A test's own fault: a payload it returns True for is not published."""
        self.delay_if: Callable[[str], float] | None = None
        """A test's own reordering: each delivery of a payload takes this much longer
        (and holds back what its publisher sends after it, as on Redis)."""
        self.published = 0

    def publish(self, sender: Node, channels: Iterable[str], payload: str, now: float) -> bool:
        """Publish; False if it failed (the sender is cut off or muted), as the
        publisher learns; a payload lost on the way still counts as published."""
        if sender.name in self.cut or sender.name in self.muted:
            return False  # what was stored stays stored
        if self.drop_if is not None and self.drop_if(payload):
            return True
        self.published += 1
        receivers: set[Node] = set()
        for channel in channels:
            receivers |= self.subscribers.get(channel, set())
        for node in sorted(receivers, key=lambda n: n.name):
            if node is sender or not node.alive or node.name in self.cut:
                continue
            if self.faults.drop and self._rng.random() < self.faults.drop:
                continue
            if (
                self.faults.drop_presence
                and _presence(payload)
                and self._rng.random() < self.faults.drop_presence
            ):
                continue
            delay = self._rng.uniform(0, self.faults.max_delay) if self.faults.max_delay else 0.0
            if self.delay_if is not None:
                delay += self.delay_if(payload)
            pair = (sender.name, node.name)
            when = max(now + delay, self._last.get(pair, now))
            self._last[pair] = when
            self._seq += 1
            heapq.heappush(self._flight, (when, self._seq, node, payload))
        return True

    def next_time(self) -> float | None:
        return self._flight[0][0] if self._flight else None

    def pop(self) -> tuple[float, Node, str]:
        when, _, node, payload = heapq.heappop(self._flight)
        return when, node, payload


_PRESENCE = {"in", "out", "moved", "here", "ask", "sum"}


def _presence(payload: str) -> bool:
    """Whether a bus payload is a presence fact (``chatcore.bus_fact``'s kinds)."""
    if not payload.startswith('{"f":'):
        return False
    kind = json.loads(payload)["f"].get("k")
    return isinstance(kind, str) and kind in _PRESENCE


class Node(Simulation):
    """One process of the cluster."""

    def __init__(self, cluster: Cluster, name: str, config: Config, seed: int) -> None:
        super().__init__(config, seed=seed, store=cluster.store, store_latency=cluster.latency)
        self.cluster = cluster
        self.name = name
        self.alive = True
        self.execute_early = True
        self.channels: set[str] = set()
        self.kept: list[tuple[tuple[str, ...], str]] = []
        """Message publishes that failed, oldest first: published again when the link works."""

    def _answers(self, commands: list[Command]) -> list[Command]:
        cluster = self.cluster
        for command in commands:
            if isinstance(command, Appended) and command.ref is not None and not command.duplicate:
                faults = cluster.bus.faults
                if faults.fail_publish and cluster.rng.random() < faults.fail_publish:
                    continue
                message = command.message
                self._publish(bus_channels(message.room), bus_message(message))
        return commands

    def _publish(self, channels: tuple[str, ...], payload: str) -> None:
        # Behind one that failed, a message waits its turn: one channel's order holds.
        if self.kept or not self.cluster.bus.publish(self, channels, payload, self.now):
            self.kept.append((channels, payload))

    def republish(self) -> None:
        """The node's link works again: what failed goes out, in its order."""
        kept, self.kept = self.kept, []
        for channels, payload in kept:
            self._publish(channels, payload)

    def _effect(self, effect: Effect) -> None:
        cluster = self.cluster
        match effect:
            case RoomHeld():
                if dm_users(effect.room) is None:
                    self._subscribe(f"room:{effect.room}")
            case RoomReleased():
                if dm_users(effect.room) is None:
                    self._unsubscribe(f"room:{effect.room}")
            case UserHeld():
                self._subscribe(user_channel(effect.user))
            case UserReleased():
                self._unsubscribe(user_channel(effect.user))
            case Share():
                payload = bus_fact(self.name, effect.room, effect.fact)
                cluster.bus.publish(self, bus_channels(effect.room), payload, self.now)
            case SessionParked():
                cluster.records[effect.token] = (self, parked_record(effect), effect.until)
            case SessionGone():
                found = cluster.records.get(effect.token)
                if found is not None and found[0] is self:
                    del cluster.records[effect.token]
            case ClaimSession():
                answer = cluster.claim(self, effect)
                if answer is not None:
                    self._queue.append(answer)
                else:  # nobody handed it over: refused once the claim's bound ran out
                    self._seq += 1
                    when = self.now + cluster.claim_timeout
                    refused: list[Command] = [ClaimRefused(ref=effect.ref)]
                    heapq.heappush(self._later, (when, self._seq, refused))

    def connect_as(self, client: SimClient) -> SimClient:
        """A new connection of ``client``'s user resuming its session (its token and
        offsets), as a new client: the old one stays as it is."""
        twin = SimClient(self, client.user, client.rooms, client.mode, client.answer_pings)
        twin.token, twin.session = client.token, client.session
        twin.offsets, twin.epochs = dict(client.offsets), dict(client.epochs)
        self.clients.append(twin)
        self._open(twin, resume=True)
        return twin

    def _subscribe(self, channel: str) -> None:
        self.channels.add(channel)
        self.cluster.subscribe(self, channel)

    def confirm(self, channel: str) -> None:
        """The bus confirmed ``channel``: the node hears it from now on, and is told."""
        if not self.alive or channel not in self.channels:
            return  # unsubscribed meanwhile
        self.cluster.bus.subscribers.setdefault(channel, set()).add(self)
        if self.name in self.cluster.bus.cut:
            return  # confirmed with every other channel when the bus is back
        kind, _, name = channel.partition(":")
        rooms, users = ((name,), ()) if kind == "room" else ((), (name,))
        self._queue.append(Subscribed(rooms=rooms, users=users))

    def _unsubscribe(self, channel: str) -> None:
        self.channels.discard(channel)
        self.cluster.bus.subscribers.get(channel, set()).discard(self)

    def next_time(self) -> float | None:
        times = (self.engine.next_deadline(), self._later[0][0] if self._later else None)
        found = [t for t in times if t is not None]
        return min(found) if found else None


class Cluster:
    """``n`` nodes over one :class:`MemoryStore` and one :class:`Bus`.

    ``heartbeat`` is how long after a node dies the others are told
    (``ProcessGone``): its heartbeat key's time to live plus the grace period.
    ``claim_timeout`` is how long a claim that found no record waits for the
    session's owner to hand it over before it is refused.
    """

    def __init__(
        self,
        n: int = 3,
        config: Config | None = None,
        *,
        seed: int = 0,
        faults: Faults | None = None,
        store_latency: float = 0.0,
        heartbeat: float = 40.0,
        claim_timeout: float = 1.0,
    ) -> None:
        self.config = replace(config or Config(), cluster=True)
        self.rng = random.Random(seed)
        self.store = MemoryStore()
        self.latency = store_latency
        self.bus = Bus(self.rng, faults or Faults())
        self.records: dict[str, tuple[Node, str, float]] = {}
        self.lost: set[str] = set()  # epochs whose history the log lost
        self.heartbeat = heartbeat
        self.claim_timeout = claim_timeout
        self.now = START
        self.nodes = [Node(self, f"p{i}", self.config, seed * 100 + i) for i in range(n)]
        self._gone: list[tuple[float, str]] = []
        self._resume_bus: list[tuple[float, str, bool]] = []  # (when, node, muted only)
        self._subs: list[tuple[float, int, Node, str]] = []  # subscriptions being confirmed
        self._sub_seq = 0

    # -- what a test does ---------------------------------------------------------

    def connect(
        self,
        node: int,
        user: str,
        room: str | None = None,
        *,
        rooms: Iterable[str] = (),
        mode: Mode = Mode.JSON,
    ) -> SimClient:
        """Open a client for ``user`` on node number ``node``."""
        return self.nodes[node].connect(user, room, rooms=rooms, mode=mode)

    def move(self, client: SimClient, node: int) -> None:
        """The client's connection drops and it resumes on ``node``."""
        old = client.sim
        if client.conn is not None:
            if isinstance(old, Node) and not old.alive:
                client.conn = None
            else:
                old.drop(client)
        target = self.nodes[node]
        client.sim = target
        target.clients.append(client)
        target._open(client, resume=True)

    def reconnect(self, client: SimClient, node: int) -> SimClient:
        """The client's link died silently (its old process has not noticed: the old
        connection stays open there) and it resumes on ``node`` with a new one."""
        return self.nodes[node].connect_as(client)

    def kill(self, node: int) -> None:
        """``kill -9``: the node stops; its clients' connections are gone with it.
        The others learn it once its heartbeat expires (``ProcessGone``)."""
        dead = self.nodes[node]
        dead.alive = False
        for client in dead.clients:
            if client.sim is dead and client.conn is not None:
                dead._by_conn.pop(client.conn, None)
                client.conn = None
        for channel in dead.channels:
            self.bus.subscribers.get(channel, set()).discard(dead)
        self._gone.append((self.now + self.heartbeat, dead.name))

    def cut(self, node: int, seconds: float) -> None:
        """Cut the node off the bus for ``seconds``; then it reconnects (``BusResumed``)
        and publishes again what failed meanwhile."""
        name = self.nodes[node].name
        self.bus.cut.add(name)
        self._resume_bus.append((self.now + seconds, name, False))

    def mute(self, node: int, seconds: float) -> None:
        """The node's publishes fail for ``seconds`` (its publishing link is down, its
        subscription is not: no ``BusResumed``); then it publishes what failed."""
        name = self.nodes[node].name
        self.bus.muted.add(name)
        self._resume_bus.append((self.now + seconds, name, True))

    def lose(self, room: str) -> None:
        """The log loses the room's data: its history starts a new life (new epoch)."""
        stored = self.store.messages(room)
        before = self.store.execute_now([LoadHeads(ref=0, rooms=(room,))])[0]
        if isinstance(before, HeadsLoaded) and room in before.heads:
            self.lost.add(before.heads[room][1])
        elif stored:
            self.lost.add(stored[-1].epoch)
        self.store.lose(room)

    def subscribe(self, node: Node, channel: str) -> None:
        """The node asked for ``channel``: confirmed now, or after a seeded delay."""
        delay = self.bus.faults.subscribe_delay
        if delay <= 0:
            node.confirm(channel)
            return
        self._sub_seq += 1
        when = self.now + self.rng.uniform(0, delay)
        heapq.heappush(self._subs, (when, self._sub_seq, node, channel))

    def _confirmed(self, node: Node) -> Subscribed:
        """Every channel the node is subscribed to (as after a reconnect)."""
        heard = sorted(c for c, nodes in self.bus.subscribers.items() if node in nodes)
        rooms = tuple(c.removeprefix("room:") for c in heard if c.startswith("room:"))
        users = tuple(c.removeprefix("user:") for c in heard if c.startswith("user:"))
        return Subscribed(rooms=rooms, users=users)

    def claim(self, claimer: Node, effect: ClaimSession) -> Command | None:
        """Take the record (asking the others first if there is none); None if
        nobody handed it over (the claim is refused once its bound ran out)."""
        found = self.records.get(effect.token)
        if found is None or found[2] < self.now:
            # The session may be live on another node: its owner parks it at once.
            ask = SessionAsked(token=effect.token, user=effect.user)
            for node in self.nodes:
                if node is not claimer and node.alive and node.name not in self.bus.cut:
                    node.feed(ask)
            found = self.records.get(effect.token)
            if found is None or found[2] < self.now:
                return None
        owner, record, _ = found
        answer = parse_parked(effect.ref, effect.user, record)
        if answer is None:
            return ClaimRefused(ref=effect.ref)  # not this user's: the record stays
        del self.records[effect.token]
        if owner is not claimer and owner.alive:
            owner._queue.append(SessionTaken(token=effect.token, by=claimer.name))
        return answer

    def advance(self, seconds: float) -> None:
        """Move every node's clock forward together, delivering the bus on time."""
        until = self.now + seconds
        while True:
            events: list[tuple[float, int]] = []
            for i, node in enumerate(self.nodes):
                t = node.next_time() if node.alive else None
                if t is not None:
                    events.append((t, i))
            if (t := self.bus.next_time()) is not None:
                events.append((t, -1))
            for when, _ in self._gone:
                events.append((when, -2))
            for when, _, _ in self._resume_bus:
                events.append((when, -3))
            if self._subs:
                events.append((self._subs[0][0], -4))
            due = [e for e in events if e[0] <= until]
            if not due:
                break
            when, which = min(due)
            when = max(when, self.now)
            self.now = when
            self._catch_up(when)
            if which >= 0:
                continue  # the node ran what was due in _catch_up
            if which == -1:
                _, node, payload = self.bus.pop()
                command = parse_bus(payload)
                if command is not None and node.alive and node.name not in self.bus.cut:
                    node.feed(command)
            elif which == -2:
                self._gone.sort()
                _, name = self._gone.pop(0)
                for node in self.nodes:
                    if node.alive:
                        node.feed(ProcessGone(origin=name))
            elif which == -4:
                _, _, node, channel = heapq.heappop(self._subs)
                node.confirm(channel)
                node._settle()
            else:
                self._resume_bus.sort()
                _, name, muted = self._resume_bus.pop(0)
                (self.bus.muted if muted else self.bus.cut).discard(name)
                for node in self.nodes:
                    if node.name == name and node.alive:
                        node.republish()
                        if not muted:
                            node.feed(BusResumed())
                            node.feed(self._confirmed(node))
        self.now = until
        self._catch_up(until)

    def settle(self, seconds: float | None = None) -> None:
        """Let everything in flight arrive and every probe run (two probe intervals)."""
        self.advance(seconds if seconds is not None else 2 * self.config.head_probe_interval)

    def _catch_up(self, when: float) -> None:
        for node in self.nodes:
            if node.alive:
                node.advance(max(0.0, when - node.now))
                node._settle()  # what another node told it (SessionTaken)
            else:
                node.now = max(node.now, when)
