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
    "MemberMoved",
    "MembersAsked",
    "MembersTold",
    "ReadMarked",
    "TypingChanged",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberArrived:
    """``user`` has a first session in the room on the sharing process.

    With ``move``: the arrival half of a session that moved here (claimed from
    another process), shared whether or not the user had a session here already.
    The old process shares the other half (``MemberMoved`` with the same
    ``move``); whichever half a process hears first counts the user on the new
    process, so nobody sees ``left`` for a user who only moved."""

    user: str
    move: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberDeparted:
    """``user``'s last session in the room on the sharing process left it."""

    user: str


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberMoved:
    """The departure half of a move: one of ``user``'s sessions in the room left
    the sharing process for process ``to``, which claimed it. ``last``: it was
    the user's last session in the room on the sharing process. ``move`` names
    the move (the session and how many times it moved), as the arrival half
    (``MemberArrived.move``) does."""

    user: str
    to: str
    move: str
    last: bool = True


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


Fact = (
    MemberArrived
    | MemberDeparted
    | MemberMoved
    | TypingChanged
    | ReadMarked
    | MembersAsked
    | MembersTold
)
