"""The JSON and file endpoints: ``/``, ``/static/*``, ``/healthz``, ``/rooms``, history.

Read-only views over the engine and the history store; nothing here changes
chat state. Errors are JSON bodies with their HTTP status (see ``_http.error``).
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any, assert_never
from urllib.parse import parse_qsl, unquote

import h11

from chatcore import (
    Access,
    Action,
    History,
    HistoryLoaded,
    LoadHistory,
    LoadRoom,
    Message,
    RoomLoaded,
    dm_users,
    event_to_dict,
    is_valid_name,
    is_valid_room,
    room_access,
)
from chatcore_store import DurableStore, StoreUnavailable

from . import _http
from ._http import AuthError, Reply, error, json_reply

if TYPE_CHECKING:
    from ._server import ChatServer

__all__ = ["route"]

_ROOM_MESSAGES = re.compile(r"/rooms/([^/]+)/messages")
_HISTORY_LIMIT = 100
_BEARER = ("www-authenticate", "Bearer")


async def route(server: ChatServer, path: str, query: str, request: h11.Request) -> Reply:
    """The answer to a GET or HEAD of ``path`` (anything but ``/ws``)."""
    if path in ("/", "/index.html"):
        return _http.static_file("index.html", server.static_dir) or error(
            404, "the browser client is not installed"
        )
    if path.startswith("/static/"):
        found = _http.static_file(unquote(path[len("/static/") :]), server.static_dir)
        return found or error(404, "no such file")
    if path == "/healthz":
        if server.stopping:
            return json_reply(503, {"status": "stopping"})
        return json_reply(200, {"status": "ok", "connections": server.connections})
    if path == "/rooms":
        try:
            return json_reply(200, {"rooms": await _public_rooms(server)})
        except StoreUnavailable:
            return error(503, "history store unavailable", ("retry-after", "5"))
    match = _ROOM_MESSAGES.fullmatch(path)
    if match:
        return await _history(server, unquote(match.group(1)), query, request)
    return error(404, "not found")


async def _public_rooms(server: ChatServer) -> list[dict[str, Any]]:
    rooms = server.engine.rooms(include_private=False)
    return [{"room": name, "members": len(view.users)} for name, view in sorted(rooms.items())]


async def _room_meta(server: ChatServer, room: str) -> tuple[bool, frozenset[str]] | None:
    """(private, allow) of a stored room, None if unknown; raises StoreUnavailable."""
    store = server.store
    if isinstance(store, DurableStore):
        info = await store.room(room)
        return None if info is None else (info.private, info.allow)
    answers = await server.query_store([LoadRoom(room=room, recent=0)])
    meta = next((a for a in answers if isinstance(a, RoomLoaded)), None)
    return None if meta is None else (meta.private, meta.allow)


def _refusal(
    user: str | None, room: str, meta: tuple[bool, frozenset[str]] | None, unnamed: str
) -> Reply | None:
    """The core's access rule for reading ``room`` as an HTTP answer (None: allowed).

    ``meta``: what the store holds of the room (None: nothing, a public room).
    A direct-message room is decided by its name, whatever the store says.
    """
    private, allow = meta or (False, frozenset())
    match room_access(user, Action.READ, room, private=private, allow=allow):
        case Access.ALLOWED:
            return None
        case Access.NAME_REQUIRED:
            return error(401, unnamed)
        case Access.FORBIDDEN:
            return error(403, f"not allowed in room {room}")
        case unreachable:
            assert_never(unreachable)


async def _load_history(
    server: ChatServer, room: str, before: int, limit: int
) -> tuple[Message, ...]:
    store = server.store
    if isinstance(store, DurableStore):
        return await store.history(room, before=before, limit=limit)
    answers = await server.query_store(
        [LoadHistory(ref=-1, room=room, after=0, before=before, limit=limit)]
    )
    loaded = next((a for a in answers if isinstance(a, HistoryLoaded)), None)
    if loaded is None:
        raise StoreUnavailable("history not available")
    return loaded.messages


async def _history(server: ChatServer, room: str, query: str, request: h11.Request) -> Reply:
    if not is_valid_room(room):
        return error(400, "invalid room name")
    params = parse_qsl(query)
    try:
        before = _int_param(params, "before", math.inf)
        limit = min(_int_param(params, "limit", 50), _HISTORY_LIMIT)
    except ValueError as exc:
        return error(400, str(exc))
    if server.jwt_secret is not None:
        # With tokens on, every read needs a valid one, public rooms included.
        try:
            user: str | None = _http.authenticate(request, params, server.jwt_secret)
        except AuthError as exc:
            return error(401, str(exc), _BEARER)
        unnamed = "a token is required"
    else:
        user = next((v for k, v in params if k == "user"), None)
        if user is not None and not is_valid_name(user):
            return error(400, "invalid user name")
        unnamed = f"a user parameter is required for room {room}"
    end = 2**62 if before == math.inf else int(before)
    try:
        # Decided before anything is read where the facts need no reading: a DM
        # room's are its name, and a store with admin calls answers without side
        # effects. Other stores create the rooms they are asked about, so those
        # are asked only about a room that has messages or is in use.
        dm = dm_users(room) is not None
        early = dm or isinstance(server.store, DurableStore)
        if early:
            meta = None if dm else await _room_meta(server, room)
            if (refused := _refusal(user, room, meta, unnamed)) is not None:
                return refused
        loaded = await _load_history(server, room, end, limit + 1)
        # A room neither stored nor in memory is answered empty, and not created.
        if not early and (loaded or room in server.engine.rooms()):
            meta = await _room_meta(server, room)
            if (refused := _refusal(user, room, meta, unnamed)) is not None:
                return refused
    except StoreUnavailable:
        return error(503, "history store unavailable", ("retry-after", "5"))
    messages = loaded[-limit:]
    page = History(room=room, messages=tuple(messages), more=len(loaded) > limit)
    return json_reply(200, event_to_dict(page))  # the same shape as the WebSocket frame


def _int_param(params: list[tuple[str, str]], name: str, default: Any) -> Any:
    for key, value in params:
        if key == name:
            if not value.isdigit() or len(value) > 15 or int(value) < 1:
                raise ValueError(f"{name} must be a positive integer")
            return int(value)
    return default
