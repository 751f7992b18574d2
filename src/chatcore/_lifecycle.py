"""Session lifecycle: connecting, the welcome, resume, losing a connection, the end.

Owns what each session transition does (the table itself, and the only writer
of a session's state, are in ``_session``): a new session or a resumed one on
``Connect``, waiting for its rooms and its direct-message inbox, the welcome
with each room's replay position, taking a session over from an older
connection, the grace period after a drop, heartbeats, closing what the
engine decided to close during a step, ending a session and shutdown.
Requests a client sent before its welcome come back to the engine, which runs
them; replay itself is ``_replay``.
"""

from __future__ import annotations

from typing import NamedTuple

from ._awaits import PendingInbox
from ._cluster import claim, moved_in, park, unpark
from ._commands import ClientRequest, Connect, Disconnected
from ._effects import Close, Effect, LoadInbox, Ping, Position, SavePositions
from ._errors import CloseCode, LocalProtocolError
from ._events import RoomPosition, Welcome
from ._messages import ahead_of_room
from ._names import dm_users, is_valid_name, is_valid_room
from ._outbox import send_members, to
from ._presence import join, remove_member
from ._replay import pump
from ._session import (
    NO_EPOCHS,
    NO_OFFSETS,
    NO_ROOMS,
    Catchup,
    Connection,
    Session,
    SessionAction,
    SessionInput,
    SessionState,
    TokenBucket,
    fire,
    takes,
)
from ._signals import session_ended, welcomed
from ._state import EngineState
from ._timers import GraceOver, PingDue, PongDue

__all__ = [
    "Held",
    "close_deferred",
    "connect",
    "disconnected",
    "drop",
    "expire",
    "grace_live",
    "inbox_loaded",
    "maybe_ready",
    "ping",
    "pong_due",
    "room_arrived",
    "shutdown",
]

_In, _Do = SessionInput, SessionAction

_GOODBYE = frozenset((CloseCode.NORMAL, 1005))
"""Close codes of a client that is done: 1000, or a close frame without a code,
which transports report as 1005 (websocat sends one on quit). No grace period."""


class Held(NamedTuple):
    """Frames a client sent before its welcome, for the engine to run after it."""

    session: Session
    requests: list[ClientRequest]


# -- connecting ----------------------------------------------------------------------


def connect(st: EngineState, cmd: Connect, now: float, out: list[Effect]) -> Held | None:
    if cmd.conn in st.conns:
        raise LocalProtocolError(f"connection {cmd.conn!r} is already open")
    if st.closing:
        st.counters.refuse("going_away")
        out.append(Close(conn=cmd.conn, code=CloseCode.GOING_AWAY, reason="going away"))
        return None
    if not is_valid_name(cmd.user):
        st.counters.refuse("invalid_user_name")
        out.append(
            Close(conn=cmd.conn, code=CloseCode.POLICY_VIOLATION, reason="invalid user name")
        )
        return None
    config = st.config
    session = st.sessions.get(cmd.resume) if cmd.resume else None
    if session is None and claim(st, cmd, out):
        return None  # the session may be parked on another process: asked for
    if session is not None and session.user == cmd.user and _resume(st, session, cmd, out):
        st.counters.resumes += 1
    else:
        if cmd.resume:
            st.counters.resumes_failed += 1
        session = _new_session(st, cmd, now, out)
        if session is None:
            return None
    conn = Connection(cmd.conn, session, cmd.mode, now)
    st.conns[cmd.conn] = conn
    session.conn = conn
    session.mode = cmd.mode
    session.backlog = []
    st.release_wanted(session)
    session.wanted = [r for r in dict.fromkeys(cmd.rooms) if r not in session.rooms]
    st.want(session, session.wanted)
    session.text_room = next(iter(session.rooms), None) or next(iter(session.wanted), None)
    st.timers.push(now + config.ping_interval, PingDue(conn))
    session.waiting = (
        frozenset(r for r in session.wanted if is_valid_room(r) and r not in st.rooms) or NO_ROOMS
    )
    if not session.resumed and config.dm_inbox:
        limit = config.max_rooms_per_session - len(session.wanted)
        if limit > 0:
            ref = st.awaits.expect(PendingInbox(session))
            session.inbox = ref
            out.append(LoadInbox(ref=ref, user=session.user, limit=limit))
    for room in session.wanted:  # in the client's order: effects are deterministic
        if room in session.waiting:
            st.load_room(room, session, None, out)
    return maybe_ready(st, session, now, out)


def _new_session(st: EngineState, cmd: Connect, now: float, out: list[Effect]) -> Session | None:
    config = st.config
    mine = st.by_user.get(cmd.user, {})
    if len(mine) >= config.max_sessions_per_user:
        # Make room by ending the oldest session waiting out its grace period.
        oldest = next((s for s in mine.values() if takes(s, _In.EXPIRE)), None)
        if oldest is None:
            st.counters.refuse("too_many_sessions")
            out.append(
                Close(conn=cmd.conn, code=CloseCode.POLICY_VIOLATION, reason="too many sessions")
            )
            return None
        expire(st, oldest, out)
    session = Session(
        st.ids.session_id(),
        st.ids.resume_token(),
        cmd.user,
        TokenBucket(config.rate_burst, now),
        TokenBucket(config.request_burst, now),
    )
    st.sessions[session.token] = session
    st.by_id[session.id] = session
    st.by_user.setdefault(cmd.user, {})[session.id] = session
    st.peers.touch_user(cmd.user)
    return session


def _resume(st: EngineState, session: Session, cmd: Connect, out: list[Effect]) -> bool:
    """The session named by a resume token is taken over, if the table says so."""
    old = session.conn
    waiting = takes(session, _In.EXPIRE)  # its grace timer is live until now
    if fire(session, _In.RESUME) is not _Do.TAKE_OVER:
        return False  # a session still opening: its token was never handed out
    if waiting:
        st.timers.went_stale()
    if old is not None:
        _detach_conn(st, old)
        out.append(
            Close(
                conn=old.id,
                code=CloseCode.NORMAL,
                reason="session resumed on another connection",
            )
        )
    session.resumed = True
    unpark(st, session, out)
    session.epochs = cmd.epochs
    # The client's offsets count for the rooms it is in and for those it asks to be
    # in again (it may not have read its own leave before the link dropped): its
    # stream in such a room goes on from what it has seen, with nothing skipped.
    asked = set(cmd.rooms)
    session.offsets = {r: o for r, o in cmd.offsets.items() if r in session.rooms or r in asked}
    return True


def inbox_loaded(
    st: EngineState, ref: int, rooms: tuple[str, ...], now: float, out: list[Effect]
) -> Held | None:
    """Add the direct-message rooms the log found to those the session asked for."""
    refs = st.awaits.refs
    pending = refs.get(ref)
    if type(pending) is not PendingInbox:
        return None  # an answer nobody waits for any more
    del refs[ref]
    session = pending.session
    if session.inbox != ref:
        return None
    session.inbox = None
    limit = st.config.max_rooms_per_session - len(session.wanted)
    added = [
        r
        for r in dict.fromkeys(rooms)
        if (pair := dm_users(r)) is not None and session.user in pair and r not in session.wanted
    ][: max(limit, 0)]
    session.wanted = session.wanted + added
    st.want(session, added)
    loading = [r for r in added if r not in st.rooms]
    if loading:
        session.waiting = session.waiting.union(loading)
        for name in loading:
            st.load_room(name, session, None, out)
    return maybe_ready(st, session, now, out)


def room_arrived(
    st: EngineState, session: Session, name: str, now: float, out: list[Effect]
) -> Held | None:
    """A room the session waited for before its welcome loaded, or failed to."""
    session.waiting = session.waiting.difference((name,)) or NO_ROOMS
    return maybe_ready(st, session, now, out)


def maybe_ready(st: EngineState, session: Session, now: float, out: list[Effect]) -> Held | None:
    """Welcome a connecting session once its rooms and its inbox are loaded."""
    if session.waiting or session.inbox is not None or session.state is SessionState.CLOSED:
        return None  # (a session that ended may still be listed as waiting for a room)
    if fire(session, _In.READY) is not _Do.WELCOME:
        return None
    return _welcome(st, session, out)


def _welcome(st: EngineState, session: Session, out: list[Effect]) -> Held | None:
    conn = session.conn
    assert conn is not None
    later: list[Effect] = []
    for room_name in session.wanted:
        join(st, session, room_name, later, quiet=True)
    st.release_wanted(session)
    moved_in(st, session, later)  # claimed from another process: the move's arrival half
    # Where this connection's stream starts per room: everything after it follows.
    starts = {}
    reset: set[str] = set()
    for name in session.rooms:
        room = st.rooms[name]
        head = room.head
        start = head
        if session.resumed:
            if session.epochs.get(name, room.epoch) != room.epoch:
                # The offset the client has is of another life of the room's history:
                # replaying from it would start in the middle of this one.
                reset.add(name)
            else:
                start = session.offsets.get(name, session.delivered.get(name, head))
                if start > head and st.peers.on:
                    # It saw more on another process than this one has heard of yet.
                    ahead_of_room(st, room, start, out)
                else:
                    start = min(max(start, 0), head)
        starts[name] = start
    rooms = {
        name: RoomPosition(
            offset=start,
            epoch=st.rooms[name].epoch,
            read=st.rooms[name].reads.get(session.user, 0),
            reset=name in reset,
        )
        for name, start in starts.items()
    }
    to(
        st,
        conn,
        Welcome(
            session=session.id,
            resume=session.token,
            user=session.user,
            resumed=session.resumed,
            rooms=rooms,
        ),
        out,
    )
    welcomed(st, session, conn, out)  # call signals held while away come first
    out.extend(later)
    for name, start in starts.items():
        room = st.rooms[name]
        send_members(st, conn, room, out, start)
        if start != room.head:  # behind it (replay), or ahead of it (wait for it)
            room.detach(conn)  # (joined just now: live only once caught up)
            conn.catchup[name] = Catchup(start + 1)
        else:
            room.attach(conn)
    session.offsets = NO_OFFSETS
    session.epochs = NO_EPOCHS
    if conn.catchup:
        pump(st, conn, out)
    backlog, session.backlog = session.backlog, []
    return Held(session, backlog) if backlog else None


# -- losing connections and sessions -----------------------------------------------------


def disconnected(st: EngineState, cmd: Disconnected, out: list[Effect]) -> None:
    gone = st.conns.get(cmd.conn)
    if gone is not None:  # None: the engine closed it already
        drop(st, gone, out, goodbye=cmd.code in _GOODBYE)


def close_deferred(st: EngineState, out: list[Effect]) -> None:
    """Close the connections the step decided to close (see ``_outbox.close_later``)."""
    while st.closes:
        closes, st.closes = st.closes, []
        for conn, code, reason in closes:
            out.append(Close(conn=conn.id, code=code, reason=reason))
            drop(st, conn, out)


def ping(st: EngineState, timer: PingDue, now: float, out: list[Effect]) -> None:
    conn = timer.conn
    conn.ping_sent = now
    out.append(Ping(conn=conn.id))
    st.timers.push(now + st.config.pong_timeout, PongDue(conn, now))


def pong_due(st: EngineState, timer: PongDue, out: list[Effect]) -> None:
    conn = timer.conn
    if conn.last_seen >= timer.sent:
        st.timers.push(timer.sent + st.config.ping_interval, PingDue(conn))
        return
    out.append(Close(conn=conn.id, code=CloseCode.HEARTBEAT_TIMEOUT, reason="heartbeat timeout"))
    drop(st, conn, out)


def grace_live(timer: GraceOver) -> bool:
    return timer.session.detach_gen == timer.gen and takes(timer.session, _In.EXPIRE)


def _detach_conn(st: EngineState, conn: Connection) -> None:
    """Forget a connection; record how far its session had been sent."""
    session = conn.session
    if st.conns.get(conn.id) is conn:  # (one closed during the step has left already)
        del st.conns[conn.id]
    st.timers.went_stale()  # its ping (or pong) timer
    session.conn = None
    for name in session.rooms:
        room = st.rooms[name]
        room.detach(conn)
        catchup = conn.catchup.get(name)
        session.delivered[name] = room.head if catchup is None else catchup.next - 1
    conn.catchup.clear()


def drop(st: EngineState, conn: Connection, out: list[Effect], *, goodbye: bool = False) -> None:
    """The connection is gone: the session waits out the grace period, or ends.

    ``goodbye``: the client closed on purpose, so there is no grace period (and
    no timer for one, which would hold the ended session until it came due).
    """
    session = conn.session
    _detach_conn(st, conn)
    st.release_wanted(session)
    action = fire(session, _In.DROP)
    if action is _Do.END:
        _end(st, session, out)
    elif action is _Do.WAIT:
        if goodbye and takes(session, _In.EXPIRE):
            expire(st, session, out, timer_due=True)
            return
        session.detach_gen += 1
        st.timers.push(st.now + st.config.grace_period, GraceOver(session, session.detach_gen))
        park(st, session, out)


def expire(
    st: EngineState, session: Session, out: list[Effect], *, timer_due: bool = False
) -> None:
    """End a session in its grace period. ``timer_due``: no grace timer is left
    for it (its own came due, or none was armed); else that timer went stale."""
    if fire(session, _In.EXPIRE) is _Do.END:
        if not timer_due:
            st.timers.went_stale()
        _end(st, session, out)


def _end(st: EngineState, session: Session, out: list[Effect]) -> None:
    """A session is over: save where it stood, leave its rooms, end its calls."""
    session_ended(st, session, out)
    moved_in(st, session, out)  # claimed, never welcomed: it gives its rooms up
    unpark(st, session, out)
    st.release_wanted(session)
    session.inbox = None
    st.awaits.forget_session(session)
    positions = []
    for name in session.rooms:
        room = st.rooms[name]
        positions.append(
            Position(
                room=name,
                delivered=session.delivered.get(name, room.head),
                read=room.reads.get(session.user, 0),
            )
        )
    if positions:
        out.append(SavePositions(user=session.user, positions=tuple(positions)))
    for name in list(session.rooms):
        remove_member(st, session, st.rooms[name], out)
    st.sessions.pop(session.token, None)
    st.by_id.pop(session.id, None)
    sessions = st.by_user[session.user]
    del sessions[session.id]
    if not sessions:
        del st.by_user[session.user]
        st.peers.touch_user(session.user)


def shutdown(st: EngineState, out: list[Effect]) -> None:
    st.closing = True
    sessions = list(st.by_id.values())
    for conn in list(st.conns.values()):
        out.append(Close(conn=conn.id, code=CloseCode.GOING_AWAY, reason="going away"))
        _detach_conn(st, conn)
    for session in sessions:
        if fire(session, _In.SHUTDOWN) is _Do.END:
            _end(st, session, out)
    st.timers.clear()
