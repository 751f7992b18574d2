"""The join-storm benchmark counts a client only once the server put it in the room,
and rebuilds every member's view of the room from what it received.

The unit tests feed frames by value; one test runs a small storm (120 clients,
more than ``presence_batch_above``, so presence is batched) against the real
server started as the benchmark starts it.
"""

from __future__ import annotations

import json
import socket
import threading
import time

from benchmarks._servers import SERVERS, RunningServer
from benchmarks._storm import ROOM, says_in_room, storm, view
from benchmarks._wire import CHATCORE, CHATCORE_PLAIN, PLAIN

WELCOME = b'{"type":"welcome","session":"s","resume":"t","user":"u1","resumed":false,"rooms":{}}'


def members(room: str, *users: str) -> bytes:
    return json.dumps(
        {"type": "members", "room": room, "users": list(users), "offset": 0, "epoch": "e"},
        separators=(",", ":"),
    ).encode()


def test_a_chatcore_client_is_in_the_room_at_its_member_list_not_its_welcome() -> None:
    assert not says_in_room(CHATCORE, WELCOME)
    assert not says_in_room(CHATCORE, members("other", "u1"))
    assert says_in_room(CHATCORE, members(ROOM, "u0", "u1"))
    assert not says_in_room(CHATCORE, b'{"type":"members","room":')  # cut short
    assert says_in_room(CHATCORE_PLAIN, b"In the room: u0, u1")
    assert not says_in_room(CHATCORE_PLAIN, b"u0 joined the room")


def test_a_peer_says_nothing_after_its_101() -> None:
    assert says_in_room(PLAIN, b"")


def test_a_view_applies_members_presence_and_joined_left_in_order() -> None:
    frames = [
        WELCOME,
        members(ROOM, "u0", "u1"),
        b'{"type":"joined","room":"room0","user":"u2"}',
        b'{"type":"presence","room":"room0","joins":["u3","u4"],"leaves":["u0"]}',
        b'{"type":"left","room":"room0","user":"u1"}',
        b'{"type":"presence","room":"other","joins":["x"],"leaves":["u2"]}',
        b"not json",
    ]
    assert view(frames) == {"u2", "u3", "u4"}
    # members replaces the set whatever came before
    assert view([*frames, members(ROOM, "u9")]) == {"u9"}


def test_a_small_storm_fills_the_room_and_every_view_holds_everyone() -> None:
    spec = SERVERS["chatcore"]
    server = RunningServer(spec, core=None)
    try:
        result, socks = storm(server.port, spec.flavor, clients=120, in_flight=10, timeout=60)
        for s in socks:
            s.close()
    finally:
        server.stop()
    assert result.failures == []
    assert (result.in_room, result.views_full, result.view_min) == (120, 120, 120)
    assert result.seconds is not None
    assert result.seconds > 0
    # Counted only after the server said so: a welcome, then the room's member list.
    assert len(result.at_count) == 120
    for frames in result.at_count:
        kinds = [(m["type"], m.get("room")) for m in map(json.loads, frames)]
        assert kinds[0] == ("welcome", None)
        assert ("members", ROOM) in kinds


def server_frame(payload: bytes) -> bytes:
    assert len(payload) < 126
    return bytes((0x81, len(payload))) + payload


class SlowWelcome:
    """A stand-in server that answers 101 at once and the welcome and member list only
    later, in a write of their own: the storm must not count a client at its 101."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += conn.recv(4096)
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
        time.sleep(0.2)
        conn.sendall(server_frame(WELCOME) + server_frame(members(ROOM, "u0", "u1")))

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def test_a_client_is_not_counted_at_its_101() -> None:
    server = SlowWelcome()
    try:
        flavor = SERVERS["chatcore"].flavor
        result, socks = storm(server.port, flavor, clients=2, in_flight=2, timeout=10)
        for s in socks:
            s.close()
    finally:
        server.close()
    assert result.in_room == 2
    assert result.seconds is not None
    assert result.seconds >= 0.2
    assert [len(frames) for frames in result.at_count] == [2, 2]
