"""User and room names: what is valid, and the canonical direct-message room.

Names are 1 to 64 characters from ``A-Z a-z 0-9 _ - .`` (ASCII only, so that
two names that look alike are alike). Direct-message rooms are named
``dm:<a>:<b>`` with the two user names sorted; the ``:`` cannot occur in a
user-chosen name, so a DM room can never be created by joining a public name.
"""

from __future__ import annotations

import re

__all__ = ["NAME_PATTERN", "dm_room", "dm_users", "is_valid_name", "is_valid_room"]

NAME_PATTERN = r"[A-Za-z0-9_.\-]{1,64}"
_NAME = re.compile(NAME_PATTERN)
_DM = re.compile(rf"dm:({NAME_PATTERN}):({NAME_PATTERN})")


def is_valid_name(name: str) -> bool:
    """True if ``name`` is a valid user name or public room name."""
    return _NAME.fullmatch(name) is not None


def dm_users(room: str) -> tuple[str, str] | None:
    """The two users of a direct-message room, or None if ``room`` is not one."""
    m = _DM.fullmatch(room)
    if m is None or m.group(1) > m.group(2):
        return None
    return m.group(1), m.group(2)


def is_valid_room(room: str) -> bool:
    """True for a valid public/private room name or a canonical DM room."""
    return is_valid_name(room) or dm_users(room) is not None


def dm_room(a: str, b: str) -> str:
    """The room both users compute for their direct messages."""
    if not (is_valid_name(a) and is_valid_name(b)):
        raise ValueError(f"invalid user name in dm_room({a!r}, {b!r})")
    lo, hi = sorted((a, b))
    return f"dm:{lo}:{hi}"
