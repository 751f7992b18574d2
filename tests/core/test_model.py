"""Random chat histories against a plain model of what every client should see.

Clients join, leave, send, retry, type, read, page history, send DMs, stop
reading, drop and resume, while the virtual clock jumps. Next to the
simulator runs :class:`Model`: plain dicts and lists of who is in which room,
which sessions are live or detached (and until when), every read mark and
typing indicator, with the log's order taken from the store. Every rule tells
the model what the client did; the model predicts what each client must
receive. The invariant, checked after every step:

* every event of a kind the model predicts (``members``, ``joined``, ``left``,
  ``typing``, ``read``, ``history``, ``error``) that a reading client received
  during the step is exactly the multiset the model predicted for it, nothing
  missing and nothing extra (the engine may drop presence events for a client
  past half its outbox, documented in docs/engine.md, so a client that had
  that many frames outstanding at once during the step is not compared);
* every ``welcome`` says ``resumed`` exactly when the model says the session
  was still in its grace period, with the same session, the same rooms, the
  resume points the client asked for and the user's read marks;
* the engine's own views agree with the model: ``engine.members(room)`` is the
  model's presence, ``engine.session(id)`` has the model's state and rooms
  (and is None once the grace period has run out), and ``engine.stats()``
  holds exactly the model's sessions, connections and rooms, exactly the
  newest ``history_window`` messages per room, and no more timers than one
  per connection, detached session and typing indicator plus those it gave up
  on that have not come due yet;
* every message a client receives is the log's message at that offset, and
  per room each client's stream (messages plus acks of its own) is gap-free and
  without repeats from its join point on, across every resume that says
  ``resumed: true`` (nothing lost, nothing duplicated, same order for all);
  a client that is connected and reading has everything the log holds;
* nobody off a private room's allow list, and nobody outside a DM pair, ever
  receives anything of that room;
* no client's own queue of unread frames ever holds more than the outbox
  bounds, and a slow consumer is closed only once it has fallen behind;
* a client message id retried any number of times is stored (and broadcast) once.

Every run also starts with a reader that stops reading, is sent messages, drops
with them unread and resumes: the session must replay exactly what it missed.

Half the runs report writes as a server that knows when a queue is empty does,
one ``Drained`` for all the readers it emptied, instead of a ``Written`` count
per client (the outbox counts of a room's whole fan-out then reset at once).

The model is exact when the store answers at once; with a slow store (a third
of the runs) the stream, privacy, bound and retry checks still apply.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from chatcore import (
    Close,
    Config,
    Deliver,
    Drained,
    Effect,
    Publish,
    SessionState,
    dm_room,
    dm_users,
)
from chatcore_sim import SimClient, Simulation

USERS = ["alice", "alice", "bob", "carol", "dave"]  # alice has two tabs
ROOMS = ["general", "tech", "staff"]
STAFF = frozenset({"alice", "bob"})
CONFIG = Config(
    outbox_frames=12,
    rate_burst=8,
    rate_per_second=4.0,
    history_window=4,
    grace_period=30.0,
    typing_ttl=5.0,
    ping_interval=25.0,
    pong_timeout=20.0,
    # Chat messages are rate limited (the store tells the model which were
    # taken); other requests are not, so that every join, read and typing has
    # one predictable answer (test_chat.py covers that limit).
    request_burst=10_000,
    request_per_second=10_000.0,
)
SOFT_FRAMES = max(1, CONFIG.outbox_frames // 2)
# A closed connection's heartbeat timer comes due within this long.
HEARTBEAT = max(CONFIG.ping_interval, CONFIG.pong_timeout)
PREDICTED = {"members", "joined", "left", "typing", "read", "history", "error"}

slots = st.integers(0, len(USERS) - 1)
rooms = st.sampled_from(ROOMS)


def admits(user: str, room: str) -> bool:
    if room == "staff":
        return user in STAFF
    pair = dm_users(room)
    return pair is None or user in pair


def event_key(event: dict[str, Any]) -> tuple[Any, ...]:
    """What of an event the model predicts (offsets of messages are the streams' job)."""
    kind = event["type"]
    if kind == "members":
        return (kind, event["room"], tuple(event["users"]))
    if kind in ("joined", "left"):
        return (kind, event["room"], event["user"])
    if kind == "typing":
        return (kind, event["room"], event["user"], event["active"])
    if kind == "read":
        return (kind, event["room"], event["user"], event["offset"])
    if kind == "history":
        offsets = tuple(m["offset"] for m in event["messages"])
        return (kind, event["room"], offsets, event["more"])
    return (kind, event["code"], event["ref"])


class MeasuredSimulation(Simulation):
    """The simulator, watching each client's own queue of unread frames.

    Every frame the engine hands a client lands in that client's queue; the
    check here is on the queue, not on the engine's counters. ``peak`` records
    per client the most frames that could have been outstanding at once (the
    client's queue when a run of commands began, plus what arrived during it).
    """

    def __init__(
        self, config: Config, *, seed: int, store_latency: float, drained: bool = False
    ) -> None:
        super().__init__(config, seed=seed, store_latency=store_latency)
        self.peak: dict[SimClient, int] = {}
        self._window: dict[SimClient, int] = {}
        self._depth = 0
        # Report writes as a server that knows when a queue is empty does: one
        # ``Drained`` for every reader emptied, instead of a ``Written`` count each.
        self.drained = drained

    def _drain(self, clients: Iterable[SimClient]) -> None:
        if not self.drained:
            super()._drain(clients)
            return
        emptied = []
        for client in clients:
            if client.reading and client.conn is not None and client._unread:
                client._read_all()
                emptied.append(client.conn)
        if emptied:
            self._queue.append(Drained(conns=tuple(emptied)))

    def _settle(self) -> None:
        self._enter()
        try:
            super()._settle()
        finally:
            self._leave()

    def _run(self, effects: list[Effect]) -> None:
        self._enter()
        try:
            self._check_queues(effects)
            super()._run(effects)
        finally:
            self._leave()

    def _check_queues(self, effects: list[Effect]) -> None:
        queued: dict[SimClient, list[int]] = {}
        for effect in effects:
            if isinstance(effect, Deliver):
                for conn in effect.to:
                    client = self._by_conn[conn]
                    if client not in queued:
                        unread = client._unread
                        queued[client] = [len(unread), sum(len(d.encode()) for d in unread)]
                    q = queued[client]
                    q[0] += 1
                    q[1] += effect.size
                    assert q[0] <= CONFIG.outbox_frames, ("outbox over its frames", client)
                    assert q[1] <= CONFIG.outbox_bytes, ("outbox over its bytes", client)
                    self._window[client] = self._window.get(client, len(client._unread)) + 1
            elif isinstance(effect, Close) and effect.reason == "slow consumer":
                client = self._by_conn[effect.conn]
                frames = queued.get(client, [len(client._unread)])[0]
                if not client.reading:  # a reader's Written may lag its queue
                    # Only a client that fell behind (past half its outbox) is too slow.
                    assert frames >= SOFT_FRAMES, ("closed while keeping up", client, frames)

    def _enter(self) -> None:
        if self._depth == 0:
            self._window = {}
        self._depth += 1

    def _leave(self) -> None:
        self._depth -= 1
        if self._depth == 0:
            for client, frames in self._window.items():
                self.peak[client] = max(self.peak.get(client, 0), frames)


# -- the model ---------------------------------------------------------------------------


@dataclass(eq=False)
class Sess:
    """One session as the model sees it."""

    user: str
    client: SimClient
    rooms: dict[str, None] = field(default_factory=dict)  # in join order
    live: bool = True
    grace: tuple[float, int] | None = None  # (when it expires, order set) while detached
    sid: str | None = None  # known once its client reads the welcome


@dataclass
class Welcome:
    resumed: bool
    sid: str | None
    rooms: dict[str, tuple[int | None, int]]  # room -> (resume point or None, read mark)


class Model:
    """What the chat should look like, kept in plain dicts and lists.

    The store is the log: a room's head is the number of messages it holds.
    """

    def __init__(self, sim: MeasuredSimulation) -> None:
        self.sim = sim
        self.sessions: list[Sess] = []  # alive (live or in their grace period), oldest first
        self.ended: list[Sess] = []
        self.serving: dict[SimClient, Sess] = {}  # the session a client's connection serves
        self.known: dict[SimClient, Sess] = {}  # the session whose welcome the client read
        self.welcomes: dict[SimClient, Welcome] = {}
        self.marks: dict[tuple[str, str], int] = {}  # (room, user) -> read mark
        self.saved: dict[tuple[str, str], int] = {}  # what the store keeps of those marks
        self.typing: dict[str, dict[str, list[float]]] = {}  # room -> user -> [until, due, order]
        self.dm_rooms: set[str] = set()
        self.expected: dict[SimClient, Counter[tuple[Any, ...]]] = {}
        # Timers the engine has no more use for stay in its heap until they come due
        # (it invalidates them lazily): when each of those comes due, at the latest.
        self.abandoned: list[float] = []
        self.order = 0

    # -- reading the model ---------------------------------------------------------------

    @property
    def now(self) -> float:
        return self.sim.now

    def head(self, room: str) -> int:
        return len(self.sim.store.messages(room))

    def presence(self, room: str) -> set[str]:
        return {s.user for s in self.sessions if room in s.rooms}

    def attached(self, room: str) -> list[SimClient]:
        """Clients whose connections are live in the room. (One that fell behind
        misses presence events until it catches up; such a client is not compared
        in that step, and a reading one has caught up by the end of it.)"""
        return [s.client for s in self.sessions if s.live and room in s.rooms]

    def live_session(self, client: SimClient) -> Sess:
        session = self.serving[client]
        assert session.live, ("model lost track", client)
        assert session in self.sessions, ("model lost track", client)
        return session

    def held_rooms(self) -> set[str]:
        return {room for s in self.sessions for room in s.rooms}

    def expect(self, client: SimClient, *key: Any) -> None:
        self.expected.setdefault(client, Counter())[key] += 1

    def _next_order(self) -> int:
        self.order += 1
        return self.order

    # -- connections ---------------------------------------------------------------------

    def connect(self, client: SimClient, *, resume: bool) -> None:
        old = self.known.get(client) if resume else None
        if old is not None and old in self.sessions:
            session, resumed = old, True
            if session.grace is not None:
                self.abandoned.append(session.grace[0])
            session.live, session.grace = True, None
            wanted = [r for r in dict.fromkeys(client.rooms) if r not in session.rooms]
            asked = {r: o for r, o in client.offsets.items() if r in session.rooms}
        else:
            mine = [s for s in self.sessions if s.user == client.user]
            if len(mine) >= CONFIG.max_sessions_per_user:
                oldest = next(s for s in mine if not s.live)
                assert oldest.grace is not None
                self.abandoned.append(oldest.grace[0])
                self.expire(oldest)
            session, resumed = Sess(client.user, client), False
            self.sessions.append(session)
            wanted = list(dict.fromkeys(client.rooms))
            limit = CONFIG.max_rooms_per_session - len(wanted)
            wanted += [r for r in self.inbox(client.user)[:limit] if r not in wanted]
            asked = {}
        self.serving[client] = session
        for room in wanted:
            if not admits(client.user, room):
                self.expect(client, "error", "forbidden", room)
            else:
                self.add_member(session, room, announce=False)
        self.welcomes[client] = Welcome(
            resumed,
            session.sid if resumed else None,
            {
                room: (
                    min(asked[room], self.head(room)) if room in asked else None,
                    self.marks.get((room, client.user), 0),
                )
                for room in session.rooms
            },
        )
        for room in session.rooms:
            self.expect(client, "members", room, tuple(sorted(self.presence(room))))

    def inbox(self, user: str) -> list[str]:
        """Direct-message rooms with news for ``user``, newest first."""
        found = []
        for room in self.dm_rooms:
            messages = self.sim.store.messages(room)
            if (
                user in (dm_users(room) or ())
                and len(messages) > self.saved.get((user, room), 0)
                and messages[-1].sender != user
            ):
                found.append((-messages[-1].ts, room))
        return [room for _, room in sorted(found)]

    def welcomed(self, client: SimClient, event: dict[str, Any]) -> None:
        want = self.welcomes.pop(client)
        session = self.serving[client]
        assert event["resumed"] == want.resumed, ("resumed", client, event)
        if want.resumed:
            assert event["session"] == want.sid, ("another session", client, event)
        else:
            session.sid = event["session"]
        assert set(event["rooms"]) == set(want.rooms), ("welcome rooms", client, event)
        for room, (offset, read) in want.rooms.items():
            position = event["rooms"][room]
            if offset is not None:
                assert position["offset"] == offset, ("resume point", client, room, event)
            assert 0 <= position["offset"] <= self.head(room), ("welcome offset", client, event)
            assert position["read"] == read, ("read mark in welcome", client, room, event)
        self.known[client] = session

    def detach(self, session: Sess) -> None:
        """The transport is gone: the grace period starts."""
        session.live = False
        session.grace = (self.now + CONFIG.grace_period, self._next_order())
        self.abandoned.append(self.now + HEARTBEAT)  # the connection's heartbeat

    def expire(self, session: Sess) -> None:
        for room in list(session.rooms):
            self.remove_member(session, room)
        self.sessions.remove(session)
        self.ended.append(session)

    # -- rooms -------------------------------------------------------------------------------

    def add_member(self, session: Sess, room: str, *, announce: bool) -> None:
        if session.user not in self.presence(room):
            for client in self.attached(room):
                self.expect(client, "joined", room, session.user)
        session.rooms[room] = None
        if session.live and announce:
            self.expect(session.client, "members", room, tuple(sorted(self.presence(room))))

    def remove_member(self, session: Sess, room: str) -> None:
        del session.rooms[room]
        if session.user not in self.presence(room):
            self.stop_typing(room, session.user)
            for client in self.attached(room):
                self.expect(client, "left", room, session.user)
        if session.live:
            self.expect(session.client, "left", room, session.user)
        # A room nobody is in is dropped from memory, but its read marks are not lost:
        # the store keeps them and the room's next load brings them back
        # (RoomLoaded.reads), so a later welcome shows the same ``read``.

    def join(self, client: SimClient, room: str) -> None:
        session = self.live_session(client)
        if room in session.rooms:
            self.expect(client, "members", room, tuple(sorted(self.presence(room))))
        elif not admits(client.user, room):
            self.expect(client, "error", "forbidden", room)
        else:
            self.add_member(session, room, announce=True)

    def leave(self, client: SimClient, room: str) -> None:
        session = self.live_session(client)
        if room not in session.rooms:
            self.expect(client, "error", "not_member", room)
        else:
            self.remove_member(session, room)

    def member(self, client: SimClient, room: str, ref: str | None = None) -> Sess | None:
        session = self.live_session(client)
        if room in session.rooms:
            return session
        self.expect(client, "error", "not_member", ref or room)
        return None

    def direct(self, client: SimClient, to: str) -> None:
        """A DM makes both users members of their room (every session of the recipient)."""
        session = self.live_session(client)
        room = dm_room(client.user, to)
        self.dm_rooms.add(room)
        for s in [session, *(s for s in self.sessions if s.user == to)]:
            if room not in s.rooms:
                self.add_member(s, room, announce=True)

    def sent(self, user: str, room: str) -> None:
        """The log took a message of ``user``: their typing indicator goes, silently."""
        self.stop_typing(room, user)

    # -- typing and read marks -----------------------------------------------------------

    def start_typing(self, client: SimClient, room: str) -> None:
        if self.member(client, room) is None:
            return
        user, until = client.user, self.now + CONFIG.typing_ttl
        indicators = self.typing.setdefault(room, {})
        previous = indicators.get(user)
        # A refresh within half the lifetime extends the indicator silently.
        announce = previous is None or previous[0] - self.now < CONFIG.typing_ttl / 2
        if previous is None:
            indicators[user] = [until, until, self._next_order()]
        else:
            previous[0] = until
        if announce:
            for other in self.attached(room):
                if other.user != user:
                    self.expect(other, "typing", room, user, True)

    def stop_typing(self, room: str, user: str) -> None:
        """The indicator goes silently (a message, the user gone); its timer stays."""
        entry = self.typing.get(room, {}).pop(user, None)
        if entry is not None:
            self.abandoned.append(entry[1])

    def read(self, client: SimClient, room: str, offset: int) -> None:
        if self.member(client, room) is None:
            return
        offset = min(offset, self.head(room))
        key = (room, client.user)
        if offset <= self.marks.get(key, 0):
            return
        self.marks[key] = offset
        self.saved[client.user, room] = max(self.saved.get((client.user, room), 0), offset)
        for other in self.attached(room):
            if other is not client:
                self.expect(other, "read", room, client.user, offset)

    def history(self, client: SimClient, room: str, before: int | None, limit: int) -> None:
        self.live_session(client)
        if not admits(client.user, room):
            self.expect(client, "error", "forbidden", room)
            return
        head = self.head(room)
        before = head + 1 if before is None else min(before, head + 1)
        first = max(1, before - min(limit, CONFIG.history_page_max))
        self.expect(client, "history", room, tuple(range(first, before)), first > 1)

    # -- time ------------------------------------------------------------------------------

    def advance(self, seconds: float) -> None:
        """Run every typing expiry and grace period due, in the order they were set."""
        until = self.now + seconds
        while True:
            due: list[tuple[float, int, str, Any]] = [
                (entry[1], int(entry[2]), room, user)
                for room, indicators in self.typing.items()
                for user, entry in indicators.items()
            ]
            due += [(*s.grace, "", s) for s in self.sessions if s.grace is not None]
            due = [d for d in due if d[0] <= until]
            if not due:
                return
            when, _, room, what = min(due, key=lambda d: (d[0], d[1]))
            if isinstance(what, Sess):
                what.grace = None
                self.expire(what)
                continue
            entry = self.typing[room][what]
            if entry[0] > when:  # refreshed since: the timer moves on
                entry[1], entry[2] = entry[0], self._next_order()
                continue
            del self.typing[room][what]
            for client in self.attached(room):
                if client.user != what:
                    self.expect(client, "typing", room, what, False)

    def timer_allowance(self) -> int:
        """Timers the engine may hold: one per connection (its heartbeat), detached
        session (its grace period) and typing indicator, plus those abandoned and
        not yet due."""
        live = sum(1 for s in self.sessions if s.live)
        detached = len(self.sessions) - live
        indicators = sum(len(i) for i in self.typing.values())
        self.abandoned = [t for t in self.abandoned if t > self.now]
        return live + detached + indicators + len(self.abandoned)


# -- per client ---------------------------------------------------------------------------


class Tracker:
    """What one client has seen, per room, and the checks on each new event."""

    def __init__(self, client: SimClient, model: Model | None) -> None:
        self.client = client
        self.model = model
        self.seen: dict[str, int] = {}
        self.cursor = 0
        self.sent_ids: set[str] = set()

    def check(self, sim: Simulation) -> list[dict[str, Any]]:
        """Check the events read since the last call; return them."""
        user = self.client.user
        new = self.client.events[self.cursor :]
        self.cursor = len(self.client.events)
        for event in new:
            kind = event["type"]
            room = event.get("room")
            if isinstance(room, str):
                assert kind == "error" or admits(user, room), ("privacy", user, event)
            if kind == "welcome":
                fresh = {r: p["offset"] for r, p in event["rooms"].items()}
                if event["resumed"]:
                    for r, offset in fresh.items():
                        if r in self.seen:
                            assert offset == self.seen[r], ("resume point", user, r)
                self.seen = fresh
                if self.model is not None:
                    self.model.welcomed(self.client, event)
            elif kind == "members":
                self.seen.setdefault(room, event["offset"])
            elif kind == "message":
                assert room in self.seen, ("message for a room not joined", user, event)
                assert event["offset"] == self.seen[room] + 1, (
                    "gap or repeat",
                    user,
                    event,
                    self.seen[room],
                )
                self.seen[room] = event["offset"]
                stored = sim.store.messages(room)[event["offset"] - 1]
                assert (stored.sender, stored.text) == (event["from"], event["text"])
            elif kind == "ack":
                if room not in self.seen:
                    continue
                if event["offset"] == self.seen[room] + 1:
                    self.seen[room] = event["offset"]
                else:
                    # Only a retried id may be acked again, with its original offset.
                    assert event["id"] in self.sent_ids, ("unexpected ack", user, event)
                    assert event["offset"] <= self.seen[room], (
                        "ack out of order",
                        user,
                        event,
                        self.seen[room],
                    )
            elif kind == "left" and event["user"] == user:
                self.seen.pop(room, None)
            elif kind == "read":
                assert 0 < event["offset"] <= len(sim.store.messages(room)), ("read mark", event)
            elif kind == "history":
                offsets = [m["offset"] for m in event["messages"]]
                assert offsets == list(
                    range(offsets[0], offsets[0] + len(offsets)) if offsets else []
                )
                assert event["more"] == (bool(offsets) and offsets[0] > 1), ("more", event)
                for m in event["messages"]:
                    stored = sim.store.messages(room)[m["offset"] - 1]
                    assert stored.text == m["text"]
        return new


# -- the machine --------------------------------------------------------------------------


class ChatModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.sim = MeasuredSimulation(CONFIG, seed=0, store_latency=0.0)
        self.model: Model | None = None
        self.trackers: list[Tracker | None] = [None] * len(USERS)
        self.counter = 0
        self.step_start: dict[SimClient, tuple[int | None, bool]] = {}

    @initialize(
        latency=st.sampled_from([0.0, 0.0, 0.7]),
        drained=st.booleans(),
        seed=st.integers(0, 2**16),
        wanted=st.lists(
            st.lists(rooms, max_size=3, unique=True), min_size=len(USERS), max_size=len(USERS)
        ),
        unread_slot=slots,
        unread=st.integers(1, 6),
    )
    def setup(
        self,
        latency: float,
        drained: bool,
        seed: int,
        wanted: list[list[str]],
        unread_slot: int,
        unread: int,
    ) -> None:
        self.sim = MeasuredSimulation(CONFIG, seed=seed, store_latency=latency, drained=drained)
        self.model = Model(self.sim) if latency == 0 else None
        self.sim.create_room("staff", allow=STAFF)
        # Everyone starts connected, so that every step has someone to act on.
        for slot, user in enumerate(USERS):
            self.open(slot, self.sim.connect(user, rooms=["general", *wanted[slot]]))
        self.advance(1.0)
        # Every run resumes a session that dropped with frames unread.
        self.check_step()
        self.unread_then_drop(unread_slot, unread, resume=True)

    def open(self, slot: int, client: SimClient) -> None:
        """``client`` was just connected for ``slot``: track it, tell the model."""
        self.trackers[slot] = Tracker(client, self.model)
        if self.model is not None:
            self.model.connect(client, resume=False)

    def client(self, slot: int) -> SimClient | None:
        tracker = self.trackers[slot]
        return None if tracker is None else tracker.client

    def connected(self, slot: int) -> SimClient | None:
        client = self.client(slot)
        return client if client is not None and client.connected else None

    # -- connections ---------------------------------------------------------------------

    @rule(slot=slots, wanted=st.lists(rooms, max_size=3, unique=True))
    def connect_fresh(self, slot: int, wanted: list[str]) -> None:
        if self.connected(slot) is not None:
            self.drop(slot)
        self.open(slot, self.sim.connect(USERS[slot], rooms=wanted))

    @rule(slot=slots)
    def drop(self, slot: int) -> None:
        if (client := self.connected(slot)) is not None:
            self.sim.drop(client)
            if self.model is not None:
                self.model.detach(self.model.live_session(client))

    @rule(slot=slots)
    def resume(self, slot: int) -> None:
        client = self.client(slot)
        if client is not None and not client.connected and client.token is not None:
            if self.model is not None:
                self.model.connect(client, resume=True)
            self.sim.resume(client)

    @rule(slot=slots, reading=st.booleans())
    def reading(self, slot: int, reading: bool) -> None:
        if (client := self.client(slot)) is not None:
            if reading:
                client.start_reading()
            else:
                client.stop_reading()

    @rule(seconds=st.sampled_from([0.1, 1.0, 3.0, 6.0, 20.0, 31.0]))
    def advance(self, seconds: float) -> None:
        if self.model is not None:
            self.model.advance(seconds)
        self.sim.advance(seconds)

    @rule(slot=slots, count=st.integers(1, 6), resume=st.booleans())
    def unread_then_drop(self, slot: int, count: int, resume: bool) -> None:
        """A reader stops reading, messages arrive, the transport drops with them unread."""
        client = self.connected(slot)
        if client is None or client.conn is None:
            return
        info = self.sim.engine.session_of(client.conn)
        if info is None or not info.rooms:
            return
        room = info.rooms[0]
        client.stop_reading()
        for _ in range(count):
            self.counter += 1
            self.sim.feed(Publish(room=room, sender="host", text=f"n{self.counter}"))
        if self.model is None:
            self.sim.advance(1.0)  # the slow store answers: the messages arrive unread
        self.notice_closes()
        if client.connected:
            self.drop(slot)
        if resume and client.token is not None:
            self.resume(slot)
            client.start_reading()

    # -- chat ------------------------------------------------------------------------------

    @rule(slot=slots, room=rooms, with_id=st.booleans())
    def send(self, slot: int, room: str, with_id: bool) -> None:
        if (client := self.connected(slot)) is None:
            return
        self.counter += 1
        tracker = self.trackers[slot]
        assert tracker is not None
        cid = f"{client.user}-{self.counter}" if with_id else None
        if cid:
            tracker.sent_ids.add(cid)
        self.send_text(client, f"t{self.counter}", room, cid)

    def send_text(self, client: SimClient, text: str, room: str, cid: str | None) -> None:
        model = self.model
        if model is not None and model.member(client, room, cid) is None:
            client.send(text, room, id=cid)
            return
        before = len(self.sim.store.messages(room))
        client.send(text, room, id=cid)
        if model is not None and len(self.sim.store.messages(room)) > before:
            model.sent(client.user, room)

    @rule(slot=slots, room=rooms, count=st.integers(2, 8))
    def burst(self, slot: int, room: str, count: int) -> None:
        for _ in range(count):
            self.send(slot, room, with_id=True)

    @rule(slot=slots, data=st.data())
    def retry(self, slot: int, data: st.DataObject) -> None:
        tracker = self.trackers[slot]
        if tracker is None or not tracker.sent_ids or not tracker.client.connected:
            return
        cid = data.draw(st.sampled_from(sorted(tracker.sent_ids)))
        sent = next((e for e in tracker.client.of_type("ack") if e["id"] == cid), None)
        room = sent["room"] if sent else "general"
        self.send_text(tracker.client, f"retry of {cid}", room, cid)

    @rule(slot=slots, room=rooms, join=st.booleans())
    def join_or_leave(self, slot: int, room: str, join: bool) -> None:
        if (client := self.connected(slot)) is not None:
            if self.model is not None:
                (self.model.join if join else self.model.leave)(client, room)
            (client.join if join else client.leave)(room)

    @rule(slot=slots, room=rooms)
    def typing(self, slot: int, room: str) -> None:
        if (client := self.connected(slot)) is not None:
            if self.model is not None:
                self.model.start_typing(client, room)
            client.typing(room)

    @rule(slot=slots, room=rooms, offset=st.integers(0, 50))
    def read(self, slot: int, room: str, offset: int) -> None:
        if (client := self.connected(slot)) is not None:
            if self.model is not None:
                self.model.read(client, room, offset)
            client.read(offset, room)

    @rule(slot=slots, room=rooms, before=st.none() | st.integers(1, 40), limit=st.integers(1, 10))
    def history(self, slot: int, room: str, before: int | None, limit: int) -> None:
        if (client := self.connected(slot)) is not None:
            if self.model is not None:
                self.model.history(client, room, before, limit)
            client.history(room, before=before, limit=limit)

    @rule(slot=slots, to=st.sampled_from(["alice", "bob", "carol"]))
    def dm(self, slot: int, to: str) -> None:
        if (client := self.connected(slot)) is not None:
            self.counter += 1
            room = dm_room(client.user, to)
            before = len(self.sim.store.messages(room))
            if self.model is not None:
                self.model.direct(client, to)
            client.dm(to, f"dm{self.counter}")
            if self.model is not None and len(self.sim.store.messages(room)) > before:
                self.model.sent(client.user, room)

    # -- what must always hold ---------------------------------------------------------------

    def notice_closes(self) -> None:
        """The engine closed a slow consumer: its session waits out the grace period."""
        if self.model is None:
            return
        for session in [s for s in self.model.sessions if s.live and not s.client.connected]:
            assert session.client.closed is not None, ("closed without a close", session.user)
            assert session.client.closed[1] == "slow consumer", session.client.closed
            self.model.detach(session)

    @invariant()
    def the_rules_hold(self) -> None:
        self.check_step()

    def check_step(self) -> None:
        # One invariant, so the checks run in this order after every step.
        self.notice_closes()
        received = {}
        for tracker in self.trackers:
            if tracker is not None:
                received[tracker.client] = tracker.check(self.sim)
        if self.model is not None:
            self.events_are_what_the_model_predicts(received)
            self.engine_agrees_with_the_model()
            self.model.expected.clear()
        else:
            self.memory_stays_within_the_configuration()
        self.readers_have_everything_the_log_holds()
        self.a_client_id_is_stored_once()
        self.sim.peak.clear()
        self.step_start = {
            t.client: (t.client.conn, t.client.reading) for t in self.trackers if t is not None
        }

    def events_are_what_the_model_predicts(
        self, received: dict[SimClient, list[dict[str, Any]]]
    ) -> None:
        assert self.model is not None
        for client, events in received.items():
            _, was_reading = self.step_start.get(client, (None, True))
            if not (client.connected and client.reading and was_reading):
                continue
            if self.sim.peak.get(client, 0) >= SOFT_FRAMES:
                continue  # presence events may have been dropped for it, as documented
            got = Counter(
                event_key(e)
                for e in events
                if e["type"] in PREDICTED and e.get("code") != "rate_limited"
            )
            want = self.model.expected.get(client, Counter())
            assert got == want, (
                "events differ from the model",
                client,
                "missing:",
                want - got,
                "extra:",
                got - want,
            )

    def engine_agrees_with_the_model(self) -> None:
        model, engine = self.model, self.sim.engine
        assert model is not None
        held = model.held_rooms()
        for room in {*ROOMS, *model.dm_rooms}:
            assert engine.members(room) == tuple(sorted(model.presence(room))), room
        for session in model.sessions:
            if session.sid is None:
                continue
            info = engine.session(session.sid)
            assert info is not None, ("session gone before its grace period ran out", session)
            state = SessionState.LIVE if session.live else SessionState.DETACHED
            assert info.state is state, (session.user, info)
            assert info.rooms == tuple(session.rooms), (session.user, info, session.rooms)
        for session in model.ended:
            if session.sid is not None:
                assert engine.session(session.sid) is None, ("session outlived", session.user)
        stats = engine.stats()
        assert stats["sessions"] == len(model.sessions), stats
        assert stats["connections"] == sum(1 for s in model.sessions if s.live), stats
        assert stats["rooms"] == len(held), (stats, held)
        window = sum(min(model.head(r), CONFIG.history_window) for r in held)
        assert stats["messages_in_memory"] == window, (stats, window)
        assert stats["pending_appends"] == stats["pending_loads"] == 0, stats
        assert stats["timers"] <= model.timer_allowance(), (stats, model.timer_allowance())

    def memory_stays_within_the_configuration(self) -> None:
        stats = self.sim.engine.stats()
        assert stats["messages_in_memory"] <= stats["rooms"] * CONFIG.history_window, stats
        # Direct-message rooms: one per pair of the 4 distinct users (6), and one per
        # user writing to themselves (4).
        assert stats["rooms"] <= len(ROOMS) + 6 + 4, stats
        assert stats["connections"] <= len(USERS), stats

    def readers_have_everything_the_log_holds(self) -> None:
        if self.model is None:
            return
        for tracker in self.trackers:
            if tracker is None or not tracker.client.connected or not tracker.client.reading:
                continue
            for room, seen in tracker.seen.items():
                assert seen == len(self.sim.store.messages(room)), (tracker.client.user, room)

    def a_client_id_is_stored_once(self) -> None:
        for room in ROOMS:
            keys = Counter(
                (m.sender, m.client_id)
                for m in self.sim.store.messages(room)
                if m.client_id is not None
            )
            assert all(n == 1 for n in keys.values()), keys.most_common(1)


ChatModel.TestCase.settings = settings(
    max_examples=int(os.environ.get("CHATCORE_MODEL_EXAMPLES", "400")),
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestChatModel = ChatModel.TestCase
