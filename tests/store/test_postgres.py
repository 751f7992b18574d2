"""PostgreSQL only: outage and recovery, upgrades in place, servers sharing a schema."""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator

import anyio
import psycopg
import pytest
from psycopg import sql

from chatcore import (
    Append,
    Appended,
    AppendFailed,
    HistoryFailed,
    HistoryLoaded,
    LoadHistory,
    LoadRoom,
    RoomLoaded,
    RoomLoadFailed,
)
from chatcore_store import StoreUnavailable, open_store
from chatcore_store.postgres import SCHEMA_VERSION, PostgresStore, migrate

from .conftest import PG_URL, drop_schema, new_schema

pytestmark = [pytest.mark.anyio, pytest.mark.postgres, pytest.mark.usefixtures("pg_url")]

T0 = 1_795_000_000_000


def append(ref: int, room: str = "lobby", cid: str | None = None, sender: str = "alice") -> Append:
    return Append(ref=ref, room=room, sender=sender, text=f"m{ref}", ts=T0, client_id=cid)


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    name = new_schema()
    try:
        yield name
    finally:
        await drop_schema(name)


def _cluster(action: str) -> None:
    versions = os.listdir("/etc/postgresql")
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", versions[0], "main", action],
        check=True,
        timeout=120,
    )


@pytest.mark.pg_outage
async def test_postgres_stopped_fails_appends_then_recovers(schema: str) -> None:
    if not os.path.isdir("/etc/postgresql"):
        pytest.skip("no local PostgreSQL cluster to stop (pg_ctlcluster)")
    async with PostgresStore(PG_URL, schema=schema, connect_timeout=2) as store:
        await store.execute([LoadRoom(room="lobby", recent=0)])
        [ok] = await store.execute([append(1, cid="a")])
        assert isinstance(ok, Appended)
        try:
            _cluster("stop")
            answers = await store.execute(
                [append(2, cid="b"), LoadHistory(ref=7, room="lobby", after=0, before=99)]
            )
            assert answers == [
                AppendFailed(ref=2, reason="store unavailable"),
                HistoryFailed(ref=7, reason="store unavailable"),
            ]
            assert await store.execute([LoadRoom(room="lobby", recent=5)]) == [
                RoomLoadFailed(room="lobby", reason="store unavailable")
            ]
            with pytest.raises(StoreUnavailable):
                await store.rooms()
        finally:
            _cluster("start")  # always, even when the test fails
        # Back by itself, on the first batch after the restart.
        answers = await store.execute(
            [append(3, cid="b"), LoadHistory(ref=8, room="lobby", after=0, before=99)]
        )
        assert isinstance(answers[0], Appended)
        assert (answers[0].message.offset, answers[0].duplicate) == (2, False)
        assert isinstance(answers[1], HistoryLoaded)
        assert [m.text for m in answers[1].messages] == ["m1", "m3"]


async def test_an_old_schema_is_upgraded_in_place(schema: str) -> None:
    async with await psycopg.AsyncConnection.connect(PG_URL, autocommit=True) as db:
        await db.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        await db.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        assert await migrate(db, schema, target=1) == 0
        await db.execute("INSERT INTO rooms (name, epoch, head) VALUES ('lobby', 'e-old', 1)")
        await db.execute(
            "INSERT INTO messages VALUES ('lobby', 1, 'e-old', 'alice', 'from v1', %s, 'c1')",
            (T0,),
        )
    async with PostgresStore(PG_URL, schema=schema) as store:
        [room] = await store.execute([LoadRoom(room="lobby", recent=5)])
        assert isinstance(room, RoomLoaded)
        assert (room.epoch, room.head, [m.text for m in room.recent]) == ("e-old", 1, ["from v1"])
        [dup] = await store.execute([append(1, cid="c1")])
        assert isinstance(dup, Appended)
        assert dup.duplicate
        await store.set_retention("lobby", max_messages=10)  # a column version 2 added
    async with await psycopg.AsyncConnection.connect(PG_URL) as db:
        cur = await db.execute(
            sql.SQL("SELECT max(version) FROM {}.schema_version").format(sql.Identifier(schema))
        )
        assert await cur.fetchone() == (SCHEMA_VERSION,)


async def test_dm_rooms_stored_public_before_version_5_become_private(schema: str) -> None:
    async with await psycopg.AsyncConnection.connect(PG_URL, autocommit=True) as db:
        await db.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        await db.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        assert await migrate(db, schema, target=4) == 0
        for name in ("dm:alice:bob", "dm:bob:carol", "lobby"):
            await db.execute(
                "INSERT INTO rooms (name, epoch, head) VALUES (%s, 'e-old', 1)", (name,)
            )
    async with PostgresStore(PG_URL, schema=schema) as store:
        got = {r.name: (r.private, sorted(r.allow)) for r in await store.rooms()}
    assert got == {
        "dm:alice:bob": (True, ["alice", "bob"]),
        "dm:bob:carol": (True, ["bob", "carol"]),
        "lobby": (False, []),
    }


async def test_two_servers_share_a_room_without_gaps_or_repeats(schema: str) -> None:
    stores = [PostgresStore(PG_URL, schema=schema) for _ in range(2)]
    for store in stores:
        await store.open()
    offsets: list[int] = []
    duplicates: list[int] = []

    async def server(store: PostgresStore, me: int) -> None:
        for batch in range(10):
            effects = [append(batch * 100 + i, cid=f"s{me}-{batch}-{i}") for i in range(10)]
            # Every client id is also retried once through the other server.
            effects += [append(999, cid=f"s{1 - me}-{batch}-{i}") for i in range(0, 10, 3)]
            for answer in await store.execute(effects):
                assert isinstance(answer, Appended)
                (duplicates if answer.duplicate else offsets).append(answer.message.offset)

    try:
        async with anyio.create_task_group() as tg:
            for me, store in enumerate(stores):
                tg.start_soon(server, store, me)
        [page] = await stores[0].execute([LoadHistory(ref=1, room="lobby", after=0, before=10**6)])
    finally:
        for store in stores:
            await store.close()
    assert sorted(offsets) == list(range(1, 201))
    assert isinstance(page, HistoryLoaded)
    assert [m.offset for m in page.messages] == list(range(1, 201))
    assert len({(m.sender, m.client_id) for m in page.messages}) == 200
    assert len(duplicates) == 80  # each key was sent twice: one of the two is the duplicate


async def test_schemas_keep_test_runs_apart(schema: str) -> None:
    other = new_schema()
    try:
        async with (
            PostgresStore(PG_URL, schema=schema) as a,
            PostgresStore(PG_URL, schema=other) as b,
        ):
            await a.execute([LoadRoom(room="only-in-a", recent=0)])
            assert [r.name for r in await a.rooms()] == ["only-in-a"]
            assert await b.rooms() == []
    finally:
        await drop_schema(other)


async def test_open_store_reads_the_schema_from_the_url(schema: str) -> None:
    store = open_store(f"{PG_URL}?schema={schema}&connect_timeout=3")
    assert isinstance(store, PostgresStore)
    assert store.schema == schema
    async with store:
        [room] = await store.execute([LoadRoom(room="lobby", recent=0)])
        assert isinstance(room, RoomLoaded)


def test_bad_schema_names_are_refused() -> None:
    with pytest.raises(ValueError, match="schema"):
        PostgresStore(PG_URL, schema='x"; DROP TABLE rooms; --')


async def test_an_append_whose_insert_fails_stores_nothing_and_the_next_batch_works(
    schema: str,
) -> None:
    # The INSERT and the head moves leave with the COMMIT, unanswered (pipeline mode):
    # their failure must still fail the whole batch, and leave the connection usable.
    store = PostgresStore(PG_URL, schema=schema)
    await store.open()
    try:
        [first] = await store.execute([append(1)])
        assert isinstance(first, Appended)
        assert first.message.offset == 1
        async with await psycopg.AsyncConnection.connect(PG_URL, autocommit=True) as db:
            # A row at the next offset that the head does not know of: the INSERT collides.
            await db.execute(
                sql.SQL(
                    "INSERT INTO {}.messages (room, msg_offset, epoch, sender, text, ts)"
                    " VALUES ('lobby', 2, 'x', 'mallory', 'squatter', 0)"
                ).format(sql.Identifier(schema))
            )
            answers = await store.execute([append(2), append(3)])
            assert [type(a) for a in answers] == [AppendFailed, AppendFailed]
            head = await (
                await db.execute(
                    sql.SQL("SELECT head FROM {}.rooms WHERE name = 'lobby'").format(
                        sql.Identifier(schema)
                    )
                )
            ).fetchone()
            assert head == (1,)  # the head moved in the same transaction did not stay moved
            await db.execute(
                sql.SQL("DELETE FROM {}.messages WHERE sender = 'mallory'").format(
                    sql.Identifier(schema)
                )
            )
        [again] = await store.execute([append(4)])
        assert isinstance(again, Appended)
        assert again.message.offset == 2
        [page] = await store.execute([LoadHistory(ref=5, room="lobby", after=0, before=10)])
        assert isinstance(page, HistoryLoaded)
        assert [m.text for m in page.messages] == ["m1", "m4"]
    finally:
        await store.close()


async def test_a_batch_cancelled_in_its_transaction_leaves_nothing_for_the_next(
    schema: str,
) -> None:
    # BEGIN and COMMIT are plain statements on the store's one connection: a batch
    # cancelled between them (its server shutting down) must not leave its transaction
    # open for the next batch to commit or trip over.
    store = PostgresStore(PG_URL, schema=schema)
    await store.open()
    try:
        [first] = await store.execute([append(1)])
        assert isinstance(first, Appended)
        db = await psycopg.AsyncConnection.connect(PG_URL, autocommit=True)
        async with db, db.transaction():
            await db.execute(
                sql.SQL("SELECT * FROM {}.rooms WHERE name = 'lobby' FOR UPDATE").format(
                    sql.Identifier(schema)
                )
            )
            with anyio.move_on_after(0.5) as waited:
                await store.execute([append(2)])  # waits for the row lock
            assert waited.cancelled_caught
        [again] = await store.execute([append(3)])
        assert isinstance(again, Appended)
        assert again.message.offset == 2
        [page] = await store.execute([LoadHistory(ref=5, room="lobby", after=0, before=10)])
        assert isinstance(page, HistoryLoaded)
        assert [m.text for m in page.messages] == ["m1", "m3"]
    finally:
        await store.close()
