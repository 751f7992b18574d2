"""What the engine awaits from the log: one typed record per request in flight.

Every effect that the log answers by reference (``Append``, ``LoadHistory``,
``LoadInbox``) leaves one entry in :attr:`Awaits.refs`, whose type says who
asked and what the answer is for; ``LoadRoom`` is answered by room name, and
:attr:`Awaits.rooms` lists who waits for each. An answer whose entry is gone
(its session ended, or it was answered already) is ignored. This module holds
data only; the modules that send the requests handle the answers.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._commands import ClientRequest
from ._session import Connection, Session

__all__ = [
    "Awaits",
    "Pending",
    "PendingCatchup",
    "PendingGap",
    "PendingInbox",
    "PendingKeys",
    "PendingPage",
    "PendingScreen",
    "PendingSend",
    "RoomWaiter",
]


@dataclass(slots=True)
class PendingSend:
    """A message handed to the log and not yet answered (``Append``)."""

    session: Session
    room: str
    client_id: str | None


@dataclass(slots=True)
class PendingPage:
    """A history page a client asked for (``LoadHistory``)."""

    session: Session
    room: str
    before: int


@dataclass(slots=True)
class PendingCatchup:
    """Messages a connection replays and the window no longer holds (``LoadHistory``)."""

    conn: Connection
    room: str
    before: int


@dataclass(slots=True)
class PendingGap:
    """Messages the log numbered before one it published early, or before the
    head it reported (``LoadHistory``): every offset below ``before`` was asked."""

    room: str
    before: int = 0


@dataclass(slots=True)
class PendingInbox:
    """A new session's direct-message rooms, before its welcome (``LoadInbox``)."""

    session: Session


@dataclass(slots=True)
class PendingKeys:
    """A key request handed to the log (``StoreDeviceKeys``, ``ClaimPrekeys``);
    ``ref_name`` is what an error about it names."""

    session: Session
    ref_name: str


@dataclass(slots=True)
class PendingScreen:
    """A message shown to the host's hook (``Screen``), not yet appended."""

    session: Session
    room: str
    client_id: str | None
    text: str
    ts: int


Pending = (
    PendingSend
    | PendingPage
    | PendingCatchup
    | PendingGap
    | PendingInbox
    | PendingKeys
    | PendingScreen
)

RoomWaiter = tuple[Session, ClientRequest | None]
"""A session waiting for a room to load: for its welcome (None), or to carry out a request."""


class Awaits:
    __slots__ = ("refs", "rooms", "ref")

    def __init__(self) -> None:
        self.refs: dict[int, Pending] = {}
        self.rooms: dict[str, list[RoomWaiter]] = {}  # LoadRoom in flight, by room
        # One numbering for every reference the engine hands out (requests to the
        # log, typing indicators), so that effects are the same run after run.
        self.ref = 0

    def next_ref(self) -> int:
        self.ref += 1
        return self.ref

    def expect(self, pending: Pending) -> int:
        """Record what the answer to a new request is for; return its reference."""
        self.ref += 1
        self.refs[self.ref] = pending
        return self.ref

    def forget_session(self, session: Session) -> None:
        """An ended session waits for nothing: its sends, inbox and rooms are dropped.

        Messages being screened stay: the client sent them, and once accepted
        they are appended like any other (only the ack has no one to go to).

        Pages it asked for stay: their answer finds no connection and is dropped.
        """
        refs = self.refs
        for ref in [
            r
            for r, p in refs.items()
            if (type(p) is PendingSend or type(p) is PendingInbox) and p.session is session
        ]:
            del refs[ref]
        for name in session.waiting:
            waiters = self.rooms.get(name)
            if waiters is not None:
                waiters[:] = [w for w in waiters if not (w[0] is session and w[1] is None)]

    def count(self) -> tuple[int, int]:
        """(appends, loads) in flight; gap fills are not counted."""
        sends = loads = 0
        for p in self.refs.values():
            if type(p) is PendingSend or type(p) is PendingScreen:
                sends += 1
            elif type(p) is not PendingGap:
                loads += 1
        return sends, loads + len(self.rooms)
