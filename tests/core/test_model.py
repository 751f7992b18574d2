"""Random chat histories against the rules a user relies on (hypothesis state machine).

Clients join, leave, send, retry, type, read, page history, send DMs, stop
reading, drop and resume, while the clock jumps. After every step:

* every message a client receives is the log's message at that offset, and
  per room each client's stream (messages plus acks of its own) is gap-free and
  without repeats from its join point on, across every resume that says
  ``resumed: true`` (nothing lost, nothing duplicated, same order for all);
* a client that is connected and reading has everything the log holds for its
  rooms (when the log answers at once);
* nobody off a private room's allow list, and nobody outside a DM pair, ever
  receives anything of that room;
* no outbox holds more than its configured bounds;
* a client message id retried any number of times is stored (and broadcast) once.
"""

from __future__ import annotations

import os
from collections import Counter

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from chatcore import Config
from chatcore_sim import SimClient, Simulation

USERS = ["alice", "alice", "bob", "carol", "dave"]  # alice has two tabs
ROOMS = ["general", "tech", "staff"]
STAFF = {"alice", "bob"}
CONFIG = Config(
    outbox_frames=12,
    rate_burst=8,
    rate_per_second=4.0,
    history_window=4,
    grace_period=30.0,
    typing_ttl=5.0,
    ping_interval=25.0,
    pong_timeout=20.0,
)

slots = st.integers(0, len(USERS) - 1)
rooms = st.sampled_from(ROOMS)


class Tracker:
    """What one client has seen, per room, and the checks on each new event."""

    def __init__(self, client: SimClient) -> None:
        self.client = client
        self.seen: dict[str, int] = {}
        self.cursor = 0
        self.sent_ids: set[str] = set()

    def check(self, sim: Simulation) -> None:
        user = self.client.user
        for event in self.client.events[self.cursor :]:
            kind = event["type"]
            room = event.get("room")
            if isinstance(room, str):
                assert kind == "error" or self.may_see(user, room), (user, event)
            if kind == "welcome":
                fresh = {r: p["offset"] for r, p in event["rooms"].items()}
                if event["resumed"]:
                    for r, offset in fresh.items():
                        if r in self.seen:
                            assert offset == self.seen[r], ("resume point", user, r)
                self.seen = fresh
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
            elif kind == "history":
                for m in event["messages"]:
                    stored = sim.store.messages(room)[m["offset"] - 1]
                    assert stored.text == m["text"]
        self.cursor = len(self.client.events)

    @staticmethod
    def may_see(user: str, room: str) -> bool:
        if room == "staff":
            return user in STAFF
        if room.startswith("dm:"):
            return user in room.split(":")[1:]
        return True


class ChatModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.sim = Simulation(CONFIG, seed=0)
        self.trackers: list[Tracker | None] = [None] * len(USERS)
        self.counter = 0
        self.immediate = True

    @initialize(
        latency=st.sampled_from([0.0, 0.0, 0.7]),
        seed=st.integers(0, 2**16),
        wanted=st.lists(
            st.lists(rooms, max_size=3, unique=True), min_size=len(USERS), max_size=len(USERS)
        ),
    )
    def setup(self, latency: float, seed: int, wanted: list[list[str]]) -> None:
        self.sim = Simulation(CONFIG, seed=seed, store_latency=latency)
        self.immediate = latency == 0
        self.sim.create_room("staff", allow=STAFF)
        # Everyone starts connected, so that every step has someone to act on.
        for slot, user in enumerate(USERS):
            self.trackers[slot] = Tracker(self.sim.connect(user, rooms=["general", *wanted[slot]]))

    def client(self, slot: int) -> SimClient | None:
        tracker = self.trackers[slot]
        return None if tracker is None else tracker.client

    def connected(self, slot: int) -> SimClient | None:
        client = self.client(slot)
        return client if client is not None and client.connected else None

    # -- connections ---------------------------------------------------------------

    @rule(slot=slots, wanted=st.lists(rooms, max_size=3, unique=True))
    def connect_fresh(self, slot: int, wanted: list[str]) -> None:
        old = self.client(slot)
        if old is not None and old.connected:
            self.sim.drop(old)
        self.trackers[slot] = Tracker(self.sim.connect(USERS[slot], rooms=wanted))

    @rule(slot=slots)
    def drop(self, slot: int) -> None:
        if (client := self.connected(slot)) is not None:
            self.sim.drop(client)

    @rule(slot=slots)
    def resume(self, slot: int) -> None:
        client = self.client(slot)
        if client is not None and not client.connected and client.token is not None:
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
        self.sim.advance(seconds)

    # -- chat --------------------------------------------------------------------------

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
        client.send(f"t{self.counter}", room, id=cid)

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
        tracker.client.send(f"retry of {cid}", room, id=cid)

    @rule(slot=slots, room=rooms, join=st.booleans())
    def join_or_leave(self, slot: int, room: str, join: bool) -> None:
        if (client := self.connected(slot)) is not None:
            (client.join if join else client.leave)(room)

    @rule(slot=slots, room=rooms)
    def typing(self, slot: int, room: str) -> None:
        if (client := self.connected(slot)) is not None:
            client.typing(room)

    @rule(slot=slots, room=rooms, offset=st.integers(0, 50))
    def read(self, slot: int, room: str, offset: int) -> None:
        if (client := self.connected(slot)) is not None:
            client.read(offset, room)

    @rule(slot=slots, room=rooms, before=st.none() | st.integers(1, 40), limit=st.integers(1, 10))
    def history(self, slot: int, room: str, before: int | None, limit: int) -> None:
        if (client := self.connected(slot)) is not None:
            client.history(room, before=before, limit=limit)

    @rule(slot=slots, to=st.sampled_from(["alice", "bob", "carol"]))
    def dm(self, slot: int, to: str) -> None:
        if (client := self.connected(slot)) is not None:
            self.counter += 1
            client.dm(to, f"dm{self.counter}")

    # -- what must always hold ---------------------------------------------------------------

    @invariant()
    def the_rules_hold(self) -> None:
        # One invariant, so the checks run in this order after every step.
        self.streams_are_gap_free_and_private()
        self.readers_have_everything_the_log_holds()
        self.outboxes_stay_within_bounds()
        self.a_client_id_is_stored_once()

    def streams_are_gap_free_and_private(self) -> None:
        for tracker in self.trackers:
            if tracker is not None:
                tracker.check(self.sim)

    def readers_have_everything_the_log_holds(self) -> None:
        if not self.immediate:
            return
        for tracker in self.trackers:
            if tracker is None or not tracker.client.connected or not tracker.client.reading:
                continue
            for room, seen in tracker.seen.items():
                assert seen == len(self.sim.store.messages(room)), (tracker.client.user, room)

    def outboxes_stay_within_bounds(self) -> None:
        for tracker in self.trackers:
            if tracker is not None and tracker.client.conn is not None:
                frames, nbytes = self.sim.engine.outbox(tracker.client.conn)
                assert frames <= CONFIG.outbox_frames
                assert nbytes <= CONFIG.outbox_bytes

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
