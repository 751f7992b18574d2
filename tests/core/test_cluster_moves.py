"""Sessions that move between processes, in the simulator.

A client whose link died reconnects through the load balancer to another
process: its session is claimed there, parked or still live (the old process
has not noticed yet: it closes the old connection and hands the session over,
``SessionAsked``). Nobody sees ``left`` or ``joined`` for a user who only moved,
whichever half of the move (the old process's ``MemberMoved``, the new one's
``MemberArrived``) the bus brings first; the invariant is ``cluster_check``'s.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from cluster_check import check_cluster

from chatcore import Config, MemberArrived, MemberMoved, SessionAsked, Shared, bus_fact, parse_bus
from chatcore_sim import Cluster, SimClient

ROOM = "general"


def three(**kw: Any) -> tuple[Cluster, SimClient, SimClient, SimClient]:
    cluster = Cluster(3, **kw)
    a = cluster.connect(0, "alice", ROOM)
    b = cluster.connect(1, "bob", ROOM)
    c = cluster.connect(2, "carol", ROOM)
    cluster.advance(0.1)
    for client in (a, b, c):
        client.take()
    return cluster, a, b, c


def presence(client: SimClient) -> list[tuple[str, str]]:
    """The joins and leaves the client read (presence frames unrolled)."""
    seen: list[tuple[str, str]] = []
    for e in client.take():
        if e["type"] in ("joined", "left"):
            seen.append((e["type"], e["user"]))
        elif e["type"] == "presence":
            seen += [("joined", u) for u in e["joins"]] + [("left", u) for u in e["leaves"]]
    return seen


def members(cluster: Cluster) -> list[tuple[str, ...]]:
    return [n.engine.members(ROOM) for n in cluster.nodes if ROOM in n.engine.rooms()]


# -- a live session claimed elsewhere (its old connection still open) -----------------------


def test_a_resume_elsewhere_while_the_old_connection_is_open_takes_the_live_session() -> None:
    cluster, a, b, c = three()
    a.send("seen")
    cluster.advance(0.1)
    assert b.texts() == ["seen"]
    moved = cluster.reconnect(b, 0)  # bob's link died; node 1 has not noticed
    cluster.advance(0.1)
    assert b.closed == (1000, "session resumed elsewhere")
    welcome = moved.of_type("welcome")[-1]
    assert welcome["resumed"] is True
    assert welcome["session"] == b.session
    assert cluster.nodes[1].engine.sessions("bob") == []  # the old owner forgot it
    c.send("after")
    cluster.advance(0.1)
    assert moved.texts() == ["after"]
    assert presence(a) == presence(c) == []
    assert members(cluster) == [("alice", "bob", "carol")] * 2  # node 1 let the room go
    check_cluster(cluster)


@pytest.mark.parametrize("silence", ["cut", "kill"])
def test_an_owner_that_does_not_hand_over_leaves_a_fresh_session_after_the_bound(
    silence: str,
) -> None:
    cluster, _a, b, _c = three(claim_timeout=1.0)
    if silence == "cut":
        cluster.cut(1, 10.0)  # it hears no ask
    else:
        cluster.kill(1)
    moved = cluster.reconnect(b, 0)
    cluster.advance(0.9)
    assert moved.of_type("welcome") == []  # still asking
    cluster.advance(0.2)
    welcome = moved.of_type("welcome")[-1]
    assert welcome["resumed"] is False
    assert welcome["session"] != b.session
    if silence == "cut":
        assert b.connected  # its owner never heard: the old session stays there


def test_an_ask_that_names_another_user_or_a_parked_session_changes_nothing() -> None:
    cluster, _a, b, _c = three()
    node = cluster.nodes[1]
    assert b.token is not None
    node.feed(SessionAsked(token=b.token, user="mallory"))
    assert b.connected
    node.drop(b)
    cluster.advance(0.1)
    parked = dict(cluster.records)
    node.feed(SessionAsked(token=b.token, user="bob"))  # its record is kept already
    assert cluster.records == parked
    node.feed(SessionAsked(token="nope", user="bob"))
    assert [s.user for s in node.engine.sessions()] == ["bob"]


# -- nobody sees a move ----------------------------------------------------------------------

DEPARTURE = '{"k":"moved",'  # the old process's half
ARRIVAL = '{"k":"in",'  # the new process's half: a MemberArrived with a move


def hold_back(cluster: Cluster, half: str, seconds: float) -> None:
    """Deliveries of one half of a move take ``seconds`` longer (and, as on Redis,
    so does everything its publisher sends after it)."""

    def delay(payload: str) -> float:
        return seconds if half in payload and '"mv":' in payload else 0.0

    cluster.bus.delay_if = delay


@pytest.mark.parametrize("how", ["parked", "live"])
@pytest.mark.parametrize(
    "late", [DEPARTURE, ARRIVAL, None], ids=["departure_late", "arrival_late", "in_order"]
)
def test_a_move_is_invisible_whichever_half_comes_first(how: str, late: str | None) -> None:
    cluster, a, b, c = three()
    if late is not None:
        hold_back(cluster, late, 1.0)
    if how == "parked":
        cluster.nodes[1].drop(b)
        cluster.advance(0.1)
        cluster.move(b, 2)
        bob = b
    else:
        bob = cluster.reconnect(b, 2)
    cluster.advance(0.3)
    assert members(cluster) == [("alice", "bob", "carol")] * 2  # node 1 let the room go
    cluster.advance(2.0)
    assert presence(a) == presence(c) == []
    assert members(cluster) == [("alice", "bob", "carol")] * 2
    # Then bob really leaves: everyone sees it once, and nobody keeps him.
    cluster.nodes[2].close(bob)
    cluster.advance(2.0)
    assert presence(a) == presence(c) == [("left", "bob")]
    assert members(cluster) == [("alice", "carol")] * 2
    check_cluster(cluster)


def test_a_user_who_moved_and_left_at_once_leaves_once_with_no_one_keeping_him() -> None:
    cluster, a, b, c = three()
    hold_back(cluster, DEPARTURE, 2.0)  # node 0 hears node 2's arrival and departure first
    bob = cluster.reconnect(b, 2)
    cluster.advance(0.3)
    cluster.nodes[2].close(bob)
    cluster.advance(0.3)
    assert presence(a) == []  # node 1 still has him, as far as node 0 knows
    cluster.advance(3.0)
    assert presence(a) == presence(c) == [("left", "bob")]
    assert members(cluster) == [("alice", "carol")] * 2


def test_a_move_to_the_process_of_the_watching_member_is_invisible_too() -> None:
    cluster, a, b, _c = three()
    hold_back(cluster, ARRIVAL, 1.0)  # (its own half never comes back to it)
    bob = cluster.reconnect(b, 0)  # to alice's process
    cluster.advance(2.0)
    assert presence(a) == []
    cluster.nodes[0].close(bob)
    cluster.advance(2.0)
    assert presence(a) == [("left", "bob")]
    assert members(cluster) == [("alice", "carol")] * 2


def test_a_session_that_moves_back_before_the_news_of_its_first_move_is_not_seen() -> None:
    # node 1 counts carol on node 2 again (its own half of the second move) before
    # node 2's half of the first move says her session there left: that older news
    # must not cancel the newer prediction.
    cluster = Cluster(3)
    alice = cluster.connect(1, "alice", ROOM)
    carol = cluster.connect(2, "carol", ROOM)
    cluster.advance(0.1)
    alice.take()
    cluster.move(carol, 1)
    cluster.move(carol, 2)  # at once: node 2 has not even heard it was taken
    cluster.advance(1.0)
    assert presence(alice) == []
    assert members(cluster) == [("alice", "carol")] * 2


def test_a_move_carries_the_read_marks_over() -> None:
    cluster, a, b, _c = three()
    a.send("one")
    a.send("two")
    cluster.advance(0.1)
    cluster.bus.drop_if = lambda payload: '"k":"read"' in payload  # node 0 never hears it
    b.read(2)
    cluster.advance(0.1)
    bob = cluster.reconnect(b, 0)
    cluster.advance(0.1)
    assert bob.of_type("welcome")[-1]["rooms"][ROOM]["read"] == 2


def test_a_session_claimed_then_dropped_before_its_welcome_keeps_its_rooms() -> None:
    cluster = Cluster(4, store_latency=0.2)
    a = cluster.connect(0, "alice", ROOM)
    b = cluster.connect(1, "bob", ROOM)
    c = cluster.connect(2, "carol", ROOM)
    cluster.advance(1.0)
    for client in (a, b, c):
        client.take()
    cluster.nodes[1].drop(b)
    cluster.advance(0.5)
    cluster.move(b, 3)  # node 3 does not hold the room: the welcome waits for its load
    cluster.nodes[3].drop(b)
    cluster.advance(1.0)
    assert len(b.of_type("welcome")) == 1  # its first only
    owner, record, _ = cluster.records[b.token or ""]
    assert owner is cluster.nodes[3]
    assert f'"{ROOM}"' in record  # parked again with the rooms it had
    assert presence(a) == presence(c) == []
    cluster.move(b, 2)
    cluster.advance(1.0)
    welcome = b.of_type("welcome")[-1]
    assert welcome["resumed"] is True
    assert ROOM in welcome["rooms"]
    cluster.advance(2.0)
    assert presence(a) == presence(c) == []
    assert members(cluster) == [("alice", "bob", "carol")] * 2
    assert cluster.nodes[3].engine.sessions() == []


def test_parked_records_say_how_often_the_session_moved() -> None:
    cluster, _a, b, _c = three()
    counts = []
    for there, to in ((1, 2), (2, 0), (0, 1)):
        cluster.nodes[there].drop(b)
        cluster.advance(0.1)
        counts.append(json.loads(cluster.records[b.token or ""][1])["m"])
        cluster.move(b, to)
        cluster.advance(0.1)
    assert counts == [0, 1, 2]


# -- the halves of a move on the wire ----------------------------------------------------------


def test_the_halves_of_a_move_survive_the_bus() -> None:
    for fact in (
        MemberArrived(user="ann", move="sid.1"),
        MemberMoved(user="ann", to="p2", move="sid.1", last=False),
    ):
        assert parse_bus(bus_fact("p1", ROOM, fact)) == Shared(origin="p1", room=ROOM, fact=fact)
    assert '"mv"' not in bus_fact("p1", ROOM, MemberArrived(user="ann"))


@pytest.mark.parametrize(
    "body",
    [
        '{"k": "in", "u": "ann", "mv": 3}',
        '{"k": "moved", "u": "ann", "to": "", "mv": "s.1", "l": true}',
        '{"k": "moved", "u": "ann", "to": "p2", "mv": "", "l": true}',
        '{"k": "moved", "u": "ann", "to": "p2", "mv": "s.1", "l": 1}',
        '{"k": "moved", "u": "ann", "to": "p2"}',
    ],
)
def test_a_peer_s_garbled_move_is_ignored(body: str) -> None:
    assert parse_bus(f'{{"o": "p", "r": "{ROOM}", "f": {body}}}') is None


@pytest.mark.parametrize("departure", ["in_time", "late", "lost"])
@pytest.mark.parametrize("then", [1, 2])
def test_a_session_parked_mid_move_is_listed_by_every_holder(then: int, departure: str) -> None:
    # MoveModel's example: dave moves from node 0 to node 1 and drops before node 1
    # welcomed him (the room was still loading there), so he waits out his grace
    # period parked on node 1, still a member. Node 0 counts him on node 1; node 1
    # holds the room for him and counts him too, and tells whoever takes the room
    # up (alice's node), whether node 0's half of the move reaches it or not.
    cluster = Cluster(3, Config(grace_period=1e6), store_latency=0.1)
    if departure == "late":
        hold_back(cluster, DEPARTURE, 1.0)
    elif departure == "lost":  # (the first move's: the bus loses that one fact)
        cluster.bus.drop_if = lambda payload: DEPARTURE in payload and '.1"' in payload
    bob = cluster.connect(0, "bob", rooms=[ROOM])
    dave = cluster.connect(0, "dave", rooms=[ROOM])
    cluster.advance(1.0)
    bob.take()
    cluster.move(dave, 1)
    dave.sim.drop(dave)
    cluster.advance(2.0)
    alice = cluster.connect(then, "alice", rooms=[ROOM])
    cluster.advance(2.0)
    assert set(members(cluster)) == {("alice", "bob", "dave")}
    assert presence(bob) == [("joined", "alice")]
    alice.take()  # (node 2 heard of bob and dave after her welcome: joined)
    cluster.move(dave, 2)  # he comes back, elsewhere: nobody sees it
    cluster.advance(2.0)
    assert dave.of_type("welcome")[-1]["resumed"] is True
    assert set(members(cluster)) == {("alice", "bob", "dave")}
    assert presence(bob) == presence(alice) == []
    cluster.nodes[2].close(dave)  # then he leaves: once, and nobody keeps him
    cluster.advance(2.0)
    assert presence(bob) == presence(alice) == [("left", "dave")]
    assert set(members(cluster)) == {("alice", "bob")}
