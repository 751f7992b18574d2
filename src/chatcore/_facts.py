"""Facts about a room that other processes sharing the log must learn.

A fact goes out as the effect ``Share(room, fact)`` and comes back, on every
other process holding the room, as the command ``Shared(origin, room, fact)``
(``origin`` names the process that shared it; the adapter adds it and never
hands a process its own facts back). Messages are not facts: they travel as
``Appended`` (see ``_bus``). This module holds values only.

Presence facts (``MemberArrived``, ``MemberDeparted``, ``MemberMoved``,
``MembersTold``) carry ``seq``: the sharing process numbers its presence facts
per room (2, 3, ...; a tell repeats the number of the last change it
includes), so that a receiver knows whether it heard every change since the
last full tell. ``seq`` 0 means unnumbered (a process built before the
numbering, or a room the sharer does not hold): taken as it comes, unchecked.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "Fact",
    "MemberArrived",
    "MemberDeparted",
    "MemberMoved",
    "MembersAsked",
    "MembersDigest",
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
    seq: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberDeparted:
    """``user``'s last session in the room on the sharing process left it."""

    user: str
    seq: int = 0


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
    seq: int = 0


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
    holds it answers with ``MembersTold`` (its members there).

    With ``of``: only process ``of`` is asked (its digest did not match what the
    asker heard of it); it answers even with no members. The engine does not
    know its own name, so a process that has heard nothing from ``of`` in the
    room answers too (it may be ``of``; an extra tell is only a publish more)."""

    of: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class MembersTold:
    """Every user with a session in the room on the sharing process, all of them:
    the receiver replaces what it knew of that process's members in the room."""

    users: tuple[str, ...]
    seq: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class MembersDigest:
    """The sharing process has members in the room, and ``seq`` is the number of
    its last presence fact there: a receiver that did not hear everything up to
    it (a fact or a tell was lost) asks that process (``MembersAsked(of=...)``).
    Shared every ``Config.presence_check_interval`` per room with members."""

    seq: int


Fact = (
    MemberArrived
    | MemberDeparted
    | MemberMoved
    | TypingChanged
    | ReadMarked
    | MembersAsked
    | MembersTold
    | MembersDigest
)
