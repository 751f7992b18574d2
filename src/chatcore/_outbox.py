"""Backpressure: everything the engine hands a connection goes through its outbox.

Owns the outbox bounds (``Config.outbox_frames``/``outbox_bytes``), the live
fan-out of a room's events, what happens to a reader that lags (past half its
outbox it falls behind and replays from the room's window, see ``_replay``),
and closing slow consumers. A connection the engine closes during a step is
only marked here (:func:`close_later`); the engine closes it at the end of
the step, so nothing else in the step finds the world changed under it. This
module never changes a session's state and never asks the log for anything.
"""

from __future__ import annotations

from typing import cast

from ._codec import encode_json, encode_text
from ._commands import ConnId, Mode
from ._effects import Deliver, Effect
from ._errors import CloseCode, ErrorCode
from ._events import ErrorEvent, Message, ServerEvent
from ._room import Room
from ._session import Catchup, Connection, Session
from ._state import EngineState

__all__ = ["broadcast", "close_later", "error", "send_members", "to"]


def to(
    st: EngineState,
    conn: Connection,
    event: ServerEvent,
    out: list[Effect],
    encoded: str | None = None,
) -> None:
    """Send one event to one connection, within its outbox bounds.

    ``encoded`` is the event's JSON when the caller has it already. What does
    not fit closes the connection as a slow consumer (at the end of the step).
    """
    if conn.mode is Mode.JSON:
        data = encoded if encoded is not None else encode_json(event)
    else:
        line = encode_text(event)
        if line is None:
            return
        data = line
    size = len(data.encode())
    config = st.config
    if conn.frames >= config.outbox_frames or conn.nbytes + size > config.outbox_bytes:
        st.counters.slow_consumer_closes += 1
        close_later(st, conn, CloseCode.TRY_AGAIN_LATER, "slow consumer")
        return
    conn.frames += 1
    conn.nbytes += size
    out.append(Deliver(to=(conn.id,), event=event, data=data, size=size))


def error(
    st: EngineState,
    session: Session,
    code: ErrorCode,
    message: str,
    ref: str | None,
    out: list[Effect],
    *,
    retry_after: float | None = None,
) -> None:
    """An ``error`` event to the session's connection, if it has one."""
    st.counters.refuse(code.value)
    if session.conn is not None:
        to(
            st,
            session.conn,
            ErrorEvent(code=code.value, message=message, ref=ref, retry_after=retry_after),
            out,
        )


def send_members(
    st: EngineState, conn: Connection, room: Room, out: list[Effect], offset: int | None = None
) -> None:
    """The member list, encoded once per room until members or head change."""
    event, data = room.members(room.head if offset is None else offset)
    to(st, conn, event, out, data)


def broadcast(
    st: EngineState,
    room: Room,
    event: ServerEvent,
    skip: Connection | None,
    out: list[Effect],
    *,
    ephemeral: bool,
    skip_user: str | None = None,
) -> None:
    """Fan one event out to the room's live connections: encoded once per mode.

    ``skip_user`` (whose connections are passed by) is for ephemeral events only.
    Past half its outbox a connection is lagging: ephemeral events are
    dropped for it, and a chat message puts it behind (see ``_fall_behind``)
    rather than being queued, so that however many messages the room
    produces at once, no connection holds more than its outbox of them.
    """
    max_frames, max_bytes = st.soft_frames, st.soft_bytes
    overflow: list[Connection] = []
    # For the loop, the connection passed by looks like a lagging one (its count at
    # the bound, put back below): one test per member finds the recipients.
    if skip is not None:
        skip_frames, skip.frames = skip.frames, max_frames
    for conns, encode in ((room.conns, encode_json), (room.text_conns, encode_text)):
        if not conns:
            continue
        data = encode(event)
        if not data:
            continue  # nothing to show in plain-text mode
        size = len(data.encode())
        recipients: list[ConnId] = []
        add = recipients.append
        if skip_user is None:
            # The hot loop of every chat message: a few attribute reads and adds per member.
            for conn in conns.values():
                if conn.frames < max_frames and (nbytes := conn.nbytes + size) <= max_bytes:
                    conn.frames += 1
                    conn.nbytes = nbytes
                    add(conn.id)
                elif not ephemeral and conn is not skip:
                    overflow.append(conn)
        else:  # (an ephemeral event: a lagging connection just goes without it)
            for conn in conns.values():
                if (
                    conn.frames < max_frames
                    and (nbytes := conn.nbytes + size) <= max_bytes
                    and conn.session.user != skip_user
                ):
                    conn.frames += 1
                    conn.nbytes = nbytes
                    add(conn.id)
        if recipients:
            out.append(Deliver(to=tuple(recipients), event=event, data=data, size=size))
    if skip is not None:
        skip.frames = skip_frames
    if ephemeral:
        return
    offset = cast(Message, event).offset
    for conn in overflow:
        _fall_behind(conn, room, offset)
    if room.behind:
        _give_up_far_behind(st, room)


def _fall_behind(conn: Connection, room: Room, offset: int) -> None:
    """Stop the live fan-out to ``conn`` in ``room``: it replays from ``offset``.

    The messages it has not been handed wait in the room's window, which
    every member shares, instead of in its own outbox; ``_replay.pump`` hands
    them out as the adapter reports writes, and puts the connection back
    on the live fan-out once it has caught up. A burst that fills a
    reader's outbox in one go therefore costs it nothing if it reads on.
    """
    room.detach(conn)
    room.behind[conn.id] = conn
    conn.catchup[room.name] = Catchup(offset)


def _give_up_far_behind(st: EngineState, room: Room) -> None:
    """Close, as too slow, connections the room's window has moved past.

    A reader is judged by what it fails to read: one that has not taken
    a whole window of messages since it fell behind (its outbox still full,
    the rest no longer in memory) is closed with 1013 and resumes from the
    log. What it held meanwhile was its outbox and a cursor.
    """
    start = room.window_start()
    name = room.name
    for conn in [c for c in room.behind.values() if c.catchup[name].next < start]:
        st.counters.slow_consumer_closes += 1
        close_later(st, conn, CloseCode.TRY_AGAIN_LATER, "slow consumer")


def close_later(st: EngineState, conn: Connection, code: CloseCode, reason: str) -> None:
    """Close ``conn`` at the end of the step; until then it is handed nothing.

    It leaves the open connections at once (reports about it are ignored, as
    for any closed connection), and its outbox counts as full, so that the
    fan-out, the replay and :func:`to` pass it by without a check of their own.
    The grace period starts at the close: the client resumes from what it got.
    """
    if conn.closing or st.conns.get(conn.id) is not conn:
        return
    conn.closing = True
    del st.conns[conn.id]
    conn.frames = max(conn.frames, st.config.outbox_frames)
    st.closes.append((conn, code, reason))
