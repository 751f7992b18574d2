"""The engine: every chat rule, as a pure state machine.

``Engine.handle(command, now)`` and ``Engine.tick(now)`` are the only ways in;
both return the effects to carry out, in order. The engine owns sessions,
connections, rooms in memory, outboxes and timers. It does not own the
history: offsets come from the log, so several processes sharing one log
agree on every room's order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import assert_never, cast

from ._access import Access, Action, room_access, room_rule
from ._codec import FrameError, decode_line, decode_request, encode_json, encode_text
from ._commands import (
    Appended,
    AppendFailed,
    ClientRequest,
    Command,
    Connect,
    ConnId,
    CreateRoom,
    Disconnected,
    Drained,
    FetchHistory,
    HistoryFailed,
    HistoryLoaded,
    InboxFailed,
    InboxLoaded,
    Join,
    Leave,
    MarkRead,
    Mode,
    Pong,
    Publish,
    Receive,
    RoomLoaded,
    RoomLoadFailed,
    Send,
    SendDirect,
    Shutdown,
    StartTyping,
    Written,
    WrittenMany,
)
from ._config import Config
from ._effects import (
    Append,
    Close,
    Deliver,
    Effect,
    LoadHistory,
    LoadInbox,
    LoadRoom,
    Ping,
    Position,
    SavePositions,
    SaveRoom,
)
from ._errors import CloseCode, ErrorCode, LocalProtocolError
from ._events import (
    Ack,
    ErrorEvent,
    History,
    Joined,
    Left,
    Message,
    ReadMark,
    RoomPosition,
    ServerEvent,
    Typing,
    Welcome,
)
from ._ids import IdSource
from ._names import dm_room, dm_users, is_valid_name, is_valid_room
from ._room import Room
from ._session import (
    NO_OFFSETS,
    NO_ROOMS,
    Catchup,
    Connection,
    PendingSend,
    Session,
    SessionInput,
    SessionState,
    TokenBucket,
    next_state,
)
from ._timers import TimerKind, Timers

__all__ = ["Engine", "RoomView", "SessionInfo"]

_In = SessionInput

_GOODBYE = frozenset((CloseCode.NORMAL, 1005))
"""Close codes of a client that is done: 1000, or a close frame without a code,
which transports report as 1005 (websocat sends one on quit). No grace period."""


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


@dataclass(slots=True)
class _PendingPage:
    session: Session
    room: str
    before: int


def _admits(room: Room, user: str, action: Action) -> bool:
    """The access rule (``_access``) asked with what the engine holds of the room."""
    verdict = room_access(user, action, room.name, private=room.private, allow=room.allow)
    return verdict is Access.ALLOWED


class Engine:
    """The sans-IO chat engine. See the module docstring and docs/engine.md."""

    def __init__(self, config: Config, ids: IdSource) -> None:
        self.config = config
        self._ids = ids
        self._conns: dict[ConnId, Connection] = {}
        self._sessions: dict[str, Session] = {}  # by resume token
        self._by_id: dict[str, Session] = {}
        self._by_user: dict[str, dict[str, Session]] = {}
        self._rooms: dict[str, Room] = {}
        self._loading: dict[str, list[tuple[Session, ClientRequest | None]]] = {}
        self._wanted: dict[str, int] = {}  # rooms sessions wait for before their welcome
        self._pending: dict[int, PendingSend] = {}
        self._pages: dict[int, _PendingPage] = {}
        self._catchups: dict[int, tuple[Connection, str, int]] = {}
        self._gaps: dict[int, str] = {}
        self._inboxes: dict[int, Session] = {}  # LoadInbox ref -> the session waiting
        self._ref = 0
        self._timers = Timers()
        self._closing = False
        self._now = 0.0
        self._soft_frames = max(1, config.outbox_frames // 2)
        self._soft_bytes = max(1, config.outbox_bytes // 2)

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
        self._now = now
        match command:
            case Receive():
                if (conn := self._conns.get(command.conn)) is not None:
                    conn.last_seen = now
                    self._receive(conn, command.text, now, out)
            case (
                Send()
                | Join()
                | Leave()
                | StartTyping()
                | MarkRead()
                | FetchHistory()
                | SendDirect()
            ):
                if (conn := self._conns.get(command.conn)) is not None:
                    conn.last_seen = now
                    self._request(conn.session, command, now, out)
            case Written():
                self._written(((command.conn, command.frames, command.nbytes),), out)
            case WrittenMany():
                self._written(command.reports, out)
            case Drained():
                self._drained(command.conns, out)
            case Appended():
                self._appended(command, now, out)
            case Connect():
                self._connect(command, now, out)
            case Disconnected():
                gone = self._conns.get(command.conn)
                if gone is not None:  # None: the engine closed it already
                    session = gone.session
                    self._drop(gone, out)
                    if command.code in _GOODBYE and session.state is SessionState.DETACHED:
                        self._expire(session, now, out)  # closed on purpose: no grace
            case Pong():
                if (conn := self._conns.get(command.conn)) is not None:
                    conn.last_seen = now
            case RoomLoaded():
                self._room_loaded(command, now, out)
            case RoomLoadFailed():
                self._room_failed(command, now, out)
            case AppendFailed():
                pending = self._pending.pop(command.ref, None)
                if pending is not None:
                    self._error(
                        pending.session,
                        ErrorCode.UNAVAILABLE,
                        f"message not stored: {command.reason}",
                        pending.client_id,
                        out,
                    )
            case HistoryLoaded():
                self._history_loaded(command, out)
            case HistoryFailed():
                self._history_failed(command, now, out)
            case InboxLoaded():
                self._inbox_loaded(command.ref, command.rooms, now, out)
            case InboxFailed():
                self._inbox_loaded(command.ref, (), now, out)
            case CreateRoom():
                self._create_room(command, out)
            case Publish():
                self._publish_for_host(command, now, out)
            case Shutdown():
                self._shutdown(now, out)
            case _:
                assert_never(command)
        return out

    def next_deadline(self) -> float | None:
        """The absolute time at which :meth:`tick` next has work, or None."""
        timers = self._timers
        while (entry := timers.peek()) is not None:
            if self._timer_live(entry[2], entry[3], entry[4]):
                return entry[0]
            timers.pop()
        return None

    def tick(self, now: float) -> list[Effect]:
        """Run every timer due at or before ``now``."""
        out: list[Effect] = []
        self._now = now
        timers = self._timers
        while (entry := timers.peek()) is not None and entry[0] <= now:
            timers.pop()
            _, _, kind, key, gen = entry
            if not self._timer_live(kind, key, gen):
                continue
            match kind:
                case TimerKind.PING:
                    key.ping_sent = now
                    out.append(Ping(conn=key.id))
                    timers.push(now + self.config.pong_timeout, TimerKind.PONG_DEADLINE, key, now)
                case TimerKind.PONG_DEADLINE:
                    if key.last_seen >= gen:
                        timers.push(gen + self.config.ping_interval, TimerKind.PING, key, None)
                    else:
                        out.append(
                            Close(
                                conn=key.id,
                                code=CloseCode.HEARTBEAT_TIMEOUT,
                                reason="heartbeat timeout",
                            )
                        )
                        self._drop(key, out)
                case TimerKind.GRACE:
                    self._expire(key, now, out)
                case TimerKind.TYPING:
                    room, user = key
                    until = room.typing[user][0]
                    if until > now:  # refreshed since: one timer per indicator, moved on
                        timers.push(until, TimerKind.TYPING, key, gen)
                        continue
                    del room.typing[user]
                    self._broadcast(
                        room,
                        Typing(room=room.name, user=user, active=False),
                        None,
                        out,
                        ephemeral=True,
                        skip_user=user,
                    )
        return out

    def _timer_live(self, kind: TimerKind, key: object, gen: object) -> bool:
        if kind is TimerKind.PING or kind is TimerKind.PONG_DEADLINE:
            assert isinstance(key, Connection)
            return self._conns.get(key.id) is key
        if kind is TimerKind.GRACE:
            assert isinstance(key, Session)
            return key.state is SessionState.DETACHED and key.detach_gen == gen
        room, user = cast(tuple[Room, str], key)
        live = room.typing.get(user)
        return self._rooms.get(room.name) is room and live is not None and live[1] == gen

    # -- read-only views ---------------------------------------------------------

    def session(self, session_id: str) -> SessionInfo | None:
        s = self._by_id.get(session_id)
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
        c = self._conns.get(conn)
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
            )
            for name, room in self._rooms.items()
            if include_private or not room.private
        }

    def members(self, room: str) -> tuple[str, ...]:
        r = self._rooms.get(room)
        return () if r is None else r.member_list()

    def outbox(self, conn: ConnId) -> tuple[int, int]:
        """(frames, bytes) handed out to ``conn`` and not yet reported written."""
        c = self._conn(conn)
        return c.frames, c.nbytes

    @property
    def connections(self) -> int:
        return len(self._conns)

    def stats(self) -> dict[str, int]:
        """Sizes of everything the engine holds, for metrics and memory checks."""
        return {
            "connections": len(self._conns),
            "sessions": len(self._by_id),
            "rooms": len(self._rooms),
            "timers": self._timers.size(),
            "pending_appends": len(self._pending),
            "pending_loads": (
                len(self._loading) + len(self._pages) + len(self._catchups) + len(self._inboxes)
            ),
            "messages_in_memory": sum(len(r.window) for r in self._rooms.values()),
        }

    # -- connecting -------------------------------------------------------------

    def _conn(self, conn_id: ConnId) -> Connection:
        conn = self._conns.get(conn_id)
        if conn is None:
            raise LocalProtocolError(f"no open connection {conn_id!r}")
        return conn

    def _connect(self, cmd: Connect, now: float, out: list[Effect]) -> None:
        if cmd.conn in self._conns:
            raise LocalProtocolError(f"connection {cmd.conn!r} is already open")
        if self._closing:
            out.append(Close(conn=cmd.conn, code=CloseCode.GOING_AWAY, reason="going away"))
            return
        if not is_valid_name(cmd.user):
            out.append(
                Close(conn=cmd.conn, code=CloseCode.POLICY_VIOLATION, reason="invalid user name")
            )
            return
        session = self._sessions.get(cmd.resume) if cmd.resume else None
        if (
            session is not None
            and session.user == cmd.user
            and session.state in (SessionState.LIVE, SessionState.DETACHED, SessionState.RESUMING)
        ):
            old = session.conn
            session.state = next_state(session.state, _In.RESUME)
            if old is not None:
                self._detach_conn(old)
                out.append(
                    Close(
                        conn=old.id,
                        code=CloseCode.NORMAL,
                        reason="session resumed on another connection",
                    )
                )
            session.resumed = True
            session.offsets = {r: o for r, o in cmd.offsets.items() if r in session.rooms}
        else:
            mine = self._by_user.get(cmd.user, {})
            if len(mine) >= self.config.max_sessions_per_user:
                # Make room by ending the oldest session waiting out its grace period.
                oldest = next((s for s in mine.values() if s.state is SessionState.DETACHED), None)
                if oldest is None:
                    out.append(
                        Close(
                            conn=cmd.conn,
                            code=CloseCode.POLICY_VIOLATION,
                            reason="too many sessions",
                        )
                    )
                    return
                self._expire(oldest, now, out)
            session = Session(
                self._ids.session_id(),
                self._ids.resume_token(),
                cmd.user,
                TokenBucket(self.config.rate_burst, now),
                TokenBucket(self.config.request_burst, now),
            )
            self._sessions[session.token] = session
            self._by_id[session.id] = session
            self._by_user.setdefault(cmd.user, {})[session.id] = session
        conn = Connection(cmd.conn, session, cmd.mode, now)
        self._conns[cmd.conn] = conn
        session.conn = conn
        session.backlog = []
        self._release_wanted(session)
        session.wanted = [r for r in dict.fromkeys(cmd.rooms) if r not in session.rooms]
        for name in session.wanted:
            self._wanted[name] = self._wanted.get(name, 0) + 1
        session.text_room = next(iter(session.rooms), None) or next(iter(session.wanted), None)
        self._timers.push(now + self.config.ping_interval, TimerKind.PING, conn, None)
        session.waiting = (
            frozenset(r for r in session.wanted if is_valid_room(r) and r not in self._rooms)
            or NO_ROOMS
        )
        if not session.resumed and self.config.dm_inbox:
            limit = self.config.max_rooms_per_session - len(session.wanted)
            if limit > 0:
                self._ref += 1
                session.inbox = self._ref
                self._inboxes[self._ref] = session
                out.append(LoadInbox(ref=self._ref, user=session.user, limit=limit))
        for room in session.wanted:  # in the client's order: effects are deterministic
            if room in session.waiting:
                self._await_room(room, session, None, out)
        self._maybe_ready(session, now, out)

    def _maybe_ready(self, session: Session, now: float, out: list[Effect]) -> None:
        """Welcome a connecting session once its rooms and its inbox are loaded."""
        if (
            not session.waiting
            and session.inbox is None
            and session.state in (SessionState.OPENING, SessionState.RESUMING)
        ):
            self._ready(session, now, out)

    def _inbox_loaded(
        self, ref: int, rooms: tuple[str, ...], now: float, out: list[Effect]
    ) -> None:
        """Add the direct-message rooms the log found to those the session asked for."""
        session = self._inboxes.pop(ref, None)
        if session is None or session.inbox != ref:
            return  # an answer nobody waits for any more
        session.inbox = None
        limit = self.config.max_rooms_per_session - len(session.wanted)
        added = [
            r
            for r in dict.fromkeys(rooms)
            if (pair := dm_users(r)) is not None
            and session.user in pair
            and r not in session.wanted
        ][: max(limit, 0)]
        session.wanted = session.wanted + added
        for name in added:
            self._wanted[name] = self._wanted.get(name, 0) + 1
        loading = [r for r in added if r not in self._rooms]
        if loading:
            session.waiting = session.waiting.union(loading)
            for name in loading:
                self._await_room(name, session, None, out)
        self._maybe_ready(session, now, out)

    def _ready(self, session: Session, now: float, out: list[Effect]) -> None:
        conn = session.conn
        assert conn is not None
        session.state = next_state(session.state, _In.READY)
        later: list[Effect] = []
        for room_name in session.wanted:
            self._join(session, room_name, later, quiet=True)
        self._release_wanted(session)
        # Where this connection's stream starts per room: everything after it follows.
        starts = {}
        for name in session.rooms:
            head = self._rooms[name].head
            start = head
            if session.resumed:
                start = session.offsets.get(name, session.delivered.get(name, head))
                start = min(max(start, 0), head)
            starts[name] = start
        rooms = {
            name: RoomPosition(
                offset=start,
                epoch=self._rooms[name].epoch,
                read=self._rooms[name].reads.get(session.user, 0),
            )
            for name, start in starts.items()
        }
        self._to(
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
        out.extend(later)
        for name, start in starts.items():
            room = self._rooms[name]
            self._send_members(conn, room, out, start)
            if session.conn is not conn:
                return  # closed as a slow consumer
            if start < room.head:
                conn.catchup[name] = Catchup(start + 1)
            else:
                room.attach(conn)
        session.offsets = NO_OFFSETS
        if conn.catchup:
            self._pump(conn, out)
        backlog, session.backlog = session.backlog, []
        for request in backlog:
            if session.conn is not conn:
                break
            self._request(session, request, now, out)

    def _await_room(
        self, name: str, session: Session, request: ClientRequest | None, out: list[Effect]
    ) -> None:
        waiters = self._loading.get(name)
        if waiters is None:
            self._loading[name] = [(session, request)]
            out.append(LoadRoom(room=name, recent=self.config.history_window))
        else:
            waiters.append((session, request))

    def _room_loaded(self, cmd: RoomLoaded, now: float, out: list[Effect]) -> None:
        waiters = self._loading.pop(cmd.room, None)
        if waiters is None or cmd.room in self._rooms:
            return  # an answer nobody waits for any more
        private, allow = room_rule(cmd.room, private=cmd.private, allow=cmd.allow)
        room = Room(
            cmd.room,
            epoch=cmd.epoch,
            head=cmd.head,
            private=private,
            allow=allow,
            window=self.config.history_window,
            recent=cmd.recent,
        )
        self._rooms[cmd.room] = room
        for session, request in waiters:
            if request is None:
                session.waiting = session.waiting.difference((cmd.room,)) or NO_ROOMS
                self._maybe_ready(session, now, out)
            elif session.state is SessionState.LIVE:
                self._dispatch(session, request, now, out)  # its token was taken already
        self._forget_if_empty(room)

    def _written(self, reports: tuple[tuple[ConnId, int, int], ...], out: list[Effect]) -> None:
        for _, frames, nbytes in reports:
            if frames < 0 or nbytes < 0:
                raise LocalProtocolError("Written counts must not be negative")
        get = self._conns.get
        for conn_id, frames, nbytes in reports:
            if (conn := get(conn_id)) is not None:
                left = conn.frames - frames
                conn.frames = left if left > 0 else 0
                left = conn.nbytes - nbytes
                conn.nbytes = left if left > 0 else 0
                if conn.catchup:
                    self._pump(conn, out)

    def _drained(self, conn_ids: tuple[ConnId, ...], out: list[Effect]) -> None:
        get = self._conns.get
        for conn_id in conn_ids:
            if (conn := get(conn_id)) is not None:
                conn.frames = conn.nbytes = 0
                if conn.catchup:
                    self._pump(conn, out)

    def _room_failed(self, cmd: RoomLoadFailed, now: float, out: list[Effect]) -> None:
        waiters = self._loading.pop(cmd.room, None)
        for session, request in waiters or ():
            if request is not None:
                self._error(
                    session,
                    ErrorCode.UNAVAILABLE,
                    f"room {cmd.room} unavailable: {cmd.reason}",
                    cmd.room,
                    out,
                )
            elif cmd.room in session.waiting:
                session.waiting = session.waiting.difference((cmd.room,)) or NO_ROOMS
                self._maybe_ready(session, now, out)

    def _release_wanted(self, session: Session) -> None:
        """The session no longer holds the rooms it asked for at connect in memory."""
        for name in session.wanted:
            count = self._wanted[name] - 1
            if count:
                self._wanted[name] = count
            else:
                del self._wanted[name]
                if (room := self._rooms.get(name)) is not None:
                    self._forget_if_empty(room)
        session.wanted = []

    def _forget_if_empty(self, room: Room) -> None:
        if not room.users and room.name not in self._wanted and self._rooms.get(room.name) is room:
            del self._rooms[room.name]

    # -- requests from clients ------------------------------------------------------

    def _receive(self, conn: Connection, text: str, now: float, out: list[Effect]) -> None:
        session = conn.session
        if len(text) > self.config.max_frame_bytes:
            self._refuse(session, ErrorCode.TOO_LARGE, "frame too large", None, now, out)
            return
        request: ClientRequest
        if conn.mode is Mode.TEXT:
            room = session.text_room
            if room is None:
                self._refuse(session, ErrorCode.NOT_MEMBER, "join a room first", None, now, out)
                return
            request = Send(conn=conn.id, room=room, text=decode_line(text))
        else:
            try:
                request = decode_request(conn.id, text)
            except FrameError as exc:
                self._refuse(session, exc.code, exc.message, exc.ref, now, out)
                return
        self._request(session, request, now, out)

    def _request(
        self, session: Session, request: ClientRequest, now: float, out: list[Effect]
    ) -> None:
        state = next_state(session.state, _In.FRAME)
        if state is not SessionState.LIVE:
            if len(session.backlog) >= self.config.max_pending_frames:
                self._error(
                    session,
                    ErrorCode.RATE_LIMITED,
                    "too many frames before welcome",
                    _ref_of(session.user, request),
                    out,
                )
            else:
                session.backlog.append(request)
            return
        if not self._over_rate(session, _ref_of(session.user, request), now, out):
            self._dispatch(session, request, now, out)

    def _dispatch(
        self, session: Session, request: ClientRequest, now: float, out: list[Effect]
    ) -> None:
        """Carry out a request of a live session whose token is paid."""
        match request:
            case Send():
                self._send(session, request.room, request.text, request.client_id, now, out)
            case SendDirect():
                self._send_direct(session, request, now, out)
            case Join():
                self._join_request(session, request, out)
            case Leave():
                self._leave(session, request.room, out)
            case StartTyping():
                self._typing(session, request.room, now, out)
            case MarkRead():
                self._mark_read(session, request.room, request.offset, out)
            case FetchHistory():
                self._fetch_history(session, request, out)
            case _:
                assert_never(request)

    def _refuse(
        self,
        session: Session,
        code: ErrorCode,
        message: str,
        ref: str | None,
        now: float,
        out: list[Effect],
    ) -> None:
        """A frame that is no request still costs a request: a flood of them is limited."""
        if not self._over_rate(session, ref, now, out):
            self._error(session, code, message, ref, out)

    def _over_rate(self, session: Session, ref: str | None, now: float, out: list[Effect]) -> bool:
        """Take one request token; without one, answer ``rate_limited`` and say so."""
        wait = session.requests.take(now, self.config.request_burst, self.config.request_per_second)
        if wait:
            self._error(
                session,
                ErrorCode.RATE_LIMITED,
                "too many requests",
                ref,
                out,
                retry_after=round(wait, 3),
            )
        return bool(wait)

    def _member_room(self, session: Session, name: str, ref: str, out: list[Effect]) -> Room | None:
        """The room if the session is in it; else an error to the client and None."""
        if name in session.rooms:
            return self._rooms[name]
        if self._check_room_name(session, name, out):
            self._error(session, ErrorCode.NOT_MEMBER, f"not in room {name}", ref, out)
        return None

    def _check_room_name(self, session: Session, room: str, out: list[Effect]) -> bool:
        if is_valid_room(room):
            return True
        self._error(
            session,
            ErrorCode.INVALID_NAME,
            "room names are 1-64 characters of A-Z a-z 0-9 _ - .",
            room[:64],
            out,
        )
        return False

    def _send(
        self,
        session: Session,
        room_name: str,
        text: str,
        client_id: str | None,
        now: float,
        out: list[Effect],
    ) -> None:
        ref_name = client_id if client_id is not None else room_name[:64]
        room = self._member_room(session, room_name, ref_name, out)
        if room is None:
            return
        if not _admits(room, session.user, Action.SEND):  # members were admitted: never, today
            self._error(
                session, ErrorCode.FORBIDDEN, f"not allowed in room {room_name}", ref_name, out
            )
            return
        if not text:
            self._error(session, ErrorCode.INVALID_FIELD, "text must not be empty", ref_name, out)
            return
        try:
            nbytes = len(text.encode())
        except UnicodeEncodeError:
            self._error(
                session, ErrorCode.INVALID_FIELD, "text is not valid Unicode", ref_name, out
            )
            return
        if nbytes > self.config.max_text_bytes:
            self._error(
                session,
                ErrorCode.TOO_LARGE,
                f"text over {self.config.max_text_bytes} bytes",
                ref_name,
                out,
            )
            return
        wait = session.bucket.take(now, self.config.rate_burst, self.config.rate_per_second)
        if wait:
            self._error(
                session,
                ErrorCode.RATE_LIMITED,
                "sending too fast",
                ref_name,
                out,
                retry_after=round(wait, 3),
            )
            return
        self._ref += 1
        self._pending[self._ref] = PendingSend(session, room_name, client_id)
        out.append(
            Append(
                ref=self._ref,
                room=room_name,
                sender=session.user,
                text=text,
                ts=int(now * 1000),
                client_id=client_id,
            )
        )

    def _send_direct(
        self, session: Session, request: SendDirect, now: float, out: list[Effect]
    ) -> None:
        if not is_valid_name(request.to):
            self._error(session, ErrorCode.INVALID_NAME, "no such user name", request.to[:64], out)
            return
        name = dm_room(session.user, request.to)
        room = self._rooms.get(name)
        if room is None:
            self._await_room(name, session, request, out)
            return
        for s in (session, *self._by_user.get(request.to, {}).values()):
            if (
                name not in s.rooms
                and s.state is not SessionState.CLOSED
                and (s is session or len(s.rooms) < self.config.max_rooms_per_session)
            ):
                self._add_member(s, room, out, announce=True)
        self._send(session, name, request.text, request.client_id, now, out)

    def _join_request(self, session: Session, request: Join, out: list[Effect]) -> None:
        if not self._check_room_name(session, request.room, out):
            return
        if request.room not in self._rooms and request.room not in session.rooms:
            self._await_room(request.room, session, request, out)
            return
        self._join(session, request.room, out, quiet=False)

    def _join(self, session: Session, name: str, out: list[Effect], *, quiet: bool) -> None:
        """Join a loaded room. ``quiet``: during connect, the welcome tells the rest."""
        if not self._check_room_name(session, name, out):
            return
        room = self._rooms.get(name)
        if room is None:  # the log could not load it
            self._error(session, ErrorCode.UNAVAILABLE, f"room {name} unavailable", name, out)
            return
        conn = session.conn
        assert conn is not None
        if name in session.rooms:  # joining again: the member list again
            self._send_members(conn, room, out)
            return
        if not _admits(room, session.user, Action.JOIN):
            self._error(session, ErrorCode.FORBIDDEN, f"not allowed in room {name}", name, out)
            self._forget_if_empty(room)
            return
        if len(session.rooms) >= self.config.max_rooms_per_session:
            self._error(
                session,
                ErrorCode.ROOM_LIMIT,
                f"at most {self.config.max_rooms_per_session} rooms per session",
                name,
                out,
            )
            self._forget_if_empty(room)
            return
        self._add_member(session, room, out, announce=not quiet)

    def _add_member(
        self, session: Session, room: Room, out: list[Effect], *, announce: bool
    ) -> None:
        session.rooms[room.name] = None
        if session.text_room is None:
            session.text_room = room.name
        if room.add_user(session.user) and len(room.users) <= self.config.presence_limit:
            self._broadcast(
                room, Joined(room=room.name, user=session.user), None, out, ephemeral=True
            )
        conn = session.conn
        if conn is not None and session.state is SessionState.LIVE:
            room.attach(conn)
            if announce:
                self._send_members(conn, room, out)
        else:
            session.delivered[room.name] = room.head

    def _leave(self, session: Session, name: str, out: list[Effect]) -> None:
        room = self._member_room(session, name, name[:64], out)
        if room is None:
            return
        self._remove_member(session, room, out)
        if session.text_room == name:
            session.text_room = next(iter(session.rooms), None)

    def _remove_member(self, session: Session, room: Room, out: list[Effect]) -> None:
        del session.rooms[room.name]
        if session.conn is not None:
            room.detach(session.conn)
            session.conn.catchup.pop(room.name, None)
        if room.remove_user(session.user):
            room.typing.pop(session.user, None)
            if len(room.users) < self.config.presence_limit:
                self._broadcast(
                    room, Left(room=room.name, user=session.user), None, out, ephemeral=True
                )
        if session.conn is not None and session.state is SessionState.LIVE:
            self._to(session.conn, Left(room=room.name, user=session.user), out)
        self._forget_if_empty(room)

    def _typing(self, session: Session, name: str, now: float, out: list[Effect]) -> None:
        room = self._member_room(session, name, name[:64], out)
        if room is None:
            return
        until = now + self.config.typing_ttl
        previous = room.typing.get(session.user)
        if previous is None:
            self._ref += 1
            room.typing[session.user] = (until, self._ref)
            self._timers.push(until, TimerKind.TYPING, (room, session.user), self._ref)
        else:
            room.typing[session.user] = (until, previous[1])
        # A refresh within half the lifetime extends the indicator silently.
        if previous is None or previous[0] - now < self.config.typing_ttl / 2:
            self._broadcast(
                room,
                Typing(room=name, user=session.user),
                None,
                out,
                ephemeral=True,
                skip_user=session.user,
            )

    def _mark_read(self, session: Session, name: str, offset: int, out: list[Effect]) -> None:
        room = self._member_room(session, name, name[:64], out)
        if room is None:
            return
        offset = min(offset, room.head)
        if offset <= room.reads.get(session.user, 0):
            return
        room.reads[session.user] = offset
        self._broadcast(
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

    def _fetch_history(self, session: Session, request: FetchHistory, out: list[Effect]) -> None:
        name = request.room
        if not self._check_room_name(session, name, out):
            return
        room = self._rooms.get(name)
        if room is None:
            self._await_room(name, session, request, out)
            return
        if not _admits(room, session.user, Action.READ):
            self._error(session, ErrorCode.FORBIDDEN, f"not allowed in room {name}", name, out)
            self._forget_if_empty(room)
            return
        limit = min(request.limit, self.config.history_page_max)
        before = room.head + 1 if request.before is None else min(request.before, room.head + 1)
        first = max(1, before - limit)
        if first >= room.window_start() or before <= 1:
            page = room.window_slice(first, before - 1)
            assert session.conn is not None
            self._to(session.conn, History(room=name, messages=tuple(page), more=first > 1), out)
            self._forget_if_empty(room)
            return
        self._ref += 1
        self._pages[self._ref] = _PendingPage(session, name, before)
        out.append(LoadHistory(ref=self._ref, room=name, after=0, before=before, limit=limit))

    # -- the log's answers ------------------------------------------------------------

    def _appended(self, cmd: Appended, now: float, out: list[Effect]) -> None:
        message = cmd.message
        pending = self._pending.pop(cmd.ref, None) if cmd.ref is not None else None
        room = self._rooms.get(message.room)
        if cmd.duplicate or room is None:
            if pending is not None:
                self._ack(pending, message.offset, out)
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
                self._ack(pending, message.offset, out)
            return
        if message.offset > head + 1:
            room.early[message.offset] = (message, pending)
            if len(room.early) > self.config.history_window:
                # The gap has not been filled for a whole window: give it up.
                room.head = min(room.early) - 1
                self._drain_early(room, out)
                return
            if room.gap_ref is None:
                self._ref += 1
                room.gap_ref = self._ref
                self._gaps[self._ref] = room.name
                out.append(
                    LoadHistory(ref=self._ref, room=room.name, after=head, before=message.offset)
                )
            return
        self._publish(room, message, pending, out)
        self._drain_early(room, out)

    def _drain_early(self, room: Room, out: list[Effect]) -> None:
        """Publish held-back messages that are next in line."""
        while (nxt := room.early.pop(room.head + 1, None)) is not None:
            self._publish(room, nxt[0], nxt[1], out)

    def _publish(
        self, room: Room, message: Message, pending: PendingSend | None, out: list[Effect]
    ) -> None:
        room.head = message.offset
        room.window.append(message)
        sender_conn: Connection | None = None
        if pending is not None:
            sender_conn = self._ack(pending, message.offset, out)
        if room.typing:
            room.typing.pop(message.sender, None)
        self._broadcast(
            room, message, None if self.config.echo else sender_conn, out, ephemeral=False
        )

    def _ack(self, pending: PendingSend, offset: int, out: list[Effect]) -> Connection | None:
        conn = pending.session.conn
        if conn is None or pending.session.state is not SessionState.LIVE:
            return None
        self._to(conn, Ack(room=pending.room, offset=offset, client_id=pending.client_id), out)
        return conn

    def _history_loaded(self, cmd: HistoryLoaded, out: list[Effect]) -> None:
        page = self._pages.pop(cmd.ref, None)
        if page is not None:
            conn = page.session.conn
            if conn is not None and page.session.state is SessionState.LIVE:
                msgs = tuple(m for m in cmd.messages if m.offset < page.before)
                self._to(
                    conn,
                    History(room=page.room, messages=msgs, more=bool(msgs) and msgs[0].offset > 1),
                    out,
                )
            room = self._rooms.get(page.room)
            if room is not None:
                self._forget_if_empty(room)
            return
        target = self._catchups.pop(cmd.ref, None)
        if target is not None:
            conn, name, before = target
            catchup = conn.catchup.get(name)
            if catchup is not None and catchup.loading == cmd.ref:
                catchup.loading = None
                catchup.lost_below = before
                catchup.loaded.extend(m for m in cmd.messages if m.offset >= catchup.next)
                self._pump(conn, out)
            return
        name_or_none = self._gaps.pop(cmd.ref, None)
        if name_or_none is not None:
            room = self._rooms.get(name_or_none)
            if room is not None and room.gap_ref == cmd.ref:
                room.gap_ref = None
                for m in cmd.messages:
                    if m.offset == room.head + 1 and m.epoch == room.epoch:
                        self._publish(room, m, None, out)
                self._drain_early(room, out)
                if room.early:
                    # What the log does not have is lost for good: move past it.
                    room.head = min(room.early) - 1
                    self._drain_early(room, out)

    def _history_failed(self, cmd: HistoryFailed, now: float, out: list[Effect]) -> None:
        page = self._pages.pop(cmd.ref, None)
        if page is not None:
            self._error(
                page.session,
                ErrorCode.UNAVAILABLE,
                f"history not available: {cmd.reason}",
                page.room,
                out,
            )
            return
        target = self._catchups.pop(cmd.ref, None)
        if target is not None:
            conn = target[0]
            if self._conns.get(conn.id) is conn:
                # Never a partial replay: the client resumes again later.
                out.append(
                    Close(
                        conn=conn.id, code=CloseCode.TRY_AGAIN_LATER, reason="history unavailable"
                    )
                )
                self._drop(conn, out)
            return
        name = self._gaps.pop(cmd.ref, None)
        if name is not None and (room := self._rooms.get(name)) is not None:
            room.gap_ref = None

    # -- replay ---------------------------------------------------------------------

    def _pump(self, conn: Connection, out: list[Effect]) -> None:
        """Replay missed messages while the connection's outbox has room."""
        for name in list(conn.catchup):
            room = self._rooms[name]
            catchup = conn.catchup[name]
            while True:
                if conn.frames >= self._soft_frames or conn.nbytes >= self._soft_bytes:
                    return
                n = catchup.next
                if n > room.head:
                    del conn.catchup[name]
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
                        self._ref += 1
                        catchup.loading = self._ref
                        self._catchups[self._ref] = (conn, name, start)
                        out.append(LoadHistory(ref=self._ref, room=name, after=n - 1, before=start))
                    break
                catchup.next = n + 1
                own = catchup.own
                if own is not None and n in own:
                    own.discard(n)  # sent on this connection: it had the ack
                    continue
                self._to(conn, message, out)
                if self._conns.get(conn.id) is not conn:
                    return

    # -- delivery ---------------------------------------------------------------------

    def _send_members(
        self, conn: Connection, room: Room, out: list[Effect], offset: int | None = None
    ) -> None:
        """The member list, encoded once per room until members or head change."""
        event, data = room.members(room.head if offset is None else offset)
        self._to(conn, event, out, data)

    def _error(
        self,
        session: Session,
        code: ErrorCode,
        message: str,
        ref: str | None,
        out: list[Effect],
        *,
        retry_after: float | None = None,
    ) -> None:
        if session.conn is not None:
            self._to(
                session.conn,
                ErrorEvent(code=code.value, message=message, ref=ref, retry_after=retry_after),
                out,
            )

    def _to(
        self, conn: Connection, event: ServerEvent, out: list[Effect], encoded: str | None = None
    ) -> None:
        """Send one event to one connection, within its outbox bounds.

        ``encoded`` is the event's JSON when the caller has it already.
        """
        if conn.mode is Mode.JSON:
            data = encoded if encoded is not None else encode_json(event)
        else:
            line = encode_text(event)
            if line is None:
                return
            data = line
        size = len(data.encode())
        if (
            conn.frames >= self.config.outbox_frames
            or conn.nbytes + size > self.config.outbox_bytes
        ):
            self._slow(conn, out)
            return
        conn.frames += 1
        conn.nbytes += size
        out.append(Deliver(to=(conn.id,), event=event, data=data, size=size))

    def _broadcast(
        self,
        room: Room,
        event: ServerEvent,
        skip: Connection | None,
        out: list[Effect],
        *,
        ephemeral: bool,
        skip_user: str | None = None,
    ) -> None:
        """Fan one event out to the room's live connections: encoded once per mode.

        Past half its outbox a connection is lagging: ephemeral events are
        dropped for it, and a chat message puts it behind (see ``_fall_behind``)
        rather than being queued, so that however many messages the room
        produces at once, no connection holds more than its outbox of them.
        """
        max_frames, max_bytes = self._soft_frames, self._soft_bytes
        overflow: list[Connection] = []
        for conns, encode in ((room.conns, encode_json), (room.text_conns, encode_text)):
            if not conns:
                continue
            data = encode(event)
            if not data:
                continue  # nothing to show in plain-text mode
            size = len(data.encode())
            to: list[ConnId] = []
            # The hot loop of every chat message: a few attribute reads and adds per member.
            for conn in conns.values():
                if conn.frames < max_frames and conn.nbytes + size <= max_bytes:
                    if conn is skip or (skip_user is not None and conn.session.user == skip_user):
                        continue
                    conn.frames += 1
                    conn.nbytes += size
                    to.append(conn.id)
                elif not ephemeral and conn is not skip:
                    overflow.append(conn)
            if to:
                out.append(Deliver(to=tuple(to), event=event, data=data, size=size))
        if ephemeral:
            return
        offset = cast(Message, event).offset
        for conn in overflow:
            self._fall_behind(conn, room, offset)
        if skip is not None and (catchup := skip.catchup.get(room.name)) is not None:
            # The sender is itself catching up: its replay must not echo this back.
            if catchup.own is None:
                catchup.own = set()
            catchup.own.add(offset)
        if room.behind:
            self._give_up_far_behind(room, out)

    def _fall_behind(self, conn: Connection, room: Room, offset: int) -> None:
        """Stop the live fan-out to ``conn`` in ``room``: it replays from ``offset``.

        The messages it has not been handed wait in the room's window, which
        every member shares, instead of in its own outbox; ``_pump`` hands
        them out as the adapter reports writes, and puts the connection back
        on the live fan-out once it has caught up. A burst that fills a
        reader's outbox in one go therefore costs it nothing if it reads on.
        """
        room.detach(conn)
        room.behind[conn.id] = conn
        conn.catchup[room.name] = Catchup(offset)

    def _give_up_far_behind(self, room: Room, out: list[Effect]) -> None:
        """Close, as too slow, connections the room's window has moved past.

        A reader is judged by what it fails to read: one that has not taken
        a whole window of messages since it fell behind (its outbox still full,
        the rest no longer in memory) is closed with 1013 and resumes from the
        log. What it held meanwhile was its outbox and a cursor.
        """
        start = room.window_start()
        name = room.name
        far = [c for c in room.behind.values() if c.catchup[name].next < start]
        for conn in far:
            if self._conns.get(conn.id) is conn:
                self._slow(conn, out)

    def _slow(self, conn: Connection, out: list[Effect]) -> None:
        out.append(Close(conn=conn.id, code=CloseCode.TRY_AGAIN_LATER, reason="slow consumer"))
        # The grace period starts now; the client resumes from its last offset.
        self._drop(conn, out)

    # -- losing connections and sessions ---------------------------------------------------

    def _detach_conn(self, conn: Connection) -> None:
        """Forget a connection; record how far its session had been sent."""
        session = conn.session
        del self._conns[conn.id]
        session.conn = None
        for name in session.rooms:
            room = self._rooms[name]
            room.detach(conn)
            catchup = conn.catchup.get(name)
            session.delivered[name] = room.head if catchup is None else catchup.next - 1
        conn.catchup.clear()

    def _drop(self, conn: Connection, out: list[Effect]) -> None:
        session = conn.session
        self._detach_conn(conn)
        self._release_wanted(session)
        session.state = next_state(session.state, _In.DROP)
        if session.state is SessionState.CLOSED:
            self._end(session, out)
            return
        session.detach_gen += 1
        self._timers.push(
            self._now + self.config.grace_period, TimerKind.GRACE, session, session.detach_gen
        )

    def _expire(self, session: Session, now: float, out: list[Effect]) -> None:
        session.state = next_state(session.state, _In.EXPIRE)
        self._end(session, out)

    def _end(self, session: Session, out: list[Effect]) -> None:
        """A session is over: save where it stood, leave its rooms."""
        self._release_wanted(session)
        if session.inbox is not None:
            del self._inboxes[session.inbox]
            session.inbox = None
        positions = []
        for name in session.rooms:
            room = self._rooms[name]
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
            self._remove_member(session, self._rooms[name], out)
        self._sessions.pop(session.token, None)
        self._by_id.pop(session.id, None)
        sessions = self._by_user[session.user]
        del sessions[session.id]
        if not sessions:
            del self._by_user[session.user]
        for ref in [r for r, p in self._pending.items() if p.session is session]:
            del self._pending[ref]

    def _create_room(self, cmd: CreateRoom, out: list[Effect]) -> None:
        if not is_valid_name(cmd.room):
            raise LocalProtocolError(f"invalid room name {cmd.room!r}")
        bad = [u for u in cmd.allow if not is_valid_name(u)]
        if bad:
            raise LocalProtocolError(f"invalid user names in allow list: {sorted(bad)!r}")
        out.append(SaveRoom(room=cmd.room, private=cmd.private, allow=cmd.allow))
        room = self._rooms.get(cmd.room)
        if room is None:
            return
        room.private, room.allow = cmd.private, cmd.allow
        for user in [u for u in room.users if not _admits(room, u, Action.JOIN)]:
            for session in list(self._by_user.get(user, {}).values()):
                if cmd.room in session.rooms:
                    self._remove_member(session, room, out)
                    self._error(
                        session,
                        ErrorCode.FORBIDDEN,
                        f"removed from private room {cmd.room}",
                        cmd.room,
                        out,
                    )

    def _publish_for_host(self, cmd: Publish, now: float, out: list[Effect]) -> None:
        if not is_valid_room(cmd.room) or not is_valid_name(cmd.sender):
            raise LocalProtocolError(f"invalid room or sender in {cmd!r}")
        if not cmd.text or len(cmd.text.encode()) > self.config.max_text_bytes:
            raise LocalProtocolError("Publish text must be non-empty and within max_text_bytes")
        self._ref += 1
        out.append(
            Append(
                ref=self._ref,
                room=cmd.room,
                sender=cmd.sender,
                text=cmd.text,
                ts=int(now * 1000),
                client_id=cmd.client_id,
            )
        )

    def _shutdown(self, now: float, out: list[Effect]) -> None:
        self._closing = True
        sessions = list(self._by_id.values())
        for conn in list(self._conns.values()):
            out.append(Close(conn=conn.id, code=CloseCode.GOING_AWAY, reason="going away"))
            self._detach_conn(conn)
        for session in sessions:
            session.state = next_state(session.state, _In.SHUTDOWN)
            self._end(session, out)
        self._timers.clear()


def _ref_of(user: str, request: ClientRequest) -> str | None:
    """What an error about ``request`` names: its client id, else its room."""
    match request:
        case Send() | SendDirect() if request.client_id is not None:
            return request.client_id
        case SendDirect():
            return dm_room(user, request.to) if is_valid_name(request.to) else request.to[:64]
        case _:
            return request.room[:64]
