"""A room as this engine holds it: who is in it, and its recent history.

The room does not number messages: offsets come from the log (``Appended``),
and the room only checks that they arrive in order, holding early ones back
until the gap before them is filled.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque

from ._awaits import PendingSend
from ._codec import encode_string, members_shell
from ._commands import Mode
from ._events import Members, Message
from ._session import Connection, Ledger

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
        "counted",
        "ledger",
        "_ids",
        "_where",
        "behind",
        "users",
        "_sorted",
        "_encoded",
        "_roster",
        "_members_json",
        "_members_shell",
        "typing",
        "changed",
        "reads",
        "early",
        "gap_ref",
        "banned",
        "muted",
        "remote",
        "flips",
        "heard",
        "known",
        "ahead",
        "past",
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
        # The live JSON connections' outboxes: those this room's ledger counts (its
        # members), and the rest (counted by another room's ledger, or by none),
        # which the fan-out counts one by one. See _session.Ledger.
        self.ledger = Ledger()
        self.counted: dict[int, Connection] = {}
        # tuple(self.conns) until it changes, and each id's place in it.
        self._ids: tuple[int, ...] | None = None
        self._where: dict[int, int] | None = None
        # Connections that fell behind the live fan-out (their outbox filled): they
        # replay from the window as they write, and are given up once it moves past them.
        self.behind: dict[int, Connection] = {}
        # Members: sessions per user, counting sessions in their grace period.
        self.users: dict[str, int] = {}
        # The users in order and each one's JSON string, kept sorted as they come and
        # go: a join in a crowded room costs a binary search and a join of strings,
        # never a sort or an encoding of everyone.
        self._sorted: list[str] = []
        self._encoded: list[str] = []
        self._roster: tuple[str, ...] | None = None  # _sorted as a tuple, until it changes
        # The last members frame: (offset, epoch, its JSON); joins in a row encode it once.
        self._members_json: tuple[int, str, str] | None = None
        # (offset, epoch, the frame before the users, after them): kept while members
        # come and go, so a join next to a crowd joins strings and encodes nothing.
        self._members_shell: tuple[int, str, str, str] | None = None
        # user -> (when the indicator expires, id of its one live timer)
        self.typing: dict[str, tuple[float, int]] = {}
        # A crowded room's comings and goings since its last ``presence`` frame, in
        # order (``_presence.came_or_went``); None when none are waiting.
        self.changed: dict[str, None] | None = None
        self.reads: dict[str, int] = {}
        # Messages from the log that arrived before the ones preceding them.
        self.early: dict[int, tuple[Message, PendingSend | None]] = {}
        self.gap_ref: int | None = None
        # Moderation (``_moderation``): users banned, and muted until when.
        self.banned: set[str] = set()
        self.muted: dict[str, float] = {}
        # Several processes (``_cluster``): users with sessions in the room on other
        # processes (how many processes each), listed with the local ones; where
        # local members' first and last sessions are noted; when the bus or the log
        # last said something of the room; the head the log last reported.
        self.remote: dict[str, int] = {}
        self.flips: list[tuple[str, str, bool]] | None = None
        self.heard = 0.0
        self.known = 0
        # Connections that resumed having seen more than this process has heard
        # of yet: they go live once the room has caught up with them.
        self.ahead: dict[int, Connection] = {}
        # Epochs the room's history has left (a bus message of one, late, is stale).
        self.past: set[str] = set()

    def attach(self, conn: Connection) -> None:
        """Put ``conn`` on the live fan-out (again: nothing changes)."""
        if conn.mode is not Mode.JSON:
            self.text_conns[conn.id] = conn
        elif conn.id not in self.conns:
            self.conns[conn.id] = conn
            self._ids = None
            if conn.ledger is None:
                self.ledger.join(conn)
            else:
                self.counted[conn.id] = conn
        if self.behind:
            self.behind.pop(conn.id, None)

    def detach(self, conn: Connection) -> None:
        """Take ``conn`` off the live fan-out, and off the lists of those waiting."""
        if conn.mode is not Mode.JSON:
            self.text_conns.pop(conn.id, None)
        elif self.conns.pop(conn.id, None) is not None:
            self._ids = None
            if conn.ledger is self.ledger:
                self.ledger.leave(conn)
            else:
                del self.counted[conn.id]
        if self.behind:
            self.behind.pop(conn.id, None)
        if self.ahead:
            self.ahead.pop(conn.id, None)

    def live_ids(self) -> tuple[int, ...]:
        """The live JSON connections' ids, in the order they went live."""
        ids = self._ids
        if ids is None:
            ids = self._ids = tuple(self.conns)
            self._where = None
        return ids

    def live_without(self, conn_id: int) -> tuple[int, ...] | None:
        """:meth:`live_ids` less ``conn_id``; None if it is not among them."""
        ids = self.live_ids()
        where = self._where
        if where is None:
            where = self._where = dict(zip(ids, range(len(ids)), strict=True))
        i = where.get(conn_id)
        if i is None:
            return None
        return ids[:i] + ids[i + 1 :]

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

    def add_user(self, user: str) -> bool:
        """Count one more session of ``user`` in the room; True if the user is new
        (to the room, on any process)."""
        count = self.users.get(user, 0)
        self.users[user] = count + 1
        if count:
            return False
        if self.flips is not None:
            self.flips.append((self.name, user, True))
            if user in self.remote:
                return False
        self._insert(user)
        return True

    def add_remote(self, user: str) -> bool:
        """One more process has ``user`` in the room; True if the user is new."""
        count = self.remote.get(user, 0)
        self.remote[user] = count + 1
        if count or user in self.users:
            return False
        self._insert(user)
        return True

    def remove_remote(self, user: str) -> bool:
        """One process less has ``user`` in the room; True if that was the user's last."""
        count = self.remote[user] - 1
        if count:
            self.remote[user] = count
            return False
        del self.remote[user]
        if user in self.users:
            return False
        self._remove(user)
        return True

    def _insert(self, user: str) -> None:
        i = bisect_left(self._sorted, user)
        self._sorted.insert(i, user)
        self._encoded.insert(i, encode_string(user))
        self._roster = self._members_json = None

    def remove_user(self, user: str) -> bool:
        """Count one session of ``user`` less; True if that was the user's last
        (in the room, on any process)."""
        count = self.users[user] - 1
        if count:
            self.users[user] = count
            return False
        del self.users[user]
        if self.flips is not None:
            self.flips.append((self.name, user, False))
            if user in self.remote:
                return False
        self._remove(user)
        return True

    def _remove(self, user: str) -> None:
        i = bisect_left(self._sorted, user)
        del self._sorted[i]
        del self._encoded[i]
        self._roster = self._members_json = None

    def present(self, user: str) -> bool:
        """Whether ``user`` is a member, here or (``_cluster``) on another process."""
        return user in self.users or user in self.remote

    def crowd(self) -> int:
        """How many users are members, on every process."""
        return len(self._sorted)

    def member_list(self) -> tuple[str, ...]:
        """The users, sorted."""
        if self._roster is None:
            self._roster = tuple(self._sorted)
        return self._roster

    def members(self, offset: int) -> tuple[Members, str]:
        """The members event with everything after ``offset`` to follow, and its JSON."""
        event = Members(room=self.name, users=self.member_list(), offset=offset, epoch=self.epoch)
        cached = self._members_json
        if cached is not None and cached[0] == offset and cached[1] == self.epoch:
            return event, cached[2]
        shell = self._members_shell
        if shell is None or shell[0] != offset or shell[1] != self.epoch:
            head, tail = members_shell(event)
            shell = self._members_shell = (offset, self.epoch, head, tail)
        data = f"{shell[2]}{','.join(self._encoded)}{shell[3]}"
        self._members_json = (offset, self.epoch, data)
        return event, data
