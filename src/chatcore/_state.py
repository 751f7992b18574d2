"""Everything one engine holds, in one place that every part of the engine is handed.

The engine's modules are functions over an :class:`EngineState`: they read
and change what it holds and append effects to the list they are given. This
module also owns which rooms stay in memory: a room is held while it has
members, while a connecting session waits to join it, or while a request
waits for it to load.
"""

from __future__ import annotations

from ._awaits import Awaits
from ._calls import Calls
from ._commands import ClientRequest, ConnId, Mode, Moderation
from ._config import Config
from ._effects import Effect, LoadRoom, Share
from ._errors import CloseCode
from ._facts import Fact
from ._ids import IdSource
from ._peers import Peers
from ._room import Room
from ._session import Connection, Ledger, Session, SessionState
from ._timers import Timers

__all__ = ["Counters", "EngineState"]


class Counters:
    """Running totals since the engine started, read by metrics.

    Each is one increment where its event happens (never work per recipient):
    the host reads them at scrape time through ``Engine.counters()``.
    """

    __slots__ = (
        "messages_appended",
        "resumes",
        "resumes_failed",
        "slow_consumer_closes",
        "gaps_given_up",
        "rate_limited",
        "refusals",
    )

    def __init__(self) -> None:
        self.messages_appended = 0
        """Messages the log numbered that this engine published to a room in memory."""
        self.resumes = 0
        """Connections whose resume token took up their session."""
        self.resumes_failed = 0
        """Connections with a resume token that started a fresh session instead."""
        self.slow_consumer_closes = 0
        self.gaps_given_up = 0
        """Rooms that waited a whole window for a missing offset and skipped it."""
        self.rate_limited: dict[str, int] = {}
        """Requests refused for a rate, by limit: ``messages``, ``requests``, ``pending``."""
        self.refusals: dict[str, int] = {}
        """Requests refused with an ``error`` event, by code (counted also when the
        connection is gone or the error closes it), and connections refused at
        connect, by reason."""

    def copy(self) -> Counters:
        snapshot = Counters()
        for name in self.__slots__:
            value = getattr(self, name)
            setattr(snapshot, name, dict(value) if isinstance(value, dict) else value)
        return snapshot

    def refuse(self, reason: str) -> None:
        self.refusals[reason] = self.refusals.get(reason, 0) + 1

    def limit(self, which: str) -> None:
        self.rate_limited[which] = self.rate_limited.get(which, 0) + 1


class EngineState:
    __slots__ = (
        "config",
        "ids",
        "conns",
        "sessions",
        "by_id",
        "by_user",
        "rooms",
        "wanted",
        "awaits",
        "timers",
        "closing",
        "closes",
        "now",
        "soft_frames",
        "soft_bytes",
        "ledgers",
        "catching",
        "moderating",
        "calls",
        "counters",
        "peers",
    )

    def __init__(self, config: Config, ids: IdSource) -> None:
        self.config = config
        self.ids = ids
        self.conns: dict[ConnId, Connection] = {}
        self.sessions: dict[str, Session] = {}  # by resume token
        self.by_id: dict[str, Session] = {}
        self.by_user: dict[str, dict[str, Session]] = {}
        self.rooms: dict[str, Room] = {}
        self.wanted: dict[str, int] = {}  # rooms sessions wait for before their welcome
        self.awaits = Awaits()
        self.timers = Timers()
        self.closing = False  # shut down: newcomers are refused
        # Connections the engine closes at the end of the current step (_outbox.close_later).
        self.closes: list[tuple[Connection, CloseCode, str]] = []
        self.now = 0.0
        # Past these a connection is lagging (see _outbox.broadcast).
        self.soft_frames = max(1, config.outbox_frames // 2)
        self.soft_bytes = max(1, config.outbox_bytes // 2)
        # Ledgers a broadcast added to since their last reset: a ``Drained`` that
        # covers all of one's members zeroes it at once (see _session.Ledger).
        self.ledgers: dict[Ledger, None] = {}
        # At least every open connection with a replay under way (``Connection.catchup``),
        # so that a ``Drained`` finds them without asking every connection it names.
        self.catching: dict[ConnId, Connection] = {}
        # Moderation of rooms whose load was asked before it and answered after it:
        # applied to the room when it arrives (``_moderation.room_arrived``).
        self.moderating: dict[str, list[Moderation]] = {}
        self.calls = Calls(config, self.ringable, online=self.online)  # see _signals
        self.counters = Counters()
        self.peers = Peers(config.cluster)  # see _cluster

    def catching_up(self, conn: Connection) -> None:
        """``conn`` has a replay under way: a ``Drained`` that names it pumps it.

        Every place that starts a replay calls this (``_outbox._fall_behind``,
        ``_replay.pump``, which the welcome calls at once), and the engine never
        forgets one that is not over. Closed connections are swept out
        once they outnumber the open ones, so the map holds no more than twice
        the open connections.
        """
        catching = self.catching
        if catching.get(conn.id) is not conn:
            if len(catching) >= 2 * len(self.conns) + 16:
                conns = self.conns
                catching = self.catching = {
                    i: c for i, c in catching.items() if c.catchup and conns.get(i) is c
                }
            catching[conn.id] = conn

    def share(self, room: str, fact: Fact, out: list[Effect]) -> None:
        """Tell the other processes holding ``room`` (only with ``Config.cluster``)."""
        if self.peers.on:
            out.append(Share(room=room, fact=fact))

    def ringable(self, user: str) -> list[str]:
        """The sessions a call to ``user`` rings: every one not ended that takes call
        frames (JSON mode, as of its latest connection), those away included."""
        sessions = self.by_user.get(user, {})
        return [
            sid
            for sid, s in sessions.items()
            if s.state is not SessionState.CLOSED and s.mode is Mode.JSON
        ]

    def online(self, user: str) -> bool:
        """Whether ``user`` has a session not ended, whatever its mode."""
        sessions = self.by_user.get(user, {})
        return any(s.state is not SessionState.CLOSED for s in sessions.values())

    def load_room(
        self, name: str, session: Session, request: ClientRequest | None, out: list[Effect]
    ) -> None:
        """Wait for room ``name`` to load: asks the log once however many wait."""
        waiters = self.awaits.rooms.get(name)
        if waiters is None:
            self.awaits.rooms[name] = [(session, request)]
            self.peers.touch_room(name)  # held from now: what comes meanwhile is merged
            out.append(LoadRoom(room=name, recent=self.config.history_window))
        else:
            waiters.append((session, request))

    def want(self, session: Session, rooms: list[str]) -> None:
        """Hold ``rooms`` in memory until ``session`` joins them (or gives up)."""
        wanted = self.wanted
        for name in rooms:
            wanted[name] = wanted.get(name, 0) + 1

    def release_wanted(self, session: Session) -> None:
        """The session no longer holds the rooms it asked for at connect in memory."""
        for name in session.wanted:
            count = self.wanted[name] - 1
            if count:
                self.wanted[name] = count
            else:
                del self.wanted[name]
                if (room := self.rooms.get(name)) is not None:
                    self.forget_if_empty(room)
        session.wanted = []

    def forget_if_empty(self, room: Room) -> None:
        if not room.users and room.name not in self.wanted and self.rooms.get(room.name) is room:
            del self.rooms[room.name]
            self.ledgers.pop(room.ledger, None)
            self.peers.touch_room(room.name)
