"""Requests from clients: from a text frame to a request the engine carries out.

Owns decoding a frame (JSON, or a line of plain text sent to the session's
text room), refusing a frame that is no request (it still costs a request,
so a flood of them is limited), the per-session request rate, holding
requests that come before the welcome, and what an error about a request
names. Which module carries a request out is the engine's routing.
"""

from __future__ import annotations

from ._codec import FrameError, decode_line, decode_request
from ._commands import (
    CallSignal,
    ClaimDeviceKeys,
    ClientRequest,
    Mode,
    PublishDeviceKeys,
    Send,
    SendDirect,
)
from ._effects import Effect
from ._errors import ErrorCode
from ._names import dm_room, is_valid_name
from ._outbox import error
from ._session import Connection, Session
from ._state import EngineState

__all__ = ["admit", "decode", "hold", "over_rate", "ref_of"]


def decode(
    st: EngineState, conn: Connection, text: str, now: float, out: list[Effect]
) -> ClientRequest | None:
    """The request a frame carries; None (and an error to the client) if it is none."""
    session = conn.session
    if len(text) > st.config.max_frame_bytes:
        _refuse(st, session, ErrorCode.TOO_LARGE, "frame too large", None, now, out)
        return None
    if conn.mode is Mode.TEXT:
        room = session.text_room
        if room is None:
            _refuse(st, session, ErrorCode.NOT_MEMBER, "join a room first", None, now, out)
            return None
        return Send(conn=conn.id, room=room, text=decode_line(text))
    try:
        return decode_request(conn.id, text)
    except FrameError as exc:
        _refuse(st, session, exc.code, exc.message, exc.ref, now, out)
        return None


def _refuse(
    st: EngineState,
    session: Session,
    code: ErrorCode,
    message: str,
    ref: str | None,
    now: float,
    out: list[Effect],
) -> None:
    """A frame that is no request still costs a request: a flood of them is limited."""
    if not over_rate(st, session, ref, now, out):
        error(st, session, code, message, ref, out)


def admit(
    st: EngineState, session: Session, request: ClientRequest, now: float, out: list[Effect]
) -> bool:
    """Take one request token for ``request``; without one, answer ``rate_limited``
    (naming the request, :func:`ref_of`) and return False."""
    config = st.config
    wait = session.requests.take(now, config.request_burst, config.request_per_second)
    if wait:
        _rate_limited(st, session, wait, ref_of(session.user, request), out)
    return not wait


def over_rate(
    st: EngineState, session: Session, ref: str | None, now: float, out: list[Effect]
) -> bool:
    """Take one request token; without one, answer ``rate_limited`` and say so."""
    config = st.config
    wait = session.requests.take(now, config.request_burst, config.request_per_second)
    if wait:
        _rate_limited(st, session, wait, ref, out)
    return bool(wait)


def _rate_limited(
    st: EngineState, session: Session, wait: float, ref: str | None, out: list[Effect]
) -> None:
    st.counters.limit("requests")
    error(
        st,
        session,
        ErrorCode.RATE_LIMITED,
        "too many requests",
        ref,
        out,
        retry_after=round(wait, 3),
    )


def hold(st: EngineState, session: Session, request: ClientRequest, out: list[Effect]) -> None:
    """Keep a request that came before the welcome, within ``max_pending_frames``."""
    if len(session.backlog) >= st.config.max_pending_frames:
        st.counters.limit("pending")
        error(
            st,
            session,
            ErrorCode.RATE_LIMITED,
            "too many frames before welcome",
            ref_of(session.user, request),
            out,
        )
    else:
        session.backlog.append(request)


def ref_of(user: str, request: ClientRequest) -> str | None:
    """What an error about ``request`` names: its client id, else its room."""
    match request:
        case Send() | SendDirect() if request.client_id is not None:
            return request.client_id
        case SendDirect():
            return dm_room(user, request.to) if is_valid_name(request.to) else request.to[:64]
        case CallSignal():
            return request.call[:64]
        case PublishDeviceKeys():
            return request.device[:64]
        case ClaimDeviceKeys():
            return request.user[:64]
        case _:
            return request.room[:64]
