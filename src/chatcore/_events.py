"""Server-to-client events: the values a client receives.

These are the contract clients see; ``_codec`` turns each into one JSON text
frame (or a line in plain-text mode). They are plain immutable values so that
an embedding program can read them without parsing JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ._frozen import quick_init

__all__ = [
    "Ack",
    "CallEvent",
    "Deleted",
    "ErrorEvent",
    "History",
    "Joined",
    "KeysEvent",
    "Left",
    "Members",
    "Message",
    "Presence",
    "ReadMark",
    "Removed",
    "RoomPosition",
    "ServerEvent",
    "Typing",
    "Welcome",
]


@quick_init
@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """One chat message as the log stored it.

    ``offset`` is gap-free per room (1, 2, 3...) and assigned by the log, never
    by the engine. ``ts`` is the server time in milliseconds since the Unix
    epoch, UTC. ``client_id`` is the id the sender attached, if any.
    """

    room: str
    offset: int
    epoch: str
    sender: str
    text: str
    ts: int
    client_id: str | None = None
    deleted: bool = False
    """Deleted by a moderator: the offset stays, ``text`` is empty."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RoomPosition:
    """A room in ``welcome``: every message after ``offset`` will be delivered on
    this connection (replayed first when resuming); ``read`` is the user's read mark.
    ``reset``: the client resumed with an offset of another epoch (the room's
    history began a new life since); the stream starts at ``offset`` of the new one."""

    offset: int
    epoch: str
    read: int = 0
    reset: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Welcome:
    session: str
    resume: str
    user: str
    resumed: bool
    rooms: Mapping[str, RoomPosition] = field(default_factory=dict)


@quick_init
@dataclass(frozen=True, slots=True, kw_only=True)
class Ack:
    room: str
    offset: int
    epoch: str
    """The life of the room's history the offset counts in (as on a ``message``)."""
    client_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Joined:
    room: str
    user: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Left:
    room: str
    user: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Presence:
    """Who came and went in a crowded room since its last ``presence`` frame.

    Each user listed is named with where they are now: ``joins`` are in the
    room, ``leaves`` are not (a user who came and went in between is a leave).
    """

    room: str
    joins: tuple[str, ...]
    leaves: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Members:
    """The member list, sent on joining; ``offset``: every message after it follows."""

    room: str
    users: tuple[str, ...]
    offset: int = 0
    epoch: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Typing:
    """``active`` is False when the indicator expired or the user sent a message."""

    room: str
    user: str
    active: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadMark:
    room: str
    user: str
    offset: int


@dataclass(frozen=True, slots=True, kw_only=True)
class History:
    room: str
    messages: tuple[Message, ...]
    more: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorEvent:
    """``ref`` names what failed: the client message id, else the room, else None."""

    code: str
    message: str
    ref: str | None = None
    retry_after: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class CallEvent:
    """A call signal for this client (docs/protocol.md section 8); never stored.

    ``kind`` is the frame's ``type``: ``call`` (``user`` rings you), ``ringing``
    (your call rings ``user``), ``offer``, ``answer``, ``candidate`` (from
    ``user``), or ``ended`` (with a ``reason``).
    """

    kind: str
    call: str
    user: str
    video: bool = False
    sdp: str | None = None
    candidate: str | None = None
    mid: str | None = None
    index: int | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class KeysEvent:
    """The key directory's answer or notice (docs/protocol.md section 11).

    ``kind`` is the frame's ``type``: ``keys_published`` (``device`` has
    ``prekeys`` in stock), ``keys`` (``user``'s ``devices``, each a
    ``(device, identity, prekey id, prekey)`` with the prekey None when it had
    none left) or ``keys_low`` (``device`` of this user is down to ``prekeys``).
    """

    kind: str
    user: str
    device: str | None = None
    prekeys: int = 0
    devices: tuple[tuple[str, str, int | None, str | None], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Deleted:
    """A moderator deleted the message at ``offset``: show it as deleted."""

    room: str
    offset: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Removed:
    """A moderator removed this user from ``room`` (None: from the server, and the
    connection closes next with code 4003)."""

    room: str | None
    reason: str = ""


ServerEvent = (
    Welcome
    | Message
    | Ack
    | Joined
    | Left
    | Presence
    | Members
    | Typing
    | ReadMark
    | History
    | ErrorEvent
    | CallEvent
    | KeysEvent
    | Deleted
    | Removed
)
