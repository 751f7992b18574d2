"""Chat messages: sending through the log, and publishing what the log numbered.

Owns the checks on a message (member? allowed? size? rate?), the ``Append``
that hands it to the log, and what happens when the log answers: the sender's
ack, the fan-out in offset order, messages held back until the gap before
them is filled (``LoadHistory``), and following the log when its history
restarts (a new epoch). Direct messages make their room and its two members
here. Replaying messages to one connection is ``_replay``.
"""

from __future__ import annotations

from ._access import Access, Action
from ._awaits import PendingGap, PendingScreen, PendingSend
from ._commands import (
    Appended,
    AppendFailed,
    HistoryLoaded,
    Publish,
    Screened,
    SendDirect,
    Verdict,
)
from ._effects import Append, Effect, LoadHistory, Screen
from ._errors import ErrorCode, LocalProtocolError
from ._events import Ack, Message
from ._keys import ENCRYPTED
from ._names import dm_room, dm_users, is_valid_name, is_valid_room
from ._outbox import broadcast, error, to
from ._presence import add_member, member_room, refusal, verdict
from ._room import Room
from ._session import Connection, Session, SessionState
from ._state import EngineState

__all__ = [
    "append_failed",
    "appended",
    "gap_failed",
    "gap_filled",
    "publish_for_host",
    "screened",
    "send",
    "send_direct",
]

SCREEN_RETRY = 1.0
"""``retry_after`` (seconds) of a message refused because too many await the host's verdict."""


def send(
    st: EngineState,
    session: Session,
    room_name: str,
    text: str,
    client_id: str | None,
    now: float,
    out: list[Effect],
    *,
    encrypted: bool = False,
) -> None:
    ref_name = client_id if client_id is not None else room_name[:64]
    room = member_room(st, session, room_name, ref_name, out)
    if room is None:
        return
    if encrypted != text.startswith(ENCRYPTED) or (encrypted and dm_users(room_name) is None):
        _refuse_encrypted(st, session, encrypted, ref_name, out)
        return
    if (refused := verdict(room, session.user, Action.SEND, now)) is not Access.ALLOWED:
        error(
            st,
            session,
            ErrorCode.FORBIDDEN,
            refusal(room, refused, session.user, now),
            ref_name,
            out,
        )
        return
    if not text:
        error(st, session, ErrorCode.INVALID_FIELD, "text must not be empty", ref_name, out)
        return
    try:
        nbytes = len(text.encode())
    except UnicodeEncodeError:
        error(st, session, ErrorCode.INVALID_FIELD, "text is not valid Unicode", ref_name, out)
        return
    config = st.config
    if nbytes > config.max_text_bytes:
        error(
            st,
            session,
            ErrorCode.TOO_LARGE,
            f"text over {config.max_text_bytes} bytes",
            ref_name,
            out,
        )
        return
    screening = config.screen_messages and not encrypted
    if screening and (
        st.awaits.screens >= config.max_screening
        or st.awaits.screening(session) >= config.max_screening_per_session
    ):
        # The host's hook is behind (or stuck): what waits for it stays bounded.
        st.counters.limit("screening")
        error(
            st,
            session,
            ErrorCode.RATE_LIMITED,
            "too many messages awaiting moderation",
            ref_name,
            out,
            retry_after=SCREEN_RETRY,
        )
        return
    wait = session.bucket.take(now, config.rate_burst, config.rate_per_second)
    if wait:
        st.counters.limit("messages")
        error(
            st,
            session,
            ErrorCode.RATE_LIMITED,
            "sending too fast",
            ref_name,
            out,
            retry_after=round(wait, 3),
        )
        return
    # Ciphertext goes past the hook: it cannot read it, and a replacement
    # would break the envelope (docs/engine.md, "Screening messages").
    if screening:
        pending = PendingScreen(session, room_name, client_id, text, int(now * 1000))
        ref = st.awaits.expect_screen(pending)
        out.append(
            Screen(ref=ref, room=room_name, sender=session.user, text=text, client_id=client_id)
        )
        return
    awaits = st.awaits  # (Awaits.expect, inlined: this runs for every message)
    awaits.ref = ref = awaits.ref + 1
    awaits.refs[ref] = PendingSend(session, room_name, client_id)
    out.append(
        Append(
            ref=ref,
            room=room_name,
            sender=session.user,
            text=text,
            ts=int(now * 1000),
            client_id=client_id,
        )
    )


def send_direct(
    st: EngineState, session: Session, request: SendDirect, now: float, out: list[Effect]
) -> None:
    if not is_valid_name(request.to):
        error(st, session, ErrorCode.INVALID_NAME, "no such user name", request.to[:64], out)
        return
    name = dm_room(session.user, request.to)
    room = st.rooms.get(name)
    if room is None:
        st.load_room(name, session, request, out)
        return
    for s in (session, *st.by_user.get(request.to, {}).values()):
        if (
            name not in s.rooms
            and s.state is not SessionState.CLOSED
            and (s is session or len(s.rooms) < st.config.max_rooms_per_session)
        ):
            add_member(st, s, room, out, announce=True)
    send(st, session, name, request.text, request.client_id, now, out, encrypted=request.encrypted)


def _refuse_encrypted(
    st: EngineState, session: Session, encrypted: bool, ref_name: str, out: list[Effect]
) -> None:
    """Ciphertext goes to direct-message rooms only, and plain text never looks like it."""
    if encrypted:
        what, code = "encrypted messages only in direct-message rooms", ErrorCode.FORBIDDEN
    else:
        what, code = "text must not start with the encryption marker", ErrorCode.INVALID_FIELD
    error(st, session, code, what, ref_name, out)


def screened(st: EngineState, cmd: Screened, out: list[Effect]) -> None:
    """The host's hook answered a ``Screen``: append the message (as sent or
    replaced), or refuse it with an error to its sender."""
    refs = st.awaits.refs
    pending = refs.get(cmd.ref)
    if type(pending) is not PendingScreen:
        return  # answered already, or not a screening's reference
    text = pending.text
    if cmd.verdict is Verdict.REPLACE:
        text = _host_text("Screened", cmd.text, st)
    st.awaits.screen_answered(cmd.ref, pending)
    if cmd.verdict is Verdict.REFUSE:
        if pending.session.state is SessionState.LIVE:
            ref_name = pending.client_id if pending.client_id is not None else pending.room[:64]
            error(st, pending.session, ErrorCode.REFUSED, cmd.reason or "refused", ref_name, out)
        return
    # The same reference now awaits the log's answer, as if sent unscreened.
    refs[cmd.ref] = PendingSend(pending.session, pending.room, pending.client_id)
    out.append(
        Append(
            ref=cmd.ref,
            room=pending.room,
            sender=pending.session.user,
            text=text,
            ts=pending.ts,
            client_id=pending.client_id,
        )
    )


def publish_for_host(st: EngineState, cmd: Publish, now: float, out: list[Effect]) -> None:
    if not is_valid_room(cmd.room) or not is_valid_name(cmd.sender):
        raise LocalProtocolError(f"invalid room or sender in {cmd!r}")
    _host_text("Publish", cmd.text, st)
    out.append(
        Append(
            ref=st.awaits.next_ref(),
            room=cmd.room,
            sender=cmd.sender,
            text=cmd.text,
            ts=int(now * 1000),
            client_id=cmd.client_id,
        )
    )


def _host_text(what: str, text: str | None, st: EngineState) -> str:
    """Text the host appends itself: plain text, non-empty, within ``max_text_bytes``.

    It must not start with the encryption marker: only a client can send an
    encrypted message, and a host's text read as an envelope would be
    "cannot decrypt" on every device (or could forge one).
    """
    if not text:
        raise LocalProtocolError(f"{what} text must be non-empty")
    try:
        nbytes = len(text.encode())
    except UnicodeEncodeError:
        raise LocalProtocolError(f"{what} text is not valid Unicode (a lone surrogate)") from None
    if nbytes > st.config.max_text_bytes:
        raise LocalProtocolError(f"{what} text must be within max_text_bytes")
    if text.startswith(ENCRYPTED):
        raise LocalProtocolError(f"{what} text must not start with the encryption marker")
    return text


def appended(st: EngineState, cmd: Appended, out: list[Effect]) -> None:
    """The log numbered a message (ours or another process's): publish it in order."""
    message = cmd.message
    pending: PendingSend | None = None
    if cmd.ref is not None:
        refs = st.awaits.refs
        found = refs.pop(cmd.ref, None)
        if type(found) is PendingSend:
            pending = found
        elif found is not None:  # not an append's reference: not ours to take
            refs[cmd.ref] = found
    room = st.rooms.get(message.room)
    if cmd.duplicate or room is None:
        if pending is not None:
            _ack(st, pending, message.offset, out)
        return
    if message.epoch != room.epoch:
        # The log's history was lost and restarted: follow the new numbering.
        room.epoch = message.epoch
        room.head = message.offset - 1
        room.window.clear()
        room.early.clear()
    head = room.head
    if message.offset <= head:  # already delivered (a replayed answer)
        if pending is not None:
            _ack(st, pending, message.offset, out)
        return
    if message.offset > head + 1:
        room.early[message.offset] = (message, pending)
        if len(room.early) > st.config.history_window:
            # The gap has not been filled for a whole window: give it up.
            st.counters.gaps_given_up += 1
            room.head = min(room.early) - 1
            _drain_early(st, room, out)
            return
        if room.gap_ref is None:
            ref = st.awaits.expect(PendingGap(room.name))
            room.gap_ref = ref
            out.append(LoadHistory(ref=ref, room=room.name, after=head, before=message.offset))
        return
    _publish(st, room, message, pending, out)
    _drain_early(st, room, out)


def append_failed(st: EngineState, cmd: AppendFailed, out: list[Effect]) -> None:
    refs = st.awaits.refs
    pending = refs.get(cmd.ref)
    if type(pending) is PendingSend:
        del refs[cmd.ref]
        error(
            st,
            pending.session,
            ErrorCode.UNAVAILABLE,
            f"message not stored: {cmd.reason}",
            pending.client_id,
            out,
        )


def gap_filled(st: EngineState, gap: PendingGap, cmd: HistoryLoaded, out: list[Effect]) -> None:
    room = st.rooms.get(gap.room)
    if room is not None and room.gap_ref == cmd.ref:
        room.gap_ref = None
        for m in cmd.messages:
            if m.offset == room.head + 1 and m.epoch == room.epoch:
                _publish(st, room, m, None, out)
        _drain_early(st, room, out)
        if room.early:
            # What the log does not have is lost for good: move past it.
            room.head = min(room.early) - 1
            _drain_early(st, room, out)


def gap_failed(st: EngineState, gap: PendingGap) -> None:
    if (room := st.rooms.get(gap.room)) is not None:
        room.gap_ref = None


def _drain_early(st: EngineState, room: Room, out: list[Effect]) -> None:
    """Publish held-back messages that are next in line."""
    while (nxt := room.early.pop(room.head + 1, None)) is not None:
        _publish(st, room, nxt[0], nxt[1], out)


def _publish(
    st: EngineState,
    room: Room,
    message: Message,
    pending: PendingSend | None,
    out: list[Effect],
) -> None:
    st.counters.messages_appended += 1
    room.head = message.offset
    room.window.append(message)
    sender_conn: Connection | None = None
    if pending is not None:
        sender_conn = _ack(st, pending, message.offset, out)
    if room.typing:
        room.typing.pop(message.sender, None)
    broadcast(st, room, message, None if st.config.echo else sender_conn, out, ephemeral=False)


def _ack(
    st: EngineState, pending: PendingSend, offset: int, out: list[Effect]
) -> Connection | None:
    conn = pending.session.conn
    if conn is None or pending.session.state is not SessionState.LIVE:
        return None
    ack = Ack(room=pending.room, offset=offset, client_id=pending.client_id)
    catchup = conn.catchup.get(pending.room)
    if catchup is not None and offset >= catchup.next:
        # The sender is replaying this room: its ack takes the message's place in
        # that replay, so that the client still sees offsets in order (an ack ahead
        # of messages it has not been handed yet would look like a gap).
        if catchup.own is None:
            catchup.own = {}
        catchup.own[offset] = ack
        return conn
    to(st, conn, ack, out)
    return conn
