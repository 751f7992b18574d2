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
    Disconnected,
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
        self.queued: dict[int, list[int]] = {}  # sizes handed and not yet written
        self.delivers: list[Deliver] = []

    def do(self, command: Any) -> None:
        self.run(self.engine.handle(command, NOW))

    def run(self, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, Deliver):
                self.delivers.append(effect)
                for conn in effect.to:
                    self.frames.setdefault(conn, []).append(json.loads(effect.data))
                    self.unwritten.add(conn)
                    self.queued.setdefault(conn, []).append(effect.size)
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
            for conn in ready:
                self.queued[conn] = []
            self.do(Drained(conns=ready))

    def check_outboxes(self) -> None:
        """The engine counts for every open connection exactly what it holds unwritten."""
        for conn, sizes in self.queued.items():
            if conn not in self.closed:
                assert self.engine.outbox(conn) == (len(sizes), sum(sizes)), conn

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


def test_in_a_busy_room_a_reader_who_lags_catches_up_and_one_who_stops_is_closed() -> None:
    """One fan-out to the whole room while everyone keeps up; a lagging reader leaves
    it, replays, and comes back to it; a stopped one is given up; nobody else notices."""
    config = Config(
        outbox_frames=16,  # past 8 frames a reader lags
        history_window=40,
        rate_burst=10_000,
        rate_per_second=10_000.0,
        request_burst=10_000,
        request_per_second=10_000.0,
    )
    a = Adapter(config)
    members = range(1, 31)
    lagging, stuck = 29, 30
    for conn in members:
        a.do(Connect(conn=conn, user=f"u{conn}", rooms=("busy",)))
    a.write()
    sent = 0

    def send(stalled: frozenset[int], burst: int = 1) -> None:
        nonlocal sent
        for _ in range(burst):
            sent += 1
            a.do(Send(conn=1 + sent % 4, room="busy", text=f"m{sent} " + "z" * 50))
        a.commit()
        a.write(stalled=stalled)
        a.check_outboxes()

    for _ in range(10):  # everyone reads
        send(frozenset())
    for _ in range(15):  # the lagging one stops a while (and falls behind), the stuck one for good
        send(frozenset({lagging, stuck}), burst=2)
    assert stuck not in a.closed
    assert lagging not in a.closed
    for _ in range(40):  # the lagging one reads again: it replays and goes live again
        send(frozenset({stuck}))
    assert a.closed == {stuck: (1013, "slow consumer")}
    # It did fall behind: some messages were handed to it alone, from the window.
    assert any(isinstance(d.event, Message) and d.to == (lagging,) for d in a.delivers)
    # The last message went out as one fan-out to the whole room, the lagging reader in it.
    last = [d for d in a.delivers if isinstance(d.event, Message) and d.event.offset == sent]
    assert len(last) == 1
    assert set(last[0].to) == set(members) - {stuck, 1 + sent % 4}
    for conn in members:
        if conn == stuck:
            continue
        got = [m["offset"] for m in a.messages(conn)]
        own = [f["offset"] for f in a.frames[conn] if f["type"] == "ack"]
        # Every message once, in order: its own as acks in their places.
        assert sorted(got + own) == list(range(1, sent + 1)), conn
        stream = [f["offset"] for f in a.frames[conn] if f["type"] in ("message", "ack")]
        assert stream == list(range(1, sent + 1)), conn
    got = [m["offset"] for m in a.messages(stuck)]
    assert got == list(range(1, len(got) + 1))  # what it was handed: in order, from the start
    assert a.most[0] <= config.outbox_frames


def test_readers_closed_while_replaying_are_not_remembered() -> None:
    """Connections that fall behind and then go (closed as slow, or dropped) leave no
    trace in what the engine keeps to find replays (``EngineState.catching``)."""
    config = Config(
        outbox_frames=4,
        history_window=5,
        rate_burst=10_000,
        rate_per_second=10_000.0,
        request_burst=10_000,
        request_per_second=10_000.0,
    )
    a = Adapter(config)
    a.do(Connect(conn=1, user="talker", rooms=("r",)))
    a.write()
    conn = 1
    for round in range(40):
        readers = [conn + 1, conn + 2]
        conn += 2
        for reader in readers:
            a.do(Connect(conn=reader, user=f"r{reader}", rooms=("r",)))
        a.write()
        for i in range(4):  # they stop reading: past 2 frames they fall behind
            a.do(Send(conn=1, room="r", text=f"{round}.{i}"))
            a.commit()
            a.write(stalled=frozenset(readers))
        if round % 2:
            for reader in readers:
                a.closed[reader] = (1006, "gone")
                a.do(Disconnected(conn=reader))
        else:
            for i in range(6):  # the window passes them: closed as slow
                a.do(Send(conn=1, room="r", text=f"{round}.{i}"))
                a.commit()
                a.write(stalled=frozenset(readers))
            assert set(readers) <= a.closed.keys()
        a.check_outboxes()
    # The test reaches in on purpose: this map must not grow with connections gone.
    assert len(a.engine._st.catching) <= 2 * a.engine.connections + 16
