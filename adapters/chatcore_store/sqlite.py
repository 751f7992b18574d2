"""SQLiteStore: the default durable store, one file in WAL mode (or ``:memory:``).

This module owns the SQLite schema and every statement against it. The
standard library's ``sqlite3`` blocks, so every call runs on an anyio worker
thread, one at a time (a capacity limiter of one guards the one connection):
the event loop never waits on the disk, on asyncio and trio alike, with no
dependency beyond anyio. An async driver (aiosqlite) would be the same
design, a thread per connection, behind another package.

One ``execute`` batch is one transaction (group commit): every ``Appended``
in its answer is committed, or none is and each ``Append`` gets
``AppendFailed`` (and a ``LoadRoom`` it cannot answer ``RoomLoadFailed``).
After a database error the connection is dropped and opened
again on the next call, so the store recovers by itself once the file is
writable again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from chatcore import (
    Append,
    Appended,
    AppendFailed,
    Command,
    HistoryFailed,
    HistoryLoaded,
    InboxFailed,
    InboxLoaded,
    LoadHistory,
    LoadInbox,
    LoadRoom,
    Message,
    RoomLoaded,
    RoomLoadFailed,
    SavePositions,
    SaveRoom,
    room_rule,
)

from ._base import (
    RoomInfo,
    StorageEffect,
    StoreUnavailable,
    delete_in_chunks,
    group_appends,
    history_request,
    inbox_args,
    new_epoch,
    number_appends,
)

__all__ = ["SCHEMA_VERSION", "SQLiteStore"]

log = logging.getLogger("chatcore_store.sqlite")

T = TypeVar("T")

UNAVAILABLE = "store unavailable"

_DM_SECOND = "substr(name, 4 + instr(substr(name, 4), ':'))"  # "b" of "dm:a:b"

_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE rooms (
            name TEXT PRIMARY KEY,
            private INTEGER NOT NULL DEFAULT 0,
            allow TEXT NOT NULL DEFAULT '[]',
            epoch TEXT NOT NULL,
            head INTEGER NOT NULL DEFAULT 0
        )""",
        """CREATE TABLE messages (
            room TEXT NOT NULL,
            msg_offset INTEGER NOT NULL,
            epoch TEXT NOT NULL,
            sender TEXT NOT NULL,
            text TEXT NOT NULL,
            ts INTEGER NOT NULL,
            client_id TEXT,
            PRIMARY KEY (room, msg_offset)
        ) WITHOUT ROWID""",
        # The exactly-once key: a retried send with the same client id finds its message.
        """CREATE UNIQUE INDEX messages_client_key
            ON messages (room, sender, client_id) WHERE client_id IS NOT NULL""",
        """CREATE TABLE positions (
            username TEXT NOT NULL,
            room TEXT NOT NULL,
            delivered INTEGER NOT NULL,
            read INTEGER NOT NULL,
            PRIMARY KEY (username, room)
        ) WITHOUT ROWID""",
    ),
    2: (
        "ALTER TABLE rooms ADD COLUMN max_messages INTEGER",
        "ALTER TABLE rooms ADD COLUMN max_age_ms INTEGER",
        "CREATE INDEX messages_ts ON messages (room, ts)",
    ),
    # Retention by age walks the oldest messages in offset order instead; the index
    # cost a third of the append rate across many rooms.
    3: ("DROP INDEX messages_ts",),
    # A new session's inbox finds the user's direct-message rooms by name: as the
    # first user through the primary key ("dm:USER:" prefix), as the second
    # through this index on what follows the second ':'.
    4: (f"CREATE INDEX rooms_dm_second ON rooms ({_DM_SECOND})",),
    # Direct-message rooms were created public. The access rule decides them by
    # name anyway; this makes the stored rows say the same (private, the pair).
    5: (
        "UPDATE rooms SET private = 1, allow = json_array("
        f"substr(name, 4, instr(substr(name, 4), ':') - 1), {_DM_SECOND})"
        " WHERE name >= 'dm:' AND name < 'dm;'",
    ),
}
SCHEMA_VERSION = max(_MIGRATIONS)

_MESSAGE_COLUMNS = "room, msg_offset, epoch, sender, text, ts, client_id"
_CHUNK = 900  # bound parameters per statement (old SQLite builds allow 999)


def _message(row: Sequence[Any]) -> Message:
    return Message(
        room=row[0],
        offset=row[1],
        epoch=row[2],
        sender=row[3],
        text=row[4],
        ts=row[5],
        client_id=row[6],
    )


def _allow_text(allow: Iterable[str]) -> str:
    return json.dumps(sorted(allow))


def migrate(db: sqlite3.Connection, target: int = SCHEMA_VERSION) -> int:
    """Bring the schema up to ``target`` in place; returns the version found.

    Each step runs in the same transaction as the version row that records it.
    """
    found = _version(db)
    if found > SCHEMA_VERSION:
        raise RuntimeError(
            f"database schema version {found} is newer than this chatcore ({SCHEMA_VERSION})"
        )
    if found >= target:
        return found
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        found = _version(db)  # another process may have migrated meanwhile
        for version in range(found + 1, target + 1):
            for statement in _MIGRATIONS[version]:
                db.execute(statement)
            db.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return found


def _version(db: sqlite3.Connection) -> int:
    exists = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
    ).fetchone()
    if exists is None:
        return 0
    row = db.execute("SELECT max(version) FROM schema_version").fetchone()
    return int(row[0] or 0)


class SQLiteStore:
    """History in one SQLite file (``":memory:"``: in this process only).

    ``synchronous`` is SQLite's ``PRAGMA synchronous``: ``FULL`` (the default)
    keeps every committed batch through a power cut; ``NORMAL`` keeps them
    through a crash of this process but may lose the last batches on power loss.
    ``busy_timeout`` (seconds) is how long a write waits for another process's lock
    before the batch fails.
    """

    answers_at_once = False

    def __init__(
        self,
        path: str | os.PathLike[str] = "chatcore.db",
        *,
        synchronous: str = "FULL",
        busy_timeout: float = 5.0,
        epochs: Callable[[], str] = new_epoch,
        retention_chunk: int = 500,
    ) -> None:
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"unknown synchronous mode {synchronous!r}")
        self.path = os.fspath(path)
        self._synchronous = synchronous.upper()
        self._busy_timeout = busy_timeout
        self._epochs = epochs
        self._chunk = retention_chunk
        self._db: sqlite3.Connection | None = None
        self._limiter: anyio.CapacityLimiter | None = None
        self._closed = True

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"

    @property
    def in_memory(self) -> bool:
        return self.path == ":memory:" or self.path.startswith("file::memory:")

    # -- life cycle ---------------------------------------------------------------

    async def open(self) -> None:
        """Open the file, switch to WAL and create or upgrade the schema.

        Raises ``StoreUnavailable`` if the file cannot be opened."""
        self._closed = False
        try:
            await self._run(self._connection)
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailable(f"cannot open {self.path}: {exc}") from exc

    async def close(self) -> None:
        self._closed = True
        await self._run(self._drop)

    async def __aenter__(self) -> SQLiteStore:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- the adapter's face -----------------------------------------------------------

    async def execute(self, effects: Sequence[StorageEffect]) -> list[Command]:
        if not effects:
            return []
        return await self._run(self._execute, effects)

    # -- admin and maintenance ------------------------------------------------------------

    async def rooms(self) -> list[RoomInfo]:
        return await self._guarded(self._rooms)

    async def room(self, name: str) -> RoomInfo | None:
        found = [r for r in await self._guarded(self._rooms, name) if r.name == name]
        return found[0] if found else None

    async def save_room(self, name: str, *, private: bool, allow: frozenset[str]) -> RoomInfo:
        def work(db: sqlite3.Connection) -> RoomInfo:
            with _transaction(db):
                self._save_room(db, SaveRoom(room=name, private=private, allow=allow))
            return self._rooms(db, name)[0]

        return await self._guarded(work)

    async def set_retention(
        self, name: str, *, max_messages: int | None = None, max_age: float | None = None
    ) -> None:
        if max_messages is not None and max_messages < 0:
            raise ValueError("max_messages must not be negative")
        if max_age is not None and max_age < 0:
            raise ValueError("max_age must not be negative")
        age_ms = None if max_age is None else round(max_age * 1000)

        def work(db: sqlite3.Connection) -> None:
            with _transaction(db):
                self._room_row(db, name)
                db.execute(
                    "UPDATE rooms SET max_messages = ?, max_age_ms = ? WHERE name = ?",
                    (max_messages, age_ms, name),
                )

        await self._guarded(work)

    async def apply_retention(self, now: float) -> int:
        """Cut every room down to its limits, ``retention_chunk`` messages per
        transaction; the database is released between chunks, so batches interleave."""
        cuts = await self._guarded(self._retention_cuts, round(now * 1000))

        async def delete(room: str, lo: int, hi: int) -> int:
            return await self._guarded(self._delete_range, room, lo, hi)

        return await delete_in_chunks(cuts, self._chunk, delete)

    async def history(
        self, room: str, *, after: int = 0, before: int | None = None, limit: int | None = None
    ) -> tuple[Message, ...]:
        return await self._guarded(self._range, history_request(room, after, before, limit))

    async def positions(self, user: str) -> dict[str, tuple[int, int]]:
        def work(db: sqlite3.Connection) -> dict[str, tuple[int, int]]:
            rows = db.execute(
                "SELECT room, delivered, read FROM positions WHERE username = ?", (user,)
            ).fetchall()
            return {r[0]: (r[1], r[2]) for r in rows}

        return await self._guarded(work)

    # -- threads and connections -----------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(1)
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def _guarded(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(db, *args)`` on the worker; a database failure becomes StoreUnavailable."""

        def work() -> T:
            try:
                return fn(self._connection(), *args)
            except (sqlite3.Error, OSError) as exc:
                self._broken(exc)
                raise StoreUnavailable(f"{UNAVAILABLE}: {exc}") from exc

        return await self._run(work)

    def _connection(self) -> sqlite3.Connection:
        if self._closed:
            raise sqlite3.ProgrammingError("the store is closed")
        if self._db is not None:
            return self._db
        db = sqlite3.connect(
            self.path,
            timeout=self._busy_timeout,
            isolation_level=None,  # transactions are begun and ended here, explicitly
            check_same_thread=False,  # one worker at a time, guarded by the limiter
            uri=self.path.startswith("file:"),
        )
        try:
            db.execute("PRAGMA journal_mode = WAL")
            db.execute(f"PRAGMA synchronous = {self._synchronous}")
            migrate(db)
        except BaseException:
            db.close()
            raise
        self._db = db
        return db

    def _drop(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            with contextlib.suppress(sqlite3.Error):  # closing a broken handle
                db.close()

    def _broken(self, exc: BaseException) -> None:
        log.warning("sqlite store %s failed: %s", self.path, exc)
        db = self._db
        if db is not None and db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        if not self.in_memory:  # an in-memory database dies with its only connection
            self._drop()

    # -- one batch ------------------------------------------------------------------------

    def _execute(self, effects: Sequence[StorageEffect]) -> list[Command]:
        for attempt in (1, 2):
            reused = self._db is not None
            try:
                db = self._connection()
            except (sqlite3.Error, OSError) as exc:
                self._broken(exc)
                return self._degraded(effects, reachable=False)
            try:
                answers: list[Command] = []
                with _transaction(db):
                    for run in group_appends(effects):
                        if isinstance(run, list):
                            answers.extend(self._append_run(db, run))
                        elif (answer := self._apply(db, run)) is not None:
                            answers.append(answer)
                return answers
            except (sqlite3.Error, OSError) as exc:
                self._broken(exc)
                # A handle opened while the file was read-only stays read-only: a batch
                # that failed on an old handle gets one more try on a fresh one.
                if attempt == 2 or not reused or self._db is not None:
                    break
        return self._degraded(effects, reachable=True)

    def _degraded(self, effects: Sequence[StorageEffect], *, reachable: bool) -> list[Command]:
        """The batch failed: no Append of it is stored. Reads are still tried one by
        one (a read-only or locked file can still be read) until the database cannot
        even be opened."""
        answers: list[Command] = []
        for effect in effects:
            if isinstance(effect, Append):
                answers.append(AppendFailed(ref=effect.ref, reason=UNAVAILABLE))
                continue
            done, answer = False, None
            if reachable:
                try:
                    db = self._connection()
                except (sqlite3.Error, OSError) as exc:
                    self._broken(exc)
                    reachable = False
                else:
                    try:
                        with _transaction(
                            db, write=not isinstance(effect, (LoadHistory, LoadInbox))
                        ):
                            answer = self._apply(db, effect)
                        done = True
                    except (sqlite3.Error, OSError) as exc:
                        self._broken(exc)
            if done:
                if answer is not None:
                    answers.append(answer)
                continue
            match effect:
                case LoadHistory():
                    answers.append(HistoryFailed(ref=effect.ref, reason=UNAVAILABLE))
                case LoadRoom():
                    answers.append(RoomLoadFailed(room=effect.room, reason=UNAVAILABLE))
                case LoadInbox():
                    answers.append(InboxFailed(ref=effect.ref, reason=UNAVAILABLE))
                case _:
                    log.warning("sqlite store %s lost %r", self.path, effect)
        return answers

    def _apply(self, db: sqlite3.Connection, effect: StorageEffect) -> Command | None:
        match effect:
            case Append():
                return self._append_run(db, [effect])[0]
            case LoadRoom():
                epoch, head, private, allow = self._room_row(db, effect.room)
                recent: tuple[Message, ...] = ()
                if effect.recent > 0:
                    rows = db.execute(
                        f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE room = ?"
                        " ORDER BY msg_offset DESC LIMIT ?",
                        (effect.room, effect.recent),
                    ).fetchall()
                    recent = tuple(_message(r) for r in reversed(rows))
                return RoomLoaded(
                    room=effect.room,
                    epoch=epoch,
                    head=head,
                    private=private,
                    allow=allow,
                    recent=recent,
                )
            case LoadHistory():
                return HistoryLoaded(ref=effect.ref, messages=self._range(db, effect))
            case LoadInbox():
                # The candidates come from two index lookups (see migration 4).
                rows = db.execute(
                    "SELECT r.name FROM rooms r"
                    " LEFT JOIN positions p ON p.username = :user AND p.room = r.name"
                    " LEFT JOIN messages m ON m.room = r.name AND m.msg_offset = r.head"
                    " WHERE r.name IN ("
                    "  SELECT name FROM rooms WHERE name >= :first AND name < :after_first"
                    "  UNION ALL"
                    f"  SELECT name FROM rooms WHERE {_DM_SECOND} = :user"
                    "   AND name >= 'dm:' AND name < 'dm;')"
                    " AND r.head > coalesce(p.read, 0)"
                    " AND (m.sender IS NULL OR m.sender <> :user)"
                    " ORDER BY m.ts DESC, r.name LIMIT :limit",
                    inbox_args(effect),
                ).fetchall()
                names = tuple(r[0] for r in rows)
                return InboxLoaded(ref=effect.ref, rooms=names)
            case SaveRoom():
                self._save_room(db, effect)
                return None
            case SavePositions():
                db.executemany(
                    "INSERT INTO positions (username, room, delivered, read) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (username, room) DO UPDATE SET"
                    " delivered = max(delivered, excluded.delivered),"
                    " read = max(read, excluded.read)",
                    [(effect.user, p.room, p.delivered, p.read) for p in effect.positions],
                )
                return None

    def _room_row(self, db: sqlite3.Connection, name: str) -> tuple[str, int, bool, frozenset[str]]:
        """(epoch, head, private, allow) of the room, creating it if new: public,
        or for a direct-message room private to its two users."""
        row = db.execute(
            "SELECT epoch, head, private, allow FROM rooms WHERE name = ?", (name,)
        ).fetchone()
        if row is None:
            epoch = self._epochs()
            private, allow = room_rule(name, private=False, allow=frozenset())
            db.execute(
                "INSERT INTO rooms (name, epoch, private, allow) VALUES (?, ?, ?, ?)",
                (name, epoch, int(private), _allow_text(allow)),
            )
            return epoch, 0, private, allow
        return row[0], row[1], bool(row[2]), frozenset(json.loads(row[3]))

    def _save_room(self, db: sqlite3.Connection, effect: SaveRoom) -> None:
        private, allow = room_rule(effect.room, private=effect.private, allow=effect.allow)
        db.execute(
            "INSERT INTO rooms (name, private, allow, epoch) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET private = excluded.private,"
            " allow = excluded.allow",
            (effect.room, int(private), _allow_text(allow), self._epochs()),
        )

    def _append_run(self, db: sqlite3.Connection, run: list[Append]) -> list[Appended]:
        """Store consecutive appends: each room's row read once, the messages
        inserted in one statement, each head moved once."""
        names = list(dict.fromkeys(a.room for a in run))
        heads = self._heads(db, names)
        for name in names:
            if name not in heads:
                epoch, head, _, _ = self._room_row(db, name)
                heads[name] = (epoch, head)
        seen = self._stored_keys(db, [a for a in run if a.client_id is not None])
        answers, new = number_appends(run, heads, seen)
        rows = [(m.room, m.offset, m.epoch, m.sender, m.text, m.ts, m.client_id) for m in new]
        if rows:
            db.executemany(
                f"INSERT INTO messages ({_MESSAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)", rows
            )
            moved = {m[0] for m in rows}
            db.executemany(
                "UPDATE rooms SET head = ? WHERE name = ?",
                [(heads[name][1], name) for name in moved],
            )
        return answers

    def _heads(self, db: sqlite3.Connection, names: list[str]) -> dict[str, tuple[str, int]]:
        """(epoch, head) of those rooms that exist."""
        found: dict[str, tuple[str, int]] = {}
        for lo in range(0, len(names), _CHUNK):
            part = names[lo : lo + _CHUNK]
            marks = ", ".join("?" * len(part))
            for name, epoch, head in db.execute(
                f"SELECT name, epoch, head FROM rooms WHERE name IN ({marks})", part
            ):
                found[name] = (epoch, head)
        return found

    def _stored_keys(
        self, db: sqlite3.Connection, keyed: list[Append]
    ) -> dict[tuple[str, str, str], Message]:
        """The stored messages of these appends' exactly-once keys."""
        found: dict[tuple[str, str, str], Message] = {}
        keys = list(dict.fromkeys((a.room, a.sender, a.client_id) for a in keyed))
        for lo in range(0, len(keys), _CHUNK // 3):
            part = keys[lo : lo + _CHUNK // 3]
            values = ", ".join("(?, ?, ?)" for _ in part)
            rows = db.execute(
                f"WITH k (room, sender, client_id) AS (VALUES {values})"
                f" SELECT {', '.join('m.' + c for c in _MESSAGE_COLUMNS.split(', '))}"
                " FROM k JOIN messages m ON m.room = k.room AND m.sender = k.sender"
                " AND m.client_id = k.client_id WHERE m.client_id IS NOT NULL",
                [v for key in part for v in key],
            )
            for row in rows:
                m = _message(row)
                found[m.room, m.sender, m.client_id] = m  # type: ignore[index]
        return found

    def _range(self, db: sqlite3.Connection, effect: LoadHistory) -> tuple[Message, ...]:
        rows = db.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages"
            " WHERE room = ? AND msg_offset > ? AND msg_offset < ?"
            " ORDER BY msg_offset DESC LIMIT ?",
            (
                effect.room,
                effect.after,
                effect.before,
                -1 if effect.limit is None else max(0, effect.limit),
            ),
        ).fetchall()
        return tuple(_message(r) for r in reversed(rows))

    def _rooms(self, db: sqlite3.Connection, name: str | None = None) -> list[RoomInfo]:
        where, args = ("WHERE r.name = ?", (name,)) if name is not None else ("", ())
        rows = db.execute(
            "SELECT r.name, r.private, r.allow, r.epoch, r.head, r.max_messages, r.max_age_ms,"
            " (SELECT count(*) FROM messages m WHERE m.room = r.name)"
            f" FROM rooms r {where} ORDER BY r.name",
            args,
        ).fetchall()
        return [
            RoomInfo(
                name=r[0],
                private=bool(r[1]),
                allow=frozenset(json.loads(r[2])),
                epoch=r[3],
                head=r[4],
                max_messages=r[5],
                max_age=None if r[6] is None else r[6] / 1000,
                stored=r[7],
            )
            for r in rows
        ]

    def _retention_cuts(self, db: sqlite3.Connection, now_ms: int) -> list[tuple[str, int, int]]:
        """(room, first stored offset, last offset to delete) for every room over a limit."""
        cuts = []
        rows = db.execute(
            "SELECT name, head, max_messages, max_age_ms FROM rooms"
            " WHERE max_messages IS NOT NULL OR max_age_ms IS NOT NULL"
        ).fetchall()
        for name, head, max_messages, max_age_ms in rows:
            cut = 0
            if max_messages is not None:
                cut = head - max_messages
            if max_age_ms is not None:
                # Too old: everything before the oldest message young enough to keep. The
                # scan walks only the messages it will delete, so no index on ts is needed.
                row = db.execute(
                    "SELECT msg_offset FROM messages WHERE room = ? AND ts >= ?"
                    " ORDER BY msg_offset LIMIT 1",
                    (name, now_ms - max_age_ms),
                ).fetchone()
                cut = max(cut, head if row is None else row[0] - 1)
            first = db.execute(
                "SELECT min(msg_offset) FROM messages WHERE room = ?", (name,)
            ).fetchone()[0]
            if first is not None and cut >= first:
                cuts.append((name, first, cut))
        return cuts

    def _delete_range(self, db: sqlite3.Connection, room: str, lo: int, hi: int) -> int:
        with _transaction(db):
            cursor = db.execute(
                "DELETE FROM messages WHERE room = ? AND msg_offset BETWEEN ? AND ?",
                (room, lo, hi),
            )
        return cursor.rowcount


class _transaction:
    """BEGIN ... COMMIT, or ROLLBACK when the body raises."""

    def __init__(self, db: sqlite3.Connection, *, write: bool = True) -> None:
        self._db = db
        self._begin = "BEGIN IMMEDIATE" if write else "BEGIN"

    def __enter__(self) -> None:
        self._db.execute(self._begin)

    def __exit__(self, kind: object, value: object, tb: object) -> None:
        if kind is None:
            self._db.execute("COMMIT")
        elif self._db.in_transaction:
            self._db.execute("ROLLBACK")
