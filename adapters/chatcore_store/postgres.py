"""PostgresStore: history in PostgreSQL, shared by any number of servers.

This module owns the PostgreSQL schema (created and migrated here, versioned
in ``schema_version``) and every statement against it. The driver is psycopg 3
in its asyncio mode: it is maintained by PostgreSQL's own community, typed
(``py.typed``, so ``mypy --strict`` checks our calls, where asyncpg ships no
annotations), speaks libpq's connection strings and URLs unchanged, and its
``binary`` wheel needs nothing installed on the machine. It runs on asyncio,
so a server using this store runs anyio's asyncio backend.

One ``execute`` batch is one transaction (group commit). A run of appends
costs a fixed handful of round trips however long it is: lock the rooms'
rows (in name order, so two servers never deadlock), look up the client ids
already stored, insert the new messages in one statement and move the
heads. The row locks make offsets gap-free and the exactly-once key hold
even with several servers writing the same room.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import anyio
import psycopg
from psycopg import sql

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

__all__ = ["DEFAULT_SCHEMA", "SCHEMA_VERSION", "PostgresStore"]

log = logging.getLogger("chatcore_store.postgres")

T = TypeVar("T")

UNAVAILABLE = "store unavailable"
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
}
SCHEMA_VERSION = max(_MIGRATIONS)

_COLUMNS = "room, msg_offset, epoch, sender, text, ts, client_id"


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


class PostgresStore:
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
        self._connect_timeout = connect_timeout
        self._epochs = epochs
        self._chunk = retention_chunk
        self._db: psycopg.AsyncConnection[Any] | None = None
        self._lock: anyio.Lock | None = None
        self._closed = True

    def __repr__(self) -> str:
        return f"PostgresStore(schema={self.schema!r})"

    # -- life cycle -----------------------------------------------------------------

    async def open(self) -> None:
        """Connect, and create or upgrade the schema. Raises ``StoreUnavailable``
        if the server cannot be reached."""
        self._closed = False
        try:
            await self._locked(self._connection)
        except psycopg.Error as exc:
            raise StoreUnavailable(f"cannot connect to PostgreSQL: {exc}") from exc

    async def close(self) -> None:
        self._closed = True
        await self._locked(self._drop)

    async def __aenter__(self) -> PostgresStore:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def drop_schema(self) -> None:
        """Delete the schema and everything in it (for tests and throwaway runs)."""

        async def work() -> None:
            db = await self._connection()
            await db.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.schema))
            )
            await self._drop()

        await self._locked(work)

    # -- the adapter's face ------------------------------------------------------------

    async def execute(self, effects: Sequence[StorageEffect]) -> list[Command]:
        if not effects:
            return []
        return await self._locked(self._execute, effects)

    # -- admin and maintenance ------------------------------------------------------------

    async def rooms(self) -> list[RoomInfo]:
        return await self._guarded(self._rooms)

    async def room(self, name: str) -> RoomInfo | None:
        found = await self._guarded(self._rooms, name)
        return found[0] if found else None

    async def save_room(self, name: str, *, private: bool, allow: frozenset[str]) -> RoomInfo:
        async def work(db: psycopg.AsyncConnection[Any]) -> RoomInfo:
            async with db.transaction():
                await self._save_room(db, SaveRoom(room=name, private=private, allow=allow))
            return (await self._rooms(db, name))[0]

        return await self._guarded(work)

    async def set_retention(
        self, name: str, *, max_messages: int | None = None, max_age: float | None = None
    ) -> None:
        if max_messages is not None and max_messages < 0:
            raise ValueError("max_messages must not be negative")
        if max_age is not None and max_age < 0:
            raise ValueError("max_age must not be negative")
        age_ms = None if max_age is None else round(max_age * 1000)

        async def work(db: psycopg.AsyncConnection[Any]) -> None:
            async with db.transaction():
                await self._room_row(db, name)
                await db.execute(
                    "UPDATE rooms SET max_messages = %s, max_age_ms = %s WHERE name = %s",
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
        async def work(db: psycopg.AsyncConnection[Any]) -> dict[str, tuple[int, int]]:
            cur = await db.execute(
                "SELECT room, delivered, read FROM positions WHERE username = %s", (user,)
            )
            return {r[0]: (r[1], r[2]) for r in await cur.fetchall()}

        return await self._guarded(work)

    # -- the connection -------------------------------------------------------------------

    async def _locked(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        if self._lock is None:
            self._lock = anyio.Lock()
        async with self._lock:
            return await fn(*args)

    async def _guarded(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        async def work() -> T:
            try:
                return await fn(await self._connection(), *args)
            except psycopg.Error as exc:
                await self._broken(exc)
                raise StoreUnavailable(f"{UNAVAILABLE}: {exc}") from exc

        return await self._locked(work)

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._closed:
            raise psycopg.InterfaceError("the store is closed")
        if self._db is not None and not self._db.closed:
            return self._db
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

    async def _broken(self, exc: BaseException) -> None:
        log.warning("postgres store (schema %s) failed: %s", self.schema, exc)
        db = self._db
        if db is not None and (db.closed or db.broken or isinstance(exc, psycopg.OperationalError)):
            await self._drop()

    # -- one batch ------------------------------------------------------------------------

    async def _execute(self, effects: Sequence[StorageEffect]) -> list[Command]:
        for attempt in (1, 2):
            reused = self._db is not None and not self._db.closed
            try:
                db = await self._connection()
            except psycopg.Error as exc:
                await self._broken(exc)
                return await self._degraded(effects, reachable=False)
            committing = False
            try:
                answers: list[Command] = []
                async with db.transaction():
                    for run in group_appends(effects):
                        if isinstance(run, list):
                            answers.extend(await self._append_run(db, run))
                        elif (answer := await self._apply(db, run)) is not None:
                            answers.append(answer)
                    committing = True
                return answers
            except psycopg.Error as exc:
                await self._broken(exc)
                # A connection the server closed since the last batch (a restart) gets
                # one more try on a fresh one. Not after a failed COMMIT: it may have
                # been stored, and a retry would store it twice (a client's retry with
                # its client id is answered as a duplicate instead).
                if attempt == 2 or not reused or committing or self._db is not None:
                    break
        return await self._degraded(effects, reachable=True)

    async def _degraded(
        self, effects: Sequence[StorageEffect], *, reachable: bool
    ) -> list[Command]:
        """The batch failed: none of its appends is stored. Reads are tried one by
        one until a connection cannot be made (one failed connect per batch at most:
        an unreachable host costs ``connect_timeout`` each time)."""
        answers: list[Command] = []
        for effect in effects:
            if isinstance(effect, Append):
                answers.append(AppendFailed(ref=effect.ref, reason=UNAVAILABLE))
                continue
            done, answer = False, None
            if reachable:
                try:
                    db = await self._connection()
                except psycopg.Error as exc:
                    await self._broken(exc)
                    reachable = False
                else:
                    try:
                        async with db.transaction():
                            answer = await self._apply(db, effect)
                        done = True
                    except psycopg.Error as exc:
                        await self._broken(exc)
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
                    log.warning("postgres store lost %r", effect)
        return answers

    async def _apply(
        self, db: psycopg.AsyncConnection[Any], effect: StorageEffect
    ) -> Command | None:
        match effect:
            case Append():
                return (await self._append_run(db, [effect]))[0]
            case LoadRoom():
                epoch, head, private, allow = await self._room_row(db, effect.room)
                recent: tuple[Message, ...] = ()
                if effect.recent > 0:
                    cur = await db.execute(
                        f"SELECT {_COLUMNS} FROM messages WHERE room = %s"
                        " ORDER BY msg_offset DESC LIMIT %s",
                        (effect.room, effect.recent),
                    )
                    recent = tuple(_message(r) for r in reversed(await cur.fetchall()))
                return RoomLoaded(
                    room=effect.room,
                    epoch=epoch,
                    head=head,
                    private=private,
                    allow=allow,
                    recent=recent,
                )
            case LoadHistory():
                return HistoryLoaded(ref=effect.ref, messages=await self._range(db, effect))
            case LoadInbox():
                # Either name of "dm:a:b", through the indexes of migration 4.
                cur = await db.execute(
                    "SELECT r.name FROM rooms r"
                    " LEFT JOIN positions p ON p.username = %(user)s AND p.room = r.name"
                    " LEFT JOIN messages m ON m.room = r.name AND m.msg_offset = r.head"
                    " WHERE r.name IN ("
                    "  SELECT name FROM rooms WHERE left(name, 3) = 'dm:'"
                    "   AND split_part(name, ':', 2) = %(user)s"
                    "  UNION ALL"
                    "  SELECT name FROM rooms WHERE left(name, 3) = 'dm:'"
                    "   AND split_part(name, ':', 3) = %(user)s)"
                    " AND r.head > coalesce(p.read, 0)"
                    " AND (m.sender IS NULL OR m.sender <> %(user)s)"
                    " ORDER BY m.ts DESC NULLS LAST, r.name LIMIT %(limit)s",
                    inbox_args(effect),
                )
                names = tuple(r[0] for r in await cur.fetchall())
                return InboxLoaded(ref=effect.ref, rooms=names)
            case SaveRoom():
                await self._save_room(db, effect)
                return None
            case SavePositions():
                async with db.cursor() as cur:
                    await cur.executemany(
                        "INSERT INTO positions (username, room, delivered, read)"
                        " VALUES (%s, %s, %s, %s)"
                        " ON CONFLICT (username, room) DO UPDATE SET"
                        " delivered = greatest(positions.delivered, excluded.delivered),"
                        " read = greatest(positions.read, excluded.read)",
                        [(effect.user, p.room, p.delivered, p.read) for p in effect.positions],
                    )
                return None

    async def _room_row(
        self, db: psycopg.AsyncConnection[Any], name: str
    ) -> tuple[str, int, bool, frozenset[str]]:
        """(epoch, head, private, allow) of the room, creating it if new: public,
        or for a direct-message room private to its two users."""
        query = "SELECT epoch, head, private, allow FROM rooms WHERE name = %s"
        row = await (await db.execute(query, (name,))).fetchone()
        if row is None:
            private, allow = room_rule(name, private=False, allow=frozenset())
            await db.execute(
                "INSERT INTO rooms (name, epoch, private, allow) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT DO NOTHING",
                (name, self._epochs(), private, sorted(allow)),
            )
            row = await (await db.execute(query, (name,))).fetchone()
            assert row is not None  # inserted just now, or by another server meanwhile
        return row[0], row[1], row[2], frozenset(row[3])

    async def _save_room(self, db: psycopg.AsyncConnection[Any], effect: SaveRoom) -> None:
        private, allow = room_rule(effect.room, private=effect.private, allow=effect.allow)
        await db.execute(
            "INSERT INTO rooms (name, private, allow, epoch) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (name) DO UPDATE SET private = excluded.private,"
            " allow = excluded.allow",
            (effect.room, private, sorted(allow), self._epochs()),
        )

    async def _append_run(
        self, db: psycopg.AsyncConnection[Any], run: list[Append]
    ) -> list[Appended]:
        names = sorted({a.room for a in run})
        rooms = await self._lock_rooms(db, names)
        missing = [n for n in names if n not in rooms]
        if missing:
            # New rooms are public, a direct-message room private to its two users;
            # each allow list travels as a JSON array (unnest flattens arrays of arrays).
            rules = [room_rule(n, private=False, allow=frozenset()) for n in missing]
            await db.execute(
                "INSERT INTO rooms (name, epoch, private, allow)"
                " SELECT n, e, p, ARRAY(SELECT jsonb_array_elements_text(a::jsonb))"
                " FROM unnest(%s::text[], %s::text[], %s::boolean[], %s::text[]) AS t(n, e, p, a)"
                " ON CONFLICT DO NOTHING",
                (
                    missing,
                    [self._epochs() for _ in missing],
                    [p for p, _ in rules],
                    [json.dumps(sorted(a)) for _, a in rules],
                ),
            )
            rooms.update(await self._lock_rooms(db, missing))
        keys = [(a.room, a.sender, a.client_id) for a in run if a.client_id is not None]
        stored: dict[tuple[str, str, str], Message] = {}
        if keys:
            cur = await db.execute(
                f"SELECT {', '.join('m.' + c for c in _COLUMNS.split(', '))} FROM messages m"
                " JOIN unnest(%s::text[], %s::text[], %s::text[]) AS k(room, sender, client_id)"
                " ON m.room = k.room AND m.sender = k.sender AND m.client_id = k.client_id"
                " WHERE m.client_id IS NOT NULL",
                ([k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys]),
            )
            for row in await cur.fetchall():
                m = _message(row)
                assert m.client_id is not None  # the WHERE says so
                stored[m.room, m.sender, m.client_id] = m
        answers, new = number_appends(run, rooms, stored)
        if new:
            await db.execute(
                f"INSERT INTO messages ({_COLUMNS}) SELECT * FROM unnest("
                "%s::text[], %s::bigint[], %s::text[], %s::text[], %s::text[], %s::bigint[],"
                " %s::text[])",
                (
                    [m.room for m in new],
                    [m.offset for m in new],
                    [m.epoch for m in new],
                    [m.sender for m in new],
                    [m.text for m in new],
                    [m.ts for m in new],
                    [m.client_id for m in new],
                ),
            )
            moved = sorted({m.room for m in new})
            await db.execute(
                "UPDATE rooms SET head = v.head"
                " FROM unnest(%s::text[], %s::bigint[]) AS v(name, head)"
                " WHERE rooms.name = v.name",
                (moved, [rooms[n][1] for n in moved]),
            )
        return answers

    async def _lock_rooms(
        self, db: psycopg.AsyncConnection[Any], names: list[str]
    ) -> dict[str, tuple[str, int]]:
        cur = await db.execute(
            "SELECT name, epoch, head FROM rooms WHERE name = ANY(%s) ORDER BY name FOR UPDATE",
            (names,),
        )
        return {r[0]: (r[1], r[2]) for r in await cur.fetchall()}

    async def _range(
        self, db: psycopg.AsyncConnection[Any], effect: LoadHistory
    ) -> tuple[Message, ...]:
        cur = await db.execute(
            f"SELECT {_COLUMNS} FROM messages"
            " WHERE room = %s AND msg_offset > %s AND msg_offset < %s"
            " ORDER BY msg_offset DESC LIMIT %s",
            (
                effect.room,
                effect.after,
                effect.before,
                None if effect.limit is None else max(0, effect.limit),
            ),
        )
        return tuple(_message(r) for r in reversed(await cur.fetchall()))

    async def _rooms(
        self, db: psycopg.AsyncConnection[Any], name: str | None = None
    ) -> list[RoomInfo]:
        cur = await db.execute(
            "SELECT r.name, r.private, r.allow, r.epoch, r.head, r.max_messages, r.max_age_ms,"
            " (SELECT count(*) FROM messages m WHERE m.room = r.name)"
            " FROM rooms r WHERE %s::text IS NULL OR r.name = %s ORDER BY r.name",
            (name, name),
        )
        return [
            RoomInfo(
                name=r[0],
                private=r[1],
                allow=frozenset(r[2]),
                epoch=r[3],
                head=r[4],
                max_messages=r[5],
                max_age=None if r[6] is None else r[6] / 1000,
                stored=r[7],
            )
            for r in await cur.fetchall()
        ]

    async def _retention_cuts(
        self, db: psycopg.AsyncConnection[Any], now_ms: int
    ) -> list[tuple[str, int, int]]:
        """(room, first stored offset, last offset to delete) for every room over a limit."""
        cur = await db.execute(
            "SELECT r.name,"
            " (SELECT min(msg_offset) FROM messages m WHERE m.room = r.name),"
            " greatest(coalesce(r.head - r.max_messages, 0),"
            # Too old: everything before the oldest message young enough to keep.
            "  CASE WHEN r.max_age_ms IS NULL THEN 0 ELSE"
            "   coalesce((SELECT m.msg_offset - 1 FROM messages m"
            "    WHERE m.room = r.name AND m.ts >= %s - r.max_age_ms"
            "    ORDER BY m.msg_offset LIMIT 1), r.head) END)"
            " FROM rooms r WHERE r.max_messages IS NOT NULL OR r.max_age_ms IS NOT NULL",
            (now_ms,),
        )
        return [
            (name, first, cut)
            for name, first, cut in await cur.fetchall()
            if first is not None and cut >= first
        ]

    async def _delete_range(
        self, db: psycopg.AsyncConnection[Any], room: str, lo: int, hi: int
    ) -> int:
        cur = await db.execute(
            "DELETE FROM messages WHERE room = %s AND msg_offset BETWEEN %s AND %s",
            (room, lo, hi),
        )
        return cur.rowcount
