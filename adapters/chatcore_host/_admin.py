"""The admin API's logic: who is an admin, and what each ``/admin/`` request does.

Plain values in and out (a method, a path, headers, a body's bytes; a status
and a JSON-ready dict), so that every server mounts the same API: the
WebSocket server's HTTP routes and the ASGI app alike. Every change goes
through the engine as a command (``CreateRoom``, ``RemoveMember``, ``Kick``,
``Mute``, ``Ban``, ``Unban``, ``DeleteMessage``, ``Publish``), which stores it;
nothing here writes to the store itself. The shapes are documented in
docs/protocol.md, section "Admin API".
"""

from __future__ import annotations

import hmac
import json
import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from chatcore import (
    Ban,
    Command,
    CreateRoom,
    DeleteMessage,
    Kick,
    LocalProtocolError,
    Mute,
    Publish,
    RemoveMember,
    Unban,
    is_valid_name,
    is_valid_room,
)
from chatcore_store import StoreUnavailable

from ._host import EngineHost
from ._policy import Headers, header

__all__ = ["MAX_ADMIN_BODY", "AdminReply", "admin_request", "check_admin"]

MAX_ADMIN_BODY = 16 * 1024
"""Bytes an admin request's JSON body may have (more: 413)."""

_ROOM = re.compile(r"/admin/rooms/([^/]+)")
_ROOM_ACTION = re.compile(r"/admin/rooms/([^/]+)/(remove|mute|ban|unban|messages)")
_MESSAGE = re.compile(r"/admin/rooms/([^/]+)/messages/([0-9]{1,15})")
_USER_REMOVE = re.compile(r"/admin/users/([^/]+)/remove")


@dataclass(frozen=True, slots=True)
class AdminReply:
    status: int
    body: dict[str, Any]


def _err(status: int, message: str) -> AdminReply:
    return AdminReply(status, {"error": message})


def check_admin(
    headers: Headers, *, admin_token: str | None, jwt_secret: str | None
) -> AdminReply | None:
    """None if the request carries an admin credential, else the refusal.

    A credential is ``Authorization: Bearer <admin token>`` (the server's
    ``--admin-token``), or, with ``--jwt-secret``, a valid token whose claims
    have ``"admin": true``. No credential: 401. One that is wrong or not an
    admin's: 403. Neither configured: 403 for everyone (the API is off).
    Tokens in the query string are not taken here: URLs end up in logs.
    """
    auth = header(headers, b"authorization") or ""
    scheme, _, token = auth.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return _err(401, "an admin token is required (Authorization: Bearer)")
    if admin_token is not None and hmac.compare_digest(token.encode(), admin_token.encode()):
        return None
    if jwt_secret is not None:
        import jwt

        try:
            claims = jwt.decode(token, jwt_secret, algorithms=["HS256"])
        except jwt.InvalidTokenError:
            return _err(403, "invalid admin token")
        if claims.get("admin") is True:
            return None
        return _err(403, "this token has no admin claim")
    if admin_token is None:
        return _err(403, "the admin API is off: start the server with --admin-token")
    return _err(403, "invalid admin token")


async def admin_request(host: EngineHost, method: str, path: str, body: bytes) -> AdminReply:
    """Carry out one authorised admin request (see docs/protocol.md, "Admin API")."""
    try:
        data = _body(method, body)
    except ValueError as exc:
        return _err(400, str(exc))
    try:
        return await _route(host, method, path, data)
    except _BadRequest as exc:
        return _err(400, str(exc))
    except LocalProtocolError as exc:  # the engine's check of names and values
        return _err(400, str(exc))
    except StoreUnavailable:
        return _err(503, "history store unavailable")


class _BadRequest(Exception):
    pass


def _body(method: str, body: bytes) -> dict[str, Any]:
    if method not in ("POST", "PUT") or not body.strip():
        return {}
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("the body must be a JSON object") from None
    if not isinstance(data, dict):
        raise ValueError("the body must be a JSON object")
    return data


def _field(data: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    """``data[name]`` if it is a ``kind`` (an int counts as a float), else 400."""
    if name not in data:
        return default
    value = data[name]
    if kind is float and type(value) is int:
        value = float(value)
    if type(value) is not kind:
        raise _BadRequest(f"{name} must be a {kind.__name__}")
    return value


def _user(data: dict[str, Any]) -> str:
    user = _field(data, "user", str)
    if user is None or not is_valid_name(user):
        raise _BadRequest("user must be a valid user name")
    return str(user)


def _reason(data: dict[str, Any]) -> str:
    return str(_field(data, "reason", str, ""))


async def _route(host: EngineHost, method: str, path: str, data: dict[str, Any]) -> AdminReply:
    engine = host.engine
    if path == "/admin/rooms":
        if method == "GET":
            return AdminReply(200, {"rooms": await _rooms(host)})
        if method == "POST":
            room = _field(data, "room", str)
            if room is None or not is_valid_room(room) or ":" in room:
                raise _BadRequest("room must be a valid room name")
            private = _field(data, "private", bool, True)
            allow = data.get("allow", [])
            if not isinstance(allow, list) or not all(isinstance(u, str) for u in allow):
                raise _BadRequest("allow must be a list of user names")
            return _do(host, CreateRoom(room=room, private=private, allow=frozenset(allow)))
        return _err(405, "use GET or POST")
    if path == "/admin/sessions":
        if method != "GET":
            return _err(405, "use GET")
        sessions = [
            {"id": s.id, "user": s.user, "state": s.state.value, "rooms": list(s.rooms)}
            for s in engine.sessions()
        ]
        return AdminReply(200, {"sessions": sessions})
    if (m := _USER_REMOVE.fullmatch(path)) is not None:
        if method != "POST":
            return _err(405, "use POST")
        user = unquote(m.group(1))
        if not is_valid_name(user):
            raise _BadRequest("invalid user name")
        return _do(host, Kick(user=user, reason=_reason(data)))
    if (m := _MESSAGE.fullmatch(path)) is not None:
        if method != "DELETE":
            return _err(405, "use DELETE")
        room, offset = _room_name(m.group(1)), int(m.group(2))
        head = await _head(host, room)
        if offset < 1 or head is None or offset > head:
            return _err(404, f"no message {offset} in room {room}")
        return _do(host, DeleteMessage(room=room, offset=offset))
    if (m := _ROOM_ACTION.fullmatch(path)) is not None:
        if method != "POST":
            return _err(405, "use POST")
        room, action = _room_name(m.group(1)), m.group(2)
        match action:
            case "remove":
                return _do(host, RemoveMember(room=room, user=_user(data), reason=_reason(data)))
            case "mute":
                seconds = _field(data, "seconds", float)
                if seconds is None or not 0 <= seconds <= 10 * 365 * 86400:
                    raise _BadRequest("seconds must be a number from 0 (unmute) to ten years")
                until = time.time() + seconds if seconds > 0 else None
                return _do(
                    host, Mute(room=room, user=_user(data), until=until, reason=_reason(data))
                )
            case "ban":
                return _do(host, Ban(room=room, user=_user(data), reason=_reason(data)))
            case "unban":
                return _do(host, Unban(room=room, user=_user(data)))
            case _:  # "messages": post as a bot or system user
                sender, text = _field(data, "sender", str, "system"), _field(data, "text", str)
                if text is None or not is_valid_name(sender):
                    raise _BadRequest("text (a string) and a valid sender are required")
                return _do(host, Publish(room=room, sender=sender, text=text))
    if (m := _ROOM.fullmatch(path)) is not None:
        if method != "GET":
            return _err(405, "use GET")
        room = _room_name(m.group(1))
        found = [r for r in await _rooms(host) if r["room"] == room]
        if not found:
            return _err(404, f"no room {room}")
        banned, muted = engine.moderation(room)
        return AdminReply(
            200,
            {
                **found[0],
                "members": list(engine.members(room)),
                "banned": sorted(banned),
                "muted": {u: round(t, 3) for u, t in sorted(muted.items())},
            },
        )
    return _err(404, "not found")


def _room_name(raw: str) -> str:
    room = unquote(raw)
    if not is_valid_room(room):
        raise _BadRequest("invalid room name")
    return room


def _do(host: EngineHost, command: Command) -> AdminReply:
    host.feed(command)
    return AdminReply(200, {"ok": True})


async def _rooms(host: EngineHost) -> list[dict[str, Any]]:
    """Rooms stored (with a durable store) and held in memory, by name."""
    held = host.engine.rooms()
    rooms: dict[str, dict[str, Any]] = {}
    if (durable := host.durable) is not None:
        for info in await durable.rooms():
            rooms[info.name] = {
                "room": info.name,
                "private": info.private,
                "allow": sorted(info.allow),
                "head": info.head,
                "members": 0,
            }
    for name, view in held.items():
        entry = rooms.setdefault(name, {"room": name, "allow": []})
        entry.update(
            private=view.private, allow=sorted(view.allow), head=view.head, members=len(view.users)
        )
    return [rooms[n] for n in sorted(rooms)]


async def _head(host: EngineHost, room: str) -> int | None:
    view = host.engine.rooms().get(room)
    if view is not None:
        return view.head
    if (durable := host.durable) is not None:
        info = await durable.room(room)
        return None if info is None else info.head
    stored = await host.history(room, before=2**62, limit=1)
    return stored[-1].offset if stored else None
