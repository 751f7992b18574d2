"""A Peer fed bytes in memory, with no server: its owner is a small class of ours.

The client side is a real wsproto client connection; what the peer queues is
read back through it, so both ends of the link are real endpoints.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Event, Ping, Pong, TextMessage

from chatcore_server._frames import MessageBound
from chatcore_server._peer import Peer, PeerOwner


class Owner:
    """A PeerOwner that records what its peer reports (and ends a refused peer)."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self.alive = 0
        self.left: list[int] = []
        self.refused: list[tuple[int, str]] = []
        self.lost = 0
        self.turns = 0

    @contextmanager
    def _turn(self) -> Iterator[None]:
        self.turns += 1
        yield

    def turn(self) -> AbstractContextManager[None]:
        return self._turn()

    def queued(self, peer: Peer) -> None:
        pass

    def flush_peer(self, peer: Peer) -> None:
        pass

    def flush_now(self) -> None:
        pass

    def spawn_writer(self, peer: Peer) -> None:
        pass  # nothing to write to: the test reads ``peer.out`` itself

    def peer_received(self, peer: Peer, text: str) -> None:
        self.received.append(text)

    def peer_alive(self, peer: Peer) -> None:
        self.alive += 1

    def peer_written(self, peer: Peer, frames: int, nbytes: int) -> None:
        pass

    def peer_left(self, peer: Peer, code: int) -> None:
        self.left.append(code)

    def peer_refused(self, peer: Peer, code: int, reason: str) -> None:
        self.refused.append((code, reason))
        peer.close(code, reason)

    def peer_lost(self, peer: Peer) -> None:
        self.lost += 1

    def peer_finished(self, peer: Peer) -> None:
        pass


def linked(max_frame_bytes: int = 1024) -> tuple[Peer, Owner, Connection]:
    owner = Owner()
    checked: PeerOwner = owner  # the narrow interface is all a Peer needs
    peer = Peer(
        1,
        "alice",
        None,
        -1,
        Connection(ConnectionType.SERVER),
        checked,
        bound=MessageBound(max_frame_bytes, 4),
        close_timeout=1.0,
    )
    return peer, owner, Connection(ConnectionType.CLIENT)


def sent_back(peer: Peer, client: Connection) -> list[Event]:
    """What the peer queued, as its client reads it."""
    client.receive_data(b"".join(peer.out))
    peer.out.clear()
    return list(client.events())


def test_text_messages_reach_the_owner_whole_however_the_bytes_arrive() -> None:
    texts = ["hello", "é" * 300, ""]
    for split in (False, True):
        peer, owner, client = linked()
        data = b"".join(client.send(TextMessage(data=t)) for t in texts)
        data += client.send(TextMessage(data="in ", message_finished=False))
        data += client.send(TextMessage(data="two parts"))
        for chunk in [data[i : i + 1] for i in range(len(data))] if split else [data]:
            peer.feed(chunk)
        assert owner.received == [*texts, "in two parts"], split
        assert owner.refused == []


def test_a_ping_is_answered_with_a_pong_and_counts_as_alive() -> None:
    peer, owner, client = linked()
    peer.feed(client.send(Ping(payload=b"are you there")))
    assert owner.alive == 1
    assert sent_back(peer, client) == [Pong(payload=b"are you there")]


def test_a_client_close_is_answered_and_reported_with_its_code() -> None:
    peer, owner, client = linked()
    peer.feed(client.send(CloseConnection(code=1000, reason="bye")))
    assert owner.left == [1000]
    assert [(type(e), getattr(e, "code", None)) for e in sent_back(peer, client)] == [
        (CloseConnection, 1000)
    ]


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (BytesMessage(data=b"\x00\x01"), 1003),
        (TextMessage(data="x" * 2000), 1009),
    ],
)
def test_a_frame_the_transport_refuses_closes_the_peer_with_its_code(
    frame: Event, code: int
) -> None:
    peer, owner, client = linked(max_frame_bytes=1024)
    peer.feed(client.send(frame))
    assert [c for c, _ in owner.refused] == [code]
    assert owner.received == []
    closes = [e for e in sent_back(peer, client) if isinstance(e, CloseConnection)]
    assert [c.code for c in closes] == [code]


def test_a_failure_while_reading_ends_the_peer_with_1011(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    peer, owner, client = linked()

    def broken(text: str) -> None:
        raise RuntimeError("planted bug")

    monkeypatch.setattr(owner, "peer_received", lambda p, text: broken(text))
    peer.feed(client.send(TextMessage(data="boom")))
    assert owner.refused == [(1011, "internal error")]
    peer.feed(client.send(TextMessage(data="after")))  # nothing more is read
    assert [e.code for e in sent_back(peer, client) if isinstance(e, CloseConnection)] == [1011]
