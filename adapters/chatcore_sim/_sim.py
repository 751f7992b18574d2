"""The simulator: the engine, a log and any number of clients, on a virtual clock.

Clients speak the real wire protocol: what they send goes through the
engine's codec as text frames, what they receive is the encoded frames the
engine hands out. Nothing here sleeps or opens a socket; time moves only when
the test calls :meth:`Simulation.advance`. The same seed gives the same run,
down to the bytes of :attr:`Simulation.log`.
"""

from __future__ import annotations

import heapq
import json
import random
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any

from chatcore import (
    Close,
    Command,
    Config,
    Connect,
    CreateRoom,
    Deliver,
    Disconnected,
    Effect,
    Engine,
    LocalProtocolError,
    Mode,
    Ping,
    Pong,
    Receive,
    Recorder,
    Screen,
    Screened,
    SeededIds,
    Shutdown,
    Written,
    follow_offsets,
)
from chatcore_store import MemoryStore, StorageEffect, is_storage_effect

__all__ = ["SimClient", "Simulation"]

START = 1_795_000_000.0
"""Where virtual time starts: 2026-11-18T11:06:40Z."""


class SimClient:
    """One simulated user's client: a connection that can drop and resume.

    ``events`` holds every event the client has read, decoded from JSON (in
    plain-text mode, lines as strings wrapped as ``{"type": "line", ...}``).
    """

    def __init__(
        self, sim: Simulation, user: str, rooms: tuple[str, ...], mode: Mode, answer_pings: bool
    ) -> None:
        self.sim = sim
        self.user = user
        self.rooms = rooms
        self.mode = mode
        self.answer_pings = answer_pings
        self.conn: int | None = None
        self.token: str | None = None
        self.session: str | None = None
        self.offsets: dict[str, int] = {}  # last offset seen per room
        self.epochs: dict[str, str] = {}  # the epoch each of those offsets is in
        self.events: list[dict[str, Any]] = []
        self.closed: tuple[int, str] | None = None
        self.reading = True
        self._unread: deque[str] = deque()
        self._cursor = 0
        self._sent = 0

    # -- what a user does -----------------------------------------------------

    def send(self, text: str, room: str | None = None, *, id: str | None = None) -> None:
        """Send a chat message (to the first room, unless ``room`` is given)."""
        if self.mode is Mode.TEXT:
            self.send_raw(text)
            return
        frame: dict[str, Any] = {"type": "send", "room": room or self.rooms[0], "text": text}
        if id is not None:
            frame["id"] = id
        self.send_json(frame)

    def join(self, room: str) -> None:
        self.send_json({"type": "join", "room": room})

    def leave(self, room: str) -> None:
        self.send_json({"type": "leave", "room": room})

    def typing(self, room: str | None = None) -> None:
        self.send_json({"type": "typing", "room": room or self.rooms[0]})

    def read(self, offset: int, room: str | None = None) -> None:
        self.send_json({"type": "read", "room": room or self.rooms[0], "offset": offset})

    def history(
        self, room: str | None = None, *, before: int | None = None, limit: int = 50
    ) -> None:
        self.send_json(
            {"type": "history", "room": room or self.rooms[0], "before": before, "limit": limit}
        )

    def dm(self, to: str, text: str, *, id: str | None = None) -> None:
        frame: dict[str, Any] = {"type": "dm", "to": to, "text": text}
        if id is not None:
            frame["id"] = id
        self.send_json(frame)

    def signal(self, kind: str, call: str, **fields: Any) -> None:
        """A call frame (``call``, ``offer``, ``candidate``, ``hangup``...) for call ``call``."""
        self.send_json({"type": kind, "call": call, **fields})

    def calls(self, call: str | None = None) -> list[dict[str, Any]]:
        """The call frames read (optionally of one call), as ``(type, ...)`` dicts."""
        kinds = ("call", "ringing", "offer", "answer", "candidate", "ended")
        return [
            e
            for e in self.events
            if e.get("type") in kinds and (call is None or e.get("call") == call)
        ]

    def send_json(self, frame: dict[str, Any]) -> None:
        self.send_raw(json.dumps(frame))

    def send_raw(self, text: str) -> None:
        """Send one text frame exactly as given (for testing bad input)."""
        if self.conn is None:
            raise RuntimeError(f"{self.user} is not connected")
        self.sim._record(f"{self.user} -> {text}")
        self.sim.feed(Receive(conn=self.conn, text=text))

    def stop_reading(self) -> None:
        """Become a slow reader: frames pile up unread in the outbox."""
        self.reading = False

    def start_reading(self) -> None:
        self.reading = True
        self.sim._drain([self])
        self.sim._settle()

    # -- what a test reads ---------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.conn is not None

    def take(self) -> list[dict[str, Any]]:
        """The events read since the last ``take``."""
        new = self.events[self._cursor :]
        self._cursor = len(self.events)
        return new

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("type") == kind]

    def messages(self, room: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.of_type("message") if room is None or e["room"] == room]

    def texts(self, room: str | None = None) -> list[str]:
        return [e["text"] for e in self.messages(room)]

    def lines(self) -> list[str]:
        """Plain-text mode: every line read."""
        return [e["line"] for e in self.of_type("line")]

    def __repr__(self) -> str:
        return f"<SimClient {self.user} conn={self.conn}>"

    # -- the transport side ---------------------------------------------------------

    def _arrive(self, data: str) -> None:
        self._unread.append(data)

    def _read_all(self) -> tuple[int, int]:
        frames = nbytes = 0
        while self._unread:
            data = self._unread.popleft()
            frames += 1
            nbytes += len(data.encode())
            self.sim._record(f"{self.user} <- {data}")
            if self.mode is Mode.TEXT:
                for line in data.split("\n"):
                    self.events.append({"type": "line", "line": line})
                continue
            event = json.loads(data)
            self.events.append(event)
            self._observe(event)
        return frames, nbytes

    def _observe(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind == "welcome":
            self.token, self.session = event["resume"], event["session"]
            for room, position in event["rooms"].items():
                self.epochs[room] = position["epoch"]
        elif kind in ("message", "members") and self.epochs.get(event["room"]) != event["epoch"]:
            # A new life of the room's history: its offsets start again.
            self.epochs[event["room"]] = event["epoch"]
            if kind == "message":
                self.offsets[event["room"]] = event["offset"]
        follow_offsets(self.offsets, self.user, event)


class Simulation:
    """Engine + :class:`MemoryStore` + clients on a virtual clock.

    ``store_latency`` delays every store answer by up to that many virtual
    seconds (drawn from the seed, answers kept in order), so that tests can
    catch the engine between a send and its ack.

    ``screen`` is the host's message hook (see ``Config.screen_messages``,
    turned on when it is given): each ``Screen`` effect is answered with what
    it returns. ``record`` gets the lines of a :class:`chatcore.Recorder`
    record of the run, for :func:`chatcore.replay`.
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        seed: int = 0,
        store: MemoryStore | None = None,
        store_latency: float = 0.0,
        start: float = START,
        screen: Callable[[Screen], Screened] | None = None,
        record: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config or Config()
        if screen is not None and not self.config.screen_messages:
            self.config = replace(self.config, screen_messages=True)
        self._screen = screen
        self.recorder = None if record is None else Recorder(self.config, SeededIds(seed), record)
        self.engine = (
            Engine(self.config, SeededIds(seed)) if self.recorder is None else self.recorder.engine
        )
        driver = self.recorder if self.recorder is not None else self.engine
        self._handle = driver.handle
        self._tick = driver.tick
        self.store = store or MemoryStore()
        self.now = start
        self.log: list[str] = []
        self.clients: list[SimClient] = []
        self._rng = random.Random(seed)
        self._latency = store_latency
        self._queue: deque[Command] = deque()
        self._later: list[tuple[float, int, Sequence[StorageEffect]]] = []
        self._last_answer = start
        self._seq = 0
        self._next_conn = 0
        self._by_conn: dict[int, SimClient] = {}
        self._busy = False

    # -- driving it ----------------------------------------------------------------

    def connect(
        self,
        user: str,
        room: str | None = None,
        *,
        rooms: Iterable[str] = (),
        mode: Mode = Mode.JSON,
        answer_pings: bool = True,
    ) -> SimClient:
        """Open a new client for ``user`` joined to ``room`` / ``rooms``."""
        wanted = tuple(([room] if room else []) + list(rooms))
        client = SimClient(self, user, wanted, mode, answer_pings)
        self.clients.append(client)
        self._open(client, resume=False)
        return client

    def drop(self, client: SimClient) -> None:
        """The client's transport dies without a close frame; unread frames are lost."""
        self._disconnect(client, None, "dropped")
        client._unread.clear()

    def close(self, client: SimClient, code: int = 1000) -> None:
        """The client closes its connection with ``code``: 1000, or 1005 (a close
        frame with no status), ends its session at once (the others see it leave);
        another code is kept for the grace period."""
        self._disconnect(client, code, f"closed {code}")

    def _disconnect(self, client: SimClient, code: int | None, what: str) -> None:
        if client.conn is None:
            raise RuntimeError(f"{client.user} is not connected")
        conn, client.conn = client.conn, None
        del self._by_conn[conn]
        self._record(f"{client.user} {what}")
        self.feed(Disconnected(conn=conn, code=code))

    def resume(self, client: SimClient) -> None:
        """Reconnect with the resume token and the last offset seen per room."""
        if client.conn is not None:
            self.drop(client)
        self._open(client, resume=True)

    def create_room(self, room: str, *, allow: Iterable[str], private: bool = True) -> None:
        self.feed(CreateRoom(room=room, private=private, allow=frozenset(allow)))

    def shutdown(self) -> None:
        self.feed(Shutdown())

    def advance(self, seconds: float) -> None:
        """Move the virtual clock forward, running every timer and store answer due."""
        if seconds < 0:
            raise ValueError("time does not go backwards")
        until = self.now + seconds
        while True:
            due = [
                t
                for t in (self.engine.next_deadline(), self._later[0][0] if self._later else None)
                if t is not None and t <= until
            ]
            if not due:
                break
            self.now = max(self.now, min(due))
            if self._later and self._later[0][0] <= self.now:
                _, _, effects = heapq.heappop(self._later)
                self._queue.extend(self._answers(self.store.execute_now(effects)))
                self._settle()
            else:
                self._run(self._tick(self.now))
        self.now = until

    # -- the adapter's side ----------------------------------------------------------

    def _open(self, client: SimClient, *, resume: bool) -> None:
        self._next_conn += 1
        conn = self._next_conn
        client.conn = conn
        client.closed = None
        self._by_conn[conn] = client
        self._record(f"{client.user} connects" + (" (resume)" if resume else ""))
        offsets = dict(client.offsets) if resume else {}
        epochs = {r: e for r, e in client.epochs.items() if r in offsets} if resume else {}
        self.feed(
            Connect(
                conn=conn,
                user=client.user,
                rooms=client.rooms,
                resume=client.token if resume else None,
                offsets=offsets,
                epochs=epochs,
                mode=client.mode,
            )
        )

    def _record(self, line: str) -> None:
        self.log.append(f"{self.now - START:10.3f} {line}")

    def feed(self, command: Command) -> None:
        """Hand the engine a command directly, as an adapter would, and run it through."""
        self._queue.append(command)
        self._settle()

    def _settle(self) -> None:
        """Run queued commands until the system is quiet."""
        if self._busy:
            return
        self._busy = True
        try:
            while self._queue:
                self._run(self._handle(self._queue.popleft(), self.now))
        finally:
            self._busy = False

    def _run(self, effects: list[Effect]) -> None:
        touched: dict[int, SimClient] = {}
        storage: list[StorageEffect] = []
        for effect in effects:
            if is_storage_effect(effect):
                storage.append(effect)
            elif isinstance(effect, Deliver):
                for conn in effect.to:
                    client = self._by_conn.get(conn)
                    if client is None:
                        raise LocalProtocolError(f"engine delivered to unknown conn {conn}")
                    client._arrive(effect.data)
                    touched[conn] = client
            elif isinstance(effect, Close):
                client = self._by_conn.pop(effect.conn, None)
                if client is not None:
                    touched.pop(effect.conn, None)
                    if client.reading:  # frames sent before the close frame still arrive
                        client._read_all()
                    client.conn = None
                    client._unread.clear()
                    client.closed = (effect.code, effect.reason)
                    self._record(f"{client.user} closed {effect.code} {effect.reason}")
            elif isinstance(effect, Screen):
                if self._screen is None:
                    raise LocalProtocolError("Config.screen_messages is on but no screen hook")
                self._queue.append(self._screen(effect))
            elif isinstance(effect, Ping):
                client = self._by_conn.get(effect.conn)
                if client is not None and client.answer_pings:
                    self._queue.append(Pong(conn=effect.conn))
            else:
                self._effect(effect)
        if storage:
            if self._latency <= 0:
                self._queue.extend(self._answers(self.store.execute_now(storage)))
            else:
                when = max(self._last_answer, self.now + self._rng.uniform(0, self._latency))
                self._last_answer = when
                self._seq += 1
                heapq.heappush(self._later, (when, self._seq, storage))
        self._drain(touched.values())
        self._settle()

    def _answers(self, commands: list[Command]) -> list[Command]:
        """The store's answers, before the engine gets them (a cluster node
        publishes its appends here)."""
        return commands

    def _effect(self, effect: Effect) -> None:
        """An effect for the bus (``Config.cluster``): a lone process has none."""

    def _drain(self, clients: Iterable[SimClient]) -> None:
        for client in clients:
            if client.reading and client.conn is not None and client._unread:
                frames, nbytes = client._read_all()
                self._queue.append(Written(conn=client.conn, frames=frames, nbytes=nbytes))
