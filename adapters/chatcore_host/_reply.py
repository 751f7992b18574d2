"""HTTP answers as plain data: a reply, JSON and file bodies.

No sockets and no HTTP library here: each server writes a :class:`Reply`
its own way (h11 bytes in ``chatcore_server._http``, ASGI messages in
``chatcore_asgi``). :data:`STATIC_DIR` is the browser client that ships in
``chatcore_server/static``; it is found without importing that package (whose
import needs h11 and wsproto).
"""

from __future__ import annotations

import importlib.util
import json
import mimetypes
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["STATIC_DIR", "Reply", "error", "json_reply", "static_file"]


def _static_dir() -> Path:
    spec = importlib.util.find_spec("chatcore_server")  # located, not imported
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))).resolve() / "static"
    return Path(__file__).resolve().parent.parent / "chatcore_server" / "static"


STATIC_DIR = _static_dir()
"""The browser client's files (``index.html``, ``app.js``, ``app.css``)."""

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
