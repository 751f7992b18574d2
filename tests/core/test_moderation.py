"""Moderation through the engine: removals, mutes, bans and deleted messages.

Every test drives the engine through the simulator (real frames, a virtual
clock); "a restart" is a new engine over the same store.
"""

from __future__ import annotations

import pytest

from chatcore import (
    Access,
    Action,
    Ban,
    CloseCode,
    DeleteMessage,
    Kick,
    LocalProtocolError,
    Mute,
    RemoveMember,
    Unban,
    room_access,
)
from chatcore_sim import SimClient, Simulation
from chatcore_store import MemoryStore


def _errors(client: SimClient) -> list[dict[str, object]]:
    return client.of_type("error")


def test_the_rule_refuses_a_banned_user_join_and_send_but_not_read() -> None:
    def ask(
        action: Action, banned: frozenset[str] = frozenset(), muted: dict[str, float] | None = None
    ) -> Access:
        return room_access(
            "mallory", action, "lobby", private=False, allow=(), banned=banned, muted=muted, now=100
        )

    assert ask(Action.JOIN, banned=frozenset({"mallory"})) is Access.BANNED
    assert ask(Action.SEND, banned=frozenset({"mallory"})) is Access.BANNED
    assert ask(Action.READ, banned=frozenset({"mallory"})) is Access.ALLOWED
    assert ask(Action.SEND, muted={"mallory": 101.0}) is Access.MUTED
    assert ask(Action.JOIN, muted={"mallory": 101.0}) is Access.ALLOWED
    assert ask(Action.SEND, muted={"mallory": 100.0}) is Access.ALLOWED  # over at its time
    # A ban admits nobody the room refuses anyway: a private room still says forbidden.
    refused = room_access("x", Action.JOIN, "staff", private=True, allow=(), banned={"x"})
    assert refused is Access.FORBIDDEN


def test_a_muted_user_is_refused_with_a_reason_until_the_mute_expires() -> None:
    sim = Simulation()
    alice = sim.connect("alice", "lobby")
    bob = sim.connect("bob", "lobby")
    sim.feed(Mute(room="lobby", user="bob", until=sim.now + 60))
    bob.send("hello?", id="m1")
    [err] = _errors(bob)
    assert err["code"] == "forbidden"
    assert err["message"] == "muted in room lobby for 60 more seconds"
    assert err["ref"] == "m1"
    assert alice.texts() == []
    alice.send("alice still speaks")
    assert bob.texts() == ["alice still speaks"]
    sim.advance(61)
    bob.send("back")
    assert alice.texts() == ["back"]


def test_unmuting_lifts_the_mute_at_once() -> None:
    sim = Simulation()
    alice = sim.connect("alice", "lobby")
    bob = sim.connect("bob", "lobby")
    sim.feed(Mute(room="lobby", user="bob", until=sim.now + 600))
    sim.feed(Mute(room="lobby", user="bob", until=None))
    bob.send("free")
    assert alice.texts() == ["free"]


def test_a_banned_member_is_removed_and_refused_until_unbanned() -> None:
    sim = Simulation()
    alice = sim.connect("alice", "lobby")
    bob = sim.connect("bob", "lobby")
    sim.feed(Ban(room="lobby", user="bob", reason="spam"))
    assert bob.of_type("removed") == [{"type": "removed", "room": "lobby", "reason": "spam"}]
    assert {"type": "left", "room": "lobby", "user": "bob"} in alice.events
    assert sim.engine.members("lobby") == ("alice",)
    bob.join("lobby")
    [err] = _errors(bob)
    assert err["code"] == "forbidden"
    assert "banned" in str(err["message"])
    assert sim.engine.members("lobby") == ("alice",)
    # A new connection asking for the room at connect is refused too.
    again = sim.connect("bob", "lobby")
    assert sim.engine.members("lobby") == ("alice",)
    assert any(e["code"] == "forbidden" for e in _errors(again))
    sim.feed(Unban(room="lobby", user="bob"))
    bob.join("lobby")
    assert sim.engine.members("lobby") == ("alice", "bob")


def test_removing_a_member_tells_them_and_they_may_come_back() -> None:
    sim = Simulation()
    alice = sim.connect("alice", "lobby")
    bob = sim.connect("bob", "lobby")
    sim.feed(RemoveMember(room="lobby", user="bob", reason="cool off"))
    assert bob.of_type("removed") == [{"type": "removed", "room": "lobby", "reason": "cool off"}]
    alice.send("only alice hears")
    assert bob.texts() == []
    bob.join("lobby")
    assert sim.engine.members("lobby") == ("alice", "bob")


def test_a_user_removed_from_the_server_is_closed_4003_and_cannot_resume() -> None:
    assert int(CloseCode.REMOVED) == 4003  # the code docs/protocol.md documents
    sim = Simulation()
    alice = sim.connect("alice", "lobby")
    bob1 = sim.connect("bob", "lobby")
    bob2 = sim.connect("bob", rooms=["lobby", "other"])
    sim.feed(Kick(user="bob", reason="abuse"))
    for bob in (bob1, bob2):
        assert bob.closed == (CloseCode.REMOVED, "removed: abuse")
        assert bob.of_type("removed")[-1] == {"type": "removed", "room": None, "reason": "abuse"}
    assert sim.engine.sessions("bob") == []
    assert {"type": "left", "room": "lobby", "user": "bob"} in alice.events
    sim.resume(bob1)  # the token is void: a fresh session, not a resumed one
    [welcome] = bob1.of_type("welcome")[-1:]
    assert welcome["resumed"] is False


def test_a_user_in_the_grace_period_is_removed_too() -> None:
    sim = Simulation()
    sim.connect("alice", "lobby")
    bob = sim.connect("bob", "lobby")
    sim.drop(bob)
    assert sim.engine.members("lobby") == ("alice", "bob")  # waiting to resume
    sim.feed(Kick(user="bob"))
    assert sim.engine.members("lobby") == ("alice",)
    sim.resume(bob)
    assert bob.of_type("welcome")[-1]["resumed"] is False


def _three(sim: Simulation) -> tuple[SimClient, SimClient]:
    alice = sim.connect("alice", "lobby")
    bob = sim.connect("bob", "lobby")
    for text in ("one", "two", "three"):
        alice.send(text)
    return alice, bob


def test_a_deleted_message_keeps_its_offset_and_shows_deleted_everywhere() -> None:
    sim = Simulation()
    alice, bob = _three(sim)
    sim.drop(bob)  # will replay on resume
    sim.feed(DeleteMessage(room="lobby", offset=2))
    assert alice.of_type("deleted") == [{"type": "deleted", "room": "lobby", "offset": 2}]
    alice.history("lobby")
    [page] = alice.of_type("history")
    shown = [(m["offset"], m["text"], m.get("deleted", False)) for m in page["messages"]]
    assert shown == [(1, "one", False), (2, "", True), (3, "three", False)]
    carol = sim.connect("carol", "lobby")
    carol.history("lobby")
    [page] = carol.of_type("history")
    assert [m.get("deleted", False) for m in page["messages"]] == [False, True, False]
    alice.send("four")  # offsets go on without a gap
    assert [m["offset"] for m in carol.messages()] == [4]


def test_a_resumed_reader_replays_a_deleted_message_as_deleted() -> None:
    sim = Simulation()
    alice = sim.connect("alice", "lobby")
    bob = sim.connect("bob", "lobby")
    alice.send("one")
    sim.drop(bob)
    alice.send("two")
    alice.send("three")
    sim.feed(DeleteMessage(room="lobby", offset=2))
    sim.resume(bob)
    got = [(m["offset"], m["text"], m.get("deleted", False)) for m in bob.messages()]
    assert got == [(1, "one", False), (2, "", True), (3, "three", False)]


def test_moderation_survives_a_restart_over_the_same_store() -> None:
    first = Simulation()
    _three(first)
    first.feed(Ban(room="lobby", user="mallory"))
    first.feed(Mute(room="lobby", user="bob", until=first.now + 300))
    first.feed(DeleteMessage(room="lobby", offset=2))
    first.shutdown()

    second = Simulation(store=first.store, start=first.now + 10)
    mallory = second.connect("mallory", "lobby")
    assert any("banned" in str(e["message"]) for e in _errors(mallory))
    bob = second.connect("bob", "lobby")
    bob.send("after the restart")
    assert any("muted" in str(e["message"]) for e in _errors(bob))
    bob.history("lobby")
    [page] = bob.of_type("history")
    assert [m.get("deleted", False) for m in page["messages"]] == [False, True, False]
    second.advance(300)  # the stored mute ends at its time, after the restart too
    bob.send("now")
    assert len(_errors(bob)) == 1
    assert bob.of_type("ack")[-1]["offset"] == 4


def test_a_ban_on_a_room_nobody_holds_is_stored_and_applies_when_it_loads() -> None:
    sim = Simulation()
    sim.feed(Ban(room="quiet", user="bob"))
    bob = sim.connect("bob", "quiet")
    assert any("banned" in str(e["message"]) for e in _errors(bob))
    assert sim.engine.members("quiet") == ()


@pytest.mark.parametrize(
    "command",
    [
        Ban(room="lobby", user="bad name"),
        Mute(room="no room!", user="bob", until=None),
        DeleteMessage(room="lobby", offset=0),
        Kick(user="bob", reason="x" * 201),
    ],
)
def test_invalid_moderation_is_refused_before_anything_changes(command: object) -> None:
    sim = Simulation()
    sim.connect("bob", "lobby")
    with pytest.raises(LocalProtocolError):
        sim.engine.handle(command, sim.now)  # type: ignore[arg-type]
    assert sim.engine.members("lobby") == ("bob",)


def test_a_mute_and_a_ban_of_a_room_nobody_holds_keep_each_other() -> None:
    sim = Simulation()
    sim.feed(Ban(room="quiet", user="bob"))
    sim.feed(Mute(room="quiet", user="bob", until=sim.now + 600))  # must not lift the ban
    sim.feed(Mute(room="quiet", user="carol", until=sim.now + 600))
    sim.feed(Ban(room="quiet", user="carol"))  # must not lift the mute
    sim.feed(Unban(room="quiet", user="carol"))
    bob = sim.connect("bob", "quiet")
    assert any("banned" in str(e["message"]) for e in _errors(bob))
    carol = sim.connect("carol", "quiet")
    carol.send("hello")
    assert [str(e["message"]) for e in _errors(carol)] == [
        "muted in room quiet for 600 more seconds"
    ]


def test_moderation_while_the_room_is_loading_is_not_lost_when_it_arrives() -> None:
    # The store answers late: the ban, the mute and the deletion reach the engine
    # after it asked for the room and before the (older) answer comes back.
    store = MemoryStore()
    seed = Simulation(store=store)
    author = seed.connect("alice", "quiet")
    author.send("one")
    author.send("two")
    seed.shutdown()
    sim = Simulation(store=store, store_latency=1.0, start=seed.now + 1)
    bob = sim.connect("bob", "quiet")  # asks the store for the room
    carol = sim.connect("carol", "quiet")
    sim.feed(Ban(room="quiet", user="bob"))
    sim.feed(Mute(room="quiet", user="carol", until=sim.now + 600))
    sim.feed(DeleteMessage(room="quiet", offset=2))
    sim.advance(5)
    assert sim.engine.members("quiet") == ("carol",)
    assert any("banned" in str(e["message"]) for e in _errors(bob))
    carol.send("hi")
    sim.advance(5)
    assert any("muted" in str(e["message"]) for e in _errors(carol))
    carol.history("quiet")
    sim.advance(5)
    [page] = carol.of_type("history")
    assert [m.get("deleted", False) for m in page["messages"]] == [False, True]
