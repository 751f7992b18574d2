"""Several processes taking rooms and users up: what happens between asking the
bus for a channel and the bus confirming it (``Subscribed``).

Redis subscribes asynchronously: until it confirms a channel, a process hears
nothing published on it. The simulator's bus confirms late here
(``Faults.subscribe_delay``), so each test runs inside that window:

* a room confirmed asks the log for its own head only, not every room's;
* two processes taking a room up at the same instant both end up knowing both
  sides' members, whichever order their loads and confirmations come in
  (stated as a property: once the bus is quiet, every holder's member list is
  the union of every process's local members);
* a direct message sent while the recipient's channel is not confirmed yet
  reaches the live session, not only its next session's inbox.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from cluster_check import check_cluster
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatcore import BusResumed, Command, Config, LoadHeads, Subscribed
from chatcore_sim import Cluster, Faults, Node

PROBE = 30.0  # long: no periodic probe runs inside these tests unless they wait for it


def probes(cluster: Cluster) -> list[LoadHeads]:
    """Every LoadHeads the log is asked from now on (recorded as it is carried out)."""
    seen: list[LoadHeads] = []
    execute = cluster.store.execute_now

    def recording(effects: Sequence[Any]) -> list[Command]:
        seen.extend(e for e in effects if isinstance(e, LoadHeads))
        return execute(effects)

    cluster.store.execute_now = recording  # type: ignore[method-assign]
    return seen


def as_before(node: Node) -> None:
    """The adapter as it was: every newly confirmed room made it feed ``BusResumed``
    (every held room probed), for comparing against."""
    confirm = node.confirm

    def confirm_as_before(channel: str) -> None:
        confirm(channel)
        queued = node._queue
        if queued and isinstance(queued[-1], Subscribed) and queued[-1].rooms:
            queued[-1] = BusResumed()

    node.confirm = confirm_as_before  # type: ignore[method-assign]


def burst(n: int, *, before: bool = False) -> list[LoadHeads]:
    """``n`` users join ``n`` distinct rooms on one process at once; each room's
    channel is confirmed at its own moment."""
    cluster = Cluster(
        2,
        Config(head_probe_interval=PROBE),
        seed=3,
        faults=Faults(subscribe_delay=0.2),
    )
    if before:
        as_before(cluster.nodes[0])
    seen = probes(cluster)
    clients = [cluster.connect(0, f"u{i}", f"room{i}") for i in range(n)]
    cluster.advance(1.0)
    assert all(c.of_type("welcome") for c in clients)
    return seen


def test_a_burst_of_joins_into_distinct_rooms_probes_each_room_once() -> None:
    n = 40
    seen = burst(n)
    rooms = [r for p in seen for r in p.rooms]
    assert sorted(rooms) == sorted(f"room{i}" for i in range(n))  # each once, nothing else
    assert len(seen) <= n
    # What every newly confirmed room probing every held room cost: about n*n/2.
    before = [r for p in burst(n, before=True) for r in p.rooms]
    assert len(before) > n * n // 4


def test_a_reconnect_still_probes_every_room() -> None:
    cluster = Cluster(2, Config(head_probe_interval=PROBE), faults=Faults(subscribe_delay=0.2))
    for i in range(5):
        cluster.connect(0, f"u{i}", f"room{i}")
    cluster.advance(1.0)
    seen = probes(cluster)
    cluster.cut(0, 1.0)
    cluster.advance(1.5)
    assert [sorted(p.rooms) for p in seen] == [[f"room{i}" for i in range(5)]]


def test_a_message_sent_before_a_room_s_channel_is_confirmed_arrives_at_confirmation() -> None:
    cluster = Cluster(2, Config(head_probe_interval=PROBE), faults=Faults(subscribe_delay=0.5))
    alice = cluster.connect(0, "alice", "general")
    cluster.advance(1.0)
    bob = cluster.connect(1, "bob", "general")
    alice.send("unheard")  # bob's process is not subscribed yet
    cluster.advance(1.0)  # far less than a probe interval
    assert bob.texts() == ["unheard"]
    check_cluster(cluster)


def members_agree(cluster: Cluster, local: dict[int, dict[str, set[str]]]) -> None:
    """Every process holding a room lists the union of every process's local members."""
    rooms = {r for per in local.values() for r in per}
    for room in rooms:
        union = set().union(*(per.get(room, set()) for per in local.values()))
        for node in cluster.nodes:
            if room in node.engine.rooms():
                assert set(node.engine.members(room)) == union, (node.name, room)


@pytest.mark.parametrize("seed", range(12))
def test_two_processes_taking_a_room_up_at_once_learn_each_other_s_members(seed: int) -> None:
    cluster = Cluster(
        2,
        Config(head_probe_interval=PROBE),
        seed=seed,
        faults=Faults(subscribe_delay=0.3, max_delay=0.05),
        store_latency=0.3,
    )
    cluster.connect(0, "ann", "general")
    cluster.connect(1, "bo", "general")
    cluster.advance(2.0)
    members_agree(cluster, {0: {"general": {"ann"}}, 1: {"general": {"bo"}}})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**16),
    subscribe=st.sampled_from([0.0, 0.1, 0.5]),
    latency=st.sampled_from([0.0, 0.1, 0.5]),
    delay=st.sampled_from([0.0, 0.05]),
    steps=st.lists(
        st.tuples(
            st.integers(0, 2),
            st.sampled_from(["ann", "bo", "cy", "di"]),
            st.sampled_from(["general", "tech"]),
            st.sampled_from([0.0, 0.0, 0.05, 0.3]),
            st.booleans(),
        ),
        min_size=1,
        max_size=12,
    ),
)
def test_every_holder_lists_the_union_of_every_process_s_members(
    seed: int, subscribe: float, latency: float, delay: float, steps: list[Any]
) -> None:
    """Property: processes take rooms up in any order of loads, confirmations and
    deliveries (the bus loses nothing here); once it is quiet, every process
    holding a room lists exactly the users with a session in it on any process."""
    cluster = Cluster(
        3,
        Config(head_probe_interval=PROBE),
        seed=seed,
        faults=Faults(subscribe_delay=subscribe, max_delay=delay),
        store_latency=latency,
    )
    open_: list[tuple[int, str, str, Any]] = []
    for node, user, room, wait, close in steps:
        if close and open_:
            n, _, _, client = open_.pop(0)
            if client.conn is not None:
                cluster.nodes[n].close(client)
        else:
            open_.append((node, user, room, cluster.connect(node, user, room)))
        cluster.advance(wait)
    cluster.advance(3.0)
    local: dict[int, dict[str, set[str]]] = {}
    for node, user, room, client in open_:
        if client.conn is not None:
            local.setdefault(node, {}).setdefault(room, set()).add(user)
    members_agree(cluster, local)


def test_a_direct_message_sent_while_the_recipient_s_channel_is_unconfirmed_arrives_live() -> None:
    cluster = Cluster(2, Config(head_probe_interval=PROBE), faults=Faults(subscribe_delay=0.5))
    alice = cluster.connect(0, "alice", "general")
    cluster.advance(1.0)
    bob = cluster.connect(1, "bob", "general")
    assert bob.of_type("welcome")  # live, its channel not yet confirmed
    alice.dm("bob", "psst", id="d1")
    alice.dm("bob", "again", id="d2")
    cluster.advance(1.0)
    assert bob.texts("dm:alice:bob") == ["psst", "again"]
    bob.send("back", room="dm:alice:bob")
    cluster.advance(0.1)
    assert alice.texts("dm:alice:bob") == ["back"]
    check_cluster(cluster)


def test_a_recheck_of_direct_messages_read_meanwhile_adds_nothing() -> None:
    cluster = Cluster(2, Config(head_probe_interval=PROBE), faults=Faults(subscribe_delay=0.5))
    alice = cluster.connect(0, "alice", "general")
    bob_phone = cluster.connect(0, "bob", "general")
    cluster.advance(1.0)
    bob = cluster.connect(1, "bob", "general")
    alice.dm("bob", "psst", id="d1")
    cluster.advance(0.01)
    bob_phone.read(1, room="dm:alice:bob")  # read on the other device before the recheck
    cluster.advance(1.0)
    assert bob_phone.texts("dm:alice:bob") == ["psst"]
    assert "dm:alice:bob" not in cluster.nodes[1].engine.rooms()
    assert not bob.texts("dm:alice:bob")


def test_a_user_held_while_the_bus_reconnects_is_listening_only_once_confirmed() -> None:
    """A reconnect (``BusResumed``) vouches only for the channels it subscribed:
    one asked for meanwhile is listening once its own ``Subscribed`` came."""
    cluster = Cluster(2, Config(head_probe_interval=PROBE), faults=Faults(subscribe_delay=1.0))
    alice = cluster.connect(0, "alice", "general")
    cluster.advance(2.0)
    cluster.cut(1, 0.05)
    bob = cluster.connect(1, "bob")
    cluster.advance(0.1)  # the bus is back on bob's process; bob's channel is not yet
    assert cluster.nodes[1] not in cluster.bus.subscribers.get("user:bob", set())
    alice.dm("bob", "psst", id="d1")
    cluster.advance(2.0)
    assert bob.texts("dm:alice:bob") == ["psst"]


def test_a_direct_message_from_elsewhere_reaches_a_party_not_in_the_held_conversation() -> None:
    """The recipient's process holds the conversation for someone else (the
    sender's other session there) and the recipient left it: the message from
    another process brings the recipient back into it, as a local one does."""
    cluster = Cluster(2, Config(head_probe_interval=PROBE))
    alice = cluster.connect(0, "alice", "general")
    alice_too = cluster.connect(1, "alice", "general")
    bob = cluster.connect(1, "bob", "general")
    cluster.advance(0.5)
    alice_too.dm("bob", "one", id="d1")
    cluster.advance(0.5)
    bob.leave("dm:alice:bob")
    cluster.advance(0.5)
    assert "dm:alice:bob" in cluster.nodes[1].engine.rooms()  # (for alice_too)
    alice.dm("bob", "two", id="d2")
    cluster.advance(0.5)
    assert bob.texts("dm:alice:bob") == ["one", "two"]
    check_cluster(cluster)


def test_members_who_came_while_the_bus_was_away_are_listed_once_it_is_back() -> None:
    cluster = Cluster(2, Config(head_probe_interval=PROBE))
    cluster.connect(0, "ann", "general")
    bob = cluster.connect(1, "bob", "general")
    cluster.advance(1.0)
    cluster.cut(1, 2.0)
    cluster.connect(0, "dan", "general")  # its arrival is lost on the way to 1
    cluster.connect(1, "eve", "general")  # and this one on the way to 0
    cluster.nodes[1].close(bob)  # and this departure
    cluster.advance(3.0)
    for node in cluster.nodes:
        assert {"ann", "dan", "eve"} <= set(node.engine.members("general")), node.name
    # Bob's departure was not heard on node 0, only that node 1 no longer has him:
    # he is listed two probe intervals more (he may have moved; docs/engine.md
    # "Presence"), then gone.
    cluster.advance(2 * PROBE + PROBE / 2)
    for node in cluster.nodes:
        assert node.engine.members("general") == ("ann", "dan", "eve"), node.name
