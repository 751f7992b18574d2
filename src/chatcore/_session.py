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


class Connection:
    __slots__ = (
        "id",
        "session",
        "mode",
        "frames",
        "nbytes",
        "last_seen",
        "ping_sent",
        "catchup",
        "closing",
    )

    def __init__(self, conn_id: ConnId, session: Session, mode: Mode, now: float) -> None:
        self.id = conn_id
        self.session = session
        self.mode = mode
        self.frames = 0  # outbox: handed to the adapter, not yet reported written
        self.nbytes = 0
        self.last_seen = now
        self.ping_sent: float | None = None
        self.catchup: dict[str, Catchup] = {}
        # Set when the engine decided to close it during a step; the close itself
        # happens at the end of the step (see _outbox.close_later).
        self.closing = False


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
