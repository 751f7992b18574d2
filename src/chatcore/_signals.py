"""Call signals between sessions: carrying out what ``_calls`` decides.

``_calls`` owns the calls (their table, limits, deadlines, the signals held
for a session away) and knows sessions only by id. This module is the engine
side of it: it hands each call frame of a live session to ``st.calls``, and
delivers what comes back, now to a session that is live, or through
:meth:`Calls.hold` to one that is not (in its grace period, not welcomed
yet, or losing its connection this step), whose held signals
:func:`welcomed` gives out right after its next welcome. It never changes a
session's state, never touches rooms, and nothing it relays reaches the log.
"""

from __future__ import annotations

from ._calls import Notify
from ._commands import CallSignal
from ._effects import Effect
from ._outbox import to
from ._session import Connection, Session, SessionState
from ._state import EngineState

__all__ = ["session_ended", "signal", "tick", "welcomed"]


def signal(
    st: EngineState, session: Session, request: CallSignal, now: float, out: list[Effect]
) -> None:
    """A call frame of a live session (paid from the calls' own bucket, not the requests')."""
    _deliver(st, st.calls.signal(session.user, session.id, request, now), now, out)


def session_ended(st: EngineState, session: Session, out: list[Effect]) -> None:
    """The session is over: its calls end, or stop ringing there; the other side hears."""
    _deliver(st, st.calls.session_ended(session.id, st.now), st.now, out)


def welcomed(st: EngineState, session: Session, conn: Connection, out: list[Effect]) -> None:
    """Right after a welcome: the call signals held while the session was away, if fresh."""
    for event in st.calls.release(session.id, st.now):
        to(st, conn, event, out)


def tick(st: EngineState, now: float, out: list[Effect]) -> None:
    _deliver(st, st.calls.tick(now), now, out)


def _deliver(st: EngineState, notes: list[Notify], now: float, out: list[Effect]) -> None:
    for note in notes:
        session = st.by_id.get(note.session)
        if session is None or session.state is SessionState.CLOSED:
            continue
        conn = session.conn
        if session.state is SessionState.LIVE and conn is not None and not conn.closing:
            to(st, conn, note.event, out)
        else:
            st.calls.hold(session.id, note.event, now)
