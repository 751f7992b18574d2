"""SQLiteStore: the default durable store, one file in WAL mode (or ``:memory:``).

This module owns the SQLite schema and the connection; what a batch does is
``_base.SQLStore``'s, in the statements of ``_sql``. The standard library's
``sqlite3`` blocks, so each transaction runs on an anyio worker thread, one at
a time (a capacity limiter of one guards the one connection): the event loop
never waits on the disk, on asyncio and trio alike, with no dependency beyond
anyio. A whole batch is one trip to the thread. An async driver (aiosqlite)
would be the same design, a thread per connection, behind another package.

``BEGIN IMMEDIATE`` takes the file's write lock for the whole batch, so a run
of appends needs no row locks. After a database error the connection is
dropped and opened again on the next call, so the store recovers by itself
once the file is writable again.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from ._base import Rows, SQLStore, Work, drive, new_epoch
from ._sql import Dialect, Statement, Statements

__all__ = ["SCHEMA_VERSION", "SQLiteStore"]

T = TypeVar("T")

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
    # Moderation: who is banned or muted in a room (muted_until: ms since the
    # epoch), and messages deleted in place (the offset stays, the text goes).
    6: (
        "ALTER TABLE messages ADD COLUMN deleted INTEGER NOT NULL DEFAULT 0",
        """CREATE TABLE moderation (
            room TEXT NOT NULL,
            username TEXT NOT NULL,
            banned INTEGER NOT NULL DEFAULT 0,
            muted_until INTEGER,
            PRIMARY KEY (room, username)
        ) WITHOUT ROWID""",
    ),
    # The key directory of end-to-end encrypted direct messages: public keys only.
    7: (
        """CREATE TABLE devices (
            username TEXT NOT NULL,
            device TEXT NOT NULL,
            identity TEXT NOT NULL,
            PRIMARY KEY (username, device)
        ) WITHOUT ROWID""",
        """CREATE TABLE prekeys (
            username TEXT NOT NULL,
            device TEXT NOT NULL,
            key_id INTEGER NOT NULL,
            key TEXT NOT NULL,
            PRIMARY KEY (username, device, key_id)
        ) WITHOUT ROWID""",
    ),
    # A room's load brings its read marks (RoomLoaded.reads): found by room.
    8: ("CREATE INDEX positions_room ON positions (room)",),
}
SCHEMA_VERSION = max(_MIGRATIONS)


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


_DIALECT = Dialect(
    placeholder="?",
    greatest="max",
    no_limit=-1,
    lock_rooms="",  # BEGIN IMMEDIATE holds the whole file
    allow_from_json="{}",  # the column is the JSON text
    read_allow=lambda text: frozenset(json.loads(text)),
    # As the first user through the primary key ("dm:USER:" prefix), as the
    # second through the index of migration 4.
    dm_rooms="SELECT name FROM rooms WHERE name >= 'dm:' || ? || ':' AND name < 'dm:' || ? || ';'"
    f" UNION ALL SELECT name FROM rooms WHERE {_DM_SECOND} = ?"
    " AND name >= 'dm:' AND name < 'dm;'",
    max_params=900,  # old SQLite builds allow 999
)


class SQLiteStore(SQLStore):
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
        driver = _Driver(self.path, synchronous=synchronous.upper(), busy_timeout=busy_timeout)
        super().__init__(driver, epochs=epochs, retention_chunk=retention_chunk)

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"

    @property
    def in_memory(self) -> bool:
        return _in_memory(self.path)


def _in_memory(path: str) -> bool:
    return path == ":memory:" or path.startswith("file::memory:")


class _Driver:
    """The one connection, used from a worker thread (see ``SQLDriver``)."""

    statements = Statements(_DIALECT)
    errors: tuple[type[Exception], ...] = (sqlite3.Error, OSError)
    failed_commit_may_have_stored = False  # a local file: a failed COMMIT kept nothing

    def __init__(self, path: str, *, synchronous: str, busy_timeout: float) -> None:
        self.path = path
        self.unreachable = f"cannot open {path}"
        self._synchronous = synchronous
        self._busy_timeout = busy_timeout
        self._db: sqlite3.Connection | None = None
        self._limiter: anyio.CapacityLimiter | None = None
        self._closed = True

    @property
    def connected(self) -> bool:
        return self._db is not None

    async def open(self) -> None:
        self._closed = False
        await self._thread(self._connection)

    async def close(self) -> None:
        self._closed = True
        await self._thread(self._drop)

    async def connect(self) -> None:
        if self._db is None:
            await self._thread(self._connection)

    async def run(self, work: Work[T], *, write: bool = True) -> T:
        return await self._thread(self._run, work, write)

    async def broken(self, exc: Exception) -> None:
        await self._thread(self._broken)

    async def _thread(self, fn: Callable[..., T], *args: Any) -> T:
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(1)
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    def _run(self, work: Work[T], write: bool) -> T:
        db = self._connection()

        def execute(statement: Statement) -> Rows:
            if statement.many:
                db.executemany(statement.sql, statement.params)
                return []
            cursor = db.execute(statement.sql, statement.params)
            return [(cursor.rowcount,)] if statement.count else cursor.fetchall()

        with _transaction(db, write=write):
            return drive(work, execute)

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

    def _broken(self) -> None:
        db = self._db
        if db is not None and db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        if not _in_memory(self.path):  # an in-memory database dies with its only connection
            self._drop()


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
