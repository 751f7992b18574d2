"""Membership and presence: who is in which room, and what the room hears of it.

Owns joining and leaving (with the access rule, ``_access``), ``joined`` and
``left`` events, the member list a joiner gets, typing indicators and their
timers, read marks, and changes to a room's privacy by the host. It does not
decide when a session joins the rooms it asked for at connect (that is the
welcome, ``_lifecycle``) and never changes a session's state.
"""

from __future__ import annotations

from ._access import Access, Action, room_access
from ._commands import CreateRoom, Join
from ._effects import Effect, Position, SavePositions, SaveRoom
from ._errors import ErrorCode, LocalProtocolError
from ._events import Joined, Left, ReadMark, Typing
from ._facts import ReadMarked, TypingChanged
from ._names import is_valid_name, is_valid_room
from ._outbox import broadcast, error, send_members, to
from ._room import Room
from ._session import Session, SessionState
from ._state import EngineState
from ._timers import TypingOver

__all__ = [
    "add_member",
    "admits",
    "check_room_name",
    "create_room",
    "join",
    "join_request",
    "leave",
    "mark_read",
    "member_room",
    "refusal",
    "remove_member",
    "typing",
    "typing_over",
    "verdict",
]


def admits(room: Room, user: str, action: Action, now: float = 0.0) -> bool:
    """The access rule (``_access``) asked with what the engine holds of the room."""
    return verdict(room, user, action, now) is Access.ALLOWED


def verdict(room: Room, user: str, action: Action, now: float) -> Access:
    """:func:`room_access` with everything the engine holds of the room."""
    return room_access(
        user,
        action,
        room.name,
        private=room.private,
        allow=room.allow,
        banned=room.banned,
        muted=room.muted,
        now=now,
    )


def refusal(room: Room, access: Access, user: str, now: float) -> str:
    """The ``forbidden`` error's message for a refusal: it says why."""
    match access:
        case Access.BANNED:
            return f"banned from room {room.name}"
        case Access.MUTED:
            left = max(1, round(room.muted.get(user, now) - now))
            return f"muted in room {room.name} for {left} more seconds"
        case _:
            return f"not allowed in room {room.name}"


def check_room_name(st: EngineState, session: Session, room: str, out: list[Effect]) -> bool:
    if is_valid_room(room):
        return True
    error(
        st,
        session,
        ErrorCode.INVALID_NAME,
        "room names are 1-64 characters of A-Z a-z 0-9 _ - .",
        room[:64],
        out,
    )
    return False


def member_room(
    st: EngineState, session: Session, name: str, ref: str, out: list[Effect]
) -> Room | None:
    """The room if the session is in it; else an error to the client and None."""
    if name in session.rooms:
        return st.rooms[name]
    if check_room_name(st, session, name, out):
        error(st, session, ErrorCode.NOT_MEMBER, f"not in room {name}", ref, out)
    return None


def join_request(st: EngineState, session: Session, request: Join, out: list[Effect]) -> None:
    if not check_room_name(st, session, request.room, out):
        return
    if request.room not in st.rooms and request.room not in session.rooms:
        st.load_room(request.room, session, request, out)
        return
    join(st, session, request.room, out, quiet=False)


def join(st: EngineState, session: Session, name: str, out: list[Effect], *, quiet: bool) -> None:
    """Join a loaded room. ``quiet``: during connect, the welcome tells the rest."""
    if not check_room_name(st, session, name, out):
        return
    room = st.rooms.get(name)
    if room is None:  # the log could not load it
        error(st, session, ErrorCode.UNAVAILABLE, f"room {name} unavailable", name, out)
        return
    conn = session.conn
    assert conn is not None
    if name in session.rooms:  # joining again: the member list again
        send_members(st, conn, room, out)
        return
    if (refused := verdict(room, session.user, Action.JOIN, st.now)) is not Access.ALLOWED:
        error(
            st,
            session,
            ErrorCode.FORBIDDEN,
            refusal(room, refused, session.user, st.now),
            name,
            out,
        )
        st.forget_if_empty(room)
        return
    limit = st.config.max_rooms_per_session
    if len(session.rooms) >= limit:
        error(st, session, ErrorCode.ROOM_LIMIT, f"at most {limit} rooms per session", name, out)
        st.forget_if_empty(room)
        return
    add_member(st, session, room, out, announce=not quiet)


def add_member(
    st: EngineState, session: Session, room: Room, out: list[Effect], *, announce: bool
) -> None:
    session.rooms[room.name] = None
    if session.text_room is None:
        session.text_room = room.name
    if room.add_user(session.user) and len(room.users) <= st.config.presence_limit:
        broadcast(st, room, Joined(room=room.name, user=session.user), None, out, ephemeral=True)
    conn = session.conn
    if conn is not None and session.state is SessionState.LIVE:
        room.attach(conn)
        if announce:
            send_members(st, conn, room, out)
    else:
        session.delivered[room.name] = room.head


def leave(st: EngineState, session: Session, name: str, out: list[Effect]) -> None:
    room = member_room(st, session, name, name[:64], out)
    if room is None:
        return
    remove_member(st, session, room, out)
    if session.text_room == name:
        session.text_room = next(iter(session.rooms), None)


def remove_member(st: EngineState, session: Session, room: Room, out: list[Effect]) -> None:
    del session.rooms[room.name]
    # Where the session had got to no longer says anything once it left: a rejoin
    # (in a later welcome) starts from the room's head, not from a stale position.
    session.delivered.pop(room.name, None)
    if session.conn is not None:
        room.detach(session.conn)
        session.conn.catchup.pop(room.name, None)
    if room.remove_user(session.user):
        room.typing.pop(session.user, None)
        if len(room.users) < st.config.presence_limit:
            broadcast(st, room, Left(room=room.name, user=session.user), None, out, ephemeral=True)
    if session.conn is not None and session.state is SessionState.LIVE:
        to(st, session.conn, Left(room=room.name, user=session.user), out)
    st.forget_if_empty(room)


def typing(st: EngineState, session: Session, name: str, now: float, out: list[Effect]) -> None:
    room = member_room(st, session, name, name[:64], out)
    if room is None:
        return
    ttl = st.config.typing_ttl
    until = now + ttl
    previous = room.typing.get(session.user)
    if previous is None:
        ref = st.awaits.next_ref()
        room.typing[session.user] = (until, ref)
        st.timers.push(until, TypingOver(room, session.user, ref))
    else:
        room.typing[session.user] = (until, previous[1])
    # A refresh within half the lifetime extends the indicator silently.
    if previous is None or previous[0] - now < ttl / 2:
        st.share(name, TypingChanged(user=session.user), out)
        broadcast(
            st,
            room,
            Typing(room=name, user=session.user),
            None,
            out,
            ephemeral=True,
            skip_user=session.user,
        )


def typing_over(st: EngineState, timer: TypingOver, now: float, out: list[Effect]) -> None:
    """A typing indicator's timer is due: it ends, unless it was refreshed since."""
    room, user = timer.room, timer.user
    until = room.typing[user][0]
    if until > now:  # refreshed since: one timer per indicator, moved on
        st.timers.push(until, timer)
        return
    del room.typing[user]
    st.share(room.name, TypingChanged(user=user, active=False), out)
    broadcast(
        st,
        room,
        Typing(room=room.name, user=user, active=False),
        None,
        out,
        ephemeral=True,
        skip_user=user,
    )


def typing_live(st: EngineState, timer: TypingOver) -> bool:
    room = timer.room
    live = room.typing.get(timer.user)
    return st.rooms.get(room.name) is room and live is not None and live[1] == timer.id


def mark_read(st: EngineState, session: Session, name: str, offset: int, out: list[Effect]) -> None:
    room = member_room(st, session, name, name[:64], out)
    if room is None:
        return
    offset = min(offset, room.head)
    if offset <= room.reads.get(session.user, 0):
        return
    room.reads[session.user] = offset
    st.share(name, ReadMarked(user=session.user, offset=offset), out)
    broadcast(
        st,
        room,
        ReadMark(room=name, user=session.user, offset=offset),
        session.conn,
        out,
        ephemeral=True,
    )
    out.append(
        SavePositions(
            user=session.user,
            positions=(Position(room=name, delivered=room.head, read=offset),),
        )
    )


def create_room(st: EngineState, cmd: CreateRoom, out: list[Effect]) -> None:
    """The host creates a room or changes who may be in it; members no longer allowed leave."""
    if not is_valid_name(cmd.room):
        raise LocalProtocolError(f"invalid room name {cmd.room!r}")
    bad = [u for u in cmd.allow if not is_valid_name(u)]
    if bad:
        raise LocalProtocolError(f"invalid user names in allow list: {sorted(bad)!r}")
    out.append(SaveRoom(room=cmd.room, private=cmd.private, allow=cmd.allow))
    room = st.rooms.get(cmd.room)
    if room is None:
        return
    room.private, room.allow = cmd.private, cmd.allow
    for user in [u for u in room.users if not admits(room, u, Action.JOIN)]:
        for session in list(st.by_user.get(user, {}).values()):
            if cmd.room in session.rooms:
                remove_member(st, session, room, out)
                error(
                    st,
                    session,
                    ErrorCode.FORBIDDEN,
                    f"removed from private room {cmd.room}",
                    cmd.room,
                    out,
                )
