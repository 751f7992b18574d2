"""The interface every history store offers to adapters, and what stores share.

Adapters need only :class:`HistoryStore`. Admin tools (``chatcore rooms``,
``chatcore history``) and servers that apply retention use the wider
:class:`DurableStore`, which the SQLite and PostgreSQL stores implement.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeGuard, runtime_checkable

from chatcore import (
    Append,
    Appended,
    Command,
    Effect,
    LoadHistory,
    LoadInbox,
    LoadRoom,
    Message,
    SavePositions,
    SaveRoom,
)

__all__ = [
    "DurableStore",
    "HistoryStore",
    "InstantStore",
    "RoomInfo",
    "StorageEffect",
    "StoreUnavailable",
    "delete_in_chunks",
    "group_appends",
    "history_request",
    "inbox_args",
    "is_storage_effect",
    "new_epoch",
    "number_appends",
]

StorageEffect = LoadRoom | Append | LoadHistory | LoadInbox | SaveRoom | SavePositions
_STORAGE = (LoadRoom, Append, LoadHistory, LoadInbox, SaveRoom, SavePositions)


def is_storage_effect(effect: Effect) -> TypeGuard[StorageEffect]:
    return isinstance(effect, _STORAGE)


def group_appends(effects: Sequence[StorageEffect]) -> list[StorageEffect | list[Append]]:
    """The batch in order, each run of consecutive appends gathered in a list
    (a store can then store a run with a few statements, whatever its length)."""
    out: list[StorageEffect | list[Append]] = []
    for effect in effects:
        if isinstance(effect, Append):
            if out and isinstance(out[-1], list):
                out[-1].append(effect)
            else:
                out.append([effect])
        else:
            out.append(effect)
    return out


def number_appends(
    run: Sequence[Append],
    heads: dict[str, tuple[str, int]],
    stored: dict[tuple[str, str, str], Message],
) -> tuple[list[Appended], list[Message]]:
    """Give each append of a run its offset, the one after its room's head, unless
    its ``(room, sender, client_id)`` is in ``stored`` (a retry: answered as a
    duplicate with the stored message). ``heads`` maps each room of the run to
    ``(epoch, head)``; both dicts are updated as the run goes. Returns the answers
    in order and the new messages, for the store to insert."""
    answers: list[Appended] = []
    new: list[Message] = []
    for a in run:
        key = (a.room, a.sender, a.client_id) if a.client_id is not None else None
        seen = stored.get(key) if key is not None else None
        if seen is not None:
            answers.append(Appended(message=seen, ref=a.ref, duplicate=True))
            continue
        epoch, head = heads[a.room]
        heads[a.room] = (epoch, head + 1)
        message = Message(
            room=a.room,
            offset=head + 1,
            epoch=epoch,
            sender=a.sender,
            text=a.text,
            ts=a.ts,
            client_id=a.client_id,
        )
        if key is not None:
            stored[key] = message
        new.append(message)
        answers.append(Appended(message=message, ref=a.ref))
    return answers, new


def new_epoch() -> str:
    """A fresh epoch for a room that is created: random, so a log that was lost
    and started again can never be confused with the old one."""
    return secrets.token_hex(8)


class StoreUnavailable(Exception):
    """The database cannot be reached by an admin or maintenance call
    (``create_room``, ``list_rooms``, ``history``, ``apply_retention``...).

    ``execute`` never raises it: a failed ``LoadRoom`` is answered with
    ``RoomLoadFailed``, never with a made-up ``RoomLoaded`` (a new epoch and an
    empty room would be worse than a refused join). ``answers`` and
    ``unanswered`` stay empty with the stores in this package; they remain for
    adapters written when ``execute`` raised for an unanswerable ``LoadRoom``.
    """

    def __init__(
        self,
        reason: str,
        *,
        answers: Sequence[Command] = (),
        unanswered: Sequence[LoadRoom] = (),
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.answers = list(answers)
        self.unanswered = tuple(unanswered)


@dataclass(frozen=True, slots=True, kw_only=True)
class RoomInfo:
    """A room as the store keeps it. ``head`` is the highest offset ever assigned
    (retention never lowers it); ``stored`` is how many messages are kept."""

    name: str
    private: bool
    allow: frozenset[str]
    epoch: str
    head: int
    stored: int = 0
    max_messages: int | None = None
    max_age: float | None = None
    """Seconds."""


class HistoryStore(Protocol):
    """What an adapter needs of a store.

    ``execute`` carries out a batch of storage effects in order, as one unit
    of durability where the store has transactions (group commit), and
    returns the answering commands in the same order. A failure of the
    database must come back as ``AppendFailed`` / ``HistoryFailed`` /
    ``RoomLoadFailed`` / ``InboxFailed`` answers, not as an exception.

    Every ``Append``, ``LoadRoom``, ``LoadHistory`` and ``LoadInbox`` needs an
    answer: the engine waits for it (a connecting session gets no welcome
    until its rooms and its inbox are answered). ``SaveRoom`` and
    ``SavePositions`` have none.
    """

    answers_at_once: bool
    """True: the store does no I/O and is an :class:`InstantStore`; a host runs
    its ``execute_now`` inline, feeding the answers back within the same call."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def execute(self, effects: Sequence[StorageEffect]) -> list[Command]: ...


class InstantStore(HistoryStore, Protocol):
    """A store whose answers need no waiting (``answers_at_once`` is True)."""

    def execute_now(self, effects: Sequence[StorageEffect]) -> list[Command]: ...


@runtime_checkable
class DurableStore(HistoryStore, Protocol):
    """A store with admin and maintenance calls. Each raises
    :class:`StoreUnavailable` when the database cannot be reached."""

    async def rooms(self) -> list[RoomInfo]: ...

    async def room(self, name: str) -> RoomInfo | None: ...

    async def save_room(self, name: str, *, private: bool, allow: frozenset[str]) -> RoomInfo:
        """Create the room (new epoch) or change who may enter it."""
        ...

    async def set_retention(
        self, name: str, *, max_messages: int | None = None, max_age: float | None = None
    ) -> None:
        """Per-room limits (None: keep everything); applied by ``apply_retention``."""
        ...

    async def apply_retention(self, now: float) -> int:
        """Delete what the limits no longer keep; returns how many messages went.

        Works in small transactions, so appends to the same rooms go on meanwhile."""
        ...

    async def history(
        self, room: str, *, after: int = 0, before: int | None = None, limit: int | None = None
    ) -> tuple[Message, ...]:
        """Stored messages with ``after < offset < before``: the newest ``limit``, ascending."""
        ...

    async def positions(self, user: str) -> dict[str, tuple[int, int]]:
        """The user's (delivered, read) offsets per room."""
        ...


def inbox_args(effect: LoadInbox) -> dict[str, str | int]:
    """Named parameters of a SQL store's inbox query: ``user``, ``limit``, and the
    range ``[first, after_first)`` of room names ``dm:USER:...``."""
    return {
        "user": effect.user,
        "first": f"dm:{effect.user}:",
        "after_first": f"dm:{effect.user};",  # ';' follows ':' in code point order
        "limit": effect.limit,
    }


def history_request(
    room: str, after: int = 0, before: int | None = None, limit: int | None = None
) -> LoadHistory:
    """The ``LoadHistory`` a store's ``history()`` call answers (``before=None``: to the head)."""
    return LoadHistory(
        ref=0, room=room, after=after, before=2**62 if before is None else before, limit=limit
    )


async def delete_in_chunks(
    cuts: Sequence[tuple[str, int, int]],
    chunk: int,
    delete: Callable[[str, int, int], Awaitable[int]],
) -> int:
    """Retention: for each ``(room, first, last)`` delete offsets first..last in
    ranges of ``chunk``, one call (one transaction) each, so appends interleave."""
    deleted = 0
    for room, first, last in cuts:
        lo = first
        while lo <= last:
            hi = min(last, lo + chunk - 1)
            deleted += await delete(room, lo, hi)
            lo = hi + 1
    return deleted
