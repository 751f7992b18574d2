"""Request policy from plain values: who asks, from which page, and what they may read.

Every server that hosts an engine (the h11 one in ``chatcore_server``, an ASGI
app) asks these same questions, so they take what every server has: the
request's headers as ``(name, value)`` byte pairs with lower-case names (h11's
``Request.headers`` and an ASGI scope's ``headers`` are both that) and its
query as ``(key, value)`` pairs. No HTTP library and no socket here.

The read rule itself is the core's (:func:`chatcore.room_access`); this
module only gathers the facts it needs, through the host's store.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

from chatcore import Access, Action, History, dm_users, room_access

from ._host import EngineHost

__all__ = [
    "AuthError",
    "Headers",
    "authenticate",
    "bearer_token",
    "header",
    "header_tokens",
    "origin_allowed",
    "parse_origin",
    "read_history",
    "repeated_header",
]

Headers = Sequence[tuple[bytes, bytes]]
"""A request's header fields in order, names in lower case (h11 and ASGI give this)."""

_DEFAULT_PORTS = {"http": 80, "https": 443}


# -- headers ------------------------------------------------------------------------------


def header(headers: Headers, name: bytes) -> str | None:
    """The first value of header ``name`` (lower case), decoded as Latin-1."""
    for key, value in headers:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def header_tokens(headers: Headers, name: bytes) -> list[str]:
    """Every comma-separated token of header ``name``, in order, stripped."""
    items: list[str] = []
    for key, value in headers:
        if key == name:
            items.extend(t.strip() for t in bytes(value).decode("latin-1").split(",") if t.strip())
    return items


def repeated_header(headers: Headers, names: Iterable[bytes]) -> bytes | None:
    """The first of ``names`` (lower case) that the request carries more than once.

    For headers that must appear once: taking the first of several would let
    a request pass on one value (``Origin: allowed``) while carrying another.
    """
    wanted = frozenset(names)
    seen: set[bytes] = set()
    for key, _ in headers:
        if key in wanted:
            if key in seen:
                return bytes(key)
            seen.add(key)
    return None


# -- the page a browser connects from ------------------------------------------------------


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


# -- who asks ------------------------------------------------------------------------------


class AuthError(Exception):
    """The request carries no valid token; the message is safe to show."""


def bearer_token(headers: Headers, query: Iterable[tuple[str, str]]) -> str | None:
    """The token of ``Authorization: Bearer``, else of ``?token=``; None if neither."""
    auth = header(headers, b"authorization")
    if auth is not None:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    for key, value in query:
        if key == "token" and value:
            return value
    return None


def authenticate(headers: Headers, query: Iterable[tuple[str, str]], secret: str) -> str:
    """The user name (``sub``) of the request's HS256 token, or raise AuthError.

    Needs PyJWT (the ``server`` extra), imported here so that the host itself
    needs nothing but anyio.
    """
    import jwt

    token = bearer_token(headers, query)
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


# -- what they may read --------------------------------------------------------------------


async def read_history(
    host: EngineHost, user: str | None, room: str, *, before: float = math.inf, limit: int
) -> History | Access:
    """The page of ``room``'s stored history before offset ``before`` that ``user``
    may read (at most ``limit`` messages, oldest first), or the refusal
    (:attr:`Access.NAME_REQUIRED` or :attr:`Access.FORBIDDEN`).

    ``user`` is None for an anonymous reader. The rule is the core's
    :func:`chatcore.room_access`, decided on what the store holds of the room
    (nothing stored: a public room); a direct-message room is decided by its
    name, whatever the store says. ``room`` must be a valid room name.
    Raises :class:`chatcore_store.StoreUnavailable`.
    """
    end = 2**62 if before == math.inf else int(before)
    # Decided before anything is read where the facts need no reading: a DM room's
    # are its name, and a store with admin calls answers without side effects.
    # Other stores create the rooms they are asked about, so those are asked only
    # about a room that has messages or is in use.
    dm = dm_users(room) is not None
    early = dm or host.durable is not None
    if early:
        meta = None if dm else await host.stored_room(room)
        if (refused := _access(user, room, meta)) is not Access.ALLOWED:
            return refused
    loaded = await host.history(room, before=end, limit=limit + 1)
    # A room neither stored nor in memory is answered empty, and not created.
    if not early and (loaded or room in host.engine.rooms()):
        meta = await host.stored_room(room)
        if (refused := _access(user, room, meta)) is not Access.ALLOWED:
            return refused
    return History(room=room, messages=tuple(loaded[-limit:]), more=len(loaded) > limit)


def _access(user: str | None, room: str, meta: tuple[bool, frozenset[str]] | None) -> Access:
    private, allow = meta or (False, frozenset())
    return room_access(user, Action.READ, room, private=private, allow=allow)
