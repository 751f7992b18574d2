"""Sessions and connections: the per-client state, and the session state table.

Every session transition is listed in :data:`TRANSITIONS`; the engine asks
:func:`next_state` and never assigns a state any other way. A session outlives
its connection: when the transport drops, the session waits out the grace
period detached, and a connection presenting its resume token picks it up.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from ._commands import ClientRequest, ConnId, Mode
from ._errors import LocalProtocolError
from ._events import Message

NO_ROOMS: frozenset[str] = frozenset()
NO_OFFSETS: Mapping[str, int] = MappingProxyType({})

__all__ = ["TRANSITIONS", "SessionInput", "SessionState", "next_state"]


class SessionState(enum.Enum):
    OPENING = "opening"
    """A fresh session waiting for its rooms to load; no welcome sent yet."""
    RESUMING = "resuming"
    """A known session taken up by a new connection, its rooms loading."""
    LIVE = "live"
    DETACHED = "detached"
    """Transport gone; the grace period runs."""
    CLOSED = "closed"


class SessionInput(enum.Enum):
    READY = "ready"
    """Every room the session needs is loaded: the welcome goes out."""
    FRAME = "frame"
    DROP = "drop"
    """Transport lost, closed as a slow consumer, or silent past a ping."""
    RESUME = "resume"
    EXPIRE = "expire"
    SHUTDOWN = "shutdown"


_S, _I = SessionState, SessionInput

TRANSITIONS: Mapping[tuple[SessionState, SessionInput], SessionState] = {
    (_S.OPENING, _I.READY): _S.LIVE,
    (_S.OPENING, _I.FRAME): _S.OPENING,  # held until the welcome
    (_S.OPENING, _I.DROP): _S.CLOSED,  # the client never got a token to resume with
    (_S.OPENING, _I.SHUTDOWN): _S.CLOSED,
    (_S.RESUMING, _I.READY): _S.LIVE,
    (_S.RESUMING, _I.FRAME): _S.RESUMING,
    (_S.RESUMING, _I.DROP): _S.DETACHED,
    (_S.RESUMING, _I.RESUME): _S.RESUMING,  # a newer connection takes over
    (_S.RESUMING, _I.SHUTDOWN): _S.CLOSED,
    (_S.LIVE, _I.FRAME): _S.LIVE,
    (_S.LIVE, _I.DROP): _S.DETACHED,
    (_S.LIVE, _I.RESUME): _S.RESUMING,  # reconnected before the old transport was seen dead
    (_S.LIVE, _I.SHUTDOWN): _S.CLOSED,
    (_S.DETACHED, _I.RESUME): _S.RESUMING,
    (_S.DETACHED, _I.EXPIRE): _S.CLOSED,
    (_S.DETACHED, _I.SHUTDOWN): _S.CLOSED,
}
"""Every allowed (state, input) pair and the state it leads to. CLOSED is final."""


def next_state(state: SessionState, event: SessionInput) -> SessionState:
    try:
        return TRANSITIONS[state, event]
    except KeyError:
        raise LocalProtocolError(
            f"session in state {state.value} cannot take {event.value}"
        ) from None


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


@dataclass(slots=True)
class PendingSend:
    """A message handed to the log and not yet answered."""

    session: Session
    room: str
    client_id: str | None


class Catchup:
    """A connection replaying a room from ``next`` before it goes live there."""

    __slots__ = ("next", "loaded", "loading", "lost_below", "own")

    def __init__(self, next_offset: int) -> None:
        self.next = next_offset
        # Offsets this connection sent while catching up: acked, so never replayed to it
        # (the sending connection gets no echo of its own message, see Config.echo).
        self.own: set[int] | None = None
        self.loaded: deque[Message] = deque()
        self.loading: int | None = None  # ref of the LoadHistory in flight
        # The log was asked for everything below this offset: what it lacks is gone
        # (retention). The window may have moved on meanwhile, so it is a bound,
        # not a flag.
        self.lost_below = 0


class Connection:
    __slots__ = ("id", "session", "mode", "frames", "nbytes", "last_seen", "ping_sent", "catchup")

    def __init__(self, conn_id: ConnId, session: Session, mode: Mode, now: float) -> None:
        self.id = conn_id
        self.session = session
        self.mode = mode
        self.frames = 0  # outbox: handed to the adapter, not yet reported written
        self.nbytes = 0
        self.last_seen = now
        self.ping_sent: float | None = None
        self.catchup: dict[str, Catchup] = {}


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
    )

    def __init__(
        self, sid: str, token: str, user: str, bucket: TokenBucket, requests: TokenBucket
    ) -> None:
        self.id = sid
        self.token = token
        self.user = user
        self.state = SessionState.OPENING
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
