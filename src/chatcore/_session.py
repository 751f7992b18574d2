"""Sessions and connections: the per-client state, and the session state table.

Everything that changes a session's state is in this file. :data:`TABLE`
maps every (state, input) pair of a session that is not closed to the action
the engine takes and the state that follows; :func:`fire` is the only code
that assigns ``Session.state``. CLOSED is final: firing anything at a closed
session is a bug in the engine and raises. The actions are carried out where
their input arises (``_lifecycle`` for most, the engine for frames); the
diagram in docs/engine.md is drawn from this table (:func:`diagram`).

A session outlives its connection: when the transport drops, the session
waits out the grace period detached, and a connection presenting its resume
token picks it up.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Mapping
from types import MappingProxyType
from typing import NamedTuple

from ._commands import ClientRequest, ConnId, Mode, ParkedRoom
from ._errors import LocalProtocolError
from ._events import Ack, Message

NO_ROOMS: frozenset[str] = frozenset()
NO_OFFSETS: Mapping[str, int] = MappingProxyType({})
NO_EPOCHS: Mapping[str, str] = MappingProxyType({})

__all__ = [
    "TABLE",
    "TRANSITIONS",
    "SessionAction",
    "SessionInput",
    "SessionState",
    "Transition",
    "diagram",
    "fire",
    "next_state",
    "takes",
]


class SessionState(enum.Enum):
    # Hashed by identity, as members are compared: Enum's own hash is a Python call,
    # and every frame looks its session up in the table by (state, input).
    __hash__ = object.__hash__

    OPENING = "opening"
    """A fresh session waiting for its rooms to load; no welcome sent yet."""
    RESUMING = "resuming"
    """A known session taken up by a new connection, its rooms loading."""
    LIVE = "live"
    DETACHED = "detached"
    """Transport gone; the grace period runs."""
    CLOSED = "closed"


class SessionInput(enum.Enum):
    __hash__ = object.__hash__  # (as SessionState's)

    READY = "ready"
    """Every room the session needs is loaded: the welcome goes out."""
    FRAME = "frame"
    DROP = "drop"
    """Transport lost, closed as a slow consumer, or silent past a ping."""
    RESUME = "resume"
    EXPIRE = "expire"
    SHUTDOWN = "shutdown"


class SessionAction(enum.Enum):
    """What the engine does when a transition fires."""

    WELCOME = "welcome"
    """Join the rooms asked for, send the welcome, replay, run the held frames."""
    HOLD = "hold"
    """Keep the frame (up to ``max_pending_frames``) until the welcome."""
    SERVE = "serve"
    """Carry the request out, within the request rate."""
    TAKE_OVER = "take over"
    """The new connection replaces the old one, which is closed with 1000."""
    WAIT = "wait"
    """Detach and start the grace period."""
    END = "end"
    """Save the session's positions, leave its rooms, forget it."""
    IGNORE = "ignore"
    """Nothing: the input is stale (an old timer, a room loaded after a drop) or
    cannot concern this session (a resume with a token the client never got)."""


class Transition(NamedTuple):
    action: SessionAction
    next: SessionState


_S, _I, _A = SessionState, SessionInput, SessionAction
_T = Transition

_TABLE: dict[tuple[SessionState, SessionInput], Transition] = {
    (_S.OPENING, _I.READY): _T(_A.WELCOME, _S.LIVE),
    (_S.OPENING, _I.FRAME): _T(_A.HOLD, _S.OPENING),
    (_S.OPENING, _I.DROP): _T(_A.END, _S.CLOSED),  # no token was issued to resume with
    (_S.OPENING, _I.RESUME): _T(_A.IGNORE, _S.OPENING),  # the newcomer gets its own
    (_S.OPENING, _I.EXPIRE): _T(_A.IGNORE, _S.OPENING),
    (_S.OPENING, _I.SHUTDOWN): _T(_A.END, _S.CLOSED),
    (_S.RESUMING, _I.READY): _T(_A.WELCOME, _S.LIVE),
    (_S.RESUMING, _I.FRAME): _T(_A.HOLD, _S.RESUMING),
    (_S.RESUMING, _I.DROP): _T(_A.WAIT, _S.DETACHED),
    (_S.RESUMING, _I.RESUME): _T(_A.TAKE_OVER, _S.RESUMING),  # a newer connection
    (_S.RESUMING, _I.EXPIRE): _T(_A.IGNORE, _S.RESUMING),
    (_S.RESUMING, _I.SHUTDOWN): _T(_A.END, _S.CLOSED),
    (_S.LIVE, _I.READY): _T(_A.IGNORE, _S.LIVE),  # a room it asked for twice
    (_S.LIVE, _I.FRAME): _T(_A.SERVE, _S.LIVE),
    (_S.LIVE, _I.DROP): _T(_A.WAIT, _S.DETACHED),
    (_S.LIVE, _I.RESUME): _T(_A.TAKE_OVER, _S.RESUMING),  # old transport not seen dead
    (_S.LIVE, _I.EXPIRE): _T(_A.IGNORE, _S.LIVE),
    (_S.LIVE, _I.SHUTDOWN): _T(_A.END, _S.CLOSED),
    (_S.DETACHED, _I.READY): _T(_A.IGNORE, _S.DETACHED),  # dropped while resuming
    (_S.DETACHED, _I.FRAME): _T(_A.IGNORE, _S.DETACHED),
    (_S.DETACHED, _I.DROP): _T(_A.IGNORE, _S.DETACHED),
    (_S.DETACHED, _I.RESUME): _T(_A.TAKE_OVER, _S.RESUMING),
    (_S.DETACHED, _I.EXPIRE): _T(_A.END, _S.CLOSED),
    (_S.DETACHED, _I.SHUTDOWN): _T(_A.END, _S.CLOSED),
}

TABLE: Mapping[tuple[SessionState, SessionInput], Transition] = MappingProxyType(_TABLE)
"""Every (state, input) pair of a session that is not closed: (action, next state)."""

TRANSITIONS: Mapping[tuple[SessionState, SessionInput], SessionState] = MappingProxyType(
    {pair: t.next for pair, t in TABLE.items()}
)
"""The state each (state, input) pair leads to (:data:`TABLE` without its actions)."""


def _check_complete() -> None:
    open_states = [s for s in SessionState if s is not SessionState.CLOSED]
    missing = [(s, i) for s in open_states for i in SessionInput if (s, i) not in TABLE]
    if missing or any(s is SessionState.CLOSED for s, _ in TABLE):
        raise RuntimeError(f"the session table is not complete: {missing}")  # pragma: no cover


_check_complete()


def next_state(state: SessionState, event: SessionInput) -> SessionState:
    """The state ``event`` leads to from ``state``; a pair not in the table raises."""
    return _transition(state, event).next


def _transition(state: SessionState, event: SessionInput) -> Transition:
    try:
        return _TABLE[state, event]
    except KeyError:
        raise LocalProtocolError(
            f"session in state {state.value} cannot take {event.value}"
        ) from None


def fire(session: Session, event: SessionInput) -> SessionAction:
    """Move ``session`` along the table; return the action to carry out.

    The only writer of ``Session.state`` (a new session starts OPENING).
    """
    try:
        action, session.state = _TABLE[session.state, event]
    except KeyError:
        raise LocalProtocolError(
            f"session in state {session.state.value} cannot take {event.value}"
        ) from None
    return action


def takes(session: Session, event: SessionInput) -> bool:
    """Whether ``event`` would do anything to ``session`` (a closed one takes nothing)."""
    transition = _TABLE.get((session.state, event))
    return transition is not None and transition.action is not SessionAction.IGNORE


def diagram() -> str:
    """The table as a mermaid state diagram; ignored inputs are left out."""
    lines = ["stateDiagram-v2", "    [*] --> OPENING: connect"]
    for (state, event), (action, target) in TABLE.items():
        if action is not SessionAction.IGNORE:
            lines.append(f"    {state.name} --> {target.name}: {event.value} / {action.value}")
    lines.append("    CLOSED --> [*]")
    return "\n".join(lines)


class TokenBucket:
    """Rate limit: ``burst`` tokens, refilled at ``rate`` per second of ``now``."""

    __slots__ = ("tokens", "stamp")

    def __init__(self, burst: int, now: float) -> None:
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float, burst: int, rate: float) -> float:
        """Take one token; return 0.0, or the seconds to wait if there is none."""
        if now > self.stamp:
            self.tokens = min(float(burst), self.tokens + (now - self.stamp) * rate)
            self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / rate


class Catchup:
    """A connection replaying a room from ``next`` before it goes live there."""

    __slots__ = ("next", "loaded", "loading", "lost_below", "own")

    def __init__(self, next_offset: int) -> None:
        self.next = next_offset
        # Messages this connection sent while catching up, by offset: the replay hands
        # out their acks in their place (the sending connection gets no echo of its
        # own message, see Config.echo), so acks and messages stay in offset order.
        self.own: dict[int, Ack] | None = None
        self.loaded: deque[Message] = deque()
        self.loading: int | None = None  # ref of the LoadHistory in flight
        # The log was asked for everything below this offset: what it lacks is gone
        # (retention). The window may have moved on meanwhile, so it is a bound,
        # not a flag.
        self.lost_below = 0


class Ledger:
    """One room's live fan-out, counted once for all the members it counts.

    A chat message to a room of N members would otherwise cost N increments of
    N outbox counts, and the adapter's ``Drained`` N resets. Instead, a
    broadcast that every member certainly has room for (``_outbox.broadcast``)
    adds to the ledger once, and a ``Drained`` that covers every member
    zeroes it once. A connection is counted by at most one ledger: that of
    the first room whose live JSON fan-out it joined (``Room.attach``); in
    its other rooms it is counted one by one (``Room.counted``). For every
    open connection ``c`` (the exactness invariant):

        outbox of c  ==  (c.frames, c.nbytes) + (c.ledger.frames, c.ledger.nbytes)

    (the ledger's part being nothing when ``c.ledger`` is None). A member's own
    counts may therefore be negative: one that joins a ledger, or is passed by
    as a message's sender, is credited in advance what the ledger holds for
    the others. Two more invariants keep the fast path and the reset sound:
    every member's own counts are at most ``top_frames``/``top_bytes`` (an
    upper bound, raised wherever own counts rise, made exact again by
    ``_outbox``'s tightening); and every member whose own counts are not zero
    is in ``owing`` (a member not in it has own counts of zero).
    """

    __slots__ = ("frames", "nbytes", "top_frames", "top_bytes", "members", "ids", "_order", "owing")

    def __init__(self) -> None:
        self.frames = 0  # handed to each member by broadcasts since the last reset
        self.nbytes = 0
        self.top_frames = 0  # at least every member's own frames
        self.top_bytes = 0
        self.members: dict[ConnId, Connection] = {}
        self.ids: set[ConnId] = set()  # the members' ids, for a Drained to be held against
        self._order: tuple[ConnId, ...] | None = None  # tuple(members), until they change
        self.owing: set[ConnId] = set()

    def owe(self, conn: Connection) -> None:
        """A member's own counts went up: keep the bound and know to reset it."""
        self.owing.add(conn.id)
        self.top_frames = max(self.top_frames, conn.frames)
        self.top_bytes = max(self.top_bytes, conn.nbytes)

    def join(self, conn: Connection) -> None:
        """``conn`` is counted here from now on: credited what the others were handed."""
        conn.ledger = self
        self.members[conn.id] = conn
        self.ids.add(conn.id)
        self._order = None
        if self.frames or self.nbytes:
            conn.frames -= self.frames
            conn.nbytes -= self.nbytes
        self.owe(conn)

    def leave(self, conn: Connection) -> None:
        """``conn`` is counted one by one from now on: its own counts take its share."""
        conn.frames += self.frames
        conn.nbytes += self.nbytes
        conn.ledger = None
        del self.members[conn.id]
        self.ids.discard(conn.id)
        self._order = None
        self.owing.discard(conn.id)

    def drained_by(self, conn_ids: tuple[ConnId, ...]) -> bool:
        """Whether ``conn_ids`` names every member (and perhaps others)."""
        order = self._order
        if order is None:
            order = self._order = tuple(self.members)
        if conn_ids == order:
            return True
        # What a server that writes a fan-out before the queues it makes names: the
        # members in the order they were handed it, the sender (its ack) last. Each
        # comparison is one C loop over pointers; the general test below, two loops
        # that hash (a set difference), costs several times more per member.
        if len(conn_ids) == len(order) and (last := conn_ids[-1]) in self.ids:
            i = order.index(last)
            if conn_ids[:i] == order[:i] and conn_ids[i:-1] == order[i + 1 :]:
                return True
        return not self.ids.difference(conn_ids)


class Connection:
    __slots__ = (
        "id",
        "session",
        "mode",
        "frames",
        "nbytes",
        "ledger",
        "last_seen",
        "ping_sent",
        "catchup",
        "closing",
    )

    def __init__(self, conn_id: ConnId, session: Session, mode: Mode, now: float) -> None:
        self.id = conn_id
        self.session = session
        self.mode = mode
        # Outbox: handed to the adapter, not yet reported written, apart from what
        # the ledger of its room counts for it (see Ledger and outbox()).
        self.frames = 0
        self.nbytes = 0
        self.ledger: Ledger | None = None
        self.last_seen = now
        self.ping_sent: float | None = None
        self.catchup: dict[str, Catchup] = {}
        # Set when the engine decided to close it during a step; the close itself
        # happens at the end of the step (see _outbox.close_later).
        self.closing = False

    def outbox(self) -> tuple[int, int]:
        """(frames, bytes) handed to the adapter and not yet reported written."""
        ledger = self.ledger
        if ledger is None:
            return self.frames, self.nbytes
        return self.frames + ledger.frames, self.nbytes + ledger.nbytes


class Session:
    __slots__ = (
        "id",
        "token",
        "user",
        "state",
        "conn",
        "rooms",
        "text_room",
        "bucket",
        "requests",
        "backlog",
        "waiting",
        "wanted",
        "offsets",
        "delivered",
        "detach_gen",
        "resumed",
        "inbox",
        "mode",
        "epochs",
        "moves",
        "moved",
    )

    def __init__(
        self, sid: str, token: str, user: str, bucket: TokenBucket, requests: TokenBucket
    ) -> None:
        self.id = sid
        self.token = token
        self.user = user
        self.state = SessionState.OPENING  # from here on, only fire() writes it
        self.conn: Connection | None = None
        self.rooms: dict[str, None] = {}  # joined rooms, in join order
        self.text_room: str | None = None  # where plain-text lines go
        self.bucket = bucket  # chat messages
        self.requests = requests  # every request
        self.backlog: list[ClientRequest] = []  # frames that came before the welcome
        # Shared empties until needed: an idle server holds thousands of sessions.
        self.waiting: frozenset[str] = NO_ROOMS  # rooms still loading before READY
        self.wanted: list[str] = []  # rooms asked for at connect, joined at READY
        self.offsets: Mapping[str, int] = NO_OFFSETS  # replay positions asked at resume
        self.delivered: dict[str, int] = {}  # room head when the transport dropped
        self.detach_gen = 0
        self.resumed = False
        self.inbox: int | None = None  # ref of the LoadInbox the welcome waits for
        # The mode of its latest connection, kept while it is away: a call rings only
        # sessions in JSON mode (a plain-text connection is never handed call frames).
        self.mode = Mode.JSON
        self.epochs: Mapping[str, str] = NO_EPOCHS  # the epoch of each offset asked at resume
        # Several processes (``_cluster``): how many times it moved between processes,
        # and, from its claim here until its welcome, the move (its name) and the rooms
        # it had there: this process answers for its membership in them meanwhile.
        self.moves = 0
        self.moved: tuple[str, tuple[ParkedRoom, ...]] | None = None
