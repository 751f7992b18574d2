"""The engine: every chat rule, as a pure state machine.

``Engine.handle(command, now)`` and ``Engine.tick(now)`` are the only ways in;
both return the effects to carry out, in order. The engine owns sessions,
connections, rooms in memory, outboxes and timers. It does not own the
history: offsets come from the log, so several processes sharing one log
agree on every room's order.

This module is the front door: it routes each command, timer and client
request to the module that owns it, and ends every step by closing the
connections the step decided to close. The rules live below it, one idea per
module: ``_lifecycle`` (connect, welcome, resume, grace period), ``_presence``
(membership, typing, read marks), ``_messages`` (send, log order), ``_replay``
(catching up), ``_history`` (history pages, loading rooms), ``_requests``
(decoding frames, the request rate), ``_outbox`` (backpressure), ``_signals``
(relaying call frames as ``_calls`` decides), ``_moderation`` (removals,
mutes, bans, deleting messages), all over the data in ``_state``. No module
below imports this one, and none imports a module that imports it back.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import filterfalse
from typing import assert_never

from . import (
    _cluster,
    _history,
    _keys,
    _lifecycle,
    _messages,
    _moderation,
    _presence,
    _replay,
    _requests,
    _signals,
)
from ._commands import (
    Appended,
    AppendFailed,
    Ban,
    BusResumed,
    CallSignal,
    ClaimDeviceKeys,
    ClaimRefused,
    ClientRequest,
    Command,
    Connect,
    ConnId,
    CreateRoom,
    DeleteMessage,
    DeviceKeysStored,
    Disconnected,
    Drained,
    FetchHistory,
    HeadsFailed,
    HeadsLoaded,
    HistoryFailed,
    HistoryLoaded,
    InboxFailed,
    InboxLoaded,
    Join,
    KeysFailed,
    Kick,
    Leave,
    MarkRead,
    Mute,
    Pong,
    PrekeysClaimed,
    ProcessGone,
    Publish,
    PublishDeviceKeys,
    Receive,
    RemoveMember,
    RoomLoaded,
    RoomLoadFailed,
    Screened,
    Send,
    SendDirect,
    SessionAsked,
    SessionClaimed,
    SessionTaken,
    Shared,
    Shutdown,
    StartTyping,
    Subscribed,
    Unban,
    Written,
    WrittenMany,
)
from ._config import Config
from ._effects import Close, Effect
from ._errors import CloseCode, ErrorCode, LocalProtocolError
from ._ids import IdSource
from ._outbox import error
from ._session import Session, SessionAction, SessionInput, SessionState, fire
from ._state import Counters, EngineState
from ._timers import GraceOver, HeadProbe, PingDue, PongDue, PresenceDue, Timer, TypingOver

__all__ = ["Engine", "RoomView", "SessionInfo"]

_In, _Do = SessionInput, SessionAction


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionInfo:
    """A read-only view of one session, for host programs and tests."""

    id: str
    user: str
    state: SessionState
    conn: ConnId | None
    rooms: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class RoomView:
    """A read-only view of a room held in memory."""

    name: str
    private: bool
    users: tuple[str, ...]
    head: int
    epoch: str
    allow: frozenset[str] = frozenset()


class Engine:
    """The sans-IO chat engine. See the module docstring and docs/engine.md."""

    def __init__(self, config: Config, ids: IdSource) -> None:
        self.config = config
        self._st = EngineState(config, ids)

    # -- the three calls -----------------------------------------------------

    def handle(self, command: Command, now: float) -> list[Effect]:
        """Apply one command; return the effects to carry out, in order.

        Raises :class:`LocalProtocolError` (before changing anything) when the
        host opens a connection id that is open already, reports negative
        written counts, or creates a room with an invalid name. Commands for
        a connection that is not open (one the engine closed, racing with the
        adapter) are ignored.
        """
        out: list[Effect] = []
        st = self._st
        st.now = now
        # The cases are tried top to bottom (a class pattern costs ~500 instructions when it
        # fails), so the commands every message and every connection brings come first.
        match command:
            case Receive():
                if (conn := st.conns.get(command.conn)) is not None:
                    conn.last_seen = now
                    request = _requests.decode(st, conn, command.text, now, out)
                    if request is not None:
                        self._request(conn.session, request, now, out)
                elif (claiming := st.peers.claiming.get(command.conn)) is not None and len(
                    claiming[1]
                ) < self.config.max_pending_frames:
                    # Its session is being claimed from another process: the frame
                    # waits, as a frame before the welcome does (and within its bound).
                    claiming[1].append(command.text)
            case Appended():
                _messages.appended(st, command, out)
            case Drained():
                self._drained(command.conns, out)
            case Written():
                self._written(((command.conn, command.frames, command.nbytes),), out)
            case WrittenMany():
                self._written(command.reports, out)
            case Connect():
                self._run_held(_lifecycle.connect(st, command, now, out), now, out)
            case InboxLoaded():
                if not _cluster.rechecked(st, command.ref, command.rooms, out):
                    held = _lifecycle.inbox_loaded(st, command.ref, command.rooms, now, out)
                    self._run_held(held, now, out)
            case InboxFailed():
                if not _cluster.rechecked(st, command.ref, (), out):
                    held = _lifecycle.inbox_loaded(st, command.ref, (), now, out)
                    self._run_held(held, now, out)
            case Disconnected():
                st.peers.claiming.pop(command.conn, None)
                _lifecycle.disconnected(st, command, out)
            case Pong():
                if (conn := st.conns.get(command.conn)) is not None:
                    conn.last_seen = now
            case (
                Send()
                | Join()
                | Leave()
                | StartTyping()
                | MarkRead()
                | FetchHistory()
                | SendDirect()
                | CallSignal()
                | PublishDeviceKeys()
                | ClaimDeviceKeys()
            ):
                if (conn := st.conns.get(command.conn)) is not None:
                    conn.last_seen = now
                    self._request(conn.session, command, now, out)
            case RoomLoaded():
                self._room_loaded(command, now, out)
            case RoomLoadFailed():
                self._room_failed(command, now, out)
            case AppendFailed():
                _messages.append_failed(st, command, out)
            case HistoryLoaded():
                _history.history_loaded(st, command, out)
            case HistoryFailed():
                _history.history_failed(st, command, out)
            case DeviceKeysStored():
                _keys.stored(st, command, out)
            case PrekeysClaimed():
                _keys.claimed(st, command, out)
            case KeysFailed():
                _keys.failed(st, command, out)
            case CreateRoom():
                _presence.create_room(st, command, out)
            case Publish():
                _messages.publish_for_host(st, command, now, out)
            case Shutdown():
                _lifecycle.shutdown(st, out)
            case RemoveMember() | Kick() | Mute() | Ban() | Unban() | DeleteMessage():
                _moderation.moderate(st, command, out)
            case Screened():
                _messages.screened(st, command, out)
            case (
                HeadsLoaded()
                | HeadsFailed()
                | BusResumed()
                | Subscribed()
                | Shared()
                | ProcessGone()
            ):
                _cluster.handle(st, command, out)
            case SessionClaimed() | ClaimRefused():
                self._claim_answered(command, now, out)
            case SessionTaken():
                self._session_taken(command, out)
            case SessionAsked():
                self._session_asked(command, out)
            case _:
                assert_never(command)
        if st.closes:
            _lifecycle.close_deferred(st, out)
        if st.timers.stale:
            st.timers.compact(self._timer_live)
        if st.peers.on and st.peers.dirty:  # (never dirty alone: ``on`` is a cheaper test)
            _cluster.flush(st, out)
        return out

    def next_deadline(self) -> float | None:
        """The absolute time at which :meth:`tick` next has work, or None."""
        timers = self._st.timers
        calls = self._st.calls.next_deadline()
        while (entry := timers.peek()) is not None:
            if self._timer_live(entry[2]):
                return entry[0] if calls is None else min(entry[0], calls)
            timers.discard()
        return calls

    def tick(self, now: float) -> list[Effect]:
        """Run every timer due at or before ``now``."""
        out: list[Effect] = []
        st = self._st
        st.now = now
        timers = st.timers
        while (entry := timers.peek()) is not None and entry[0] <= now:
            timer = entry[2]
            if not self._timer_live(timer):
                timers.discard()
                continue
            timers.pop()
            match timer:
                case PingDue():
                    _lifecycle.ping(st, timer, now, out)
                case PongDue():
                    _lifecycle.pong_due(st, timer, out)
                case GraceOver():
                    _lifecycle.expire(st, timer.session, out, timer_due=True)
                case TypingOver():
                    _presence.typing_over(st, timer, now, out)
                case PresenceDue():
                    _presence.presence_due(st, timer, out)
                case HeadProbe():
                    _cluster.probe(st, timer, now, out)
                case _:
                    assert_never(timer)
        _signals.tick(st, now, out)
        if st.closes:
            _lifecycle.close_deferred(st, out)
        if st.timers.stale:
            st.timers.compact(self._timer_live)
        if st.peers.dirty:
            _cluster.flush(st, out)
        return out

    def _timer_live(self, timer: Timer) -> bool:
        """Whether what the timer was armed for still holds (else it is skipped)."""
        match timer:
            case PingDue() | PongDue():
                return self._st.conns.get(timer.conn.id) is timer.conn
            case GraceOver():
                return _lifecycle.grace_live(timer)
            case TypingOver():
                return _presence.typing_live(self._st, timer)
            case PresenceDue():
                return _presence.presence_live(self._st, timer)
            case HeadProbe():
                return _cluster.probe_live(self._st, timer)
            case _:
                assert_never(timer)

    # -- read-only views ---------------------------------------------------------

    def session(self, session_id: str) -> SessionInfo | None:
        s = self._st.by_id.get(session_id)
        if s is None:
            return None
        return SessionInfo(
            id=s.id,
            user=s.user,
            state=s.state,
            conn=s.conn.id if s.conn else None,
            rooms=tuple(s.rooms),
        )

    def session_of(self, conn: ConnId) -> SessionInfo | None:
        c = self._st.conns.get(conn)
        return None if c is None else self.session(c.session.id)

    def rooms(self, *, include_private: bool = True) -> dict[str, RoomView]:
        """Rooms held in memory (a room with nobody in it is not held)."""
        return {
            name: RoomView(
                name=name,
                private=room.private,
                users=room.member_list(),
                head=room.head,
                epoch=room.epoch,
                allow=room.allow,
            )
            for name, room in self._st.rooms.items()
            if include_private or not room.private
        }

    def sessions(self, user: str | None = None) -> list[SessionInfo]:
        """Every session (of ``user``, if given), connected or in its grace period."""
        st = self._st
        ids = st.by_id if user is None else st.by_user.get(user, {})
        return [info for i in list(ids) if (info := self.session(i)) is not None]

    def moderation(self, room: str) -> tuple[frozenset[str], dict[str, float]]:
        """(banned users, muted users -> until) of a room held in memory."""
        r = self._st.rooms.get(room)
        return (frozenset(), {}) if r is None else (frozenset(r.banned), dict(r.muted))

    def members(self, room: str) -> tuple[str, ...]:
        r = self._st.rooms.get(room)
        return () if r is None else r.member_list()

    def outbox(self, conn: ConnId) -> tuple[int, int]:
        """(frames, bytes) handed out to ``conn`` and not yet reported written."""
        c = self._st.conns.get(conn)
        if c is None:
            raise LocalProtocolError(f"no open connection {conn!r}")
        return c.outbox()

    @property
    def connections(self) -> int:
        return len(self._st.conns)

    def stats(self) -> dict[str, int]:
        """Sizes of everything the engine holds, for metrics and memory checks."""
        st = self._st
        appends, loads = st.awaits.count()
        screens = st.awaits.screens
        return {
            "connections": len(st.conns),
            "sessions": len(st.by_id),
            "rooms": len(st.rooms),
            "timers": st.timers.size(),
            "pending_appends": appends,
            "pending_loads": loads,
            "pending_screens": screens,
            "messages_in_memory": sum(len(r.window) for r in st.rooms.values()),
            **st.calls.stats(),  # calls, and what they hold per session
            "sessions_detached": sum(
                1 for s in st.by_id.values() if s.state is SessionState.DETACHED
            ),
        }

    def counters(self) -> Counters:
        """A copy of the engine's running totals (messages, resumes, refusals...)."""
        return self._st.counters.copy()

    # -- requests from clients ------------------------------------------------------

    def _request(
        self, session: Session, request: ClientRequest, now: float, out: list[Effect]
    ) -> None:
        action = fire(session, _In.FRAME)
        if action is _Do.SERVE:
            if isinstance(request, CallSignal):
                # Call frames have their own bucket (``_calls``): an ICE candidate burst
                # neither waits for the request tokens nor spends them.
                self._dispatch(session, request, now, out)
                return
            if _requests.admit(self._st, session, request, now, out):
                self._dispatch(session, request, now, out)
        elif action is _Do.HOLD:
            _requests.hold(self._st, session, request, out)

    def _run_held(self, held: _lifecycle.Held | None, now: float, out: list[Effect]) -> None:
        """Run the frames a session sent before its welcome, now that it is live."""
        if held is None:
            return
        session = held.session
        for request in held.requests:
            if _closing(session):
                break  # closed during its welcome: what it asked goes with it
            self._request(session, request, now, out)

    def _dispatch(
        self, session: Session, request: ClientRequest, now: float, out: list[Effect]
    ) -> None:
        """Carry out a request of a live session whose token is paid."""
        st = self._st
        match request:
            case Send():
                _messages.send(
                    st,
                    session,
                    request.room,
                    request.text,
                    request.client_id,
                    now,
                    out,
                    encrypted=request.encrypted,
                )
            case SendDirect():
                _messages.send_direct(st, session, request, now, out)
            case Join():
                _presence.join_request(st, session, request, out)
            case Leave():
                _presence.leave(st, session, request.room, out)
            case StartTyping():
                _presence.typing(st, session, request.room, now, out)
            case MarkRead():
                _presence.mark_read(st, session, request.room, request.offset, out)
            case FetchHistory():
                _history.fetch_history(st, session, request, out)
            case CallSignal():
                _signals.signal(st, session, request, now, out)
            case PublishDeviceKeys():
                _keys.publish(st, session, request, out)
            case ClaimDeviceKeys():
                _keys.claim(st, session, request, out)
            case _:
                assert_never(request)

    # -- outbox credit -----------------------------------------------------------------

    def _written(self, reports: tuple[tuple[ConnId, int, int], ...], out: list[Effect]) -> None:
        for _, frames, nbytes in reports:
            if frames < 0 or nbytes < 0:
                raise LocalProtocolError("Written counts must not be negative")
        st = self._st
        get = st.conns.get
        for conn_id, frames, nbytes in reports:
            if (conn := get(conn_id)) is not None:
                ledger = conn.ledger
                if ledger is None:
                    left = conn.frames - frames
                    conn.frames = left if left > 0 else 0
                    left = conn.nbytes - nbytes
                    conn.nbytes = left if left > 0 else 0
                else:  # (its outbox is its own counts plus its ledger's, see Ledger)
                    left = conn.frames + ledger.frames - frames
                    conn.frames = (left if left > 0 else 0) - ledger.frames
                    left = conn.nbytes + ledger.nbytes - nbytes
                    conn.nbytes = (left if left > 0 else 0) - ledger.nbytes
                    ledger.owing.add(conn_id)
                if conn.catchup:
                    _replay.pump(st, conn, out)

    def _drained(self, conn_ids: tuple[ConnId, ...], out: list[Effect]) -> None:
        st = self._st
        conns = st.conns
        rest: Iterable[ConnId] = conn_ids
        if ledgers := st.ledgers:
            # A ledger all of whose members are drained goes back to zero, with the own
            # counts of those it owes (the others' are zero): a few C-level steps per
            # member instead of a few bytecodes per recipient. The rest one by one.
            if len(ledgers) == 1:
                ledger = next(iter(ledgers))
                done = [ledger] if ledger.drained_by(conn_ids) else []
            else:
                named = set(conn_ids)
                done = [g for g in ledgers if g.ids <= named]
            covered = 0
            for ledger in done:
                members = ledger.members
                for conn_id in ledger.owing:
                    member = members[conn_id]
                    member.frames = member.nbytes = 0
                ledger.owing.clear()
                ledger.frames = ledger.nbytes = ledger.top_frames = ledger.top_bytes = 0
                del ledgers[ledger]
                covered += len(members)
            if covered == len(conn_ids):
                rest = ()  # (each id a member of one of them: none named twice, none else)
            elif covered:
                reset = done[0].ids if len(done) == 1 else set().union(*(g.ids for g in done))
                rest = filterfalse(reset.__contains__, conn_ids)
        for conn_id in rest:
            if (conn := conns.get(conn_id)) is None:
                continue  # closed meanwhile
            if (counted_by := conn.ledger) is None:
                conn.frames = conn.nbytes = 0
            else:
                conn.frames = -counted_by.frames
                conn.nbytes = -counted_by.nbytes
                counted_by.owing.add(conn_id)
        # Then the replays, in the order the adapter named the connections.
        catching = st.catching
        if catching and not catching.keys().isdisjoint(conn_ids):
            for conn_id in conn_ids:
                if (replaying := catching.get(conn_id)) is None:
                    continue
                if replaying.catchup and conns.get(conn_id) is replaying:
                    _replay.pump(st, replaying, out)
                if not replaying.catchup or conns.get(conn_id) is not replaying:
                    st.catching.pop(conn_id, None)

    # -- the log's answers: each goes where it was asked from ----------------------------

    def _room_loaded(self, cmd: RoomLoaded, now: float, out: list[Effect]) -> None:
        st = self._st
        loaded = _history.room_loaded(st, cmd)
        if loaded is None:
            _moderation.load_failed(st, cmd.room)  # (an answer nobody waits for)
            return
        room, waiters = loaded
        _moderation.room_arrived(st, room)
        _cluster.room_arrived(st, room, out)
        for session, request in waiters:
            if request is None:
                self._run_held(_lifecycle.room_arrived(st, session, cmd.room, now, out), now, out)
            elif session.state is SessionState.LIVE and not _closing(session):
                self._dispatch(session, request, now, out)  # its token was taken already
        st.forget_if_empty(room)

    # -- several processes: a session claimed from another, or taken by another ------------

    def _claim_answered(
        self, cmd: SessionClaimed | ClaimRefused, now: float, out: list[Effect]
    ) -> None:
        st = self._st
        again = _cluster.claim_answered(st, cmd, now, out)
        if again is None:
            return
        connect, frames = again
        self._run_held(_lifecycle.connect(st, connect, now, out), now, out)
        for text in frames:
            if (conn := st.conns.get(connect.conn)) is None:
                break
            request = _requests.decode(st, conn, text, now, out)
            if request is not None:
                self._request(conn.session, request, now, out)

    def _session_taken(self, cmd: SessionTaken, out: list[Effect]) -> None:
        st = self._st
        session = st.sessions.get(cmd.token)
        if session is None:
            return
        st.peers.taken.add(cmd.token)
        moved = _cluster.moved_away(st, session, cmd.by, out)
        if session.conn is not None:
            conn = session.conn
            out.append(
                Close(conn=conn.id, code=CloseCode.NORMAL, reason="session resumed elsewhere")
            )
            _lifecycle.drop(st, conn, out)
        _lifecycle.expire(st, session, out)
        _cluster.forget_departures(st, session.user, moved)
        st.peers.taken.discard(cmd.token)

    def _session_asked(self, cmd: SessionAsked, out: list[Effect]) -> None:
        """Another process was handed this session's token: if its connection is
        open here, close it and park the session at once for that process to claim.
        A session parked already has its record (or had: claimed meanwhile); one
        still opening never handed its token out."""
        st = self._st
        session = st.sessions.get(cmd.token)
        if session is None or session.user != cmd.user or not st.peers.on:
            return
        conn = session.conn
        if conn is None or session.state is SessionState.OPENING:
            return
        out.append(Close(conn=conn.id, code=CloseCode.NORMAL, reason="session resumed elsewhere"))
        _lifecycle.drop(st, conn, out)  # parked (SessionParked) for the asker to take

    def _room_failed(self, cmd: RoomLoadFailed, now: float, out: list[Effect]) -> None:
        st = self._st
        _moderation.load_failed(st, cmd.room)
        st.peers.touch_room(cmd.room)
        st.peers.loading.pop(cmd.room, None)  # what came meanwhile: the next load has it
        st.peers.adopt.discard(cmd.room)
        for session, request in st.awaits.rooms.pop(cmd.room, None) or ():
            if request is not None:
                error(
                    st,
                    session,
                    ErrorCode.UNAVAILABLE,
                    f"room {cmd.room} unavailable: {cmd.reason}",
                    cmd.room,
                    out,
                )
            elif cmd.room in session.waiting:
                self._run_held(_lifecycle.room_arrived(st, session, cmd.room, now, out), now, out)


def _closing(session: Session) -> bool:
    """Whether the session's connection is being closed by the engine this step."""
    return session.conn is not None and session.conn.closing
