"""Every statement the durable stores run against their tables, written once.

SQLite and PostgreSQL read the same statements; what differs between them is
named in a :class:`Dialect` (placeholders, the two-argument maximum, how a
list of rows travels as one parameter set, the row locks of an append, how a
direct-message room is found by either of its users). The schemas and their
migrations are not here: each driver owns its own, since they differ in types
and indexes. This module builds text and parameters; it runs nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["COLUMNS", "Dialect", "Statement", "Statements", "allow_json"]

COLUMNS = "room, msg_offset, epoch, sender, text, ts, client_id, deleted"
"""A message's columns, in the order ``Message`` is built from a row (``deleted``
is not inserted: a new message is not deleted, the column's default)."""

Column = tuple[str, str]  # (name, "text" | "int" | "bool" | "names": a JSON array of names)

_MESSAGE = (
    ("room", "text"),
    ("msg_offset", "int"),
    ("epoch", "text"),
    ("sender", "text"),
    ("text", "text"),
    ("ts", "int"),
    ("client_id", "text"),
)
_NEW_ROOM = (("name", "text"), ("epoch", "text"), ("private", "bool"), ("allow", "names"))
_KEY = (("room", "text"), ("sender", "text"), ("client_id", "text"))
_HEAD = (("name", "text"), ("head", "int"))
_NAME = (("name", "text"),)


@dataclass(frozen=True, slots=True)
class Statement:
    """One statement and its parameters. ``count``: the driver answers
    ``[(rows changed,)]`` instead of the rows; ``many``: ``params`` is a list
    of parameter rows, the statement runs once for each (and answers ``[]``);
    ``quiet``: it returns no rows and its work needs no answer, so a driver may
    answer ``[]`` at once and send it with what follows (its failure, if any,
    then fails the transaction at a later statement or at the COMMIT)."""

    sql: str
    params: Sequence[Any] = ()
    count: bool = False
    many: bool = False
    quiet: bool = False


def allow_json(allow: Iterable[str]) -> str:
    """An allow list as both dialects take it in: a JSON array, sorted."""
    return json.dumps(sorted(allow))


@dataclass(frozen=True, slots=True, kw_only=True)
class Dialect:
    """What one database says differently. Statements are written with ``?``."""

    placeholder: str
    greatest: str
    """The two-argument maximum."""
    no_limit: int | None
    """The ``LIMIT`` that means every row."""
    lock_rooms: str
    """Appended to the select of the rooms an append run writes (row locks)."""
    allow_from_json: str
    """Turns ``{}``, a JSON array of names, into the allow column's value."""
    read_allow: Callable[[Any], frozenset[str]]
    dm_rooms: str
    """A select of the names of USER's direct-message rooms; every ``?`` is USER."""
    array_types: dict[str, str] | None = None
    """Rows travel as one array per column (PostgreSQL's ``unnest``), cast to these
    types: one round trip for any number of rows. None: rows are read as ``VALUES``,
    one parameter per value, and inserted one by one (SQLite inserts those fastest)."""
    max_params: int | None = None
    """Bound parameters one statement may carry (None: no limit)."""
    claim_prekeys: str = (
        "DELETE FROM prekeys WHERE (username, device, key_id) IN ("
        " SELECT username, device, min(key_id) FROM prekeys WHERE username = ?"
        " GROUP BY username, device)"
        " RETURNING device, key_id, key"
    )
    """Deletes and returns the lowest prekey of each of USER's devices (every ``?``
    is USER). The default suits a database whose writers take turns (SQLite)."""

    def sql(self, text: str) -> str:
        return text if self.placeholder == "?" else text.replace("?", self.placeholder)

    def table(
        self, name: str, columns: Sequence[Column], rows: Sequence[tuple[Any, ...]]
    ) -> tuple[str, list[Any]]:
        """A ``WITH`` entry naming ``rows`` as a table, and its parameters."""
        names = ", ".join(c for c, _ in columns)
        if self.array_types is None:
            one = "(" + ", ".join("?" * len(columns)) + ")"
            values = ", ".join([one] * len(rows))
            return f"{name} ({names}) AS (VALUES {values})", [v for row in rows for v in row]
        arrays = ", ".join(f"?::{self.array_types.get(kind, 'text')}[]" for _, kind in columns)
        return f"{name} ({names}) AS (SELECT * FROM unnest({arrays}))", [
            list(col) for col in zip(*rows, strict=True)
        ]

    def insert(
        self,
        into: str,
        columns: Sequence[Column],
        rows: Sequence[tuple[Any, ...]],
        suffix: str,
        *,
        quiet: bool = False,
    ) -> Statement:
        names = ", ".join(c for c, _ in columns)

        def value(column: Column, source: str) -> str:
            return self.allow_from_json.format(source) if column[1] == "names" else source

        if self.array_types is None:
            marks = ", ".join(value(c, "?") for c in columns)
            text = f"INSERT INTO {into} ({names}) VALUES ({marks}){suffix}"
            return Statement(self.sql(text), rows, many=True, quiet=quiet)
        table, params = self.table("v", columns, rows)
        select = ", ".join(value(c, c[0]) for c in columns)
        text = f"WITH {table} INSERT INTO {into} ({names}) SELECT {select} FROM v WHERE true"
        text += suffix  # "WHERE true": an ON CONFLICT after a SELECT must not read as a join
        return Statement(self.sql(text), params, quiet=quiet)

    def chunks(
        self, rows: Sequence[tuple[Any, ...]], width: int
    ) -> Iterator[Sequence[tuple[Any, ...]]]:
        size = len(rows) if self.max_params is None else self.max_params // width
        for lo in range(0, len(rows), max(size, 1)):
            yield rows[lo : lo + size]


class Statements:
    """The statements in one dialect: fixed text built once, rows bound per call."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = d = dialect
        q = d.sql
        self.room = q("SELECT epoch, head, private, allow FROM rooms WHERE name = ?")
        self.recent = q(
            f"SELECT {COLUMNS} FROM messages WHERE room = ? ORDER BY msg_offset DESC LIMIT ?"
        )
        self.range = q(
            f"SELECT {COLUMNS} FROM messages WHERE room = ? AND msg_offset > ? AND msg_offset < ?"
            " ORDER BY msg_offset DESC LIMIT ?"
        )
        # The user's direct-message rooms with something unread whose newest
        # message is someone else's, newest first.
        self.inbox = q(
            "SELECT r.name FROM rooms r"
            " LEFT JOIN positions p ON p.username = ? AND p.room = r.name"
            " LEFT JOIN messages m ON m.room = r.name AND m.msg_offset = r.head"
            f" WHERE r.name IN ({d.dm_rooms})"
            " AND r.head > coalesce(p.read, 0)"
            " AND (m.sender IS NULL OR m.sender <> ?)"
            " ORDER BY m.ts DESC NULLS LAST, r.name LIMIT ?"
        )
        self.inbox_user_marks = 2 + d.dm_rooms.count("?")
        self.save_room = q(
            "INSERT INTO rooms (name, private, allow, epoch)"
            f" VALUES (?, ?, {d.allow_from_json.format('?')}, ?)"
            " ON CONFLICT (name) DO UPDATE SET private = excluded.private, allow = excluded.allow"
        )
        self.set_retention = q("UPDATE rooms SET max_messages = ?, max_age_ms = ? WHERE name = ?")
        rooms = (
            "SELECT r.name, r.private, r.allow, r.epoch, r.head, r.max_messages, r.max_age_ms,"
            " (SELECT count(*) FROM messages m WHERE m.room = r.name) FROM rooms r"
        )
        self.rooms = q(f"{rooms} ORDER BY r.name")
        self.one_room = q(f"{rooms} WHERE r.name = ?")
        # (room, first stored offset, last offset the limits cut) of every room with
        # a limit, its own or the server's default (the parameters after ``now``).
        # Too old: everything before the oldest message young enough to keep;
        # the scan walks only the messages it will delete, so ts needs no index.
        self.retention_cuts = q(
            "SELECT r.name, (SELECT min(msg_offset) FROM messages m WHERE m.room = r.name),"
            f" {d.greatest}(coalesce(r.head - coalesce(r.max_messages, ?), 0),"
            "  CASE WHEN coalesce(r.max_age_ms, ?) IS NULL THEN 0 ELSE"
            "   coalesce((SELECT m.msg_offset - 1 FROM messages m"
            "    WHERE m.room = r.name AND m.ts >= ? - coalesce(r.max_age_ms, ?)"
            "    ORDER BY m.msg_offset LIMIT 1), r.head) END)"
            " FROM rooms r WHERE coalesce(r.max_messages, ?) IS NOT NULL"
            " OR coalesce(r.max_age_ms, ?) IS NOT NULL"
        )
        self.delete_range = q("DELETE FROM messages WHERE room = ? AND msg_offset BETWEEN ? AND ?")
        self.positions = q("SELECT room, delivered, read FROM positions WHERE username = ?")
        self.room_reads = q("SELECT username, read FROM positions WHERE room = ? AND read > 0")
        # The key directory (schema 7): public keys only.
        self.device_identity = q("SELECT identity FROM devices WHERE username = ? AND device = ?")
        self.device_count = q("SELECT count(*) FROM devices WHERE username = ?")
        self.save_device = q(
            "INSERT INTO devices (username, device, identity) VALUES (?, ?, ?)"
            " ON CONFLICT (username, device) DO UPDATE SET identity = excluded.identity"
        )
        self.drop_prekeys = q("DELETE FROM prekeys WHERE username = ? AND device = ?")
        self.prekey_count = q("SELECT count(*) FROM prekeys WHERE username = ? AND device = ?")
        self.save_prekeys = q(
            "INSERT INTO prekeys (username, device, key_id, key) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (username, device, key_id) DO NOTHING"
        )
        self.claim_prekeys = q(d.claim_prekeys)
        self.claim_user_marks = d.claim_prekeys.count("?")
        self.devices = q("SELECT device, identity FROM devices WHERE username = ? ORDER BY device")
        self.stock = q("SELECT device, count(*) FROM prekeys WHERE username = ? GROUP BY device")
        # Moderation (schema 6): a row per user banned or muted in a room.
        self.moderation = q("SELECT username, banned, muted_until FROM moderation WHERE room = ?")
        # Each sets its own column and leaves the other as stored.
        self.save_ban = q(
            "INSERT INTO moderation (room, username, banned) VALUES (?, ?, ?)"
            " ON CONFLICT (room, username) DO UPDATE SET banned = excluded.banned"
        )
        self.save_mute = q(
            "INSERT INTO moderation (room, username, muted_until) VALUES (?, ?, ?)"
            " ON CONFLICT (room, username) DO UPDATE SET muted_until = excluded.muted_until"
        )
        # A row that holds neither is forgotten.
        self.forget_moderation = q(
            "DELETE FROM moderation WHERE room = ? AND username = ?"
            " AND NOT banned AND muted_until IS NULL"
        )
        # The offset stays (history keeps no gap); the text goes.
        self.delete_message = q(
            "UPDATE messages SET text = '', deleted = TRUE WHERE room = ? AND msg_offset = ?"
        )
        # Run once per position: a mark only moves forward.
        self.save_positions = q(
            "INSERT INTO positions (username, room, delivered, read) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (username, room) DO UPDATE SET"
            f" delivered = {d.greatest}(positions.delivered, excluded.delivered),"
            f" read = {d.greatest}(positions.read, excluded.read)"
        )

    def _bulk(
        self,
        columns: Sequence[Column],
        rows: Sequence[tuple[Any, ...]],
        template: str,
        *,
        quiet: bool = False,
    ) -> Iterator[Statement]:
        """``WITH v AS (rows) <template>``, as many statements as the dialect needs."""
        for part in self.dialect.chunks(rows, len(columns)):
            table, params = self.dialect.table("v", columns, part)
            yield Statement(self.dialect.sql(f"WITH {table} {template}"), params, quiet=quiet)

    def heads(self, names: Sequence[str]) -> Iterator[Statement]:
        """(name, epoch, head) of those rooms that exist, locked for the run."""
        return self._bulk(
            _NAME,
            [(n,) for n in names],
            "SELECT name, epoch, head FROM rooms WHERE name IN (SELECT name FROM v)"
            f" ORDER BY name{self.dialect.lock_rooms}",
        )

    def read_heads(self, names: Sequence[str]) -> Iterator[Statement]:
        """(name, epoch, head) of those rooms that exist, read without a lock."""
        return self._bulk(
            _NAME,
            [(n,) for n in dict.fromkeys(names)],
            "SELECT name, epoch, head FROM rooms WHERE name IN (SELECT name FROM v)",
        )

    def create_rooms(self, rows: Sequence[tuple[str, str, bool, str]]) -> Statement:
        """Rows of (name, epoch, private, allow as JSON); a room that exists stays."""
        return self.dialect.insert("rooms", _NEW_ROOM, rows, " ON CONFLICT DO NOTHING")

    def stored(self, keys: Sequence[tuple[str, str, str]]) -> Iterator[Statement]:
        """The stored messages of these exactly-once keys (room, sender, client id)."""
        columns = ", ".join("m." + c for c in COLUMNS.split(", "))
        return self._bulk(
            _KEY,
            keys,
            f"SELECT {columns} FROM v JOIN messages m ON m.room = v.room"
            " AND m.sender = v.sender AND m.client_id = v.client_id"
            " WHERE m.client_id IS NOT NULL",
        )

    def insert_messages(self, rows: Sequence[tuple[Any, ...]]) -> Statement:
        """The new messages of an append run (quiet: sent with the COMMIT)."""
        return self.dialect.insert("messages", _MESSAGE, rows, "", quiet=True)

    def move_heads(self, rows: Sequence[tuple[str, int]]) -> Iterator[Statement]:
        """The heads an append run moved (quiet: sent with the COMMIT)."""
        return self._bulk(
            _HEAD,
            rows,
            "UPDATE rooms SET head = v.head FROM v WHERE rooms.name = v.name",  # SQLite 3.33+
            quiet=True,
        )
