"""A direct message crosses processes even when the bus failed it, in the simulator.

The recipient's process does not hold the conversation: it hears a direct
message only on the recipient's channel, and no head probe covers a room it
does not hold. So a message whose publish failed, or that was published while
the recipient's process was off the bus, would reach the recipient only in a
later session's inbox. What the user must notice instead: the message arrives
on the open connection, exactly once, in order, without reconnecting, and
long before any head probe (the probe interval here is a minute).

* the sender's publishes fail (``Cluster.mute``: its subscription is fine, so
  it gets no ``BusResumed``): its adapter keeps them and publishes them again,
  in order, once its link works;
* the recipient's process is off the bus (``Cluster.cut``): on ``BusResumed`` it
  asks the log for the inbox of each user with a session here (one
  ``LoadInbox`` per user, not per session or room);
* both at once, in either order of healing: the republish and the recheck
  meet, and the second is dropped.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from cluster_check import check_cluster

from chatcore import Command, Config, LoadInbox
from chatcore_sim import Cluster, SimClient

PROBE = 60.0  # never due in these tests: what arrives did not come by a probe
ROOM = "dm:alice:bob"


def pair(n: int = 2) -> tuple[Cluster, SimClient, SimClient]:
    """alice on process 0 and bob on process 1, sharing no room."""
    cluster = Cluster(n, Config(head_probe_interval=PROBE))
    alice = cluster.connect(0, "alice", "a-room")
    bob = cluster.connect(1, "bob", "b-room")
    cluster.advance(0.5)
    return cluster, alice, bob


def inbox_queries(cluster: Cluster) -> Counter[str]:
    """Counts the log's inbox queries by user, from now on."""
    store = cluster.store
    counts: Counter[str] = Counter()
    execute = store.execute_now

    def counting(effects: Sequence[object]) -> list[Command]:
        counts.update(e.user for e in effects if isinstance(e, LoadInbox))
        return execute(effects)  # type: ignore[arg-type]

    store.execute_now = counting  # type: ignore[method-assign]
    return counts


def test_a_direct_message_whose_publish_failed_arrives_live_once_the_link_works() -> None:
    cluster, alice, bob = pair()
    cluster.mute(0, 2.0)
    alice.dm("bob", "psst", id="d1")
    cluster.advance(0.5)
    assert [e["offset"] for e in alice.of_type("ack")] == [1]  # stored and acked
    assert bob.texts(ROOM) == []
    cluster.advance(2.0)
    assert bob.texts(ROOM) == ["psst"]
    assert bob.connected  # the same connection: no reconnect, one welcome
    assert len(bob.of_type("welcome")) == 1
    cluster.advance(5.0)
    assert bob.texts(ROOM) == ["psst"]
    check_cluster(cluster)


def test_direct_messages_kept_while_publishing_failed_arrive_in_their_order() -> None:
    """The recipient's process loads the conversation on the first message it hears
    and delivers from there: one heard before an older one would hide the older."""
    cluster, alice, bob = pair()
    cluster.mute(0, 2.0)
    for i, text in enumerate(("one", "two", "three")):
        alice.dm("bob", text, id=f"d{i}")
        cluster.advance(0.2)
    cluster.advance(2.0)
    alice.dm("bob", "four", id="d4")
    cluster.advance(0.5)
    assert bob.texts(ROOM) == ["one", "two", "three", "four"]
    assert [m["offset"] for m in bob.messages(ROOM)] == [1, 2, 3, 4]
    check_cluster(cluster)


def test_a_direct_message_sent_while_the_recipient_s_process_was_off_the_bus() -> None:
    cluster, alice, bob = pair()
    queries = inbox_queries(cluster)
    cluster.cut(1, 2.0)
    alice.dm("bob", "psst", id="d1")
    cluster.advance(0.5)
    assert [e["offset"] for e in alice.of_type("ack")] == [1]
    assert bob.texts(ROOM) == []
    cluster.advance(2.0)
    assert bob.texts(ROOM) == ["psst"]
    assert bob.connected  # the same connection: no reconnect, one welcome
    assert len(bob.of_type("welcome")) == 1
    assert queries == {"bob": 1}  # one inbox query for bob's process's one user
    bob.send("back", room=ROOM)
    cluster.advance(0.5)
    assert alice.texts(ROOM) == ["back"]
    cluster.advance(5.0)
    assert bob.texts(ROOM) == ["psst"]
    check_cluster(cluster)


def test_after_the_bus_is_back_each_user_here_costs_one_inbox_query() -> None:
    """Two sessions of bob and one of carol on the process: two queries, and both
    of bob's sessions get the message."""
    cluster, alice, bob = pair()
    bob_phone = cluster.connect(1, "bob")
    carol = cluster.connect(1, "carol", "b-room")
    cluster.advance(0.5)
    queries = inbox_queries(cluster)
    cluster.cut(1, 2.0)
    alice.dm("bob", "psst", id="d1")
    cluster.advance(3.0)
    assert bob.texts(ROOM) == bob_phone.texts(ROOM) == ["psst"]
    assert carol.messages() == []
    assert queries == {"bob": 1, "carol": 1}
    check_cluster(cluster)


def test_a_conversation_held_here_is_left_to_its_probe_not_delivered_twice() -> None:
    """bob's process holds the conversation already (an earlier message): the
    recheck leaves it alone, and the probe that ``BusResumed`` asks for fetches
    the new message once."""
    cluster, alice, bob = pair()
    alice.dm("bob", "first", id="d1")
    cluster.advance(0.5)
    assert ROOM in cluster.nodes[1].engine.rooms()
    cluster.cut(1, 2.0)
    alice.dm("bob", "second", id="d2")
    cluster.advance(3.0)
    assert bob.texts(ROOM) == ["first", "second"]
    check_cluster(cluster)


def test_both_failures_at_once_deliver_once_whichever_heals_first() -> None:
    for sender_heals, recipient_heals in ((1.0, 2.0), (2.0, 1.0), (1.5, 1.5)):
        cluster, alice, bob = pair()
        cluster.cut(0, sender_heals)  # alice's publish fails: kept
        cluster.cut(1, recipient_heals)  # and bob's process hears nothing
        alice.dm("bob", "psst", id="d1")
        alice.dm("bob", "again", id="d2")
        cluster.advance(3.0)
        assert bob.texts(ROOM) == ["psst", "again"], (sender_heals, recipient_heals)
        assert [m["offset"] for m in bob.messages(ROOM)] == [1, 2]
        check_cluster(cluster)


def test_a_republished_copy_heard_while_the_recheck_loads_the_room_is_dropped() -> None:
    """With a slow log, the sender's republish reaches the recipient's process while
    its recheck is still asking the log or loading the conversation (or just after):
    the copy is held with the load and merged by offset, or found delivered."""
    for lag in (0.0, 0.02, 0.05, 0.1, 0.2, 0.4):
        cluster = Cluster(2, Config(head_probe_interval=PROBE), store_latency=0.1, seed=3)
        alice = cluster.connect(0, "alice", "a-room")
        bob = cluster.connect(1, "bob", "b-room")
        cluster.advance(1.0)
        cluster.cut(1, 1.0)
        cluster.cut(0, 1.0 + lag)
        alice.dm("bob", "psst", id="d1")
        cluster.advance(3.0)
        assert bob.texts(ROOM) == ["psst"], lag
        check_cluster(cluster)


def test_a_user_whose_sessions_ended_while_the_bus_was_away_costs_nothing() -> None:
    cluster, alice, bob = pair()
    queries = inbox_queries(cluster)
    cluster.cut(1, 2.0)
    cluster.nodes[1].close(bob)
    alice.dm("bob", "psst", id="d1")
    cluster.advance(3.0)
    assert queries == {}
    assert ROOM not in cluster.nodes[1].engine.rooms()
