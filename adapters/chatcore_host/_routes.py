"""The HTTP endpoints every server shares: ``/``, ``/static/*``, ``/config.json``,
``/healthz``, ``/readyz``, ``/metrics``, ``/rooms``, history, and the admin API (``/admin/...``).

Transport-neutral: a request comes in as its method, path, query, headers
and body, and leaves as a :class:`~chatcore_host._reply.Reply` (status,
headers, body) that the server writes its own way (h11 in
``chatcore_server``, ASGI messages in ``chatcore_asgi``). :func:`answer` is
the one entry point; ``/ws`` is each server's own and never comes here.

Apart from the admin API, read-only views over the engine and the history
store; nothing else here changes chat state. Errors are JSON bodies with
their HTTP status (see ``_reply.error``). A route sees its server only as a
:class:`Site`. Needs prometheus-client (``/metrics``); no HTTP library.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, assert_never
from urllib.parse import parse_qsl, unquote

from prometheus_client import CollectorRegistry

from chatcore import Access, History, event_to_dict, is_valid_name, is_valid_room
from chatcore_store import StoreUnavailable

from ._admin import MAX_ADMIN_BODY, admin_request, check_admin
from ._host import EngineHost
from ._metrics import Page, metrics_page, readiness
from ._policy import AuthError, Headers, authenticate, read_history
from ._reply import Reply, error, json_reply, static_file

__all__ = ["Site", "admin_route", "answer", "route"]

_ROOM_MESSAGES = re.compile(r"/rooms/([^/]+)/messages")
_HISTORY_LIMIT = 100
_BEARER = ("www-authenticate", "Bearer")
_UNAVAILABLE = ("retry-after", "5")


class Site(Protocol):
    """What the routes need of the server that answers them."""

    @property
    def engine_host(self) -> EngineHost: ...

    @property
    def static_dir(self) -> Path: ...

    @property
    def jwt_secret(self) -> str | None: ...

    @property
    def admin_token(self) -> str | None: ...

    @property
    def stopping(self) -> bool: ...

    @property
    def connections(self) -> int: ...

    @property
    def ice_servers(self) -> Sequence[Mapping[str, Any]]:
        """``RTCIceServer`` entries for the page's calls (``--ice-server``)."""
        ...

    @property
    def metrics(self) -> CollectorRegistry: ...

    @property
    def metrics_token(self) -> str | None: ...


async def answer(
    site: Site, method: str, path: str, query: str, headers: Headers, body: bytes
) -> Reply:
    """The answer to any request but one for ``/ws``.

    ``body`` is what the server read of the request's body: at most one byte
    past ``MAX_ADMIN_BODY`` (only the admin API takes a body; more is 413).
    """
    if path == "/admin" or path.startswith("/admin/"):
        if len(body) > MAX_ADMIN_BODY:
            return error(413, f"an admin request body is at most {MAX_ADMIN_BODY} bytes")
        return await admin_route(site, method, path, headers, body)
    if method not in ("GET", "HEAD"):
        return error(405, "method not allowed", ("allow", "GET, HEAD"))
    return await route(site, path, query, headers)


async def route(site: Site, path: str, query: str, headers: Headers) -> Reply:
    """The answer to a GET or HEAD of ``path`` (anything but ``/ws`` and ``/admin/``)."""
    if path in ("/", "/index.html"):
        return static_file("index.html", site.static_dir) or error(
            404, "the browser client is not installed"
        )
    if path.startswith("/static/"):
        found = static_file(unquote(path[len("/static/") :]), site.static_dir)
        return found or error(404, "no such file")
    if path == "/config.json":  # what the browser page needs to know of this server
        return json_reply(200, {"iceServers": list(site.ice_servers)})
    if path == "/healthz":
        if site.stopping:
            return json_reply(503, {"status": "stopping"})
        return json_reply(200, {"status": "ok", "connections": site.connections})
    if path == "/readyz":
        return _reply(await readiness(site.engine_host, stopping=site.stopping))
    if path == "/metrics":
        return _reply(metrics_page(site.metrics, headers, site.metrics_token))
    if path == "/rooms":
        rooms = site.engine_host.engine.rooms(include_private=False)
        listed = [{"room": name, "members": len(v.users)} for name, v in sorted(rooms.items())]
        return json_reply(200, {"rooms": listed})
    match = _ROOM_MESSAGES.fullmatch(path)
    if match:
        return await _history(site, unquote(match.group(1)), query, headers)
    return error(404, "not found")


async def _history(site: Site, room: str, query: str, headers: Headers) -> Reply:
    if not is_valid_room(room):
        return error(400, "invalid room name")
    params = parse_qsl(query)
    try:
        before = _int_param(params, "before", math.inf)
        limit = min(_int_param(params, "limit", 50), _HISTORY_LIMIT)
    except ValueError as exc:
        return error(400, str(exc))
    if site.jwt_secret is not None:
        # With tokens on, every read needs a valid one, public rooms included.
        try:
            user: str | None = authenticate(headers, params, site.jwt_secret)
        except AuthError as exc:
            return error(401, str(exc), _BEARER)
        unnamed = "a token is required"
    else:
        user = next((v for k, v in params if k == "user"), None)
        if user is not None and not is_valid_name(user):
            return error(400, "invalid user name")
        unnamed = f"a user parameter is required for room {room}"
    try:
        page = await read_history(site.engine_host, user, room, before=before, limit=limit)
    except StoreUnavailable:
        return error(503, "history store unavailable", _UNAVAILABLE)
    match page:
        case History():
            return json_reply(200, event_to_dict(page))  # the shape of the WebSocket frame
        case Access.NAME_REQUIRED:
            return error(401, unnamed)
        case Access.FORBIDDEN | Access.BANNED | Access.MUTED:  # (reads are never moderated)
            return error(403, f"not allowed in room {room}")
        case Access.ALLOWED:  # read_history answers a page instead
            return error(500, "internal error")
        case unreachable:
            assert_never(unreachable)


def _reply(page: Page) -> Reply:
    return Reply(page.status, page.headers, page.body)


async def admin_route(site: Site, method: str, path: str, headers: Headers, body: bytes) -> Reply:
    """The answer to a request under ``/admin/`` (any method; see docs/protocol.md)."""
    refused = check_admin(headers, admin_token=site.admin_token, jwt_secret=site.jwt_secret)
    answer = refused or await admin_request(site.engine_host, method, path, body)
    if answer.status >= 400:
        extra = (_BEARER,) if answer.status == 401 else ()
        return error(answer.status, str(answer.body.get("error", "")), *extra)
    return json_reply(answer.status, answer.body)


def _int_param(params: list[tuple[str, str]], name: str, default: Any) -> Any:
    for key, value in params:
        if key == name:
            if not value.isdigit() or len(value) > 15 or int(value) < 1:
                raise ValueError(f"{name} must be a positive integer")
            return int(value)
    return default
