"""A fan-out the server holds for its flush keeps every peer's bytes in order.

``ChatServer.deliver`` keeps a turn's first fan-out whole until the flush, which
writes it straight to the recipients that have nothing else queued. Whatever
else is queued to a peer meanwhile (a close, a ping, another delivery) must
come after it, as it would had the fan-out been queued at once. Peers here have
no socket: what they queue is read back through a real wsproto client.
"""

from __future__ import annotations

from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, Event, Ping, TextMessage

from chatcore_server import ChatServer
from chatcore_server._frames import MessageBound
from chatcore_server._peer import Peer


def with_peers(*conns: int) -> tuple[ChatServer, list[Peer]]:
    server = ChatServer(port=0)
    peers = []
    for conn in conns:
        peer = Peer(
            conn,
            f"user{conn}",
            None,
            -1,
            Connection(ConnectionType.SERVER),
            server,
            bound=MessageBound(1024, 4),
            close_timeout=1.0,
        )
        server._peers[conn] = peer
        peers.append(peer)
    return server, peers


def queued(peer: Peer) -> list[Event]:
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(b"".join(peer.out))
    return list(client.events())


def test_a_close_comes_after_the_fan_out_held_before_it() -> None:
    server, (one, two) = with_peers(1, 2)
    server.deliver((1, 2), "first")
    server.close(1, 1000, "bye")
    got = queued(one)
    assert [type(e) for e in got] == [TextMessage, CloseConnection]
    assert isinstance(got[0], TextMessage)
    assert got[0].data == "first"
    assert [e.data for e in queued(two) if isinstance(e, TextMessage)] == ["first"]


def test_a_ping_and_a_second_delivery_come_after_the_fan_out_held_before_them() -> None:
    server, (one, two) = with_peers(1, 2)
    server.deliver((1, 2), "first")
    server.ping(2)
    server.deliver((1,), "second")
    server.deliver((1, 2), "third")  # (held in turn, until this flush)
    server._flush()
    assert [e.data for e in queued(one) if isinstance(e, TextMessage)] == [
        "first",
        "second",
        "third",
    ]
    got = queued(two)
    assert [type(e) for e in got] == [TextMessage, Ping, TextMessage]


def test_a_delivery_after_a_held_fan_out_comes_after_it() -> None:
    server, (one, two) = with_peers(1, 2)
    server.deliver((1, 2), "first")
    server.deliver((2,), "second")
    server._flush()
    assert [e.data for e in queued(two) if isinstance(e, TextMessage)] == ["first", "second"]
    assert [e.data for e in queued(one) if isinstance(e, TextMessage)] == ["first"]
