"""Random runs of a cluster (three engines, one log, one faulty bus) against a
plain model of what each client must have.

Clients connect to any process, send (and retry with the same id), drop and
resume on any process (or reconnect to one while the old link is still open),
while the bus drops deliveries, delays them (so they reorder across
publishers), fails publishes after the commit, is cut from one process for a
while, subscriptions are confirmed late, rooms load slowly (messages arrive
during the load), and the log sometimes loses a room's data (a new epoch). The
model is the log itself plus, per client, the last (epoch, offset) it saw in
each room (``cluster_check.positions``). The invariant:

* after every step, every client's stream per room is in offset order with
  nothing twice, and a resume goes on exactly where the client was, unless it
  was told of a discontinuity (another epoch);
* after a quiet period of one probe interval (plus the log's and the bus's
  delays), every connected member is at its room's head in the log: every
  acked message reached it exactly once. No engine stays behind longer.
"""

from __future__ import annotations

import os

from cluster_check import ROOMS, USERS, MovingUsers, check_cluster, positions
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from chatcore import Config
from chatcore_sim import Cluster, Faults, SimClient

PROBE = 4.0


class ClusterModel(RuleBasedStateMachine):
    cluster: Cluster
    clients: list[SimClient]

    @initialize(
        seed=st.integers(0, 2**16),
        drop=st.sampled_from([0.0, 0.1, 0.3]),
        fail=st.sampled_from([0.0, 0.1]),
        delay=st.sampled_from([0.0, 0.2]),
        latency=st.sampled_from([0.0, 0.1]),
        subscribe=st.sampled_from([0.0, 0.2]),
    )
    def start(
        self, seed: int, drop: float, fail: float, delay: float, latency: float, subscribe: float
    ) -> None:
        self.cluster = Cluster(
            3,
            Config(head_probe_interval=PROBE, grace_period=30.0),
            seed=seed,
            faults=Faults(drop=drop, fail_publish=fail, max_delay=delay, subscribe_delay=subscribe),
            store_latency=latency,
        )
        self.clients = []
        self.ids = 0

    @rule(
        node=st.integers(0, 2),
        user=st.sampled_from(USERS),
        rooms=st.sets(st.sampled_from(ROOMS), min_size=1),
    )
    def connect(self, node: int, user: str, rooms: set[str]) -> None:
        if len(self.clients) < 6:
            self.clients.append(self.cluster.connect(node, user, rooms=sorted(rooms)))

    @rule(which=st.integers(0, 5), room=st.sampled_from(ROOMS), retry=st.booleans())
    def send(self, which: int, room: str, retry: bool) -> None:
        if not self.clients:
            return
        client = self.clients[which % len(self.clients)]
        if client.conn is None or room not in positions(client, lost=frozenset(self.cluster.lost)):
            return
        self.ids += 1
        client.send(f"t{self.ids}", room, id=f"c{self.ids}")
        if retry:
            client.send(f"t{self.ids}", room, id=f"c{self.ids}")

    @rule(which=st.integers(0, 5), node=st.integers(0, 2))
    def drop_and_resume(self, which: int, node: int) -> None:
        if self.clients:
            client = self.clients[which % len(self.clients)]
            if client.token is not None:
                self.cluster.move(client, node)

    @rule(which=st.integers(0, 5), node=st.integers(0, 2))
    def reconnect_with_the_old_link_open(self, which: int, node: int) -> None:
        # Its old process has not noticed the link died: the session is handed over.
        if self.clients:
            i = which % len(self.clients)
            client = self.clients[i]
            if client.token is not None and client.conn is not None:
                self.clients[i] = self.cluster.reconnect(client, node)

    @rule(which=st.integers(0, 5))
    def drop(self, which: int) -> None:
        if self.clients:
            client = self.clients[which % len(self.clients)]
            if client.conn is not None:
                client.sim.drop(client)

    @rule(node=st.integers(0, 2), seconds=st.sampled_from([0.5, 2.0]))
    def cut_bus(self, node: int, seconds: float) -> None:
        self.cluster.cut(node, seconds)

    @rule(room=st.sampled_from(ROOMS))
    def lose_log(self, room: str) -> None:
        self.cluster.lose(room)

    @rule(seconds=st.sampled_from([0.01, 0.1, 0.5]))
    def advance(self, seconds: float) -> None:
        self.cluster.advance(seconds)

    @rule()
    def quiet_for_a_probe_interval(self) -> None:
        # Cuts end within 2 s; then a probe interval, the log's and the bus's delays.
        self.cluster.advance(2.0 + PROBE + 0.5)
        check_cluster(self.cluster)

    @invariant()
    def streams_in_order_without_repeats(self) -> None:
        for client in getattr(self, "clients", []):
            positions(client, lost=frozenset(self.cluster.lost))

    def teardown(self) -> None:
        if hasattr(self, "cluster"):
            self.cluster.advance(2.0 + PROBE + 0.5)
            check_cluster(self.cluster)


ClusterModel.TestCase.settings = settings(
    max_examples=int(os.environ.get("CHATCORE_CLUSTER_EXAMPLES", "150")),
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    phases=[
        p for p in Phase if p is not Phase.shrink or os.environ.get("CHATCORE_SHRINK", "1") == "1"
    ],
)
test_cluster_model = ClusterModel.TestCase


class MoveModel(MovingUsers):
    """Users who only move: each connects once, then drops, resumes on any process
    (a parked session claimed) or reconnects to any process while its old
    connection is still open there (a live session handed over), while the bus
    delays deliveries so that the two halves of a move, from two publishers,
    arrive in either order. Sessions never end (the grace period outlasts the
    run), so every user who was welcomed stays a member of the rooms it asked for.

    Invariant: nobody ever reads ``left`` (or a presence frame with leaves): a
    user whose session moves is never reported gone while a session of theirs
    exists. Once quiet, every process holding a room lists the same members,
    each with a session somewhere (no one kept who is gone, nobody missing).
    (A bus that loses facts: ``DeafPresenceModel`` in test_cluster_presence.py.)
    """

    cluster: Cluster

    @initialize(
        seed=st.integers(0, 2**16),
        delay=st.sampled_from([0.0, 0.2, 1.0]),
        latency=st.sampled_from([0.0, 0.1]),
    )
    def start(self, seed: int, delay: float, latency: float) -> None:
        self.cluster = Cluster(
            3,
            Config(head_probe_interval=PROBE, grace_period=1e6),
            seed=seed,
            faults=Faults(max_delay=delay),
            store_latency=latency,
        )
        self.delay = delay
        self.clients: dict[str, SimClient] = {}
        self.every: list[SimClient] = []

    @rule(user=st.sampled_from(USERS))
    def drop(self, user: str) -> None:
        client = self.clients.get(user)
        if client is not None and client.conn is not None:
            client.sim.drop(client)

    @rule(seconds=st.sampled_from([0.01, 0.1, 0.5]))
    def advance(self, seconds: float) -> None:
        self.cluster.advance(seconds)

    @rule()
    def quiet(self) -> None:
        self.cluster.advance(2 * self.delay + 1.0)
        self.members_agree()

    @invariant()
    def nobody_reads_left(self) -> None:
        for client in getattr(self, "every", []):
            for event in client.events:
                assert event["type"] != "left", (client.user, event)
                assert not event.get("leaves"), (client.user, event)

    def members_agree(self) -> None:
        nodes = self.cluster.nodes
        have = {u for n in nodes for s in n.engine.sessions() for u in [s.user]}
        for room in ROOMS:
            lists = {n.engine.members(room) for n in nodes if room in n.engine.rooms()}
            assert len(lists) <= 1, (room, lists)
            listed = set(next(iter(lists), ()))
            members = {s.user for n in nodes for s in n.engine.sessions() if room in s.rooms}
            assert members <= listed <= have, (room, members, listed, have)

    def teardown(self) -> None:
        if hasattr(self, "cluster"):
            self.cluster.advance(2 * self.delay + 1.0)
            self.members_agree()


MoveModel.TestCase.settings = settings(
    max_examples=int(os.environ.get("CHATCORE_CLUSTER_EXAMPLES", "150")),
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    phases=[
        p for p in Phase if p is not Phase.shrink or os.environ.get("CHATCORE_SHRINK", "1") == "1"
    ],
)
test_moves_are_never_seen = MoveModel.TestCase


# -- examples hypothesis found, replayed as they were found ---------------------------------


def test_move_model_a_session_parked_before_its_welcome_is_listed_everywhere() -> None:
    # Dave moves to node 1 and drops before his welcome there; alice then comes to
    # node 1: both holders of the room must list him (he is parked, a member).
    state = MoveModel()
    state.start(seed=0, delay=0.0, latency=0.1)
    state.connect(node=0, rooms={"general"}, user="bob")
    state.connect(node=0, rooms={"general"}, user="dave")
    state.quiet()
    state.drop_and_resume(node=1, user="dave")
    state.drop(user="dave")
    state.quiet()
    state.connect(node=1, rooms={"general"}, user="alice")
    state.quiet()
    state.nobody_reads_left()
    state.teardown()


def test_cluster_model_a_send_after_a_lost_life_allows_that_life_s_gap() -> None:
    # The bus loses t1 on its way to node 1 and the log loses the room before node 1
    # could fetch it: node 1's member skips it (the life it was in is gone). A send
    # afterwards judged the stream without the lost lives and failed where the
    # invariant (and the model's docstring) allows the gap.
    state = ClusterModel()
    state.start(seed=0, drop=0.3, fail=0.0, delay=0.0, latency=0.0, subscribe=0.0)
    for node in (0, 0, 0, 1):
        state.connect(node=node, user="alice", rooms={"general"})
    state.send(which=0, room="general", retry=False)
    state.send(which=0, room="general", retry=False)
    state.lose_log(room="general")
    state.advance(0.01)
    state.streams_in_order_without_repeats()
    state.send(which=3, room="general", retry=False)
    state.streams_in_order_without_repeats()
    state.teardown()
