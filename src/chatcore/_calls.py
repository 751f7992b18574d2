"""Calls: the signalling of one-to-one audio/video calls, as a state machine.

This module owns call records (keyed by call id), their states and deadlines,
the per-session call limits and signal bucket, and the signals held for a
session in its grace period. It knows sessions only by id and users only by
name; it owns no connection and never touches rooms, messages or the log: a
signal is relayed, never stored.

Every transition is in :data:`TRANSITIONS`, a complete ``(state, input) ->
(action, next state)`` table; :meth:`Calls._fire` is the one place that
applies it, and a pair missing from it raises :class:`LocalProtocolError`
(a bug, never a peer's doing). Who may call whom is :func:`room_access` on the
two users' direct-message room: users who may direct-message each other.

The engine calls :meth:`Calls.signal` for each call frame of a live session,
:meth:`Calls.session_ended` when a session is over, and :meth:`Calls.tick` at
:meth:`Calls.next_deadline`. Each returns :class:`Notify` values: an event
for one session, which the engine delivers if the session is live and else
hands back to :meth:`Calls.hold` (kept for ``call_signal_ttl`` seconds and
given out by :meth:`Calls.release` when the session resumes). Time comes in
as ``now``; nothing here reads a clock.
"""

from __future__ import annotations

import enum
import heapq
from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from ._access import Access, Action, room_access
from ._commands import CallSignal, SignalKind
from ._config import Config
from ._errors import ErrorCode, LocalProtocolError
from ._events import CallEvent, ErrorEvent, ServerEvent
from ._names import dm_room, is_valid_name
from ._session import TokenBucket

__all__ = [
    "TRANSITIONS",
    "CallAction",
    "CallInput",
    "CallState",
    "Calls",
    "Notify",
    "Transition",
]


class CallState(enum.Enum):
    IDLE = "idle"
    """No such call (yet): only a ring makes one."""
    RINGING = "ringing"
    """The callee's sessions ring; the caller's offer and candidates reach them all."""
    CONNECTING = "connecting"
    """One callee session answered: from now on only it and the caller's session."""
    ACTIVE = "active"
    """A side reported its peer connection up."""
    ENDED = "ended"
    """Final; the record is forgotten at once."""


class CallInput(enum.Enum):
    RING = "ring"
    CALLER_OFFER = "caller_offer"
    CALLER_ANSWER = "caller_answer"
    CALLER_CANDIDATE = "caller_candidate"
    CALLER_CONNECTED = "caller_connected"
    CALLER_DECLINE = "caller_decline"
    CALLER_BUSY = "caller_busy"
    CALLER_HANGUP = "caller_hangup"
    CALLER_GONE = "caller_gone"
    """The caller's session ended (closed, or its grace period ran out)."""
    CALLEE_OFFER = "callee_offer"
    CALLEE_ANSWER = "callee_answer"
    CALLEE_CANDIDATE = "callee_candidate"
    CALLEE_CONNECTED = "callee_connected"
    CALLEE_DECLINE = "callee_decline"
    CALLEE_BUSY = "callee_busy"
    CALLEE_HANGUP = "callee_hangup"
    CALLEE_GONE = "callee_gone"
    """A callee session in the call (ringing, or the one that answered) ended."""
    TIMEOUT = "timeout"
    """The state's deadline passed (ringing, or connecting)."""
    NO_RINGERS = "no_ringers"
    """Every session that was ringing is gone, or there was none."""
    UNAVAILABLE = "unavailable"
    """The ring reached no session, but the callee is online: on sessions that
    cannot take call frames (plain-text mode) only."""


class CallAction(enum.Enum):
    RING = "ring"  # announce to the callee's sessions, tell the caller it rings
    RELAY = "relay"  # pass the signal to the other side (every ringing session, or the one)
    ACCEPT = "accept"  # this callee session answered: pin it, stop the others ringing
    MARK = "mark"  # a state change nobody needs to hear about
    LEAVE_RING = "leave_ring"  # one ringing session is out; the last one out ends the call
    END = "end"  # tell everyone still in the call (but the sender) it ended, with a reason
    IGNORE = "ignore"
    REFUSE = "refuse"  # an error to the sender; nothing changes


@dataclass(frozen=True, slots=True)
class Transition:
    action: CallAction
    next: CallState
    reason: str | None = None
    """For END: the ``reason`` of the ``ended`` event."""


_S, _I, _A = CallState, CallInput, CallAction
_T = Transition

_FROM_CALLER = {
    SignalKind.OFFER: _I.CALLER_OFFER,
    SignalKind.ANSWER: _I.CALLER_ANSWER,
    SignalKind.CANDIDATE: _I.CALLER_CANDIDATE,
    SignalKind.CONNECTED: _I.CALLER_CONNECTED,
    SignalKind.DECLINE: _I.CALLER_DECLINE,
    SignalKind.BUSY: _I.CALLER_BUSY,
    SignalKind.HANGUP: _I.CALLER_HANGUP,
}
_FROM_CALLEE = {
    SignalKind.OFFER: _I.CALLEE_OFFER,
    SignalKind.ANSWER: _I.CALLEE_ANSWER,
    SignalKind.CANDIDATE: _I.CALLEE_CANDIDATE,
    SignalKind.CONNECTED: _I.CALLEE_CONNECTED,
    SignalKind.DECLINE: _I.CALLEE_DECLINE,
    SignalKind.BUSY: _I.CALLEE_BUSY,
    SignalKind.HANGUP: _I.CALLEE_HANGUP,
}


def _talking(
    state: CallState, timeout: Transition, connected: Transition
) -> dict[tuple[CallState, CallInput], Transition]:
    """The rows of an answered call (CONNECTING, ACTIVE): the two differ only in
    what a ``connected`` report and the deadline do."""
    s = state
    return {
        (s, _I.RING): _T(_A.REFUSE, s),
        (s, _I.CALLER_OFFER): _T(_A.RELAY, s),  # renegotiation, ICE restart
        (s, _I.CALLER_ANSWER): _T(_A.RELAY, s),  # to the callee's renegotiation
        (s, _I.CALLER_CANDIDATE): _T(_A.RELAY, s),
        (s, _I.CALLER_CONNECTED): connected,
        (s, _I.CALLER_DECLINE): _T(_A.REFUSE, s),
        (s, _I.CALLER_BUSY): _T(_A.REFUSE, s),
        (s, _I.CALLER_HANGUP): _T(_A.END, _S.ENDED, "hangup"),
        (s, _I.CALLER_GONE): _T(_A.END, _S.ENDED, "gone"),
        (s, _I.CALLEE_OFFER): _T(_A.RELAY, s),
        (s, _I.CALLEE_ANSWER): _T(_A.RELAY, s),
        (s, _I.CALLEE_CANDIDATE): _T(_A.RELAY, s),
        (s, _I.CALLEE_CONNECTED): connected,
        (s, _I.CALLEE_DECLINE): _T(_A.REFUSE, s),
        (s, _I.CALLEE_BUSY): _T(_A.REFUSE, s),
        (s, _I.CALLEE_HANGUP): _T(_A.END, _S.ENDED, "hangup"),
        (s, _I.CALLEE_GONE): _T(_A.END, _S.ENDED, "gone"),
        (s, _I.TIMEOUT): timeout,
        (s, _I.NO_RINGERS): _T(_A.IGNORE, s),  # nobody rings once answered
        (s, _I.UNAVAILABLE): _T(_A.IGNORE, s),  # only a ring finds that out
    }


TRANSITIONS: Mapping[tuple[CallState, CallInput], Transition] = {
    # IDLE: no record. Only a ring is meaningful; a signal for an unknown call
    # is refused before it gets here (``no_call``), the row says the same.
    **{
        (_S.IDLE, i): _T(_A.REFUSE, _S.IDLE)
        for i in (*_FROM_CALLER.values(), *_FROM_CALLEE.values())
    },
    (_S.IDLE, _I.RING): _T(_A.RING, _S.RINGING),
    (_S.IDLE, _I.CALLER_GONE): _T(_A.IGNORE, _S.IDLE),
    (_S.IDLE, _I.CALLEE_GONE): _T(_A.IGNORE, _S.IDLE),
    (_S.IDLE, _I.TIMEOUT): _T(_A.IGNORE, _S.IDLE),
    (_S.IDLE, _I.NO_RINGERS): _T(_A.IGNORE, _S.IDLE),
    (_S.IDLE, _I.UNAVAILABLE): _T(_A.IGNORE, _S.IDLE),
    # RINGING
    (_S.RINGING, _I.RING): _T(_A.REFUSE, _S.RINGING),  # the call id is taken
    (_S.RINGING, _I.CALLER_OFFER): _T(_A.RELAY, _S.RINGING),  # to every ringing session
    (_S.RINGING, _I.CALLER_ANSWER): _T(_A.REFUSE, _S.RINGING),
    (_S.RINGING, _I.CALLER_CANDIDATE): _T(_A.RELAY, _S.RINGING),
    (_S.RINGING, _I.CALLER_CONNECTED): _T(_A.REFUSE, _S.RINGING),
    (_S.RINGING, _I.CALLER_DECLINE): _T(_A.REFUSE, _S.RINGING),
    (_S.RINGING, _I.CALLER_BUSY): _T(_A.REFUSE, _S.RINGING),
    (_S.RINGING, _I.CALLER_HANGUP): _T(_A.END, _S.ENDED, "hangup"),  # cancelled
    (_S.RINGING, _I.CALLER_GONE): _T(_A.END, _S.ENDED, "gone"),
    (_S.RINGING, _I.CALLEE_OFFER): _T(_A.REFUSE, _S.RINGING),
    (_S.RINGING, _I.CALLEE_ANSWER): _T(_A.ACCEPT, _S.CONNECTING),
    (_S.RINGING, _I.CALLEE_CANDIDATE): _T(_A.REFUSE, _S.RINGING),  # answer first
    (_S.RINGING, _I.CALLEE_CONNECTED): _T(_A.REFUSE, _S.RINGING),
    (_S.RINGING, _I.CALLEE_DECLINE): _T(_A.END, _S.ENDED, "declined"),
    (_S.RINGING, _I.CALLEE_BUSY): _T(_A.END, _S.ENDED, "busy"),
    (_S.RINGING, _I.CALLEE_HANGUP): _T(_A.END, _S.ENDED, "declined"),
    (_S.RINGING, _I.CALLEE_GONE): _T(_A.LEAVE_RING, _S.RINGING),
    (_S.RINGING, _I.TIMEOUT): _T(_A.END, _S.ENDED, "timeout"),
    (_S.RINGING, _I.NO_RINGERS): _T(_A.END, _S.ENDED, "offline"),
    (_S.RINGING, _I.UNAVAILABLE): _T(_A.END, _S.ENDED, "unavailable"),
    # CONNECTING and ACTIVE
    **_talking(
        _S.CONNECTING,
        timeout=_T(_A.END, _S.ENDED, "failed"),
        connected=_T(_A.MARK, _S.ACTIVE),
    ),
    **_talking(
        _S.ACTIVE,
        timeout=_T(_A.IGNORE, _S.ACTIVE),  # a deadline of the state before
        connected=_T(_A.IGNORE, _S.ACTIVE),  # the other side's report
    ),
    # ENDED: the record is gone; nothing reaches it, and nothing would change it.
    **{(_S.ENDED, i): _T(_A.IGNORE, _S.ENDED) for i in CallInput},
}
"""Every (state, input) pair, and what it does. ENDED is final."""


def transition(state: CallState, event: CallInput) -> Transition:
    try:
        return TRANSITIONS[state, event]
    except KeyError:
        raise LocalProtocolError(f"call in state {state.value} cannot take {event.value}") from None


@dataclass(frozen=True, slots=True)
class Notify:
    """Give ``event`` to session ``session``: deliver it if the session is live;
    if not, hand it to :meth:`Calls.hold` (an error is dropped instead)."""

    session: str
    event: ServerEvent


class _Call:
    __slots__ = (
        "id",
        "caller",
        "caller_session",
        "callee",
        "callee_session",
        "ringers",
        "video",
        "state",
        "deadline",
    )

    def __init__(self, call_id: str, caller: str, session: str, callee: str, video: bool) -> None:
        self.id = call_id
        self.caller = caller
        self.caller_session = session
        self.callee = callee
        self.callee_session: str | None = None
        self.ringers: dict[str, None] = {}  # callee sessions ringing, in order
        self.video = video
        self.state = CallState.IDLE
        self.deadline: float | None = None

    def sessions(self) -> list[str]:
        found = [self.caller_session, *self.ringers]
        if self.callee_session is not None:
            found.append(self.callee_session)
        return found


_DEADLINE, _HELD = 0, 1


class Calls:
    """Every call of one engine. See the module docstring."""

    def __init__(
        self,
        config: Config,
        sessions_of: Callable[[str], Collection[str]],
        *,
        online: Callable[[str], bool] | None = None,
    ) -> None:
        """``sessions_of(user)``: the ids of ``user``'s sessions that a ring reaches
        (every session not ended that takes call frames, those in their grace
        period included). ``online(user)``: whether ``user`` has any session at
        all; a ring that reaches none of an online user's ends as ``unavailable``,
        not ``offline`` (without ``online``, always ``offline``)."""
        self.config = config
        self._sessions_of = sessions_of
        self._online = online
        self._calls: dict[str, _Call] = {}
        self._by_session: dict[str, dict[str, None]] = {}  # session -> its call ids
        self._buckets: dict[str, TokenBucket] = {}
        self._held: dict[str, deque[tuple[float, ServerEvent]]] = {}
        self._timers: list[tuple[float, int, int, str]] = []
        self._seq = 0

    # -- what the engine asks --------------------------------------------------

    def signal(self, user: str, session: str, request: CallSignal, now: float) -> list[Notify]:
        """A call frame from ``session`` of ``user``: what to tell whom.

        A peer's mistake or malice is an ``error`` for ``session`` alone.
        """
        out: list[Notify] = []
        cfg = self.config
        bucket = self._buckets.get(session)
        if bucket is None:
            bucket = self._buckets[session] = TokenBucket(cfg.signal_burst, now)
        wait = bucket.take(now, cfg.signal_burst, cfg.signal_per_second)
        if wait:
            self._error(
                session,
                ErrorCode.RATE_LIMITED,
                "call signals too fast",
                request.call[:64],
                out,
                retry_after=round(wait, 3),
            )
            return out
        problem = self._check_fields(request)
        if problem is not None:
            self._error(session, problem[0], problem[1], request.call[:64], out)
            return out
        if request.kind is SignalKind.CALL:
            self._ring(user, session, request, now, out)
            return out
        call = self._calls.get(request.call)
        side = None if call is None else _side(call, user, session)
        if call is None or side is None:
            # The same answer whether the call exists or not: a stranger learns nothing.
            self._error(session, ErrorCode.NO_CALL, "no such call", request.call, out)
            return out
        if (
            side is _FROM_CALLEE
            and request.kind is SignalKind.ANSWER
            and call.state is CallState.RINGING
            and self._count(session) >= cfg.max_calls_per_session
        ):
            self._error(session, ErrorCode.CALL_LIMIT, "too many calls", call.id, out)
            return out
        self._fire(call, side[request.kind], session, request, now, out)
        return out

    def session_ended(self, session: str, now: float) -> list[Notify]:
        """``session`` is over: its calls end (or stop ringing there), the other side is told."""
        out: list[Notify] = []
        for call_id in list(self._by_session.get(session, ())):
            call = self._calls.get(call_id)
            if call is None:
                continue
            event = _I.CALLER_GONE if session == call.caller_session else _I.CALLEE_GONE
            self._fire(call, event, session, None, now, out)
        self._by_session.pop(session, None)
        self._buckets.pop(session, None)
        self._held.pop(session, None)
        return out

    def hold(self, session: str, event: ServerEvent, now: float) -> None:
        """Keep ``event`` for ``session`` (not live) until it resumes, for
        ``call_signal_ttl`` seconds at most. An error is not kept."""
        if isinstance(event, ErrorEvent):
            return
        queue = self._held.setdefault(session, deque())
        ended = isinstance(event, CallEvent) and event.kind == "ended"
        if len(queue) >= self.config.call_held_max and not ended:
            return  # the call's ``ended`` always fits: see _forget
        expiry = now + self.config.call_signal_ttl
        queue.append((expiry, event))
        self._push(expiry, _HELD, session)

    def release(self, session: str, now: float) -> list[ServerEvent]:
        """What was held for ``session`` and is still fresh, oldest first."""
        queue = self._held.pop(session, None)
        return [] if queue is None else [event for expiry, event in queue if expiry > now]

    def next_deadline(self) -> float | None:
        timers = self._timers
        while timers:
            when, _, kind, key = timers[0]
            if self._timer_live(when, kind, key):
                return when
            heapq.heappop(timers)
        return None

    def tick(self, now: float) -> list[Notify]:
        out: list[Notify] = []
        timers = self._timers
        while timers and timers[0][0] <= now:
            when, _, kind, key = heapq.heappop(timers)
            if not self._timer_live(when, kind, key):
                continue
            if kind == _HELD:
                queue = self._held[key]
                while queue and queue[0][0] <= now:
                    queue.popleft()
                if not queue:
                    del self._held[key]
            else:
                self._fire(self._calls[key], _I.TIMEOUT, None, None, now, out)
        return out

    # -- read-only views --------------------------------------------------------

    def state(self, call_id: str) -> CallState:
        call = self._calls.get(call_id)
        return CallState.IDLE if call is None else call.state

    def calls_of(self, session: str) -> tuple[str, ...]:
        return tuple(self._by_session.get(session, ()))

    def stats(self) -> dict[str, int]:
        return {
            "calls": len(self._calls),
            "call_sessions": len(self._by_session),
            "call_buckets": len(self._buckets),
            "call_signals_held": sum(len(q) for q in self._held.values()),
            "call_timers": len(self._timers),
        }

    # -- inside ---------------------------------------------------------------------

    def _check_fields(self, r: CallSignal) -> tuple[ErrorCode, str] | None:
        cfg = self.config
        if not is_valid_name(r.call):
            return ErrorCode.INVALID_FIELD, "call ids are 1-64 characters of A-Z a-z 0-9 _ - ."
        match r.kind:
            case SignalKind.CALL:
                if r.to is None or not is_valid_name(r.to):
                    return ErrorCode.INVALID_NAME, "no such user name"
            case SignalKind.OFFER | SignalKind.ANSWER:
                if not r.sdp:
                    return ErrorCode.INVALID_FIELD, "sdp must not be empty"
                if _utf8_len(r.sdp) > cfg.max_sdp_bytes:
                    return ErrorCode.TOO_LARGE, f"sdp over {cfg.max_sdp_bytes} bytes"
            case SignalKind.CANDIDATE:
                if r.candidate is None:
                    return ErrorCode.INVALID_FIELD, "candidate missing"
                size = _utf8_len(r.candidate) + _utf8_len(r.mid or "")
                if size > cfg.max_candidate_bytes:
                    return ErrorCode.TOO_LARGE, f"candidate over {cfg.max_candidate_bytes} bytes"
            case _:
                pass
        return None

    def _ring(
        self, user: str, session: str, request: CallSignal, now: float, out: list[Notify]
    ) -> None:
        to = request.to or ""  # _check_fields saw it is a name
        if to == user:
            self._error(
                session, ErrorCode.INVALID_FIELD, "you cannot call yourself", request.call, out
            )
            return
        verdict = room_access(user, Action.SEND, dm_room(user, to), private=True, allow=())
        if verdict is not Access.ALLOWED:
            self._error(session, ErrorCode.FORBIDDEN, f"you may not call {to}", request.call, out)
            return
        existing = self._calls.get(request.call)
        if existing is not None:
            self._fire(existing, _I.RING, session, request, now, out)
            return
        if self._count(session) >= self.config.max_calls_per_session:
            self._error(session, ErrorCode.CALL_LIMIT, "too many calls", request.call, out)
            return
        call = _Call(request.call, user, session, to, request.video)
        self._calls[call.id] = call
        self._index(session, call.id)
        self._fire(call, _I.RING, session, request, now, out)

    def _fire(
        self,
        call: _Call,
        event: CallInput,
        sender: str | None,
        request: CallSignal | None,
        now: float,
        out: list[Notify],
    ) -> None:
        """Apply the table's transition for ``event``: the one place a call's state moves."""
        step = transition(call.state, event)
        before = call.state
        call.state = step.next
        match step.action:
            case CallAction.RING:
                for sid in self._sessions_of(call.callee):
                    call.ringers[sid] = None
                    self._index(sid, call.id)
                    out.append(
                        Notify(
                            sid,
                            CallEvent(
                                kind="call", call=call.id, user=call.caller, video=call.video
                            ),
                        )
                    )
                self._set_deadline(call, now + self.config.call_ring_timeout)
                if call.ringers:
                    out.append(
                        Notify(
                            call.caller_session,
                            CallEvent(kind="ringing", call=call.id, user=call.callee),
                        )
                    )
                elif self._online is not None and self._online(call.callee):
                    self._fire(call, _I.UNAVAILABLE, None, None, now, out)
                else:
                    self._fire(call, _I.NO_RINGERS, None, None, now, out)
            case CallAction.RELAY:
                request, sender = _signal_of(event, request, sender)
                relayed = _relayed(call, request, sender)
                out.extend(Notify(sid, relayed) for sid in self._other_side(call, sender))
            case CallAction.ACCEPT:
                request, sender = _signal_of(event, request, sender)
                call.callee_session = sender
                others = [sid for sid in call.ringers if sid != sender]
                call.ringers.clear()
                for sid in others:
                    self._unindex(sid, call.id)
                    out.append(
                        Notify(
                            sid,
                            CallEvent(
                                kind="ended",
                                call=call.id,
                                user=call.caller,
                                reason="answered_elsewhere",
                            ),
                        )
                    )
                out.append(Notify(call.caller_session, _relayed(call, request, sender)))
                self._set_deadline(call, now + self.config.call_connect_timeout)
            case CallAction.MARK:
                call.deadline = None
            case CallAction.LEAVE_RING:
                sender = _sender_of(event, sender)
                call.ringers.pop(sender, None)
                self._unindex(sender, call.id)
                if not call.ringers:
                    self._fire(call, _I.NO_RINGERS, None, None, now, out)
            case CallAction.END:
                for sid in call.sessions():
                    if sid != sender:
                        peer = call.callee if sid == call.caller_session else call.caller
                        out.append(
                            Notify(
                                sid,
                                CallEvent(
                                    kind="ended", call=call.id, user=peer, reason=step.reason
                                ),
                            )
                        )
                self._forget(call)
            case CallAction.IGNORE:
                pass
            case CallAction.REFUSE:
                sender = _sender_of(event, sender)
                if event is _I.RING:
                    self._error(sender, ErrorCode.INVALID_FIELD, "call id in use", call.id, out)
                else:
                    kind = request.kind.value if request is not None else event.value
                    self._error(
                        sender,
                        ErrorCode.CALL_STATE,
                        f"cannot {kind} a call that is {before.value}",
                        call.id,
                        out,
                    )

    def _other_side(self, call: _Call, sender: str) -> list[str]:
        if sender != call.caller_session:
            return [call.caller_session]
        if call.callee_session is not None:
            return [call.callee_session]
        return list(call.ringers)

    def _forget(self, call: _Call) -> None:
        del self._calls[call.id]
        for sid in call.sessions():
            self._unindex(sid, call.id)
            queue = self._held.get(sid)
            if queue:  # its signals held for a resume are moot now: only ``ended`` will do
                kept = [
                    (t, e) for t, e in queue if not (isinstance(e, CallEvent) and e.call == call.id)
                ]
                self._held[sid] = deque(kept)
        call.ringers.clear()
        call.callee_session = None
        call.deadline = None

    def _index(self, session: str, call_id: str) -> None:
        self._by_session.setdefault(session, {})[call_id] = None

    def _unindex(self, session: str, call_id: str) -> None:
        calls = self._by_session.get(session)
        if calls is not None:
            calls.pop(call_id, None)
            if not calls:
                del self._by_session[session]

    def _count(self, session: str) -> int:
        """Calls ``session`` placed or answered (ringing ones do not count)."""
        n = 0
        for call_id in self._by_session.get(session, ()):
            call = self._calls[call_id]
            if session in (call.caller_session, call.callee_session):
                n += 1
        return n

    def _set_deadline(self, call: _Call, when: float) -> None:
        call.deadline = when
        self._push(when, _DEADLINE, call.id)

    def _push(self, when: float, kind: int, key: str) -> None:
        self._seq += 1
        heapq.heappush(self._timers, (when, self._seq, kind, key))

    def _timer_live(self, when: float, kind: int, key: str) -> bool:
        if kind == _HELD:
            queue = self._held.get(key)
            return queue is not None and len(queue) > 0 and queue[0][0] <= when
        call = self._calls.get(key)
        return call is not None and call.deadline == when

    def _error(
        self,
        session: str,
        code: ErrorCode,
        message: str,
        ref: str,
        out: list[Notify],
        *,
        retry_after: float | None = None,
    ) -> None:
        event = ErrorEvent(code=code.value, message=message, ref=ref, retry_after=retry_after)
        out.append(Notify(session, event))


def _side(call: _Call, user: str, session: str) -> Mapping[SignalKind, CallInput] | None:
    """Which side ``session`` speaks for in ``call``, or None: it is no party to it."""
    if user == call.caller and session == call.caller_session:
        return _FROM_CALLER
    if user == call.callee and (session == call.callee_session or session in call.ringers):
        return _FROM_CALLEE
    return None


def _signal_of(
    event: CallInput, request: CallSignal | None, sender: str | None
) -> tuple[CallSignal, str]:
    """The frame and session behind ``event``; an action that needs them and has
    none means a wrong table: a bug, raised."""
    if request is None:
        raise LocalProtocolError(f"call input {event.value} came with no frame")
    return request, _sender_of(event, sender)


def _sender_of(event: CallInput, sender: str | None) -> str:
    if sender is None:
        raise LocalProtocolError(f"call input {event.value} came from no session")
    return sender


def _relayed(call: _Call, r: CallSignal, sender: str) -> CallEvent:
    """The event the other side gets for signal ``r``: the sender named by the call."""
    user = call.caller if sender == call.caller_session else call.callee
    if r.kind is SignalKind.CANDIDATE:
        return CallEvent(
            kind="candidate",
            call=call.id,
            user=user,
            candidate=r.candidate,
            mid=r.mid,
            index=r.index,
        )
    return CallEvent(kind=r.kind.value, call=call.id, user=user, sdp=r.sdp)


def _utf8_len(text: str) -> int:
    try:
        return len(text.encode())
    except UnicodeEncodeError:  # a lone surrogate: the codec refuses these already
        return len(text) * 4
