"""The HTTP side of the server: answers, static files, Origin and token checks.

Pure helpers over h11 values; no sockets and no engine here. ``_server``
decides which route a request takes and writes what these functions build.
"""

from __future__ import annotations

import json
import mimetypes
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import h11
import jwt

__all__ = [
    "AuthError",
    "Reply",
    "authenticate",
    "error",
    "header",
    "header_list",
    "json_reply",
    "origin_allowed",
    "static_file",
]

STATIC_DIR = Path(__file__).resolve().parent / "static"

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".txt": "text/plain; charset=utf-8",
    ".map": "application/json",
    ".woff2": "font/woff2",
    ".webmanifest": "application/manifest+json",
}
_PHRASES = frozenset(s.value for s in HTTPStatus)
_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})


@dataclass(frozen=True, slots=True)
class Reply:
    """A complete HTTP answer: status, headers and body."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""


def json_reply(status: int, obj: Any, *extra: tuple[str, str]) -> Reply:
    body = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
    return Reply(
        status,
        (("content-type", "application/json"), ("cache-control", "no-store"), *extra),
        body,
    )


def error(status: int, message: str, *extra: tuple[str, str]) -> Reply:
    """A JSON error body: ``{"error": {"status": 404, "message": "..."}}``."""
    return json_reply(status, {"error": {"status": status, "message": message}}, *extra)


def header(request: h11.Request, name: bytes) -> str | None:
    """The first value of header ``name`` (lower case), decoded as Latin-1."""
    for key, value in request.headers:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def header_list(request: h11.Request, name: bytes) -> list[str]:
    """Every comma-separated token of header ``name``, lower-cased for flags."""
    items: list[str] = []
    for key, value in request.headers:
        if key == name:
            items.extend(t.strip() for t in bytes(value).decode("latin-1").split(",") if t.strip())
    return items


def static_file(name: str, folder: Path = STATIC_DIR) -> Reply | None:
    """The file ``name`` inside ``folder`` (no way out of it), or None."""
    if not name or "\\" in name or "\x00" in name:
        return None
    root = folder.resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        return None
    suffix = path.suffix.lower()
    kind = _TYPES.get(suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return Reply(
        200,
        (
            ("content-type", kind),
            ("cache-control", "no-cache"),
            ("x-content-type-options", "nosniff"),
        ),
        path.read_bytes(),
    )


def origin_allowed(origin: str | None, host: str | None, allowed: Sequence[str]) -> bool:
    """Whether a browser page from ``origin`` may open a WebSocket here.

    No ``Origin`` header (a program, not a browser) is allowed. Otherwise the
    origin's host must be this server's ``Host``, a loopback name, or listed
    in ``allowed`` (exact origins like ``https://chat.example``, or ``*``).
    """
    if origin is None:
        return True
    if "*" in allowed or origin in allowed:
        return True
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False
    if host is not None and parts.netloc.lower() == host.lower():
        return True
    return (parts.hostname or "") in _LOCAL_HOSTS or f"[{parts.hostname}]" in _LOCAL_HOSTS


class AuthError(Exception):
    """The request carries no valid token; the message is safe to show."""


def bearer_token(request: h11.Request, query: Iterable[tuple[str, str]]) -> str | None:
    auth = header(request, b"authorization")
    if auth is not None:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    for key, value in query:
        if key == "token" and value:
            return value
    return None


def authenticate(request: h11.Request, query: Iterable[tuple[str, str]], secret: str) -> str:
    """The user name (``sub``) of the request's HS256 token, or raise AuthError."""
    token = bearer_token(request, query)
    if token is None:
        raise AuthError("a token is required (Authorization: Bearer or ?token=)")
    try:
        claims = jwt.decode(token, secret, algorithms=["HS256"], options={"require": ["sub"]})
    except jwt.ExpiredSignatureError:
        raise AuthError("token expired") from None
    except jwt.InvalidTokenError:
        raise AuthError("invalid token") from None
    sub = claims.get("sub")
    if not isinstance(sub, str):
        raise AuthError("token 'sub' must be a string")
    return sub


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
