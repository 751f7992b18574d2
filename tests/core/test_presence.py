"""Presence in crowded rooms, and what the engine keeps of users who have left.

A room of more than ``presence_batch_above`` users tells its comings and goings
in one ``presence`` frame per ``presence_interval`` (docs/protocol.md section 3);
a smaller room tells each one at once. The property test holds every member's
view of the room, built only from the frames it received, to the room's real
membership after every flush, whatever the sequence of joins, leaves, closes,
drops and resumes.

The churn tests hold the engine to its promise that a departed user costs
nothing: after any number of distinct users connected and left, every size the
engine reports, and the dicts behind them, are back where they started.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from chatcore import Config
from chatcore_sim import SimClient, Simulation

CROWD = Config(presence_batch_above=3, presence_interval=0.5)


def view(client: SimClient, room: str) -> set[str]:
    """Who ``client`` believes is in ``room``: its last member list, then every
    ``joined``/``left``/``presence`` after it, applied as a client applies them."""
    users: set[str] = set()
    for event in client.events:
        if event.get("room") != room:
            continue
        match event["type"]:
            case "members":
                users = set(event["users"])
            case "joined":
                users.add(event["user"])
            case "left":
                users.discard(event["user"])
            case "presence":
                users |= set(event["joins"])
                users -= set(event["leaves"])
    return users


def crowd(sim: Simulation, n: int, room: str = "hall") -> list[SimClient]:
    return [sim.connect(f"u{i}", room=room) for i in range(n)]


def test_a_small_room_hears_each_join_and_leave_at_once() -> None:
    sim = Simulation(CROWD, seed=1)
    alice, _bob, carol = crowd(sim, 3)
    carol.leave("hall")
    assert [(e["type"], e["user"]) for e in alice.events if e["type"] in ("joined", "left")] == [
        ("joined", "u1"),
        ("joined", "u2"),
        ("left", "u2"),
    ]
    assert alice.of_type("presence") == []


def test_a_crowded_room_hears_joins_and_leaves_together_once_per_interval() -> None:
    sim = Simulation(CROWD, seed=1)
    first = crowd(sim, 3)
    late = [sim.connect(f"late{i}", room="hall") for i in range(5)]
    late[0].leave("hall")
    sim.close(first[2])
    # Nothing yet: the room collects for half a second.
    assert first[0].of_type("presence") == []
    assert first[0].of_type("joined") == [
        {"type": "joined", "room": "hall", "user": "u1"},
        {"type": "joined", "room": "hall", "user": "u2"},
    ]
    sim.advance(0.5)
    assert first[0].of_type("presence") == [
        {
            "type": "presence",
            "room": "hall",
            "joins": ["late1", "late2", "late3", "late4"],
            "leaves": ["late0", "u2"],  # late0 came and went: a leave
        }
    ]
    # One frame for everyone, encoded once: each reader got the same one.
    assert late[4].of_type("presence") == first[0].of_type("presence")
    # The one who left confirmed its own leave at once, and hears no more.
    assert late[0].of_type("left") == [{"type": "left", "room": "hall", "user": "late0"}]
    assert late[0].of_type("presence") == []
    sim.advance(5)  # nothing new: no more frames
    assert len(first[0].of_type("presence")) == 1
    assert view(first[0], "hall") == set(sim.engine.members("hall"))


def test_a_joiner_in_a_crowd_gets_the_whole_list_and_the_frame_brings_it_up_to_date() -> None:
    sim = Simulation(CROWD, seed=2)
    members = crowd(sim, 5)
    members[1].leave("hall")
    newcomer = sim.connect("zed", room="hall")
    assert newcomer.of_type("members")[0]["users"] == ["u0", "u2", "u3", "u4", "zed"]
    members[1].join("hall")  # u1 comes back after zed's list was made
    sim.advance(0.5)
    assert view(newcomer, "hall") == {"u0", "u1", "u2", "u3", "u4", "zed"}
    assert view(members[0], "hall") == set(sim.engine.members("hall"))


def test_plain_text_mode_counts_a_crowd_instead_of_listing_it() -> None:
    from chatcore import Mode

    sim = Simulation(CROWD, seed=3)
    reader = sim.connect("reader", room="hall", mode=Mode.TEXT)
    crowd(sim, 9)
    sim.close(sim.clients[1])
    sim.advance(0.5)
    assert reader.lines()[-2:] == [
        "u2, u3, u4, u5, u6 and 2 more joined the room",  # u0, u1 joined at once,
        "u0 left the room",
    ]


def test_plain_text_mode_shows_only_the_line_a_batch_has() -> None:
    from chatcore import Mode

    sim = Simulation(CROWD, seed=3)
    reader = sim.connect("reader", room="hall", mode=Mode.TEXT)
    crowd(sim, 4)  # u2 and u3 come after the room passed 3 users
    sim.advance(0.5)
    assert reader.lines()[-1] == "u2, u3 joined the room"
    assert not any("left" in line for line in reader.lines())


def test_presence_stops_above_the_presence_limit_even_in_batches() -> None:
    sim = Simulation(Config(presence_batch_above=2, presence_limit=4), seed=4)
    watcher = crowd(sim, 4)[0]
    sim.connect("big", room="hall")  # the 5th user: above the limit, not announced
    sim.advance(1)
    told = {u for e in watcher.of_type("presence") for u in e["joins"]}
    assert "big" not in told
    assert {"u3"} <= told


class CrowdedRoom(RuleBasedStateMachine):
    """Users come and go in one room that crosses the crowd threshold both ways.

    Model: the set of users with a session in the room (a plain set, kept from
    what each rule did). Invariant, after every flush: each reading, attached
    client's view of the room (from its own frames) is the model's set, which is
    also ``engine.members``; and the engine's stats hold no more than the model.
    """

    def __init__(self) -> None:
        super().__init__()
        self.sim = Simulation(CROWD, seed=0)
        self.clients: dict[str, SimClient] = {}
        self.detached: set[str] = set()

    def members(self) -> set[str]:
        return {u for u, c in self.clients.items() if c.connected or u in self.detached}

    @rule(user=st.sampled_from([f"p{i}" for i in range(8)]))
    def come(self, user: str) -> None:
        client = self.clients.get(user)
        if client is None or (not client.connected and user not in self.detached):
            self.clients[user] = self.sim.connect(user, room="hall")
        elif user in self.detached:
            self.sim.resume(client)
            self.detached.discard(user)

    @precondition(lambda self: any(c.connected for c in self.clients.values()))
    @rule(data=st.data(), how=st.sampled_from(["close", "leave", "drop"]))
    def go(self, data: st.DataObject, how: str) -> None:
        user = data.draw(st.sampled_from(sorted(u for u, c in self.clients.items() if c.connected)))
        client = self.clients[user]
        if how == "close":
            self.sim.close(client)
        elif how == "drop":
            self.sim.drop(client)  # still a member while it waits out its grace period
            self.detached.add(user)
        else:
            client.leave("hall")
            self.sim.close(client)

    @rule(seconds=st.sampled_from([0.1, 0.3, 0.5, 31.0]))
    def wait(self, seconds: float) -> None:
        self.sim.advance(seconds)
        if seconds > CROWD.grace_period:
            self.detached.clear()

    @invariant()
    def views_converge_at_each_flush(self) -> None:
        self.sim.advance(CROWD.presence_interval)  # whatever was collected is told
        self.detached = {u for u in self.detached if self.sim.engine.sessions(u)}
        assert set(self.sim.engine.members("hall")) == self.members()
        for user, client in self.clients.items():
            if client.connected:
                assert view(client, "hall") == self.members(), (user, client.events[-5:])
        stats = self.sim.engine.stats()
        assert stats["sessions"] == len(self.members())
        # One heartbeat per connection and one grace period per detached session,
        # plus at most one presence flush; timers of those who left are dropped
        # once they are 64 and most of the heap (src/chatcore/_timers.py).
        live = stats["connections"] + stats["sessions_detached"] + 1
        assert stats["timers"] < live + max(64, live)


TestCrowdedRoom = CrowdedRoom.TestCase
TestCrowdedRoom.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def churn(sim: Simulation, first: int, n: int) -> None:
    for i in range(first, first + n):
        client = sim.connect(f"gone{i}", room="hall")
        client.typing("hall")
        sim.close(client)
        sim.advance(0.01)


def sizes(sim: Simulation) -> dict[str, Any]:
    """What the engine reports, and the dicts keyed by user or session behind it."""
    st = sim.engine._st  # the test reaches in on purpose: these must not grow
    room = st.rooms["hall"]
    return {
        **sim.engine.stats(),
        "by_user": len(st.by_user),
        "by_id": len(st.by_id),
        "tokens": len(st.sessions),
        "wanted": len(st.wanted),
        "awaits": len(st.awaits.refs),
        "room_users": len(room.users),
        "room_conns": len(room.conns),
        "room_typing": len(room.typing),
        "refusal_kinds": len(st.counters.refusals),
    }


def test_distinct_users_who_come_and_go_leave_nothing_behind() -> None:
    sim = Simulation(seed=5)
    stay = crowd(sim, 60)  # a crowded room: its presence goes in batches
    churn(sim, 0, 50)  # warm-up: everything that is kept once is kept now
    sim.advance(1)
    before = sizes(sim)
    churn(sim, 50, 500)
    sim.advance(1)
    after = sizes(sim)
    assert after == before
    assert all(c.connected for c in stay)
    # Nothing departed is held until a heartbeat or a grace period comes due: one
    # timer per connection (the 60 members), and fewer than 64 gone stale.
    assert after["timers"] < 60 + 64


def test_sessions_dropped_and_never_resumed_leave_nothing_once_their_grace_is_over() -> None:
    sim = Simulation(Config(grace_period=5.0), seed=6)
    crowd(sim, 3)
    before = sizes(sim)
    for i in range(300):
        sim.drop(sim.connect(f"away{i}", room="hall"))
    assert sim.engine.stats()["sessions_detached"] == 300
    sim.advance(6)
    assert sizes(sim) == before
