"""Commands: everything that can happen *to* the engine.

Three families, all frozen values passed to :meth:`Engine.handle`:

* transport commands, from the adapter that owns the sockets
  (``Connect``, ``Receive``, ``Disconnected``, ``Written``, ``Pong``);
* client requests, what a decoded frame asks for (``Join``, ``Send``, ...);
  ``Receive`` decodes into one of these, and a host program may also pass
  them directly;
* log answers, the results of storage effects fed back in
  (``RoomLoaded``, ``Appended``, ``AppendFailed``, ``HistoryLoaded``,
  ``HistoryFailed``, ``InboxLoaded``, ``InboxFailed``, ``HeadsLoaded``,
  ``HeadsFailed``), and host commands (``CreateRoom``, ``Shutdown``);
* bus commands, from the adapter that links several processes sharing one
  log (``BusResumed``, ``Subscribed``, ``Shared``, ``ProcessGone``,
  ``SessionClaimed``, ``ClaimRefused``, ``SessionTaken``, ``SessionAsked``):
  docs/engine.md "Several processes".
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from ._events import Message
from ._facts import Fact
from ._frozen import quick_init

__all__ = [
    "AppendFailed",
    "Appended",
    "Ban",
    "BusResumed",
    "CallSignal",
    "ClaimDeviceKeys",
    "ClaimRefused",
    "ClaimedDevice",
    "ClientRequest",
    "Command",
    "Connect",
    "CreateRoom",
    "DeleteMessage",
    "DeviceKeysStored",
    "Disconnected",
    "Drained",
    "FetchHistory",
    "HeadsFailed",
    "HeadsLoaded",
    "HistoryFailed",
    "HistoryLoaded",
    "InboxFailed",
    "InboxLoaded",
    "Join",
    "KeysFailed",
    "Kick",
    "Leave",
    "MarkRead",
    "Mode",
    "Moderation",
    "Mute",
    "ParkedRoom",
    "Pong",
    "Prekey",
    "PrekeysClaimed",
    "ProcessGone",
    "Publish",
    "PublishDeviceKeys",
    "Receive",
    "RemoveMember",
    "RoomLoadFailed",
    "RoomLoaded",
    "Screened",
    "Send",
    "SendDirect",
    "SessionAsked",
    "SessionClaimed",
    "SessionTaken",
    "Shared",
    "Shutdown",
    "SignalKind",
    "StartTyping",
    "Subscribed",
    "Unban",
    "Verdict",
    "Written",
    "WrittenMany",
]

ConnId = int


class Mode(enum.Enum):
    """How a connection's frames are encoded."""

    JSON = "json"  # subprotocol chatcore.v1
    TEXT = "text"  # no subprotocol: one line per event, as websocat users expect


# -- transport ---------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Connect:
    """A transport opened for ``user``.

    ``resume`` is the token from an earlier ``welcome``; ``offsets`` is the last
    offset the client saw per room, and ``epochs`` the epoch (the life of the
    room's history) each of those offsets belongs to, where the client knows it.
    A room whose history began a new life since (another epoch) is not replayed
    from that offset: the welcome marks it ``reset``. ``rooms`` are joined on a
    fresh session (and on a resumed one, in addition to the rooms it had).
    """

    conn: ConnId
    user: str
    rooms: tuple[str, ...] = ()
    resume: str | None = None
    offsets: Mapping[str, int] = field(default_factory=dict)
    epochs: Mapping[str, str] = field(default_factory=dict)
    mode: Mode = Mode.JSON


@quick_init
@dataclass(frozen=True, slots=True, kw_only=True)
class Receive:
    """One text frame from the client, to be decoded by the engine's codec."""

    conn: ConnId
    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Disconnected:
    """The transport is gone (closed, reset, or failed to write).

    ``code`` is the close code the client sent, None when the transport went
    without a close frame. A client closing with 1000 (normal closure), or with
    a close frame that has no code (1005, as wsproto and websockets report it;
    websocat sends one on quit), is done: its session ends at once and the
    others see it leave. Any other code, or None, keeps the session for the
    grace period so the client can resume.
    """

    conn: ConnId
    code: int | None = None


@quick_init
@dataclass(frozen=True, slots=True, kw_only=True)
class Written:
    """The adapter handed ``frames`` frames, ``nbytes`` bytes, to the socket."""

    conn: ConnId
    frames: int
    nbytes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class WrittenMany:
    """Several ``Written`` reports in one command: ``(conn, frames, nbytes)`` each.

    An adapter that flushes many connections per loop iteration reports them
    all at once, saving an engine call per connection.
    """

    reports: tuple[tuple[ConnId, int, int], ...]


@quick_init
@dataclass(frozen=True, slots=True, kw_only=True)
class Drained:
    """Everything delivered to these connections so far has been written.

    For an adapter that knows when a connection's queue is empty: no
    counting of frames or bytes needed.
    """

    conns: tuple[ConnId, ...]


@quick_init
@dataclass(frozen=True, slots=True, kw_only=True)
class Pong:
    """The client answered a ping (any received frame also counts as alive)."""

    conn: ConnId


# -- client requests -----------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Join:
    conn: ConnId
    room: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Leave:
    conn: ConnId
    room: str


@quick_init
@dataclass(frozen=True, slots=True, kw_only=True)
class Send:
    """``encrypted``: ``text`` is an end-to-end encrypted envelope (``_keys.ENCRYPTED``
    and its JSON), allowed in direct-message rooms only."""

    conn: ConnId
    room: str
    text: str
    client_id: str | None = None
    encrypted: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class SendDirect:
    conn: ConnId
    to: str
    text: str
    client_id: str | None = None
    encrypted: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class StartTyping:
    conn: ConnId
    room: str


@dataclass(frozen=True, slots=True, kw_only=True)
class MarkRead:
    conn: ConnId
    room: str
    offset: int


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchHistory:
    """Page backwards: up to ``limit`` messages with offset < ``before``.

    ``before=None`` means from the head of the room.
    """

    conn: ConnId
    room: str
    before: int | None = None
    limit: int = 50


class SignalKind(enum.StrEnum):
    """What a call frame asks (docs/protocol.md section 8); the value is its ``type``."""

    CALL = "call"  # ring a user
    OFFER = "offer"
    ANSWER = "answer"
    CANDIDATE = "candidate"
    CONNECTED = "connected"  # this side's peer connection is up
    DECLINE = "decline"
    BUSY = "busy"
    HANGUP = "hangup"


@dataclass(frozen=True, slots=True, kw_only=True)
class CallSignal:
    """One call frame: ring ``to`` (``CALL``), or a signal in call ``call``.

    Which fields are set depends on ``kind``: ``to`` and ``video`` ring, ``sdp``
    is an offer's or an answer's, ``candidate``/``mid``/``index`` an ICE
    candidate's (an empty ``candidate``: this side has no more). The engine
    relays it to the other party and never stores it.
    """

    conn: ConnId
    call: str
    kind: SignalKind
    to: str | None = None
    video: bool = False
    sdp: str | None = None
    candidate: str | None = None
    mid: str | None = None
    index: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Prekey:
    """A one-time public prekey of a device: its id, and the key (base64, opaque)."""

    id: int
    key: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PublishDeviceKeys:
    """Publish a device's public identity key and add one-time prekeys (``_keys``)."""

    conn: ConnId
    device: str
    identity: str
    prekeys: tuple[Prekey, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class ClaimDeviceKeys:
    """Ask for ``user``'s devices, taking one prekey of each (``_keys``)."""

    conn: ConnId
    user: str


ClientRequest = (
    Join
    | Leave
    | Send
    | SendDirect
    | StartTyping
    | MarkRead
    | FetchHistory
    | CallSignal
    | PublishDeviceKeys
    | ClaimDeviceKeys
)


# -- log answers and host commands ----------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class RoomLoaded:
    """The log's answer to ``LoadRoom``.

    ``head`` is the highest offset stored (0 for a new room), ``recent`` the
    newest stored messages in ascending order (at most what was asked).
    """

    room: str
    epoch: str
    head: int
    private: bool = False
    allow: frozenset[str] = frozenset()
    recent: tuple[Message, ...] = ()
    banned: frozenset[str] = frozenset()
    muted: Mapping[str, float] = field(default_factory=dict)
    """user -> until when (the engine's ``now``) a mute stored for the room lasts."""
    reads: Mapping[str, int] = field(default_factory=dict)
    """user -> the read mark stored for the room (users without one left out), so a
    room loaded again after it emptied shows everyone the marks they had."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RoomLoadFailed:
    """The log could not answer ``LoadRoom``: whoever waited gets ``unavailable``."""

    room: str
    reason: str = "store unavailable"


@quick_init
@dataclass(frozen=True, slots=True, kw_only=True)
class Appended:
    """The log stored ``message`` (or already had it: ``duplicate``).

    ``ref`` is the ``Append.ref`` this answers, or None for a message that
    another process appended (it is delivered all the same).
    """

    message: Message
    ref: int | None = None
    duplicate: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class AppendFailed:
    ref: int
    reason: str = "store unavailable"


@dataclass(frozen=True, slots=True, kw_only=True)
class HistoryLoaded:
    """Answer to ``LoadHistory``: messages in ascending offset order."""

    ref: int
    messages: tuple[Message, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class HistoryFailed:
    ref: int
    reason: str = "store unavailable"


@dataclass(frozen=True, slots=True, kw_only=True)
class InboxLoaded:
    """Answer to ``LoadInbox``: direct-message rooms with unread messages, newest first."""

    ref: int
    rooms: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class InboxFailed:
    """The log could not answer ``LoadInbox``: the session starts without those rooms."""

    ref: int
    reason: str = "store unavailable"


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceKeysStored:
    """Answer to ``StoreDeviceKeys``: the device's prekeys in stock now."""

    ref: int
    device: str
    stock: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ClaimedDevice:
    """One device in a ``PrekeysClaimed`` answer: its identity key, the prekey
    taken for the claimer (None when it had none left) and how many are left."""

    device: str
    identity: str
    prekey: Prekey | None
    left: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PrekeysClaimed:
    """Answer to ``ClaimPrekeys``: every device of ``user``, each prekey taken
    out of the store (it is handed out this once)."""

    ref: int
    user: str
    devices: tuple[ClaimedDevice, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class KeysFailed:
    """The log could not answer ``StoreDeviceKeys`` or ``ClaimPrekeys``
    (``reason``: why, e.g. too many devices)."""

    ref: int
    reason: str = "store unavailable"


@dataclass(frozen=True, slots=True, kw_only=True)
class HeadsLoaded:
    """Answer to ``LoadHeads``: room -> (head offset, epoch) as the log has them
    now. A room the log does not know is left out."""

    ref: int
    heads: Mapping[str, tuple[int, str]]


@dataclass(frozen=True, slots=True, kw_only=True)
class HeadsFailed:
    """The log could not answer ``LoadHeads``: the rooms are probed again at the
    next interval."""

    ref: int
    reason: str = "store unavailable"


# -- the bus: several processes sharing one log (docs/engine.md "Several processes") --


@dataclass(frozen=True, slots=True, kw_only=True)
class BusResumed:
    """The bus (re)connected and every subscription is back: whatever was
    published meanwhile may be lost, so every held room asks the log for its
    head (one ``LoadHeads``). Also what an adapter feeds after a liveness probe
    of the bus that found a subscription silently dead. (The channels it
    subscribed again, the adapter names with ``Subscribed``.)"""


@dataclass(frozen=True, slots=True, kw_only=True)
class Subscribed:
    """The bus confirmed the channels of these rooms (``RoomHeld``) and users
    (``UserHeld``): from now on nothing published on them is missed, but what
    was published before may have been. The adapter feeds it whenever a
    subscription is confirmed (after a reconnect too, with ``BusResumed``). A
    room is taken up once it is loaded and confirmed: it alone asks the log for
    its head, asks the other holders for their members and tells them this
    process's own. For a user newly confirmed, the log is asked which of the
    user's direct-message rooms hold something unread (``LoadInbox``). Names not
    held, or confirmed already, are ignored."""

    rooms: tuple[str, ...] = ()
    users: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Shared:
    """A fact process ``origin`` shared about ``room`` (its ``Share`` effect)."""

    origin: str
    room: str
    fact: Fact


@dataclass(frozen=True, slots=True, kw_only=True)
class ProcessGone:
    """Process ``origin`` is gone (its heartbeat expired and its grace period
    passed): every member it had in any room leaves, here, once."""

    origin: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ParkedRoom:
    """One room of a parked session: where its stream stood (``offset`` in
    ``epoch``) and the user's read mark there."""

    room: str
    offset: int
    epoch: str
    read: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionClaimed:
    """Answer to ``ClaimSession``: the parked session (``SessionParked``) is
    now this process's. ``id`` and ``token`` stay what the client knows."""

    ref: int
    id: str
    token: str
    user: str
    rooms: tuple[ParkedRoom, ...] = ()
    moves: int = 0
    """How many times the session moved before (the record's ``moves``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ClaimRefused:
    """Answer to ``ClaimSession``: no parked session has that token for that
    user (never was, expired, or claimed already): the client gets a fresh session."""

    ref: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionTaken:
    """Process ``by`` claimed the session with ``token``: this process forgets
    its copy and closes its connection, if it still has one, with 1000. Its
    rooms see no ``left``: the user is counted as a member on ``by`` instead."""

    token: str
    by: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionAsked:
    """Another process was handed resume token ``token`` for ``user`` and found
    no parked record: the session may be live here, its client reconnected
    elsewhere before this process noticed its old link died. If it is here and
    ``user``'s, it is handed over at once: its connection is closed with 1000
    ``session resumed elsewhere`` and it is parked (``SessionParked``) for the
    asker to claim. Anything else (not here, another user's, parked already,
    still opening) does nothing."""

    token: str
    user: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CreateRoom:
    """Host/admin: create or update a room; private rooms admit only ``allow``."""

    room: str
    private: bool = True
    allow: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True, kw_only=True)
class Publish:
    """Host: post a message to a room as ``sender`` (a bot, a system notice).

    It goes through the log like any message and reaches every member; no
    membership, rate limit or ack applies. ``text`` must not be empty, be
    over ``max_text_bytes`` or start with the encryption marker
    (``LocalProtocolError``): only a client sends an encrypted message.
    """

    room: str
    sender: str
    text: str
    client_id: str | None = None


class Verdict(enum.Enum):
    """What the host's screening hook decided about a message (see ``Screened``)."""

    ACCEPT = "accept"
    REFUSE = "refuse"
    REPLACE = "replace"


@dataclass(frozen=True, slots=True, kw_only=True)
class Screened:
    """Host: the answer to ``Screen`` ``ref``.

    ``ACCEPT`` appends the message as sent; ``REPLACE`` appends ``text``
    instead; ``REFUSE`` appends nothing and sends the sender error
    ``refused`` with ``reason``. An answer for a ref that is not awaited
    (answered already) is ignored. Build it with ``Screen.accept()``,
    ``Screen.refuse(reason)`` or ``Screen.replace(text)``.
    """

    ref: int
    verdict: Verdict
    text: str | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Shutdown:
    """Close every connection with 1001, save positions, refuse new connections."""


# -- moderation: host and admin commands (see ``_moderation``) -----------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class RemoveMember:
    """Take ``user`` (every session) out of ``room``; they get ``removed``. They
    may join again unless banned."""

    room: str
    user: str
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Kick:
    """Remove ``user`` from the server: every connection gets ``removed`` and is
    closed with 4003, and their sessions end (no resume)."""

    user: str
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Mute:
    """``user`` may not send in ``room`` until ``until`` (the engine's clock,
    seconds); ``until=None`` lifts a mute. Stored."""

    room: str
    user: str
    until: float | None
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Ban:
    """``user`` may not join (or send in) ``room``; a member is removed. Stored."""

    room: str
    user: str
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Unban:
    room: str
    user: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DeleteMessage:
    """Mark the message at ``offset`` deleted: its offset stays (no gap), its text
    goes; history and replays show it deleted and members get ``deleted``. Stored."""

    room: str
    offset: int


Moderation = RemoveMember | Kick | Mute | Ban | Unban | DeleteMessage


Command = (
    Connect
    | Receive
    | Disconnected
    | Written
    | WrittenMany
    | Drained
    | Pong
    | ClientRequest
    | RoomLoaded
    | RoomLoadFailed
    | Appended
    | AppendFailed
    | HistoryLoaded
    | HistoryFailed
    | InboxLoaded
    | InboxFailed
    | DeviceKeysStored
    | PrekeysClaimed
    | KeysFailed
    | CreateRoom
    | Publish
    | Shutdown
    | Moderation
    | Screened
    | HeadsLoaded
    | HeadsFailed
    | BusResumed
    | Subscribed
    | Shared
    | ProcessGone
    | SessionClaimed
    | ClaimRefused
    | SessionTaken
    | SessionAsked
)
