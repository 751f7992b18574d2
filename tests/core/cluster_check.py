"""The cluster invariant, as a plain model a test can state.

Every message the log stored reaches every member session exactly once, in
offset order, or the session is told of the discontinuity (a message or a
welcome of another epoch: the room's history began a new life); and once the
cluster settles, every connected member is at its room's head in the log.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule

from chatcore_sim import Cluster, SimClient

__all__ = ["check_client", "check_cluster", "positions"]


def positions(
    client: SimClient, acked: dict[str, int] | None = None, lost: frozenset[str] = frozenset()
) -> dict[str, tuple[str, int]]:
    """Walk the client's events, asserting order and no duplicate per room;
    return where it stands per room: (epoch, last offset seen). ``acked`` gets
    the offset of the last ack per room (an ack carries no epoch: one at or below
    what was seen is a retried send's, or the client's own first message of a
    new life, which the client cannot tell apart). In an epoch in ``lost`` (the log
    lost that life's data, and the next life tells the client so) messages may be
    missing, never repeated or out of order."""
    last: dict[str, tuple[str, int]] = {}
    acked = {} if acked is None else acked
    for event in client.events:
        kind = event.get("type")
        if kind == "welcome":
            rooms: dict[str, Any] = event["rooms"]
            if not event["resumed"]:
                last.clear()
            for room, p in rooms.items():
                at = (p["epoch"], p["offset"])
                before = last.get(room)
                if (
                    event["resumed"]
                    and before is not None
                    and not p.get("reset")
                    and before[0] == at[0]
                ):
                    # A resume goes on from what the client had: nothing skipped.
                    assert at[1] == before[1], (client.user, room, before, at)
                last[room] = at
        elif kind == "members":
            last.setdefault(event["room"], (event["epoch"], event["offset"]))
        elif kind == "message":
            room, at = event["room"], (event["epoch"], event["offset"])
            before = last.get(room)
            assert before is not None, (client.user, event)
            if before[0] == at[0] and before[0] in lost:
                assert at[1] > before[1], (client.user, room, before, at, event["text"])
            elif before[0] == at[0]:
                assert at[1] == before[1] + 1, (client.user, room, before, at, event["text"])
            last[room] = at
        elif kind == "ack":
            room = event["room"]
            before = last.get(room)
            assert before is not None, (client.user, event)
            acked[room] = event["offset"]
            if event["offset"] <= before[1]:
                continue  # the ack of a retried send: the message was counted once
            if before[0] not in lost:
                assert event["offset"] == before[1] + 1, (client.user, room, before, event)
            last[room] = (before[0], event["offset"])
        elif kind == "left" and event["user"] == client.user:
            last.pop(event["room"], None)
    return last


def check_client(cluster: Cluster, client: SimClient) -> None:
    """The client's stream is in order with nothing twice, and (if connected) at
    its rooms' heads in the log."""
    acked: dict[str, int] = {}
    for room, (epoch, offset) in positions(client, acked, frozenset(cluster.lost)).items():
        if client.conn is None:
            continue
        stored = cluster.store.messages(room)
        if not stored:
            continue
        newest = stored[-1]
        if newest.sender == client.user and acked.get(room) == newest.offset:
            continue  # its own newest message, acked (in whichever life)
        assert (epoch, offset) == (newest.epoch, newest.offset), (client.user, room, epoch, offset)


def check_cluster(cluster: Cluster) -> None:
    for node in cluster.nodes:
        for client in node.clients:
            if client.sim is node:
                check_client(cluster, client)


USERS = ["alice", "bob", "carol", "dave"]
ROOMS = ["general", "tech"]


class MovingUsers(RuleBasedStateMachine):
    """Users who connect to any of three processes and move between them (resumed
    elsewhere, or reconnected while the old link is still open): the rules the
    move models share. A subclass starts ``cluster``, ``clients`` and ``every``."""

    cluster: Cluster
    clients: dict[str, SimClient]
    every: list[SimClient]

    @rule(
        node=st.integers(0, 2),
        user=st.sampled_from(USERS),
        rooms=st.sets(st.sampled_from(ROOMS), min_size=1),
    )
    def connect(self, node: int, user: str, rooms: set[str]) -> None:
        if user not in self.clients:
            client = self.cluster.connect(node, user, rooms=sorted(rooms))
            self.clients[user] = client
            self.every.append(client)

    @rule(user=st.sampled_from(USERS), node=st.integers(0, 2))
    def drop_and_resume(self, user: str, node: int) -> None:
        client = self.clients.get(user)
        if client is not None and client.token is not None:
            self.cluster.move(client, node)

    @rule(user=st.sampled_from(USERS), node=st.integers(0, 2))
    def reconnect_with_the_old_link_open(self, user: str, node: int) -> None:
        client = self.clients.get(user)
        if client is not None and client.token is not None and client.conn is not None:
            twin = self.cluster.reconnect(client, node)
            self.clients[user] = twin
            self.every.append(twin)
