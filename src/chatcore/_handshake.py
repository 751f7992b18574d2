"""From a WebSocket handshake to a ``Connect``: the parts every adapter shares.

The URL is ``/ws?user=alice&room=general&room=tech`` for a new session, plus
``resume=TOKEN&offset=general:41&offset=tech:7`` to resume one. The
subprotocol ``chatcore.v1`` selects JSON frames; none selects plain text.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import parse_qsl

from ._commands import Connect, ConnId, Mode
from ._names import is_valid_name, is_valid_room

__all__ = ["SUBPROTOCOL", "HandshakeError", "parse_connect", "select_mode"]

SUBPROTOCOL = "chatcore.v1"
_MAX_QUERY = 8192
_MAX_ROOMS = 256


class HandshakeError(Exception):
    """The connect URL is not acceptable; ``status`` is the HTTP answer to give."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


def select_mode(offered: Iterable[str]) -> tuple[Mode, str | None]:
    """The mode for the client's offered subprotocols, and the one to accept."""
    if SUBPROTOCOL in offered:
        return Mode.JSON, SUBPROTOCOL
    return Mode.TEXT, None


def _query_pairs(query: str) -> list[tuple[str, str]]:
    """``parse_qsl(query, keep_blank_values=True)``, read directly when nothing in
    the query is escaped (no ``%`` or ``+``: then unquoting changes nothing)."""
    if "%" in query or "+" in query:
        return parse_qsl(query, keep_blank_values=True)
    pairs = []
    for field in query.split("&"):
        if field:
            key, _, value = field.partition("=")
            pairs.append((key, value))
    return pairs


def parse_connect(conn: ConnId, query: str, mode: Mode, *, user: str | None = None) -> Connect:
    """Build the ``Connect`` for a handshake's query string.

    ``user`` overrides the ``user`` parameter (an adapter that authenticated
    the client passes the authenticated name). Raises :class:`HandshakeError`
    (status 400) for a missing or invalid user, room or offset.
    """
    if len(query) > _MAX_QUERY:
        raise HandshakeError(414, "query string too long")
    rooms: list[str] = []
    offsets: dict[str, int] = {}
    epochs: dict[str, str] = {}
    resume: str | None = None
    given_user: str | None = None
    for key, value in _query_pairs(query):
        if key == "user":
            given_user = value
        elif key == "room":
            if not is_valid_room(value):
                raise HandshakeError(400, f"invalid room name {value[:64]!r}")
            rooms.append(value)
        elif key == "resume":
            resume = value or None
        elif key == "offset":
            room, sep, number = value.rpartition(":")
            if not sep or not is_valid_room(room) or not number.isdigit() or len(number) > 15:
                raise HandshakeError(400, "offset must be ROOM:N")
            offsets[room] = int(number)
        elif key == "epoch":
            room, sep, epoch = value.rpartition(":")
            if not sep or not is_valid_room(room) or not 0 < len(epoch) <= 64:
                raise HandshakeError(400, "epoch must be ROOM:EPOCH")
            epochs[room] = epoch
    if len(rooms) > _MAX_ROOMS:
        raise HandshakeError(400, f"at most {_MAX_ROOMS} rooms in a connect URL")
    name = user if user is not None else given_user
    if name is None:
        raise HandshakeError(400, "missing user parameter")
    if not is_valid_name(name):
        raise HandshakeError(400, "user names are 1-64 characters of A-Z a-z 0-9 _ - .")
    return Connect(
        conn=conn,
        user=name,
        rooms=tuple(rooms),
        resume=resume,
        offsets=offsets,
        epochs=epochs,
        mode=mode,
    )
