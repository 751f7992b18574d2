"""Facts about a room that other processes sharing the log must learn.

A fact goes out as the effect ``Share(room, fact)`` and comes back, on every
other process holding the room, as the command ``Shared(origin, room, fact)``
(``origin`` names the process that shared it; the adapter adds it and never
hands a process its own facts back). Messages are not facts: they travel as
``Appended`` (see ``_bus``). This module holds values only.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "Fact",
    "MemberArrived",
    "MemberDeparted",
    "MembersAsked",
    "MembersTold",
    "ReadMarked",
    "TypingChanged",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberArrived:
    """``user`` has a first session in the room on the sharing process."""

    user: str


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberDeparted:
    """``user``'s last session in the room on the sharing process left it."""

    user: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TypingChanged:
    """``user`` started (``active``) or stopped typing in the room."""

    user: str
    active: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadMarked:
    """``user`` marked the room read up to ``offset``."""

    user: str
    offset: int


@dataclass(frozen=True, slots=True, kw_only=True)
class MembersAsked:
    """The sharing process started holding the room: every other process that
    holds it answers with ``MembersTold`` (its members there)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MembersTold:
    """Every user with a session in the room on the sharing process, all of them:
    the receiver replaces what it knew of that process's members in the room."""

    users: tuple[str, ...]


Fact = MemberArrived | MemberDeparted | TypingChanged | ReadMarked | MembersAsked | MembersTold
