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
    "parse_origin",
    "repeated_header",
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
_DEFAULT_PORTS = {"http": 80, "https": 443}


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


def repeated_header(request: h11.Request, names: Iterable[bytes]) -> bytes | None:
    """The first of ``names`` (lower case) that the request carries more than once.

    For headers that must appear once: taking the first of several would let
    a request pass on one value (``Origin: allowed``) while carrying another.
    """
    wanted = frozenset(names)
    seen: set[bytes] = set()
    for key, _ in request.headers:
        if key in wanted:
            if key in seen:
                return bytes(key)
            seen.add(key)
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


def parse_origin(origin: str) -> tuple[str, str, int] | None:
    """``(scheme, host, port)`` of an http(s) origin, the port made explicit; None
    for anything else (``null``, another scheme, no host, a bad port)."""
    parts = urlsplit(origin.strip())
    scheme = parts.scheme.lower()
    default = _DEFAULT_PORTS.get(scheme)
    if default is None or not parts.hostname:
        return None
    try:
        port = parts.port
    except ValueError:
        return None
    return scheme, parts.hostname.lower(), port or default


def origin_allowed(
    origin: str | None, host: str | None, scheme: str, allowed: Sequence[str]
) -> bool:
    """Whether a browser page from ``origin`` may open a WebSocket here.

    No ``Origin`` header (a program, not a browser) is allowed. Otherwise the
    page must be this server's own: the same scheme (``scheme``, what the
    server speaks), host and port as the request's ``Host``; or be listed in
    ``allowed`` (origins like ``https://chat.example``, or ``*`` for any).
    Another port of the same host, or ``localhost``, is another origin.
    """
    if origin is None or "*" in allowed:
        return True
    theirs = parse_origin(origin)
    if theirs is None:
        return False
    if any(parse_origin(entry) == theirs for entry in allowed):
        return True
    return host is not None and parse_origin(f"{scheme}://{host}") == theirs


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
