"""Replay: a connection that missed messages gets them in order, then goes live.

Owns :class:`~chatcore._session.Catchup` cursors: made by the welcome of a
resumed session (``_lifecycle``) and by a reader that fell behind the live
fan-out (``_outbox``). :func:`pump` hands out missed messages from the room's
window while the outbox has room, asks the log for what the window no longer
holds, and attaches the connection to the live fan-out once it has caught up.
It never replays more than half an outbox at a time, so it never closes a
connection as slow.
"""

from __future__ import annotations

from ._awaits import PendingCatchup
from ._commands import HistoryFailed, HistoryLoaded
from ._effects import Effect, LoadHistory
from ._errors import CloseCode
from ._outbox import close_later, to
from ._session import Connection
from ._state import EngineState

__all__ = ["catchup_failed", "catchup_loaded", "pump"]


def pump(st: EngineState, conn: Connection, out: list[Effect]) -> None:
    """Replay missed messages while the connection's outbox has room."""
    if conn.catchup:
        st.catching_up(conn)
    soft_frames, soft_bytes = st.soft_frames, st.soft_bytes
    for name in list(conn.catchup):
        room = st.rooms[name]
        catchup = conn.catchup[name]
        while True:
            frames, nbytes = conn.outbox()
            if frames >= soft_frames or nbytes >= soft_bytes:
                return  # also when the connection is closing: its outbox counts as full
            n = catchup.next
            if n > room.head + 1:
                # It has seen more than this process has heard of (it resumed here from
                # another one): it waits, off the live fan-out, for the room to catch up.
                room.ahead[conn.id] = conn
                break
            if n > room.head:
                del conn.catchup[name]
                if catchup.own:  # acks of offsets the replay jumped over (lost to retention)
                    for offset in sorted(catchup.own):
                        to(st, conn, catchup.own[offset], out)
                room.attach(conn)
                break
            loaded = catchup.loaded
            while loaded and loaded[0].offset < n:
                loaded.popleft()
            start = room.window_start()
            if loaded and loaded[0].offset == n:
                message = loaded.popleft()
            elif n >= start:
                message = room.window[n - start]
            elif loaded:
                catchup.next = loaded[0].offset  # the log no longer has what lies between
                continue
            elif n < catchup.lost_below:
                catchup.next = catchup.lost_below
                continue
            else:
                if catchup.loading is None:
                    ref = st.awaits.expect(PendingCatchup(conn, name, start))
                    catchup.loading = ref
                    out.append(LoadHistory(ref=ref, room=name, after=n - 1, before=start))
                break
            catchup.next = n + 1
            own = catchup.own
            if own is not None and (ack := own.pop(n, None)) is not None:
                to(st, conn, ack, out)  # sent on this connection: its ack, in its place
                if not st.config.echo:
                    continue
            to(st, conn, message, out)


def catchup_loaded(
    st: EngineState, pending: PendingCatchup, cmd: HistoryLoaded, out: list[Effect]
) -> None:
    """The log's answer for a replay: carry on with it."""
    conn = pending.conn
    catchup = conn.catchup.get(pending.room)
    if catchup is not None and catchup.loading == cmd.ref:
        catchup.loading = None
        catchup.lost_below = pending.before
        catchup.loaded.extend(m for m in cmd.messages if m.offset >= catchup.next)
        pump(st, conn, out)


def catchup_failed(st: EngineState, pending: PendingCatchup, cmd: HistoryFailed) -> None:
    """Never a partial replay: the connection closes and the client resumes later."""
    close_later(st, pending.conn, CloseCode.TRY_AGAIN_LATER, "history unavailable")
