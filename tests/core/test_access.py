"""The access rule, every user kind x room kind x action, and the engine asking it."""

from __future__ import annotations

import itertools

import pytest

from chatcore import (
    Access,
    Action,
    Config,
    Connect,
    CreateRoom,
    Deliver,
    Effect,
    Engine,
    LoadRoom,
    Mode,
    Receive,
    RoomLoaded,
    SeededIds,
    room_access,
    room_rule,
)

ALLOWED, NAME, FORBIDDEN = Access.ALLOWED, Access.NAME_REQUIRED, Access.FORBIDDEN
STAFF = frozenset({"alice", "bob"})

# (private, allow) as a store might report them. A DM room's are deliberately wrong
# (public, nobody listed): the rule must decide a DM room by its name alone.
ROOMS: dict[str, tuple[str, bool, frozenset[str]]] = {
    "public": ("lobby", False, frozenset()),
    "private": ("staff", True, STAFF),
    "dm": ("dm:alice:bob", False, frozenset()),
}
USERS: dict[str, str | None] = {
    "member": "alice",
    "allowed": "bob",
    "stranger": "mallory",
    "anonymous": None,
}
# What each user kind gets in each room kind, for (join, read, send).
EXPECTED: dict[tuple[str, str], tuple[Access, Access, Access]] = {
    ("member", "public"): (ALLOWED, ALLOWED, ALLOWED),
    ("member", "private"): (ALLOWED, ALLOWED, ALLOWED),
    ("member", "dm"): (ALLOWED, ALLOWED, ALLOWED),
    ("allowed", "public"): (ALLOWED, ALLOWED, ALLOWED),
    ("allowed", "private"): (ALLOWED, ALLOWED, ALLOWED),
    ("allowed", "dm"): (ALLOWED, ALLOWED, ALLOWED),
    ("stranger", "public"): (ALLOWED, ALLOWED, ALLOWED),
    ("stranger", "private"): (FORBIDDEN, FORBIDDEN, FORBIDDEN),
    ("stranger", "dm"): (FORBIDDEN, FORBIDDEN, FORBIDDEN),
    # Nameless readers read public rooms; nobody joins or sends without a name.
    ("anonymous", "public"): (NAME, ALLOWED, NAME),
    ("anonymous", "private"): (NAME, NAME, NAME),
    ("anonymous", "dm"): (NAME, NAME, NAME),
}
ACTIONS = (Action.JOIN, Action.READ, Action.SEND)


@pytest.mark.parametrize(
    ("who", "kind", "action"), list(itertools.product(USERS, ROOMS, range(len(ACTIONS))))
)
def test_the_rule_for_every_user_room_and_action(who: str, kind: str, action: int) -> None:
    room, private, allow = ROOMS[kind]
    got = room_access(USERS[who], ACTIONS[action], room, private=private, allow=allow)
    assert got is EXPECTED[who, kind][action]


def test_a_dm_room_is_its_two_users_whatever_is_stored() -> None:
    for private, allow in ((False, frozenset()), (True, frozenset({"mallory"}))):
        assert room_rule("dm:alice:bob", private=private, allow=allow) == (True, STAFF)
        for user, verdict in (("alice", ALLOWED), ("bob", ALLOWED), ("mallory", FORBIDDEN)):
            for action in ACTIONS:
                got = room_access(user, action, "dm:alice:bob", private=private, allow=allow)
                assert got is verdict
    assert room_rule("staff", private=True, allow=STAFF) == (True, STAFF)
    assert room_rule("lobby", private=False, allow=frozenset()) == (False, frozenset())


def test_a_name_with_a_colon_that_is_no_dm_room_admits_nobody() -> None:
    for room in ("dm:bob:alice", "dm:alice", "x:alice:bob", "dm:alice:bob:carol"):
        for action in ACTIONS:
            assert room_access("alice", action, room, private=False, allow=()) is FORBIDDEN
            assert room_access(None, action, room, private=False, allow=()) is NAME
        assert room_rule(room, private=False, allow=frozenset())[0] is True


# -- the engine asks the same rule ------------------------------------------------------


def _frames(effects: list[Effect], conn: int) -> list[str]:
    return [e.data for e in effects if isinstance(e, Deliver) and conn in e.to]


def _engine_with_room(room: str, *, private: bool, allow: frozenset[str]) -> Engine:
    engine = Engine(Config(dm_inbox=False), SeededIds(1))
    engine.handle(Connect(conn=1, user="alice", rooms=(), mode=Mode.JSON), 0.0)
    out = engine.handle(Receive(conn=1, text=f'{{"type":"join","room":"{room}"}}'), 0.0)
    assert any(isinstance(e, LoadRoom) for e in out)
    # The store says the room is public and lists nobody, as old stores said of DMs.
    engine.handle(
        RoomLoaded(room=room, epoch="e", head=0, private=private, allow=allow, recent=()), 0.0
    )
    return engine


@pytest.mark.parametrize("kind", ["join", "history"])
def test_the_engine_refuses_a_dm_of_others_even_if_the_store_calls_it_public(kind: str) -> None:
    engine = Engine(Config(dm_inbox=False), SeededIds(1))
    engine.handle(Connect(conn=1, user="mallory", rooms=(), mode=Mode.JSON), 0.0)
    frame = f'{{"type":"{kind}","room":"dm:alice:bob"}}'
    out = engine.handle(Receive(conn=1, text=frame), 0.0)
    assert any(isinstance(e, LoadRoom) for e in out)
    loaded = RoomLoaded(
        room="dm:alice:bob", epoch="e", head=0, private=False, allow=frozenset(), recent=()
    )
    out = engine.handle(loaded, 0.0)
    frames = _frames(out, 1)
    assert any('"code":"forbidden"' in f for f in frames), frames
    assert not any('"type":"members"' in f or '"type":"history"' in f for f in frames)


def test_making_a_room_private_removes_members_the_rule_no_longer_admits() -> None:
    engine = _engine_with_room("staff", private=False, allow=frozenset())
    assert engine.members("staff") == ("alice",)
    out = engine.handle(CreateRoom(room="staff", private=True, allow=frozenset({"bob"})), 1.0)
    assert engine.members("staff") == ()
    assert any('"code":"forbidden"' in f for f in _frames(out, 1))
