"""A room as this engine holds it: who is in it, and its recent history.

The room does not number messages: offsets come from the log (``Appended``),
and the room only checks that they arrive in order, holding early ones back
until the gap before them is filled.
"""

from __future__ import annotations

from collections import deque

from ._commands import Mode
from ._events import Message
from ._session import Connection, PendingSend

__all__ = ["Room"]


class Room:
    __slots__ = (
        "name",
        "epoch",
        "head",
        "private",
        "allow",
        "window",
        "conns",
        "text_conns",
        "users",
        "roster",
        "members_json",
        "typing",
        "reads",
        "early",
        "gap_ref",
    )

    def __init__(
        self,
        name: str,
        *,
        epoch: str,
        head: int,
        private: bool,
        allow: frozenset[str],
        window: int,
        recent: tuple[Message, ...],
    ) -> None:
        self.name = name
        self.epoch = epoch
        self.head = head
        self.private = private
        self.allow = allow
        self.window: deque[Message] = deque((m for m in recent if m.offset <= head), maxlen=window)
        # Live recipients (connections of members that are caught up), by mode.
        self.conns: dict[int, Connection] = {}
        self.text_conns: dict[int, Connection] = {}
        # Members: sessions per user, counting sessions in their grace period.
        self.users: dict[str, int] = {}
        self.roster: tuple[str, ...] | None = None  # sorted users, until they change
        # The last members event sent and its JSON: joins in a row encode it once.
        self.members_json: tuple[object, str] | None = None
        # user -> (when the indicator expires, id of its one live timer)
        self.typing: dict[str, tuple[float, int]] = {}
        self.reads: dict[str, int] = {}
        # Messages from the log that arrived before the ones preceding them.
        self.early: dict[int, tuple[Message, PendingSend | None]] = {}
        self.gap_ref: int | None = None

    def attach(self, conn: Connection) -> None:
        (self.conns if conn.mode is Mode.JSON else self.text_conns)[conn.id] = conn

    def detach(self, conn: Connection) -> None:
        (self.conns if conn.mode is Mode.JSON else self.text_conns).pop(conn.id, None)

    def admits(self, user: str) -> bool:
        return not self.private or user in self.allow

    def window_start(self) -> int:
        """The lowest offset held in memory (head + 1 when none is)."""
        return self.window[0].offset if self.window else self.head + 1

    def window_slice(self, first: int, last: int) -> list[Message]:
        """Messages with first <= offset <= last that are in the window."""
        if not self.window:
            return []
        start = self.window[0].offset
        lo = max(first, start) - start
        hi = min(last, self.head) - start
        if hi < lo:
            return []
        if lo == 0 and hi == len(self.window) - 1:
            return list(self.window)
        return [self.window[i] for i in range(lo, hi + 1)]

    def member_list(self) -> tuple[str, ...]:
        if self.roster is None:
            self.roster = tuple(sorted(self.users))
        return self.roster
