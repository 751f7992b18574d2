"""Member lists: right after any sequence of joins and leaves, and cheap in a crowd.

A room keeps its users sorted and each one's JSON string as they come and go,
so a join in a crowded room joins strings instead of sorting and encoding
everyone. These tests hold that shortcut to the plain answer.
"""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from chatcore import Config, Members
from chatcore._codec import encode_json, encode_members, encode_string
from chatcore_sim import SimClient, Simulation

USERS = ["alice", "bob", "carol", "Dave", "_z", "bob.2", "a-b"]  # mixed case, punctuation


@given(
    room=st.text(max_size=12),
    users=st.lists(st.text(max_size=8), max_size=6),
    offset=st.integers(0, 2**53),
    epoch=st.text(max_size=8),
)
def test_the_members_frame_from_encoded_users_is_the_plain_encoding(
    room: str, users: list[str], offset: int, epoch: str
) -> None:
    # Invariant: byte for byte what encode_json makes, whatever the strings hold
    # (quotes, '"users":[]' itself, non-ASCII, control characters).
    event = Members(room=room, users=tuple(users), offset=offset, epoch=epoch)
    assert encode_members(event, ",".join(map(encode_string, users))) == encode_json(event)


def test_a_room_or_user_named_like_the_key_does_not_fool_the_encoder() -> None:
    event = Members(room='"users":[]', users=('"users":[]', "x"), offset=1, epoch='"users":[]')
    data = encode_members(event, ",".join(map(encode_string, event.users)))
    assert json.loads(data)["users"] == ['"users":[]', "x"]


ops = st.lists(
    st.tuples(st.sampled_from(["connect", "join", "leave", "drop"]), st.integers(0, 11)),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_member_lists_are_the_users_in_the_room_sorted(steps: list[tuple[str, int]]) -> None:
    # Invariant: after every step the engine's member list is the sorted set of users
    # with a session in the room, and a members frame lists exactly the users in the
    # room when it was sent (the joiner included), sorted, once each.
    sim = Simulation(Config(grace_period=1.0), seed=5)
    clients: dict[int, SimClient] = {}
    inside: dict[int, bool] = {}
    for op, slot in steps:
        client = clients.get(slot)
        if op == "connect" and (client is None or not client.connected):
            # Slots k and k + 7 are the same user: two sessions, one name in the list.
            client = clients[slot] = sim.connect(USERS[slot % len(USERS)], room="lobby")
            inside[slot] = True
        elif client is None or not client.connected:
            continue
        elif op == "join" and not inside[slot]:
            client.join("lobby")
            inside[slot] = True
        elif op == "leave" and inside[slot]:
            client.leave("lobby")
            inside[slot] = False
        elif op == "drop":
            sim.drop(client)
            sim.advance(1.5)  # past the grace period: the session ends
            inside[slot] = False
        else:
            continue
        expected = sorted({clients[s].user for s, i in inside.items() if i})
        assert list(sim.engine.members("lobby")) == expected, (op, slot)
        if op in ("connect", "join"):
            assert client.of_type("members")[-1]["users"] == expected


def test_a_members_frame_after_messages_and_leaves_has_the_room_as_it_is_now() -> None:
    # The room keeps the frame's parts around the user list while members come and
    # go; they must still follow the room's head, and the list must follow leaves.
    sim = Simulation(Config(), seed=3)
    alice = sim.connect("alice", room="lobby")
    bob = sim.connect("bob", room="lobby")
    first = bob.of_type("members")[-1]
    sim.close(bob)
    alice.send("one")
    alice.send("two")
    sim.advance(0.1)
    carol = sim.connect("carol", room="lobby")
    frame = carol.of_type("members")[-1]
    assert frame["users"] == ["alice", "carol"]
    assert frame["offset"] == first["offset"] + 2
    assert frame["epoch"] == first["epoch"]
    dave = sim.connect("dave", room="lobby")
    assert dave.of_type("members")[-1]["users"] == ["alice", "carol", "dave"]
    assert dave.of_type("members")[-1]["offset"] == frame["offset"]


def test_a_second_session_after_a_leave_gets_the_list_without_the_one_who_left() -> None:
    # A second session of a member changes no one's membership, so nothing else
    # refreshes the room's members frame: the leave before it must have.
    sim = Simulation(Config(), seed=4)
    alice = sim.connect("alice", room="lobby")
    bob = sim.connect("bob", room="lobby")
    assert bob.of_type("members")[-1]["users"] == ["alice", "bob"]
    sim.close(bob)
    again = sim.connect("alice", room="lobby")
    assert again.of_type("members")[-1]["users"] == ["alice"]
    assert alice.connected
