"""Moderation: what a host or an admin does to users and messages.

Owns removing a user from a room or from the server, mutes, bans and
deleting a message. Each is a host command (``_commands.Moderation``) that
changes what the engine holds of a loaded room and says what must be stored
(``SaveBan``, ``SaveMute``, ``DeleteStored``), so that a room loaded later, here or
in another process, holds the same. Whether a banned or muted user may join
or send is not decided here: the one access rule (``_access``) is asked with
the room's bans and mutes. Membership itself is ``_presence``; ending a
session is ``_lifecycle``.
"""

from __future__ import annotations

from dataclasses import replace

from ._commands import Ban, DeleteMessage, Kick, Moderation, Mute, RemoveMember, Unban
from ._effects import Close, DeleteStored, Effect, SaveBan, SaveMute
from ._errors import CloseCode, LocalProtocolError
from ._events import Deleted, Removed
from ._lifecycle import drop, expire
from ._names import is_valid_name, is_valid_room
from ._outbox import broadcast, to
from ._presence import remove_member
from ._room import Room
from ._session import SessionInput, takes
from ._state import EngineState

__all__ = ["load_failed", "moderate", "room_arrived"]

_MAX_REASON = 200  # characters: a close reason must fit in 123 bytes, see ``kick``


def moderate(st: EngineState, cmd: Moderation, out: list[Effect]) -> None:
    """Carry out one moderation command. Raises :class:`LocalProtocolError` on
    an invalid room or user name, an offset below 1 or an over-long reason,
    before changing anything."""
    _check(cmd)
    if not isinstance(cmd, Kick) and cmd.room not in st.rooms and cmd.room in st.awaits.rooms:
        # Its load is on the way with what the store held before this: apply it again
        # to what arrives (the store gets it after the load, in order).
        st.moderating.setdefault(cmd.room, []).append(cmd)
    match cmd:
        case RemoveMember():
            if (room := st.rooms.get(cmd.room)) is not None:
                _remove(st, room, cmd.user, cmd.reason, out)
        case Kick():
            _kick(st, cmd.user, cmd.reason, out)
        case Mute():
            # A mute that is over already is nothing to keep.
            until = cmd.until if cmd.until is not None and cmd.until > st.now else None
            if (room := st.rooms.get(cmd.room)) is not None:
                if until is None:
                    room.muted.pop(cmd.user, None)
                else:
                    room.muted[cmd.user] = until
            # A room not held here learns it from the store when it loads.
            out.append(SaveMute(room=cmd.room, user=cmd.user, until=until))
        case Ban():
            if (room := st.rooms.get(cmd.room)) is not None:
                room.banned.add(cmd.user)
                _remove(st, room, cmd.user, cmd.reason or "banned", out)
            out.append(SaveBan(room=cmd.room, user=cmd.user, banned=True))
        case Unban():
            if (room := st.rooms.get(cmd.room)) is not None:
                room.banned.discard(cmd.user)
            out.append(SaveBan(room=cmd.room, user=cmd.user, banned=False))
        case DeleteMessage():
            out.append(DeleteStored(room=cmd.room, offset=cmd.offset))
            if (room := st.rooms.get(cmd.room)) is not None and cmd.offset <= room.head:
                _blank(room, cmd.offset)
                broadcast(
                    st, room, Deleted(room=cmd.room, offset=cmd.offset), None, out, ephemeral=True
                )


def room_arrived(st: EngineState, room: Room) -> None:
    """A room loaded: what was decided about it while it loaded holds in it too."""
    for cmd in st.moderating.pop(room.name, ()):
        match cmd:
            case Ban():
                room.banned.add(cmd.user)
            case Unban():
                room.banned.discard(cmd.user)
            case Mute():
                if cmd.until is None or cmd.until <= st.now:
                    room.muted.pop(cmd.user, None)
                else:
                    room.muted[cmd.user] = cmd.until
            case DeleteMessage():
                _blank(room, cmd.offset)
            case RemoveMember() | Kick():
                pass  # nobody was in it while it loaded


def load_failed(st: EngineState, room: str) -> None:
    st.moderating.pop(room, None)  # stored all the same; the next load brings it


def _check(cmd: Moderation) -> None:
    if not isinstance(cmd, DeleteMessage) and not is_valid_name(cmd.user):
        raise LocalProtocolError(f"invalid user name in {cmd!r}")
    if not isinstance(cmd, Kick) and not is_valid_room(cmd.room):
        raise LocalProtocolError(f"invalid room name in {cmd!r}")
    if isinstance(cmd, DeleteMessage) and cmd.offset < 1:
        raise LocalProtocolError(f"offsets start at 1, got {cmd.offset}")
    if not isinstance(cmd, Unban | DeleteMessage) and len(cmd.reason) > _MAX_REASON:
        raise LocalProtocolError(f"a reason is at most {_MAX_REASON} characters")


def _remove(st: EngineState, room: Room, user: str, reason: str, out: list[Effect]) -> None:
    """Every session of ``user`` leaves ``room`` and is told why."""
    for session in list(st.by_user.get(user, {}).values()):
        if room.name in session.rooms:
            remove_member(st, session, room, out)
            if session.text_room == room.name:
                session.text_room = next(iter(session.rooms), None)
            if session.conn is not None and not session.conn.closing:
                to(st, session.conn, Removed(room=room.name, reason=reason), out)


def _kick(st: EngineState, user: str, reason: str, out: list[Effect]) -> None:
    """Close every connection of ``user`` with 4003 and end their sessions at once."""
    # A close reason is at most 123 bytes on the wire.
    close_reason = ("removed: " + reason if reason else "removed").encode()[:123]
    for session in list(st.by_user.get(user, {}).values()):
        conn = session.conn
        if conn is not None and not conn.closing and st.conns.get(conn.id) is conn:
            to(st, conn, Removed(room=None, reason=reason), out)
            text = close_reason.decode(errors="ignore")
            out.append(Close(conn=conn.id, code=CloseCode.REMOVED, reason=text))
            drop(st, conn, out)
        if takes(session, SessionInput.EXPIRE):
            expire(st, session, out)  # removed: no grace period, no resume


def _blank(room: Room, offset: int) -> None:
    """The window's copy of the message, if it holds one, shows it deleted."""
    start = room.window_start()
    i = offset - start
    if 0 <= i < len(room.window):
        room.window[i] = replace(room.window[i], text="", deleted=True)
    early = room.early.get(offset)
    if early is not None:
        room.early[offset] = (replace(early[0], text="", deleted=True), early[1])
