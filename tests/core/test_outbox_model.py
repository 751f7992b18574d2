"""Outbox counts against the adapter's own queues, and the fan-out's two paths against each other.

A broadcast that every live member certainly has room for is counted once for
the room (``_session.Ledger``) instead of once per member, and a ``Drained``
that names every member resets it at once. Random histories check that this
changes nothing anyone can see:

* every effect of every step is the same as that of an engine whose fan-out
  always goes member by member (the path that tests each outbox; patched in
  for the second engine), so who is handed what, who falls behind, who is
  closed 1013 and every replay are exactly as before;
* for every open connection, ``Engine.outbox`` is exactly what the adapter
  holds unwritten: the frames and bytes handed to it less those reported by
  ``Written`` (the oldest first), nothing after a ``Drained``;
* no queue ever holds more than the outbox bounds;
* per room, the messages and acks a connection receives come in offset order,
  none twice; and once the readers have written everything, each has every
  message of its rooms (a replay is never left waiting).

Clients connect in either mode (a user with two tabs, so typing passes both
by), join and leave rooms, send, type and mark reads, stop and start reading,
write part of their queue, drop and resume; the store holds appends back and
commits them as one batch when the rule says, so a burst can fill outboxes
before anything is written; drains name connections in several orders.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from chatcore import (
    Ack,
    Append,
    Close,
    Command,
    Config,
    Connect,
    Deliver,
    Disconnected,
    Drained,
    Effect,
    Engine,
    Join,
    Leave,
    Left,
    MarkRead,
    Members,
    Message,
    Mode,
    Publish,
    SeededIds,
    Send,
    StartTyping,
    Welcome,
    Written,
    _outbox,
)
from chatcore_store import MemoryStore, is_storage_effect

USERS = ["ann", "ann", "bob", "cat", "dan", "eve"]  # ann has two tabs
ROOMS = ["a", "b", "c"]
CONFIG = Config(
    outbox_frames=8,
    outbox_bytes=3_000,  # a few long messages fill it before eight short ones do
    history_window=6,
    rate_burst=10_000,
    rate_per_second=10_000.0,
    request_burst=10_000,
    request_per_second=10_000.0,
    typing_ttl=5.0,
    ping_interval=1e6,
    pong_timeout=1e6,
)

slots = st.integers(0, len(USERS) - 1)
rooms = st.sampled_from(ROOMS)


@contextmanager
def one_by_one() -> Iterator[None]:
    """The fan-out without its fast path: every member tested and counted in turn."""
    with mock.patch.object(_outbox, "_all_have_room", return_value=None):
        yield


class Client:
    def __init__(self, conn: int, user: str, mode: Mode) -> None:
        self.conn = conn
        self.user = user
        self.mode = mode
        self.queue: deque[int] = deque()  # sizes of the frames not yet written
        self.reading = True
        self.closed: tuple[int, str] | None = None
        self.token: str | None = None
        self.seen: dict[str, int] = {}  # the last offset received per room


class Outboxes(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.fast = Engine(CONFIG, SeededIds(7))
        self.plain = Engine(CONFIG, SeededIds(7))
        self.store = MemoryStore()
        self.now = 1_000.0
        self.next_conn = 1
        self.clients: list[Client | None] = [None] * len(USERS)
        self.by_conn: dict[int, Client] = {}
        self.held: list[Append] = []
        self.hold = False
        self.texts = 0

    # -- driving both engines ---------------------------------------------------------

    def feed(self, command: Command) -> None:
        fast = self.fast.handle(command, self.now)
        with one_by_one():
            plain = self.plain.handle(command, self.now)
        assert fast == plain, command
        self.carry_out(fast)

    def carry_out(self, effects: list[Effect]) -> None:
        storage = []
        for effect in effects:
            if isinstance(effect, Deliver):
                for conn in effect.to:
                    self.deliver(self.by_conn[conn], effect)
            elif isinstance(effect, Close):
                client = self.by_conn[effect.conn]
                client.closed = (effect.code, effect.reason)
                client.queue.clear()
            elif isinstance(effect, Append) and self.hold:
                self.held.append(effect)
            elif is_storage_effect(effect):
                storage.append(effect)
        for answer in self.store.execute_now(storage):
            self.feed(answer)

    def deliver(self, client: Client, effect: Deliver) -> None:
        assert client.closed is None, ("handed a frame after its close", client.conn)
        client.queue.append(effect.size)
        assert len(client.queue) <= CONFIG.outbox_frames, ("over the frames", client.conn)
        assert sum(client.queue) <= CONFIG.outbox_bytes, ("over the bytes", client.conn)
        event = effect.event
        if isinstance(event, Welcome):
            client.token = event.resume
        elif isinstance(event, Members):  # (what follows it comes after its offset)
            client.seen.setdefault(event.room, event.offset)
        elif isinstance(event, Left) and event.user == client.user:
            client.seen.pop(event.room, None)  # (joined again, it starts afresh)
        elif isinstance(event, Message | Ack):
            last = client.seen.get(event.room, 0)
            assert event.offset > last, ("out of order or twice", client.conn, event, last)
            client.seen[event.room] = event.offset

    def open_client(self, slot: int) -> Client | None:
        client = self.clients[slot]
        return client if client is not None and client.closed is None else None

    # -- rules ------------------------------------------------------------------------

    @rule(
        slot=slots,
        wanted=st.lists(rooms, max_size=3, unique=True),
        text_mode=st.booleans(),
        resume=st.booleans(),
    )
    def connect(self, slot: int, wanted: list[str], text_mode: bool, resume: bool) -> None:
        old = self.clients[slot]
        if old is not None and old.closed is None:
            self.feed(Disconnected(conn=old.conn))
            old.closed = (0, "dropped")
        conn, self.next_conn = self.next_conn, self.next_conn + 1
        mode = Mode.TEXT if text_mode and slot == 5 else Mode.JSON
        client = Client(conn, USERS[slot], mode)
        self.clients[slot] = client
        self.by_conn[conn] = client
        if resume and old is not None and old.token is not None:
            client.seen = dict(old.seen)
            offsets = dict(old.seen)
            self.feed(
                Connect(
                    conn=conn,
                    user=client.user,
                    rooms=tuple(wanted),
                    resume=old.token,
                    offsets=offsets,
                    mode=mode,
                )
            )
        else:
            self.feed(Connect(conn=conn, user=client.user, rooms=tuple(wanted), mode=mode))

    @rule(slot=slots)
    def drop(self, slot: int) -> None:
        if (client := self.open_client(slot)) is not None:
            self.feed(Disconnected(conn=client.conn))
            client.closed = (0, "dropped")

    @rule(slot=slots, room=rooms, join=st.booleans())
    def join_or_leave(self, slot: int, room: str, join: bool) -> None:
        if (client := self.open_client(slot)) is not None:
            self.feed(
                Join(conn=client.conn, room=room) if join else Leave(conn=client.conn, room=room)
            )

    @rule(slot=slots, room=rooms, count=st.integers(1, 4), long=st.booleans())
    def send(self, slot: int, room: str, count: int, long: bool) -> None:
        if (client := self.open_client(slot)) is not None and client.mode is Mode.JSON:
            for _ in range(count):
                self.texts += 1
                text = f"{self.texts} " + ("y" * 600 if long else "hi")
                self.feed(Send(conn=client.conn, room=room, text=text))

    @rule(room=rooms, count=st.integers(1, 8))
    def publish(self, room: str, count: int) -> None:
        for _ in range(count):
            self.texts += 1
            self.feed(Publish(room=room, sender="bot", text=f"{self.texts} from the host"))

    @rule(slot=slots, room=rooms)
    def typing(self, slot: int, room: str) -> None:
        if (client := self.open_client(slot)) is not None:
            self.feed(StartTyping(conn=client.conn, room=room))

    @rule(slot=slots, room=rooms)
    def mark_read(self, slot: int, room: str) -> None:
        if (client := self.open_client(slot)) is not None:
            self.feed(MarkRead(conn=client.conn, room=room, offset=client.seen.get(room, 0)))

    @rule(hold=st.booleans())
    def store_holds_appends(self, hold: bool) -> None:
        self.hold = hold
        if not hold:
            self.commit()

    @precondition(lambda self: bool(self.held))
    @rule()
    def commit(self) -> None:
        """The store answers every append it held, one batch, nothing written between."""
        batch, self.held = self.held, []
        for answer in self.store.execute_now(batch):
            self.feed(answer)

    @rule(slot=slots, reading=st.booleans())
    def reading(self, slot: int, reading: bool) -> None:
        if (client := self.clients[slot]) is not None:
            client.reading = reading

    @rule(slot=slots, frames=st.integers(1, 4))
    def write_some(self, slot: int, frames: int) -> None:
        """A socket takes the oldest few frames of a queue: ``Written``."""
        client = self.open_client(slot)
        if client is not None and client.queue:
            taken = [client.queue.popleft() for _ in range(min(frames, len(client.queue)))]
            self.feed(Written(conn=client.conn, frames=len(taken), nbytes=sum(taken)))

    @rule(order=st.sampled_from(["conn", "reversed", "sender last", "shuffled"]), data=st.data())
    def flush(self, order: str, data: Any) -> None:
        """The reading connections' queues all written: one ``Drained`` for them."""
        ready = [
            c.conn
            for c in self.clients
            if c is not None and c.closed is None and c.reading and c.queue
        ]
        if not ready:
            return
        if order == "reversed":
            ready.reverse()
        elif order == "sender last":
            ready.append(ready.pop(data.draw(st.integers(0, len(ready) - 1))))
        elif order == "shuffled":
            ready = data.draw(st.permutations(ready))
        for conn in ready:
            self.by_conn[conn].queue.clear()
        self.feed(Drained(conns=tuple(ready)))
        extra = data.draw(st.sampled_from([None, *ready]))
        if extra is not None and self.by_conn[extra].closed is None:
            self.by_conn[extra].queue.clear()  # (a replay may have refilled it)
            self.feed(Drained(conns=(extra, extra)))  # one connection named twice

    @rule()
    def everyone_reads(self) -> None:
        """Readers write all they are handed, replays included, until nothing is left:
        then every one of them has every message its rooms hold (or was closed)."""
        for _ in range(100):
            ready = [c for c in self.clients if c is not None and c.closed is None and c.reading]
            if not any(c.queue for c in ready):
                break
            for client in ready:
                client.queue.clear()
            self.feed(Drained(conns=tuple(c.conn for c in ready)))
        for client in self.clients:
            if client is None or client.closed is not None or not client.reading:
                continue
            session = self.fast.session_of(client.conn)
            assert session is not None
            for room in session.rooms:
                if stored := self.store.messages(room):
                    head = stored[-1].offset
                    assert client.seen.get(room, head) == head, (client.conn, room)

    @rule(seconds=st.sampled_from([0.5, 3.0, 6.0]))
    def wait(self, seconds: float) -> None:
        self.now += seconds
        fast = self.fast.tick(self.now)
        with one_by_one():
            plain = self.plain.tick(self.now)
        assert fast == plain
        self.carry_out(fast)

    # -- what must hold after every step ----------------------------------------------

    @invariant()
    def outboxes_are_the_queues(self) -> None:
        for client in self.clients:
            if client is None or client.closed is not None:
                continue
            queue = (len(client.queue), sum(client.queue))
            assert self.fast.outbox(client.conn) == queue, client.conn
            assert self.plain.outbox(client.conn) == queue, client.conn


Outboxes.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestOutboxes = Outboxes.TestCase
