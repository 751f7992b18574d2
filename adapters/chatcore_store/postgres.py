"""PostgresStore: history in PostgreSQL, shared by any number of servers.

This module owns the PostgreSQL schema (created and migrated here, versioned
in ``schema_version``) and the connection; what a batch does is
``_base.SQLStore``'s, in the statements of ``_sql``. The driver is psycopg 3
in its asyncio mode: it is maintained by PostgreSQL's own community, typed
(``py.typed``, so ``mypy --strict`` checks our calls, where asyncpg ships no
annotations), speaks libpq's connection strings and URLs unchanged, and its
``binary`` wheel needs nothing installed on the machine. It runs on asyncio,
so a server using this store runs anyio's asyncio backend.

Rows travel as one array per column (``unnest``), and each batch runs in
psycopg's pipeline mode (statements that answer nothing leave with the
COMMIT), so a run of appends costs two round trips (three with client ids)
however long it is. The rooms' rows are locked
in name order (two servers never deadlock); the locks make offsets gap-free
and the exactly-once key hold even with several servers writing the same room.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus

from ._base import Rows, SQLStore, Work, drive_async, new_epoch
from ._sql import Dialect, Statement, Statements

__all__ = ["DEFAULT_SCHEMA", "SCHEMA_VERSION", "PostgresStore"]

T = TypeVar("T")

DEFAULT_SCHEMA = "chatcore"
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")

_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE rooms (
            name text PRIMARY KEY,
            private boolean NOT NULL DEFAULT false,
            allow text[] NOT NULL DEFAULT '{}',
            epoch text NOT NULL,
            head bigint NOT NULL DEFAULT 0
        )""",
        """CREATE TABLE messages (
            room text NOT NULL,
            msg_offset bigint NOT NULL,
            epoch text NOT NULL,
            sender text NOT NULL,
            text text NOT NULL,
            ts bigint NOT NULL,
            client_id text,
            PRIMARY KEY (room, msg_offset)
        )""",
        # The exactly-once key: a retried send with the same client id finds its message.
        """CREATE UNIQUE INDEX messages_client_key
            ON messages (room, sender, client_id) WHERE client_id IS NOT NULL""",
        """CREATE TABLE positions (
            username text NOT NULL,
            room text NOT NULL,
            delivered bigint NOT NULL,
            read bigint NOT NULL,
            PRIMARY KEY (username, room)
        )""",
    ),
    2: (
        "ALTER TABLE rooms ADD COLUMN max_messages integer, ADD COLUMN max_age_ms bigint",
        "CREATE INDEX messages_ts ON messages (room, ts)",
    ),
    # Retention by age walks the oldest messages in offset order instead.
    3: ("DROP INDEX messages_ts",),
    # A new session's inbox finds the user's direct-message rooms by either name.
    4: (
        "CREATE INDEX rooms_dm_first ON rooms (split_part(name, ':', 2))"
        " WHERE left(name, 3) = 'dm:'",
        "CREATE INDEX rooms_dm_second ON rooms (split_part(name, ':', 3))"
        " WHERE left(name, 3) = 'dm:'",
    ),
    # Direct-message rooms were created public. The access rule decides them by
    # name anyway; this makes the stored rows say the same (private, the pair).
    5: (
        "UPDATE rooms SET private = true,"
        " allow = ARRAY[split_part(name, ':', 2), split_part(name, ':', 3)]"
        " WHERE left(name, 3) = 'dm:'",
    ),
    # Moderation: who is banned or muted in a room, and messages deleted in place
    # (the offset stays, the text goes) so history shows them deleted, gap-free.
    6: (
        "ALTER TABLE messages ADD COLUMN deleted boolean NOT NULL DEFAULT false",
        """CREATE TABLE moderation (
            room text NOT NULL,
            username text NOT NULL,
            banned boolean NOT NULL DEFAULT false,
            muted_until bigint,
            PRIMARY KEY (room, username)
        )""",
    ),
    # The key directory of end-to-end encrypted direct messages: public keys only.
    7: (
        """CREATE TABLE devices (
            username text NOT NULL,
            device text NOT NULL,
            identity text NOT NULL,
            PRIMARY KEY (username, device)
        )""",
        """CREATE TABLE prekeys (
            username text NOT NULL,
            device text NOT NULL,
            key_id bigint NOT NULL,
            key text NOT NULL,
            PRIMARY KEY (username, device, key_id)
        )""",
    ),
    # A room's load brings its read marks (RoomLoaded.reads): found by room.
    8: ("CREATE INDEX positions_room ON positions (room)",),
}
SCHEMA_VERSION = max(_MIGRATIONS)


async def migrate(
    db: psycopg.AsyncConnection[Any], schema: str, target: int = SCHEMA_VERSION
) -> int:
    """Create ``schema`` if needed and bring it up to ``target``; returns the version found.

    An advisory lock makes servers that start together migrate one at a time;
    each step commits together with the version row that records it.
    """
    async with db.transaction():
        await db.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"chatcore:{schema}",))
        await db.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        await db.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
        cur = await db.execute("SELECT coalesce(max(version), 0) FROM schema_version")
        row = await cur.fetchone()
        found = int(row[0]) if row else 0
        if found > SCHEMA_VERSION:
            raise RuntimeError(
                f"schema {schema} is at version {found}, newer than this chatcore"
                f" ({SCHEMA_VERSION})"
            )
        for version in range(found + 1, target + 1):
            for statement in _MIGRATIONS[version]:
                await db.execute(statement)
            await db.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
    return found


_DIALECT = Dialect(
    placeholder="%s",
    greatest="greatest",
    no_limit=None,
    lock_rooms=" FOR UPDATE",
    allow_from_json="ARRAY(SELECT jsonb_array_elements_text(CAST({} AS jsonb)))",
    read_allow=frozenset,
    # Either name of "dm:a:b", through the indexes of migration 4.
    dm_rooms="SELECT name FROM rooms WHERE left(name, 3) = 'dm:' AND split_part(name, ':', 2) = ?"
    " UNION ALL"
    " SELECT name FROM rooms WHERE left(name, 3) = 'dm:' AND split_part(name, ':', 3) = ?",
    array_types={"text": "text", "int": "bigint", "bool": "boolean"},
    # Each device's lowest prekey that no other claim holds right now (SKIP LOCKED:
    # a claim racing this one takes the next prekey instead of waiting for this
    # one and finding it gone), chosen once (a CTE: a lateral subquery joined into
    # the DELETE would be run again per row and take them all); the DELETE returns
    # only rows it deleted itself.
    claim_prekeys="WITH c AS MATERIALIZED (SELECT d.device, k.key_id FROM devices d"
    " CROSS JOIN LATERAL (SELECT key_id FROM prekeys k"
    "  WHERE k.username = d.username AND k.device = d.device"
    "  ORDER BY key_id LIMIT 1 FOR UPDATE SKIP LOCKED) k WHERE d.username = ?)"
    " DELETE FROM prekeys p USING c WHERE p.username = ? AND p.device = c.device"
    " AND p.key_id = c.key_id RETURNING p.device, p.key_id, p.key",
)


class PostgresStore(SQLStore):
    """History in the ``schema`` of the database at ``conninfo`` (a URL or libpq string).

    Tests give each run its own schema; servers sharing a history share one.
    """

    answers_at_once = False

    def __init__(
        self,
        conninfo: str,
        *,
        schema: str = DEFAULT_SCHEMA,
        connect_timeout: float = 5.0,
        epochs: Callable[[], str] = new_epoch,
        retention_chunk: int = 500,
    ) -> None:
        if not _SCHEMA_NAME.fullmatch(schema):
            raise ValueError(f"schema name must match {_SCHEMA_NAME.pattern}, got {schema!r}")
        self.conninfo = conninfo
        self.schema = schema
        self._pg = _Driver(conninfo, schema=schema, connect_timeout=connect_timeout)
        super().__init__(self._pg, epochs=epochs, retention_chunk=retention_chunk)

    def __repr__(self) -> str:
        return f"PostgresStore(schema={self.schema!r})"

    async def drop_schema(self) -> None:
        """Delete the schema and everything in it (for tests and throwaway runs)."""
        async with self._locked():
            await self._pg.drop_schema()


class _Driver:
    """One asyncio connection in autocommit mode (see ``SQLDriver``)."""

    statements = Statements(_DIALECT)
    errors: tuple[type[Exception], ...] = (psycopg.Error,)
    unreachable = "cannot connect to PostgreSQL"
    # A COMMIT whose answer was lost may have been stored: a retry would store it twice.
    failed_commit_may_have_stored = True

    def __init__(self, conninfo: str, *, schema: str, connect_timeout: float) -> None:
        self.conninfo = conninfo
        self.schema = schema
        self._connect_timeout = connect_timeout
        self._db: psycopg.AsyncConnection[Any] | None = None
        self._closed = True

    @property
    def connected(self) -> bool:
        return self._db is not None and not self._db.closed

    async def open(self) -> None:
        self._closed = False
        await self.connect()

    async def close(self) -> None:
        self._closed = True
        await self._drop()

    async def connect(self) -> None:
        await self._connection()

    async def run(self, work: Work[T], *, write: bool = True) -> T:
        db = await self._connection()
        # Pipeline mode: a statement goes out without waiting for the one before, and
        # the client waits only where the work needs an answer. The BEGIN leaves with
        # the first statement, the quiet ones (an append run's INSERT and head moves)
        # with the COMMIT, whose answer is awaited by the pipeline's closing sync: an
        # append run is two round trips (three with client ids) where it was six.
        # Every round trip is a wake-up of the database's backend and of this loop,
        # which a busy machine delays. BEGIN and COMMIT are plain statements:
        # psycopg's transaction() syncs the pipeline on the way in and out.
        try:
            async with db.pipeline() as pipeline:

                async def execute(statement: Statement) -> Rows:
                    if statement.many:
                        async with db.cursor() as many:
                            await many.executemany(statement.sql, statement.params)
                        return []
                    cursor = await db.execute(statement.sql, statement.params)
                    if statement.quiet:
                        return []
                    await pipeline.sync()
                    if statement.count:
                        return [(cursor.rowcount,)]
                    return await cursor.fetchall() if cursor.description is not None else []

                await db.execute("BEGIN")
                result = await drive_async(work, execute)
                await db.execute("COMMIT")
        except psycopg.Error:
            # Undo what the failed statement left open; a connection too broken for
            # that is dropped by broken(). (A batch cancelled half-way may leave its
            # transaction open: _connection() replaces such a connection.)
            with contextlib.suppress(psycopg.Error):
                await db.execute("ROLLBACK")
            raise
        return result  # the pipeline's closing sync answered the COMMIT

    async def broken(self, exc: Exception) -> None:
        db = self._db
        if db is not None and (db.closed or db.broken or isinstance(exc, psycopg.OperationalError)):
            await self._drop()

    async def drop_schema(self) -> None:
        db = await self._connection()
        await db.execute(
            sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.schema))
        )
        await self._drop()

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._closed:
            raise psycopg.InterfaceError("the store is closed")
        if self._db is not None and not self._db.closed:
            if self._db.info.transaction_status == TransactionStatus.IDLE:
                return self._db
            await self._drop()  # a batch cancelled in its transaction: start afresh
        db = await psycopg.AsyncConnection.connect(
            self.conninfo,
            autocommit=True,  # transactions are explicit, one per batch
            connect_timeout=max(1, round(self._connect_timeout)),
            application_name="chatcore",
        )
        try:
            await db.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))
            await migrate(db, self.schema)
        except BaseException:
            await db.close()
            raise
        self._db = db
        return db

    async def _drop(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await db.close()
