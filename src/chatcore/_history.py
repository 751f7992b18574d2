"""History and room loading: what the engine asks the log to read.

Owns history pages a client asks for (``fetch_history``: from the room's
memory window when it holds the page, else ``LoadHistory``) and turning the
log's ``RoomLoaded`` into a room held in memory. Who waits for a room to
load is recorded in ``_awaits``; carrying out what they waited to do is the
engine's (a welcome, a join, a direct message), as those belong to other
modules. Every ``LoadHistory`` answer comes in here and goes to whoever asked:
a page, a replay (``_replay``) or a gap in the log's order (``_messages``).
"""

from __future__ import annotations

from ._access import Action, room_rule
from ._awaits import PendingCatchup, PendingGap, PendingPage, RoomWaiter
from ._commands import FetchHistory, HistoryFailed, HistoryLoaded, RoomLoaded
from ._effects import Effect, LoadHistory
from ._errors import ErrorCode
from ._events import History
from ._messages import gap_failed, gap_filled
from ._outbox import error, to
from ._presence import admits, check_room_name
from ._replay import catchup_failed, catchup_loaded
from ._room import Room
from ._session import Session, SessionState
from ._state import EngineState

__all__ = [
    "fetch_history",
    "history_failed",
    "history_loaded",
    "page_failed",
    "page_loaded",
    "room_loaded",
]


def fetch_history(
    st: EngineState, session: Session, request: FetchHistory, out: list[Effect]
) -> None:
    name = request.room
    if not check_room_name(st, session, name, out):
        return
    room = st.rooms.get(name)
    if room is None:
        st.load_room(name, session, request, out)
        return
    if not admits(room, session.user, Action.READ):
        error(st, session, ErrorCode.FORBIDDEN, f"not allowed in room {name}", name, out)
        st.forget_if_empty(room)
        return
    limit = min(request.limit, st.config.history_page_max)
    before = room.head + 1 if request.before is None else min(request.before, room.head + 1)
    first = max(1, before - limit)
    if first >= room.window_start() or before <= 1:
        page = room.window_slice(first, before - 1)
        assert session.conn is not None
        to(st, session.conn, History(room=name, messages=tuple(page), more=first > 1), out)
        st.forget_if_empty(room)
        return
    ref = st.awaits.expect(PendingPage(session, name, before))
    out.append(LoadHistory(ref=ref, room=name, after=0, before=before, limit=limit))


def page_loaded(st: EngineState, page: PendingPage, cmd: HistoryLoaded, out: list[Effect]) -> None:
    conn = page.session.conn
    if conn is not None and page.session.state is SessionState.LIVE:
        msgs = tuple(m for m in cmd.messages if m.offset < page.before)
        to(
            st,
            conn,
            History(room=page.room, messages=msgs, more=bool(msgs) and msgs[0].offset > 1),
            out,
        )
    room = st.rooms.get(page.room)
    if room is not None:
        st.forget_if_empty(room)


def page_failed(st: EngineState, page: PendingPage, cmd: HistoryFailed, out: list[Effect]) -> None:
    error(
        st,
        page.session,
        ErrorCode.UNAVAILABLE,
        f"history not available: {cmd.reason}",
        page.room,
        out,
    )


def room_loaded(st: EngineState, cmd: RoomLoaded) -> tuple[Room, list[RoomWaiter]] | None:
    """Hold the room the log loaded; return it and who waited for it (None: nobody)."""
    waiters = st.awaits.rooms.pop(cmd.room, None)
    if waiters is None or cmd.room in st.rooms:
        return None  # an answer nobody waits for any more
    private, allow = room_rule(cmd.room, private=cmd.private, allow=cmd.allow)
    room = Room(
        cmd.room,
        epoch=cmd.epoch,
        head=cmd.head,
        private=private,
        allow=allow,
        window=st.config.history_window,
        recent=cmd.recent,
    )
    room.banned.update(cmd.banned)
    room.muted.update(cmd.muted)
    # A mark past the head (a log that lost messages) counts as read to the head.
    room.reads.update((user, min(mark, room.head)) for user, mark in cmd.reads.items() if mark > 0)
    st.rooms[cmd.room] = room
    return room, waiters


def history_loaded(st: EngineState, cmd: HistoryLoaded, out: list[Effect]) -> None:
    """A ``LoadHistory`` answered: it goes to whoever asked (a page, a replay, a gap)."""
    refs = st.awaits.refs
    match refs.get(cmd.ref):
        case PendingPage() as page:
            del refs[cmd.ref]
            page_loaded(st, page, cmd, out)
        case PendingCatchup() as catchup:
            del refs[cmd.ref]
            catchup_loaded(st, catchup, cmd, out)
        case PendingGap() as gap:
            del refs[cmd.ref]
            gap_filled(st, gap, cmd, out)
        case _:
            pass  # an answer nobody waits for any more


def history_failed(st: EngineState, cmd: HistoryFailed, out: list[Effect]) -> None:
    refs = st.awaits.refs
    match refs.get(cmd.ref):
        case PendingPage() as page:
            del refs[cmd.ref]
            page_failed(st, page, cmd, out)
        case PendingCatchup() as catchup:
            del refs[cmd.ref]
            catchup_failed(st, catchup, cmd)
        case PendingGap() as gap:
            del refs[cmd.ref]
            gap_failed(st, gap)
        case _:
            pass
