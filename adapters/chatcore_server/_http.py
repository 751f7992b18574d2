"""HTTP answers as h11 bytes (:func:`render` writes a :class:`Reply`), and the
door's strict reading of a WebSocket upgrade request (:func:`read_upgrade_head`).

The answers themselves (JSON, files, the routes) are ``chatcore_host``'s,
shared with the ASGI app; only this module knows h11. ``_server`` decides
which route a request takes and writes what ``render`` builds.
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Final, Literal, NamedTuple

import h11

from chatcore_host._reply import STATIC_DIR, Reply, error, json_reply, static_file

__all__ = [
    "NEED_DATA",
    "NOT_OURS",
    "STATIC_DIR",
    "Reply",
    "UpgradeHead",
    "error",
    "json_reply",
    "read_upgrade_head",
    "render",
    "static_file",
]

_PHRASES = frozenset(s.value for s in HTTPStatus)


def render(reply: Reply, conn: h11.Connection, *, head: bool, close: bool) -> bytes:
    """The bytes of ``reply`` for ``conn`` (headers only for a HEAD request)."""
    headers = [(k.encode(), v.encode()) for k, v in reply.headers]
    headers.append((b"content-length", str(len(reply.body)).encode()))
    if close:
        headers.append((b"connection", b"close"))
    phrase = HTTPStatus(reply.status).phrase.encode() if reply.status in _PHRASES else b""
    out = conn.send(h11.Response(status_code=reply.status, headers=headers, reason=phrase)) or b""
    if reply.body and not head:
        out += conn.send(h11.Data(data=reply.body)) or b""
    out += conn.send(h11.EndOfMessage()) or b""
    return out


# -- the door's reading of an upgrade request (see ``ChatServer._door``) -----------------
#
# A strict subset of what h11 accepts, read with two regular expressions instead of
# h11's state machine (53 us a request against ~5): ``GET /ws`` or ``GET /ws?QUERY``
# over HTTP/1.1, CRLF line ends, header fields of visible ASCII with no folded lines,
# one Host, no Content-Length or Transfer-Encoding. Every such request means the same
# to h11 (the same target and fields, no body, the bytes after the blank line left
# over); anything else is not read here at all: the connection goes to h11, which
# reads it from its first byte and answers it (or refuses it) as ever.

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_VALUE = rb"(?:[\x21-\x7e]+(?:[ \t]+[\x21-\x7e]+)*)?"
_FIELD = rb"(" + _TOKEN + rb"):[ \t]*(" + _VALUE + rb")[ \t]*\r\n"
_UPGRADE_HEAD = re.compile(
    rb"GET (/ws(?:\?[\x21-\x22\x24-\x7e]*)?) HTTP/1\.1\r\n((?:" + _FIELD + rb")*)\r\n"
)
_FIELDS = re.compile(_FIELD)
_BARE_LF_END = re.compile(rb"\n\r?\n")  # where h11 sees a head end that CRLF does not

NEED_DATA: Final = None
"""``read_upgrade_head``: no whole head yet, and nothing wrong so far."""
NOT_OURS: Final = False
"""``read_upgrade_head``: not a request the door reads; h11 is to read it."""


class UpgradeHead(NamedTuple):
    """A request the door reads: its target, header fields (names in lower case, as
    h11 gives them) and the bytes after it (the client's first frames, if any)."""

    target: bytes
    headers: list[tuple[bytes, bytes]]
    size: int
    rest: bytes

    @property
    def query(self) -> str:
        """The target's query (``urlsplit``'s: the target has no fragment)."""
        return self.target[4:].decode("ascii") if len(self.target) > 3 else ""


def read_upgrade_head(
    data: bytes | bytearray, max_size: int, searched: int = 0
) -> UpgradeHead | Literal[False] | None:
    """The upgrade request at the start of ``data``, if the door may read it.

    :data:`NEED_DATA` (None) while the head is incomplete and under ``max_size``
    bytes; :data:`NOT_OURS` (False) for everything else, which h11 then reads
    from the first byte (and answers, refuses or times out as it always did).
    ``searched``: how many bytes of ``data`` an earlier call saw (a request that
    trickles in is not searched from its start again for every piece).
    """
    end = data.find(b"\r\n\r\n", max(0, searched - 3))
    if end < 0:
        if len(data) > max_size or _BARE_LF_END.search(data, max(0, searched - 2)) is not None:
            return NOT_OURS
        return NEED_DATA
    head = _UPGRADE_HEAD.match(data, 0, end + 4)
    if head is None or head.end() != end + 4:
        return NOT_OURS
    # Every line of the head is a field now, so a field's name is what follows a CRLF.
    names = data[:end].lower()
    if names.count(b"\r\nhost:") != 1:
        return NOT_OURS  # h11 refuses none or several (HTTP/1.1)
    if b"\r\ncontent-length:" in names or b"\r\ntransfer-encoding:" in names:
        return NOT_OURS  # h11 decides what a body on an upgrade means
    headers = [(name.lower(), value) for name, value in _FIELDS.findall(head.group(2))]
    return UpgradeHead(head.group(1), headers, end, bytes(data[end + 4 :]))
