"""HTTP answers: a reply as plain data, JSON and file bodies, and their bytes.

No sockets and no engine here; only :func:`render` knows h11. ``_server``
decides which route a request takes and writes what these functions build.
Request policy (tokens, origins, read access) is ``chatcore_host``'s.
"""

from __future__ import annotations

import json
import mimetypes
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import h11

__all__ = ["STATIC_DIR", "Reply", "error", "json_reply", "render", "static_file"]

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
