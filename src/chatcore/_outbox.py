"""Backpressure: everything the engine hands a connection goes through its outbox.

Owns the outbox bounds (``Config.outbox_frames``/``outbox_bytes``), the live
fan-out of a room's events, what happens to a reader that lags (past half its
outbox it falls behind and replays from the room's window, see ``_replay``),
and closing slow consumers. A connection the engine closes during a step is
only marked here (:func:`close_later`); the engine closes it at the end of
the step, so nothing else in the step finds the world changed under it. This
module never changes a session's state and never asks the log for anything.

A chat message to a room whose members all have room for it is counted once,
in the room's ledger (``_session.Ledger``), not once per member: the fan-out
then costs the same whatever the room's size, apart from the C-level copy of
its recipients' ids. Only when a member might lag does it go member by member.
"""

from __future__ import annotations

from itertools import filterfalse
from operator import attrgetter
from typing import cast

from ._codec import encode_json, encode_text
from ._commands import ConnId, Mode
from ._effects import Deliver, Effect
from ._errors import CloseCode, ErrorCode
from ._events import ErrorEvent, Message, ServerEvent
from ._room import Room
from ._session import Catchup, Connection, Ledger, Session
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
    frames, nbytes = conn.outbox()
    if frames >= config.outbox_frames or nbytes + size > config.outbox_bytes:
        st.counters.slow_consumer_closes += 1
        close_later(st, conn, CloseCode.TRY_AGAIN_LATER, "slow consumer")
        return
    conn.frames += 1
    conn.nbytes += size
    if (ledger := conn.ledger) is not None:
        ledger.owe(conn)
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
    overflow: list[Connection] = []
    if room.conns:
        data = encode_json(event)
        size = len(data.encode())
        to = _all_have_room(st, room, skip, skip_user, size)
        if to is None:
            to = _one_by_one(st, room.conns, skip, skip_user, size, ephemeral, overflow)
            st.ledgers[room.ledger] = None  # (its members' own counts rose)
        if to:
            out.append(Deliver(to=to, event=event, data=data, size=size))
    if room.text_conns and (line := encode_text(event)):  # (some have nothing to show)
        size = len(line.encode())
        to = _one_by_one(st, room.text_conns, skip, skip_user, size, ephemeral, overflow)
        if to:
            out.append(Deliver(to=to, event=event, data=line, size=size))
    if ephemeral:
        return
    offset = cast(Message, event).offset
    for conn in overflow:
        _fall_behind(st, conn, room, offset)
    if room.behind:
        _give_up_far_behind(st, room)


def _all_have_room(
    st: EngineState, room: Room, skip: Connection | None, skip_user: str | None, size: int
) -> tuple[ConnId, ...] | None:
    """The fan-out to the live JSON connections when each certainly has room for it.

    Then the room's ledger takes the event once for all its members (see
    ``_session.Ledger``): their outboxes are its count plus their own, and
    every own count is at most ``top_frames``/``top_bytes``, so the ledger
    plus that bound below half the outbox is every member below it, which is
    the test the one-by-one fan-out makes of each. Those passed by are
    credited the event in advance (their outboxes do not change). Returns the
    recipients, or None when someone might lag: then the fan-out goes one by
    one, and nothing has changed.
    """
    max_frames, max_bytes = st.soft_frames, st.soft_bytes
    ledger = room.ledger
    frames = ledger.frames + 1
    nbytes = ledger.nbytes + size
    if ledger.top_frames + frames > max_frames or ledger.top_bytes + nbytes > max_bytes:
        _tighten(ledger)
        if ledger.top_frames + frames > max_frames or ledger.top_bytes + nbytes > max_bytes:
            return None
    counted = room.counted
    if counted:  # (counted by another room's ledger, or by none: one by one)
        for conn in counted.values():
            f, b = conn.outbox()
            if f >= max_frames or b + size > max_bytes:
                return None
    conns = room.conns
    passed: list[Connection] = []
    if skip is not None and conns.get(skip.id) is skip:
        passed.append(skip)
    if skip_user is not None:  # (its live sessions' connections: any other is closing,
        # and a closing connection's full outbox has sent the fan-out one by one)
        for session in st.by_user.get(skip_user, {}).values():
            if (own := session.conn) is not None and conns.get(own.id) is own and own is not skip:
                passed.append(own)
    if not passed:
        to = room.live_ids()
    elif len(passed) == 1:
        to = room.live_without(passed[0].id) or ()
    else:
        gone = {conn.id for conn in passed}
        to = tuple(filterfalse(gone.__contains__, room.live_ids()))
    ledger.frames = frames
    ledger.nbytes = nbytes
    st.ledgers[ledger] = None
    for conn in passed:
        if conn.ledger is ledger:
            conn.frames -= 1
            conn.nbytes -= size
            ledger.owing.add(conn.id)
    if counted:
        for conn in counted.values():
            if conn not in passed:
                conn.frames += 1
                conn.nbytes += size
                if (other := conn.ledger) is not None:
                    other.owe(conn)
    return to


def _tighten(ledger: Ledger) -> None:
    """Make the ledger's bound on its members' own counts exact (their largest)."""
    members = ledger.members.values()
    if members:
        ledger.top_frames = max(map(_FRAMES, members))
        ledger.top_bytes = max(map(_NBYTES, members))
    else:
        ledger.top_frames = ledger.top_bytes = 0


_FRAMES = attrgetter("frames")
_NBYTES = attrgetter("nbytes")


def _one_by_one(
    st: EngineState,
    conns: dict[ConnId, Connection],
    skip: Connection | None,
    skip_user: str | None,
    size: int,
    ephemeral: bool,
    overflow: list[Connection],
) -> tuple[ConnId, ...]:
    """The fan-out that tests each connection (and puts those that lag on ``overflow``)."""
    max_frames, max_bytes = st.soft_frames, st.soft_bytes
    recipients: list[ConnId] = []
    add = recipients.append
    for conn in conns.values():
        if conn is skip or (skip_user is not None and conn.session.user == skip_user):
            continue
        ledger = conn.ledger
        if ledger is None:
            frames, nbytes = conn.frames, conn.nbytes
        else:
            frames, nbytes = conn.frames + ledger.frames, conn.nbytes + ledger.nbytes
        if frames < max_frames and nbytes + size <= max_bytes:
            conn.frames += 1
            conn.nbytes += size
            add(conn.id)
            if ledger is not None:
                ledger.owe(conn)
        elif not ephemeral:
            overflow.append(conn)
    return tuple(recipients)


def _fall_behind(st: EngineState, conn: Connection, room: Room, offset: int) -> None:
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
    st.catching_up(conn)


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
    frames = conn.outbox()[0]
    if frames < st.config.outbox_frames:
        conn.frames += st.config.outbox_frames - frames
        if (ledger := conn.ledger) is not None:
            ledger.owe(conn)  # (so the fan-out's fast path stands aside)
    st.closes.append((conn, code, reason))
