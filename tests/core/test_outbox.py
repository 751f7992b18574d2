"""The outbox judges a reader by what it fails to read, not by the size of a burst.

A store that commits appends in groups answers a room's burst as one batch of
``Appended``: every message of it is fanned out before the adapter can write
anything. Readers that write what they are handed must get all of it, in
order, and never be closed; a reader that stops must still be closed with 1013
while holding no more than its outbox.
"""

from __future__ import annotations

import json
from typing import Any

from chatcore import (
    Append,
    Appended,
    Close,
    Config,
    Connect,
    Deliver,
    Drained,
    Effect,
    Engine,
    InboxLoaded,
    LoadInbox,
    LoadRoom,
    Message,
    Publish,
    RoomLoaded,
    SeededIds,
    Send,
)

NOW = 1_000.0
TEXT = "y" * 40_000  # 50 of them are 2 MB: twice the default 1 MiB outbox


class Adapter:
    """An engine and the sockets of an adapter, written only when the test says."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.engine = Engine(config, SeededIds(3))
        self.frames: dict[int, list[dict[str, Any]]] = {}
        self.unwritten: set[int] = set()
        self.closed: dict[int, tuple[int, str]] = {}
        self.appends: list[Append] = []
        self.offset = 0
        self.most = (0, 0)  # the fullest outbox seen: frames, bytes

    def do(self, command: Any) -> None:
        self.run(self.engine.handle(command, NOW))

    def run(self, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, Deliver):
                for conn in effect.to:
                    self.frames.setdefault(conn, []).append(json.loads(effect.data))
                    self.unwritten.add(conn)
            elif isinstance(effect, Close):
                self.closed[effect.conn] = (effect.code, effect.reason)
            elif isinstance(effect, Append):
                self.appends.append(effect)
            elif isinstance(effect, LoadRoom):
                self.do(RoomLoaded(room=effect.room, epoch="e1", head=0, recent=()))
            elif isinstance(effect, LoadInbox):
                self.do(InboxLoaded(ref=effect.ref, rooms=()))
        for conn in self.unwritten:
            if conn not in self.closed:
                frames, nbytes = self.engine.outbox(conn)
                self.most = (max(self.most[0], frames), max(self.most[1], nbytes))

    def commit(self) -> None:
        """The store's answer to every append so far: one batch, no writes between."""
        batch, self.appends = self.appends, []
        for append in batch:
            self.offset += 1
            message = Message(
                room=append.room,
                offset=self.offset,
                epoch="e1",
                sender=append.sender,
                text=append.text,
                ts=append.ts,
                client_id=append.client_id,
            )
            self.do(Appended(message=message, ref=append.ref))

    def write(self, stalled: frozenset[int] = frozenset()) -> None:
        """Flush every socket but the stalled ones, as often as there is more to write."""
        while ready := tuple(sorted(self.unwritten - stalled - self.closed.keys())):
            self.unwritten -= set(ready)
            self.do(Drained(conns=ready))

    def messages(self, conn: int) -> list[dict[str, Any]]:
        return [f for f in self.frames.get(conn, []) if f["type"] == "message"]


def test_a_batch_twice_the_outbox_closes_no_reader_and_sender_that_write() -> None:
    config = Config()  # the documented defaults: 1 MiB outbox, a burst of 10 messages
    a = Adapter(config)
    readers, senders = range(1, 5), range(5, 10)
    for conn in [*readers, *senders]:
        a.do(Connect(conn=conn, user=f"u{conn}", rooms=("burst",)))
    a.write()
    for conn in senders:
        for i in range(10):
            a.do(Send(conn=conn, room="burst", text=TEXT, client_id=f"{conn}-{i}"))
    a.commit()  # 50 messages, 2 MB per member, before anything is written
    a.write()
    assert a.closed == {}
    for conn in readers:
        assert [m["offset"] for m in a.messages(conn)] == list(range(1, 51)), conn
    for conn in senders:
        got = a.messages(conn)
        assert [m["offset"] for m in got] == sorted(m["offset"] for m in got)
        assert len(got) == 40, conn
        assert all(m["from"] != f"u{conn}" for m in got), conn  # no echo of its own
        assert sum(f["type"] == "ack" for f in a.frames[conn]) == 10
        # Its acks take its messages' places: the stream it sees has no gap and
        # never runs ahead, although it fell behind while it was sending.
        stream = [f["offset"] for f in a.frames[conn] if f["type"] in ("message", "ack")]
        assert stream == list(range(1, 51)), conn
    # Nobody was handed more than the outbox at any moment, whatever the batch.
    assert a.most[0] <= config.outbox_frames
    assert a.most[1] <= config.outbox_bytes
    # Caught up: back on the live fan-out, so the next message comes at once.
    a.do(Publish(room="burst", sender="bot", text="after"))
    a.commit()
    assert all(a.messages(conn)[-1]["text"] == "after" for conn in readers)


def test_a_reader_that_stops_is_closed_once_the_window_has_moved_past_it() -> None:
    config = Config(
        history_window=100,
        rate_burst=10_000,
        rate_per_second=10_000.0,
        request_burst=10_000,
        request_per_second=10_000.0,
    )
    a = Adapter(config)
    for conn, user in ((1, "alice"), (2, "bob"), (3, "stuck")):
        a.do(Connect(conn=conn, user=user, rooms=("general",)))
    a.write()
    stuck = frozenset({3})
    sent = 0
    while 3 not in a.closed and sent < 1_000:
        a.do(Send(conn=1, room="general", text=TEXT))
        sent += 1
        a.commit()
        a.write(stalled=stuck)
    assert a.closed == {3: (1013, "slow consumer")}
    handed = len(a.messages(3))
    assert 0 < handed < 26  # what fitted in half its outbox: 1 MiB / 2 / 40 KB
    # It was given up when the window (100 messages) no longer held its next one.
    assert sent == handed + config.history_window + 1
    assert [m["offset"] for m in a.messages(2)] == list(range(1, sent + 1))
    assert a.most[1] <= config.outbox_bytes
    assert a.engine.stats()["connections"] == 2
