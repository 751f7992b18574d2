"""Several processes, one chat, in the simulator: N engines over one log and one bus.

Each test states what a user notices when a chat runs on several processes,
and most plant one of the bus's known failures (a lost message, a lost last
message, a deaf subscriber, a node cut off, a publish that failed after the
commit, a log that lost its data). The invariant is ``cluster_check``'s.
"""

from __future__ import annotations

import pytest
from cluster_check import check_cluster

from chatcore import Config
from chatcore_sim import Cluster, Faults, SimClient

PROBE = 5.0


def three(**kw: object) -> tuple[Cluster, SimClient, SimClient, SimClient]:
    cluster = Cluster(3, **kw)  # type: ignore[arg-type]
    a = cluster.connect(0, "alice", "general")
    b = cluster.connect(1, "bob", "general")
    c = cluster.connect(2, "carol", "general")
    cluster.advance(0.1)
    return cluster, a, b, c


def test_members_on_any_process_see_the_same_messages_at_the_same_offsets() -> None:
    cluster, a, b, c = three()
    a.send("one")
    b.send("two")
    c.send("three")
    cluster.advance(0.1)
    for client in (a, b, c):
        seen = {m["text"]: m["offset"] for m in client.messages()}
        assert seen == {t: o for t, o in {"one": 1, "two": 2, "three": 3}.items() if t in seen}
    assert b.texts() == ["one", "three"]
    assert c.texts() == ["one", "two"]
    check_cluster(cluster)


def test_member_lists_and_joined_left_are_the_union_of_every_process() -> None:
    cluster, _a, b, c = three()
    for node in cluster.nodes:
        assert node.engine.members("general") == ("alice", "bob", "carol")
    dave = cluster.connect(0, "dave", "general")
    cluster.advance(0.1)
    assert dave.of_type("members")[-1]["users"] == ["alice", "bob", "carol", "dave"]
    assert {"type": "joined", "room": "general", "user": "dave"} in b.take()
    cluster.nodes[1].close(b)
    cluster.advance(0.1)
    assert {"type": "left", "room": "general", "user": "bob"} in c.take()
    assert cluster.nodes[0].engine.members("general") == ("alice", "carol", "dave")


def test_a_user_on_two_processes_leaves_only_when_gone_from_both() -> None:
    cluster, a, _b, c = three()
    c.take()
    a2 = cluster.connect(1, "alice", "general")
    cluster.advance(0.1)
    assert not [e for e in c.take() if e["type"] == "joined" and e["user"] == "alice"]
    cluster.nodes[0].close(a)
    cluster.advance(0.1)
    assert not [e for e in c.take() if e["type"] == "left"]
    cluster.nodes[1].close(a2)
    cluster.advance(0.1)
    assert [e for e in c.take() if e["type"] == "left"] == [
        {"type": "left", "room": "general", "user": "alice"}
    ]


def test_typing_and_read_marks_cross_processes() -> None:
    cluster, a, b, c = three()
    a.send("hello")
    cluster.advance(0.1)
    b.typing()
    cluster.advance(0.1)
    assert {"type": "typing", "room": "general", "user": "bob", "active": True} in a.events
    b.read(1)
    cluster.advance(0.1)
    marks = [e for e in c.events if e["type"] == "read"]
    assert marks == [{"type": "read", "room": "general", "user": "bob", "offset": 1}]
    cluster.advance(10)
    assert {"type": "typing", "room": "general", "user": "bob", "active": False} in a.events


def test_a_direct_message_reaches_the_recipient_on_another_process() -> None:
    cluster = Cluster(3)
    alice = cluster.connect(0, "alice", "general")
    bob = cluster.connect(2, "bob", "general")
    cluster.advance(0.1)
    alice.dm("bob", "psst", id="d1")
    cluster.advance(0.1)
    assert bob.texts("dm:alice:bob") == ["psst"]
    assert [e["offset"] for e in alice.of_type("ack")] == [1]
    bob.send("back", room="dm:alice:bob")
    cluster.advance(0.1)
    assert alice.texts("dm:alice:bob") == ["back"]
    # And the inbox, on a process that holds nothing of it yet.
    other_device = cluster.connect(1, "alice")
    cluster.advance(0.1)
    assert "dm:alice:bob" in other_device.of_type("welcome")[0]["rooms"]
    check_cluster(cluster)


def test_centrifuge_go_150_order_on_subscribe() -> None:
    """centrifuge-go #150: messages published while a subscriber was loading the
    room's history came out of order or were lost. Here node 1 subscribes before
    its (slow) load reads the head; what the bus brings meanwhile is held and
    merged by offset."""
    cluster = Cluster(2, Config(head_probe_interval=60.0), store_latency=0.5, seed=3)
    alice = cluster.connect(0, "alice", "general")
    cluster.advance(1)
    for i in range(3):
        alice.send(f"before {i}")
    cluster.advance(1)
    bob = cluster.connect(1, "bob", "general")  # its LoadRoom answers up to 0.5 s later
    loading = cluster.nodes[1]._later[0][0]
    while cluster.now < loading - 0.01:  # messages published while it loads
        alice.send(f"during {cluster.now}")
        cluster.advance(0.01)
    cluster.advance(2)  # (no probe in this test: only the merge can deliver them)
    offsets = [m["offset"] for m in bob.messages()]
    assert offsets == sorted(offsets)
    assert len(offsets) == len(set(offsets))
    check_cluster(cluster)


def test_centrifugo_1189_deaf_node() -> None:
    """centrifugo #1189: a node whose subscription died silently never delivered
    again. Here the subscription dies with no error and no reconnect: the head
    probe finds the room behind within one probe interval."""
    cluster, a, _b, c = three(config=Config(head_probe_interval=PROBE))
    deaf = cluster.nodes[2]
    for subscribers in cluster.bus.subscribers.values():
        subscribers.discard(deaf)  # the subscription is gone; nobody was told
    a.send("are you there?")
    cluster.advance(0.1)
    assert c.texts() == []
    cluster.advance(PROBE)
    assert c.texts() == ["are you there?"]
    check_cluster(cluster)


def test_python_socketio_1581_worker_stops_receiving() -> None:
    """python-socketio #1581: a worker stopped receiving after its message queue
    connection dropped. Here the node is cut from the bus: its own sends are still
    stored and acked, and when the bus comes back every held room resyncs at
    once (``BusResumed``), without waiting for a probe."""
    cluster, a, b, _c = three(config=Config(head_probe_interval=60.0))
    cluster.cut(1, seconds=3.0)
    b.send("mine, stored anyway", id="b1")
    cluster.advance(0.1)
    assert [e["offset"] for e in b.of_type("ack")] == [1]
    a.send("while you were away")
    cluster.advance(0.1)
    assert b.texts() == []
    cluster.advance(3.0)
    assert b.texts() == ["while you were away"]
    cluster.advance(60.0)
    assert a.texts() == ["mine, stored anyway"]
    check_cluster(cluster)


def test_the_last_message_of_a_burst_lost_on_the_bus_arrives_by_the_probe() -> None:
    cluster, a, b, _c = three(config=Config(head_probe_interval=PROBE))
    cluster.bus.drop_if = lambda payload: '"last"' in payload
    for text in ("first", "second", "last"):
        a.send(text)
    cluster.advance(0.1)
    assert b.texts() == ["first", "second"]
    cluster.advance(PROBE)
    assert b.texts() == ["first", "second", "last"]
    check_cluster(cluster)


def test_a_publish_that_fails_after_the_commit_loses_nothing() -> None:
    cluster, a, b, c = three(
        config=Config(head_probe_interval=PROBE), faults=Faults(fail_publish=1.0)
    )
    a.send("stored, never published")
    a.send("nor this")
    cluster.advance(0.1)
    assert [e["offset"] for e in a.of_type("ack")] == [1, 2]
    cluster.advance(PROBE)
    assert b.texts() == c.texts() == ["stored, never published", "nor this"]
    check_cluster(cluster)


def test_deliveries_reordered_across_publishers_come_out_in_offset_order() -> None:
    cluster, a, b, c = three(faults=Faults(max_delay=0.3), seed=7)
    for i in range(10):
        (a if i % 2 else b).send(f"m{i}")
        cluster.advance(0.01)
    cluster.advance(1)
    assert [m["offset"] for m in c.messages()] == list(range(1, 11))
    check_cluster(cluster)


def test_a_lost_log_starts_a_new_life_that_members_are_told_of() -> None:
    cluster, a, b, c = three(config=Config(head_probe_interval=PROBE))
    a.send("old life")
    cluster.advance(0.1)
    old = c.messages()[-1]["epoch"]
    cluster.lose("general")
    b.send("new life")  # node 1 learns of the new epoch from its own append
    cluster.advance(PROBE)
    last = c.messages()[-1]
    assert (last["text"], last["offset"]) == ("new life", 1)
    assert last["epoch"] != old
    check_cluster(cluster)


def test_a_resume_with_an_offset_of_another_life_is_reset_not_replayed() -> None:
    cluster, a, _b, c = three(config=Config(head_probe_interval=PROBE))
    for i in range(3):
        a.send(f"old {i}")
    cluster.advance(0.1)
    cluster.nodes[2].drop(c)
    cluster.lose("general")
    a.send("new 0")
    cluster.advance(PROBE)
    cluster.move(c, 0)
    cluster.advance(0.1)
    welcome = c.of_type("welcome")[-1]
    assert welcome["resumed"] is True
    assert welcome["rooms"]["general"]["reset"] is True
    assert welcome["rooms"]["general"]["offset"] == 1
    check_cluster(cluster)


def test_a_client_retry_is_stored_and_delivered_once() -> None:
    cluster, a, b, _c = three()
    a.send("once", id="x1")
    a.send("once", id="x1")
    cluster.advance(0.1)
    assert b.texts() == ["once"]
    assert [e["offset"] for e in a.of_type("ack")] == [1, 1]
    check_cluster(cluster)


def test_a_session_resumes_on_another_process_with_exactly_what_it_missed() -> None:
    cluster, a, b, c = three()
    a.send("seen")
    cluster.advance(0.1)
    cluster.nodes[1].drop(b)
    cluster.advance(0.1)
    a.send("missed 1")
    a.send("missed 2")
    cluster.advance(0.1)
    assert not [e for e in c.take() if e["type"] == "left"]
    a.take()
    cluster.move(b, 2)
    cluster.advance(0.1)
    welcome = b.of_type("welcome")[-1]
    assert welcome["resumed"] is True
    assert b.texts() == ["seen", "missed 1", "missed 2"]
    assert cluster.nodes[1].engine.sessions("bob") == []  # the old owner forgot it
    assert not [e for e in c.take() + a.take() if e["type"] in ("left", "joined")]
    for node in (cluster.nodes[0], cluster.nodes[2]):
        assert node.engine.members("general") == ("alice", "bob", "carol")
    assert "general" not in cluster.nodes[1].engine.rooms()  # nobody left there
    check_cluster(cluster)


def test_a_live_session_claimed_elsewhere_closes_its_old_connection() -> None:
    cluster, _a, b, _c = three()
    old_conn = b.conn
    cluster.move(b, 0)  # (the simulator drops it first; make the old one look alive)
    cluster.advance(0.1)
    assert old_conn is not None
    assert b.of_type("welcome")[-1]["resumed"] is True


def test_a_token_resumes_only_its_own_user() -> None:
    cluster, _a, b, _c = three()
    cluster.nodes[1].drop(b)
    cluster.advance(0.1)
    thief = cluster.connect(2, "mallory", "general")
    thief.token = b.token
    cluster.move(thief, 2)
    cluster.advance(0.1)
    welcome = thief.of_type("welcome")[-1]
    assert welcome["resumed"] is False
    assert welcome["user"] == "mallory"
    cluster.move(b, 0)  # the record is still bob's
    cluster.advance(0.1)
    assert b.of_type("welcome")[-1]["resumed"] is True


def test_a_killed_process_s_members_leave_once_after_its_heartbeat() -> None:
    cluster, a, _b, _c = three(heartbeat=40.0)
    dave = cluster.connect(1, "dave", "general")
    cluster.advance(0.1)
    a.take()
    cluster.kill(1)
    cluster.advance(39)
    assert not [e for e in a.take() if e["type"] == "left"]
    cluster.advance(2)
    left = sorted(e["user"] for e in a.take() if e["type"] == "left")
    assert left == ["bob", "dave"]
    assert cluster.nodes[0].engine.members("general") == ("alice", "carol")
    cluster.nodes[0].feed(__import__("chatcore").ProcessGone(origin="p1"))
    assert not [e for e in a.take() if e["type"] == "left"]  # never twice
    assert dave.conn is None


def test_a_session_of_a_killed_process_resumes_elsewhere() -> None:
    cluster, a, b, _c = three()
    cluster.nodes[1].drop(b)
    cluster.advance(0.1)
    cluster.kill(1)
    a.send("after the crash")
    cluster.advance(0.1)
    cluster.move(b, 2)
    cluster.advance(0.1)
    assert b.of_type("welcome")[-1]["resumed"] is True
    assert b.texts() == ["after the crash"]


@pytest.mark.parametrize("seed", range(4))
def test_lossy_bus_with_every_fault_still_delivers_everything(seed: int) -> None:
    cluster, a, b, c = three(
        config=Config(head_probe_interval=PROBE),
        faults=Faults(drop=0.2, fail_publish=0.1, max_delay=0.2),
        seed=seed,
        store_latency=0.05,
    )
    for i in range(30):
        [a, b, c][i % 3].send(f"m{i}", id=f"id{i}")
        cluster.advance(0.03)
    cluster.cut(2, 1.0)
    for i in range(30, 40):
        a.send(f"m{i}")
    cluster.settle()
    check_cluster(cluster)


def test_a_crowded_room_batches_members_of_other_processes_too() -> None:
    """Presence in a crowded room is one frame per interval, whichever process
    a user came through; it names each user as they are when it is sent."""
    config = Config(cluster=True, presence_batch_above=2, presence_interval=0.5)
    cluster = Cluster(2, config=config)
    watcher = cluster.connect(0, "wanda", "hall")
    others = [cluster.connect(1, name, "hall") for name in ("xena", "yuri", "zoe")]
    cluster.advance(1.0)
    first = [e for e in watcher.take() if e["type"] == "presence"]
    assert first == [{"type": "presence", "room": "hall", "joins": ["yuri", "zoe"], "leaves": []}]
    cluster.nodes[1].close(others[0])
    late = cluster.connect(1, "abel", "hall")
    cluster.advance(0.1)
    assert not [e for e in watcher.take() if e["type"] in ("joined", "left", "presence")]
    cluster.advance(1.0)
    frames = [e for e in watcher.take() if e["type"] in ("joined", "left", "presence")]
    assert frames == [{"type": "presence", "room": "hall", "joins": ["abel"], "leaves": ["xena"]}]
    assert cluster.nodes[0].engine.members("hall") == ("abel", "wanda", "yuri", "zoe")
    assert late.of_type("members")[-1]["users"] == ["abel", "wanda", "yuri", "zoe"]


def test_a_gap_lost_with_its_life_is_skipped_and_the_next_life_tells_the_member() -> None:
    # ClusterModel's example: the bus loses "one", node 1 hears "two" and asks the
    # log for the gap, but the log lost the room's data meanwhile (a new epoch):
    # it has nothing to give. "two" goes out past the hole (the life it belongs to
    # is gone, so nothing would ever fill it), and the next message, of the new
    # life, tells the member of the break by its epoch.
    cluster, a, b, _c = three(config=Config(head_probe_interval=PROBE))
    cluster.bus.drop_if = lambda payload: '"one"' in payload
    a.send("one")
    a.send("two")
    cluster.lose("general")
    cluster.advance(0.1)
    old = [(m["text"], m["offset"]) for m in b.messages()]
    assert old == [("two", 2)]
    a.send("new life")
    cluster.advance(PROBE)
    last = b.messages()[-1]
    assert (last["text"], last["offset"]) == ("new life", 1)
    assert last["epoch"] != b.messages()[0]["epoch"]
    check_cluster(cluster)
