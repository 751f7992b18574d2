"""HTTP answers as h11 bytes: :func:`render` writes a :class:`Reply`.

The answers themselves (JSON, files, the routes) are ``chatcore_host``'s,
shared with the ASGI app; only this module knows h11. ``_server`` decides
which route a request takes and writes what ``render`` builds.
"""

from __future__ import annotations

from http import HTTPStatus

import h11

from chatcore_host._reply import STATIC_DIR, Reply, error, json_reply, static_file

__all__ = ["STATIC_DIR", "Reply", "error", "json_reply", "render", "static_file"]

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
