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
from ._effects import Append, Effect, LoadHeads, LoadHistory, LoadRoom, Screen
from ._errors import ErrorCode, LocalProtocolError
from ._events import Ack, Message
from ._keys import ENCRYPTED
from ._names import dm_room, dm_users, is_valid_name, is_valid_room
from ._outbox import broadcast, error, to
from ._presence import add_member, member_room, refusal, verdict
from ._replay import pump
from ._room import Room
from ._session import Connection, Session, SessionState
from ._state import EngineState

__all__ = [
    "ahead_of_room",
    "append_failed",
    "appended",
    "behind",
    "gap_failed",
    "gap_filled",
    "held_back",
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
    if (
        cmd.duplicate
        and room is not None
        and message.offset > room.head
        and message.epoch == room.epoch
    ):
        # A retry of a message this process has not delivered yet (it waits for the
        # gap before it, or another process appended it): it goes in its place, and
        # the ack with it, never ahead of the messages before it.
        held = room.early.get(message.offset)
        if held is not None:  # held already: one ack for it, when it goes out
            if held[1] is None:
                room.early[message.offset] = (held[0], pending)
            return
    elif cmd.duplicate or room is None:
        if pending is not None:
            _ack(st, pending, message, out)
        if room is None and not cmd.duplicate:
            _unheld(st, message, out)
        return
    if cmd.ref is None:
        room.heard = st.now  # the bus is alive for this room: no head probe needed
        if room.name.startswith("dm:"):
            # Another process's direct message: its parties' sessions here that are
            # not in the conversation (left it, or came after) join it, as
            # ``send_direct`` has them join when the sender is here.
            _parties_join(st, room, out)
    if message.epoch != room.epoch:
        bus = cmd.ref is None and st.peers.on
        if bus or message.epoch in room.past:
            # From a life the room has left (stale), or from the bus, which may
            # bring an old life's message late: only the log says which life is
            # the room's now, so ask it (the answer fetches this one if it is new).
            if pending is not None:
                _ack(st, pending, message, out)
            if bus and message.epoch not in room.past:
                _ask_head(st, room, out)
            return
        # The log's history was lost and restarted: follow the new numbering, from
        # its start (within a window): what came before this one is fetched as a gap.
        _new_life(st, room, message.epoch, max(0, message.offset - 1 - st.config.history_window))
    head = room.head
    if message.offset <= head:  # already delivered (a replayed answer)
        if pending is not None:
            _ack(st, pending, message, out)
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
            _fetch_gap(st, room, message.offset, out)
        return
    _publish(st, room, message, pending, out)
    if room.early:
        _drain_early(st, room, out)


def _unheld(st: EngineState, message: Message, out: list[Effect]) -> None:
    """A message for a room not in memory: held if the room is loading, merged by
    offset once it is (``held_back``); for a direct-message room with a party here,
    the room is loaded for them (another process appended it)."""
    name = message.room
    peers = st.peers
    if name not in st.awaits.rooms:
        pair = dm_users(name)
        if not peers.on or pair is None or not any(u in st.by_user for u in pair):
            return  # not ours to hold: nobody here is in it
        adopt_room(st, name, out)
    held = peers.loading.setdefault(name, {})
    if len(held) < st.config.history_window:
        held[message.offset] = message


def adopt_room(st: EngineState, name: str, out: list[Effect]) -> None:
    """Load a direct-message room for its parties' sessions here (``held_back``
    adds them once it loaded)."""
    st.peers.adopt.add(name)
    st.awaits.rooms[name] = []
    st.peers.touch_room(name)
    out.append(LoadRoom(room=name, recent=st.config.history_window))


def held_back(st: EngineState, room: Room, out: list[Effect]) -> None:
    """A room finished loading: deliver what came for it meanwhile, by offset.

    For a direct-message room loaded because another process appended to it,
    the parties' sessions here join it first and get that message and what
    followed (as ``send_direct`` does locally)."""
    held = st.peers.loading.pop(room.name, None) or {}
    if room.name in st.peers.adopt:
        st.peers.adopt.discard(room.name)
        first = min((o for o, m in held.items() if m.epoch == room.epoch), default=None)
        rechecked = st.peers.unread.pop(room.name, None)
        if rechecked is not None:
            first = _first_unread(room, rechecked, first)
        replay: list[Message] = []
        if first is not None and first <= room.head:
            while room.window and room.window[-1].offset >= first:
                replay.append(room.window.pop())
            room.head = first - 1
        if first is not None or rechecked is None:  # (read meanwhile: nothing to join)
            _parties_join(st, room, out)
        for m in reversed(replay):
            appended(st, Appended(message=m), out)
    for offset in sorted(held):
        appended(st, Appended(message=held[offset]), out)


def _parties_join(st: EngineState, room: Room, out: list[Effect]) -> None:
    """The sessions here of a direct-message room's two parties join it (within
    their room bound), told its members as any joiner is."""
    pair = dm_users(room.name)
    if pair is None:
        return
    limit = st.config.max_rooms_per_session
    for user in pair:
        for s in list(st.by_user.get(user, {}).values()):
            if (
                room.name not in s.rooms
                and s.state is not SessionState.CLOSED
                and len(s.rooms) < limit
            ):
                add_member(st, s, room, out, announce=True)


def _first_unread(room: Room, user: str, first: int | None) -> int | None:
    """The first message of a rechecked room that ``user`` has not read (within the
    window loaded; older ones are in the history), or ``first`` if earlier."""
    unread = max(room.reads.get(user, 0) + 1, room.window_start())
    if unread > room.head:
        return first
    return unread if first is None else min(first, unread)


def ahead_of_room(st: EngineState, room: Room, offset: int, out: list[Effect]) -> None:
    """A client resumed having seen ``offset``, past what this process has heard
    of the room: the log has it (another process delivered it), so fetch it."""
    room.known = max(room.known, offset)
    _fetch_known(st, room, out)


def behind(st: EngineState, room: Room, head: int, epoch: str, out: list[Effect]) -> None:
    """The log says the room's head is ``head`` in ``epoch``: fetch what this
    engine has not delivered (a message the bus lost, or a new life of the room)."""
    if epoch in room.past:
        return  # read before the room's history restarted: stale
    if epoch != room.epoch:
        # A new life: its newest messages, at most a window of them, as a gap.
        _new_life(st, room, epoch, max(0, head - st.config.history_window))
    room.known = max(room.known, head)
    _fetch_known(st, room, out)


def _ask_head(st: EngineState, room: Room, out: list[Effect]) -> None:
    peers = st.peers
    if room.name not in peers.asking:
        ref = st.awaits.next_ref()
        peers.probes.add(ref)
        peers.asking[room.name] = ref
        out.append(LoadHeads(ref=ref, rooms=(room.name,)))


def _fetch_known(st: EngineState, room: Room, out: list[Effect]) -> None:
    if room.known > room.head and room.gap_ref is None:
        _fetch_gap(st, room, room.known + 1, out)


def _fetch_gap(st: EngineState, room: Room, before: int, out: list[Effect]) -> None:
    ref = st.awaits.expect(PendingGap(room.name, before))
    room.gap_ref = ref
    out.append(LoadHistory(ref=ref, room=room.name, after=room.head, before=before))


def _new_life(st: EngineState, room: Room, epoch: str, head: int) -> None:
    """The room's history restarted (another epoch): follow it from ``head``.

    Connections replaying the old life (or waiting for it) start over at the
    new one, and go on as soon as it has messages; the epoch on those messages
    tells their clients of the break."""
    if len(room.past) >= 16:  # (bounded: a room's history rarely restarts)
        room.past.clear()
    room.past.add(room.epoch)
    room.epoch = epoch
    room.head = head
    room.known = 0
    room.window.clear()
    room.early.clear()
    room.gap_ref = None  # an answer from the old life is not awaited any more
    name = room.name
    for user in room.users:
        for session in st.by_user.get(user, {}).values():
            conn = session.conn
            if conn is not None and (catchup := conn.catchup.get(name)) is not None:
                catchup.next = head + 1
                catchup.loaded.clear()
                catchup.loading = None
                catchup.lost_below = 0
                catchup.own = None
                room.behind.pop(conn.id, None)
                room.ahead[conn.id] = conn  # the next message of the new life wakes it


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
        early = room.early
        for m in cmd.messages:
            # (Past a hole: what the log does not have is lost for good.)
            if m.offset > room.head and m.epoch == room.epoch:
                held = early.pop(m.offset, None) if early else None
                _publish(st, room, m, None if held is None else held[1], out)
        for offset in [o for o in early if o <= room.head]:
            # Held back and delivered from the log since: only its ack is left to give.
            stored, pending = early.pop(offset)
            if pending is not None:
                _ack(st, pending, stored, out)
        _drain_early(st, room, out)
        if early:
            first = min(early)
            if first <= gap.before:
                # What the log does not have is lost for good: move past it.
                room.head = first - 1
                _drain_early(st, room, out)
            else:  # more went missing since this gap was asked for
                _fetch_gap(st, room, first, out)
                return
        if room.known > room.head and gap.before > room.known:
            # Asked up to what the log (or a client that resumed) said, and the log
            # has no more: stop asking. A client that says it saw more goes live
            # when the room gets there (or starts over in the room's next life).
            room.known = room.head
        _fetch_known(st, room, out)


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
        sender_conn = _ack(st, pending, message, out)
    if room.typing:
        room.typing.pop(message.sender, None)
    broadcast(st, room, message, None if st.config.echo else sender_conn, out, ephemeral=False)
    if room.ahead:
        _caught_up(st, room, out)


def _caught_up(st: EngineState, room: Room, out: list[Effect]) -> None:
    """Connections waiting for the room to reach what they had seen go on."""
    for conn in list(room.ahead.values()):
        catchup = conn.catchup.get(room.name)
        if catchup is None:
            del room.ahead[conn.id]
        elif catchup.next <= room.head + 1:
            del room.ahead[conn.id]
            pump(st, conn, out)


def _ack(
    st: EngineState, pending: PendingSend, message: Message, out: list[Effect]
) -> Connection | None:
    conn = pending.session.conn
    if conn is None or pending.session.state is not SessionState.LIVE:
        return None
    offset = message.offset
    ack = Ack(room=pending.room, offset=offset, epoch=message.epoch, client_id=pending.client_id)
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
