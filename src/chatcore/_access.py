"""Who may join, read or send in a room: the one access rule every path asks.

The engine (WebSocket requests), the HTTP history route, the command line and
any later adapter (ASGI, admin) call :func:`room_access` with the facts they
hold about a room; none of them decides on its own. The rule:

* A direct-message room ``dm:a:b`` admits exactly ``a`` and ``b``. That follows
  from its name alone: whatever a store says about its privacy is ignored, so
  a store that saved it as public cannot open it to anyone else.
* A private room admits the users on its allow list.
* A public room admits every named user.
* A name with a ``:`` that is not a canonical DM room (``dm:bob:alice``)
  admits nobody: no path creates such a room, so none may be opened.
* A user banned from a room may not join it or send there; a user muted in
  a room until a time later than ``now`` may not send there (joining and
  reading are still allowed). These come after the rules above: a ban never
  admits anyone the room would refuse anyway.
* Nobody (``user`` None: a reader who gave no name) may join or send anywhere;
  such a reader may read a public room only. Whether a server accepts nameless
  readers at all is authentication, decided before this rule is asked: with
  tokens required, a request without a valid one never gets here.

Pure: no I/O, no clock, and nothing kept between calls.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping

from ._names import dm_users

__all__ = ["Access", "Action", "room_access", "room_rule"]


class Action(enum.Enum):
    """What a user asks to do in a room."""

    JOIN = "join"
    READ = "read"  # history pages, over WebSocket or HTTP
    SEND = "send"


class Access(enum.Enum):
    """The answer of :func:`room_access`."""

    ALLOWED = "allowed"
    NAME_REQUIRED = "name_required"  # a nameless reader: say who you are (HTTP 401)
    FORBIDDEN = "forbidden"  # this user is not admitted (HTTP 403, error ``forbidden``)
    BANNED = "banned"  # banned from the room (HTTP 403, error ``forbidden``)
    MUTED = "muted"  # may not send for now (error ``forbidden`` naming the mute)


def room_rule(room: str, *, private: bool, allow: frozenset[str]) -> tuple[bool, frozenset[str]]:
    """The privacy and allow list that hold for ``room``.

    A direct-message room's come from its name (private, its two users); any
    other room's are the ``private`` and ``allow`` given (stored or created).
    """
    if ":" in room:
        pair = dm_users(room)
        return True, frozenset(() if pair is None else pair)
    return private, allow


def room_access(
    user: str | None,
    action: Action,
    room: str,
    *,
    private: bool,
    allow: Collection[str],
    banned: Collection[str] = (),
    muted: Mapping[str, float] | None = None,
    now: float = 0.0,
) -> Access:
    """May ``user`` (None: nameless) do ``action`` in ``room``?

    ``private`` and ``allow`` are what the caller knows of the room (from the
    engine or a store); for a direct-message room they are not consulted.
    A room nobody has created is public: pass ``private=False, allow=()``.
    ``banned`` and ``muted`` (user -> muted until) are the room's moderation,
    ``now`` the time a mute is compared with.
    """
    verdict = _membership(user, action, room, private=private, allow=allow)
    if verdict is not Access.ALLOWED or user is None or action is Action.READ:
        return verdict
    if user in banned:
        return Access.BANNED
    if action is Action.SEND and muted and muted.get(user, now) > now:
        return Access.MUTED
    return Access.ALLOWED


def _membership(
    user: str | None, action: Action, room: str, *, private: bool, allow: Collection[str]
) -> Access:
    if ":" in room:  # only direct-message rooms have one
        pair = dm_users(room)
        if user is None:
            return Access.NAME_REQUIRED
        return Access.ALLOWED if pair is not None and user in pair else Access.FORBIDDEN
    if user is None:
        if action is Action.READ and not private:
            return Access.ALLOWED
        return Access.NAME_REQUIRED
    if private and user not in allow:
        return Access.FORBIDDEN
    return Access.ALLOWED
