"""Effects: everything the engine asks its adapter to do.

Transport effects (``Deliver``, ``Close``, ``Ping``) act on connections;
storage effects (``LoadRoom``, ``Append``, ``LoadHistory``, ``LoadInbox``,
``SaveRoom``, ``SavePositions``, ``SaveBan``, ``SaveMute``, ``DeleteStored``,
``LoadHeads``) go to the log, whose answers come back as commands. Bus effects
(``RoomHeld``, ``RoomReleased``, ``UserHeld``, ``UserReleased``, ``Share``,
``SessionParked``, ``SessionGone``, ``ClaimSession``) go to the adapter that
links processes sharing one log; the engine emits them only with
``Config(cluster=True)`` (docs/engine.md "Several processes"). The adapter
carries them out in the order given.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._commands import ConnId, ParkedRoom, Prekey, Screened, Verdict
from ._events import ServerEvent
from ._facts import Fact
from ._frozen import quick_init

__all__ = [
    "Append",
    "ClaimPrekeys",
    "ClaimSession",
    "Close",
    "DeleteStored",
    "Deliver",
    "Effect",
    "LoadHeads",
    "LoadHistory",
    "LoadInbox",
    "LoadRoom",
    "Ping",
    "Position",
    "RoomHeld",
    "RoomReleased",
    "SaveBan",
    "SaveMute",
    "SavePositions",
    "SaveRoom",
    "Screen",
    "SessionGone",
    "SessionParked",
    "Share",
    "StoreDeviceKeys",
    "UserHeld",
    "UserReleased",
]


@quick_init
@dataclass(frozen=True, slots=True, kw_only=True)
class Deliver:
    """Write ``data`` (one text frame, already encoded) to every connection in ``to``.

    The same string goes to all of them: fan-out encodes once. ``size`` is its
    UTF-8 length, which the engine counts against each outbox until the adapter
    reports it ``Written``.
    """

    to: tuple[ConnId, ...]
    event: ServerEvent
    data: str
    size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Close:
    """Close the connection with a WebSocket close code and reason.

    The engine has already forgotten the connection; a later ``Disconnected``
    for it is ignored.
    """

    conn: ConnId
    code: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Ping:
    conn: ConnId


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadRoom:
    """Answer with ``RoomLoaded`` (creating a public room if it does not exist)."""

    room: str
    recent: int


@quick_init
@dataclass(frozen=True, slots=True, kw_only=True)
class Append:
    """Append a message; answer ``Appended`` with the offset the log assigned.

    The log must keep (room, sender, client_id) unique when ``client_id`` is
    set and answer a repeat with the stored message and ``duplicate=True``.
    """

    ref: int
    room: str
    sender: str
    text: str
    ts: int
    client_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadHistory:
    """Answer ``HistoryLoaded``: the newest ``limit`` messages with
    ``after < offset < before`` (all of them when ``limit`` is None), ascending."""

    ref: int
    room: str
    after: int
    before: int
    limit: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadInbox:
    """Answer ``InboxLoaded``: the direct-message rooms of ``user`` (``dm:a:b``
    with ``user`` as ``a`` or ``b``) whose head is past the read offset last
    saved for ``user`` there and whose newest message is not ``user``'s own
    (replying is reading), the one with the newest message first, at most
    ``limit``. Asked once per new session, before its welcome."""

    ref: int
    user: str
    limit: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SaveRoom:
    room: str
    private: bool
    allow: frozenset[str]


@dataclass(frozen=True, slots=True, kw_only=True)
class Position:
    room: str
    delivered: int
    read: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SavePositions:
    """Persist a user's delivered/read offsets (a read mark, or a session that ended)."""

    user: str
    positions: tuple[Position, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreDeviceKeys:
    """Answer ``DeviceKeysStored`` (or ``KeysFailed``): record ``user``'s device
    with its public identity key and add ``prekeys`` (ids already stored are
    kept as they are). A device whose identity key changes starts over: its old
    prekeys go. Refuse a new device past ``max_devices`` and prekeys past
    ``max_prekeys`` in stock."""

    ref: int
    user: str
    device: str
    identity: str
    prekeys: tuple[Prekey, ...]
    max_devices: int
    max_prekeys: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ClaimPrekeys:
    """Answer ``PrekeysClaimed`` (or ``KeysFailed``): every device of ``user``,
    each with one of its prekeys deleted from the store and returned. Each
    prekey must be returned by one claim only, whatever claims run at once."""

    ref: int
    user: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SaveBan:
    """Store whether ``user`` is banned from ``room`` (a mute stays as stored). No answer."""

    room: str
    user: str
    banned: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class SaveMute:
    """Store until when ``user`` is muted in ``room`` (None: not muted; a ban stays
    as stored). No answer."""

    room: str
    user: str
    until: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class DeleteStored:
    """Mark the stored message at ``offset`` deleted (blank its text, keep the
    offset) so that history pages and replays show it deleted. No answer."""

    room: str
    offset: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Screen:
    """Ask the host's hook about a message before it is appended (``Config.screen_messages``).

    Answer with ``Screened`` (the helpers below build it); until then the
    message waits and nothing of it is stored or delivered.
    """

    ref: int
    room: str
    sender: str
    text: str
    client_id: str | None = None

    def accept(self) -> Screened:
        return Screened(ref=self.ref, verdict=Verdict.ACCEPT)

    def refuse(self, reason: str) -> Screened:
        return Screened(ref=self.ref, verdict=Verdict.REFUSE, reason=reason)

    def replace(self, text: str) -> Screened:
        return Screened(ref=self.ref, verdict=Verdict.REPLACE, text=text)


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadHeads:
    """Answer ``HeadsLoaded``: the head offset and epoch of each room, as stored.

    One effect for many rooms (a periodic probe, or every held room after the
    bus came back): a store reads them in one query."""

    ref: int
    rooms: tuple[str, ...]


# -- the bus (only with ``Config(cluster=True)``) -------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class RoomHeld:
    """The engine holds ``room`` in memory from now on: subscribe to its
    messages and facts (for a direct-message room, the parties' user channels
    carry them: see ``chatcore.bus_channels``). Emitted once per hold; a
    ``RoomReleased`` ends it."""

    room: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RoomReleased:
    """The engine no longer holds ``room``: unsubscribe."""

    room: str


@dataclass(frozen=True, slots=True, kw_only=True)
class UserHeld:
    """``user`` has a session on this process (connected or in its grace
    period): subscribe to the user's channel, which carries the direct
    messages of rooms this process may not hold yet."""

    user: str


@dataclass(frozen=True, slots=True, kw_only=True)
class UserReleased:
    """``user``'s last session here ended: unsubscribe from the user's channel."""

    user: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Share:
    """Tell every other process holding ``room`` this fact (``chatcore.bus_fact``
    encodes it with this process's name); they learn it as ``Shared``."""

    room: str
    fact: Fact


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionParked:
    """A session lost its connection and waits out its grace period until
    ``until`` (the engine's clock): record it where any process can claim it
    (``ClaimSession``), with this process as its owner. A later ``SessionParked``
    for the same token replaces the record."""

    token: str
    id: str
    user: str
    rooms: tuple[ParkedRoom, ...]
    until: float
    moves: int = 0
    """How many times the session moved between processes (kept in the record)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionGone:
    """The session with ``token`` resumed here or ended: delete its record so
    that no process claims it."""

    token: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ClaimSession:
    """A connection presented resume token ``token`` that this process does not
    know: take the parked record atomically, and only if it is ``user``'s.
    Answer ``SessionClaimed`` (and tell the record's owner ``SessionTaken``) or
    ``ClaimRefused``. With no record at all, the session may still be live on
    another process (its client's old link died unnoticed): ask every other
    process (``SessionAsked``), take the record its owner parks at once, and
    answer ``ClaimRefused`` if none appears within a bound (the owner is gone or
    silent). The connection waits for the answer before its welcome."""

    ref: int
    token: str
    user: str


Effect = (
    Deliver
    | Close
    | Ping
    | LoadRoom
    | Append
    | LoadHistory
    | LoadInbox
    | SaveRoom
    | SavePositions
    | StoreDeviceKeys
    | ClaimPrekeys
    | SaveBan
    | SaveMute
    | DeleteStored
    | Screen
    | LoadHeads
    | RoomHeld
    | RoomReleased
    | UserHeld
    | UserReleased
    | Share
    | SessionParked
    | SessionGone
    | ClaimSession
)
