"""SQLite only: outages of the file, locking, upgrades of old files, backends."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from chatcore import (
    Append,
    Appended,
    AppendFailed,
    HistoryLoaded,
    Join,
    LoadHistory,
    LoadRoom,
    Members,
    Position,
    RoomLoaded,
    RoomLoadFailed,
    SavePositions,
)
from chatcore_store import StoreUnavailable, open_store
from chatcore_store.sqlite import SCHEMA_VERSION, SQLiteStore, migrate

from .driver import Driver
from .outage import unwritable

pytestmark = pytest.mark.anyio

T0 = 1_795_000_000_000


def append(ref: int, room: str = "lobby", cid: str | None = None) -> Append:
    return Append(ref=ref, room=room, sender="alice", text=f"m{ref}", ts=T0, client_id=cid)


async def test_an_unwritable_file_fails_appends_then_recovers(tmp_path: Path) -> None:
    path = tmp_path / "chat.db"
    async with SQLiteStore(path) as store:
        await store.execute([LoadRoom(room="lobby", recent=0)])
        [ok] = await store.execute([append(1)])
        assert isinstance(ok, Appended)
        with unwritable(path):
            answers = await store.execute([append(2), append(3, cid="x")])
            assert answers == [
                AppendFailed(ref=2, reason="store unavailable"),
                AppendFailed(ref=3, reason="store unavailable"),
            ]
            # Reads still work while writes fail.
            [page] = await store.execute([LoadHistory(ref=9, room="lobby", after=0, before=99)])
            assert isinstance(page, HistoryLoaded)
            assert [m.offset for m in page.messages] == [1]
        # Back by itself: the failed appends left no trace, offsets go on without a gap.
        answers = await store.execute([append(4, cid="x")])
        assert [(a.message.offset, a.duplicate) for a in answers if isinstance(a, Appended)] == [
            (2, False)
        ]
    async with SQLiteStore(path) as store:
        [page] = await store.execute([LoadHistory(ref=9, room="lobby", after=0, before=99)])
        assert isinstance(page, HistoryLoaded)
        assert [m.text for m in page.messages] == ["m1", "m4"]


async def test_load_room_while_unwritable(tmp_path: Path) -> None:
    path = tmp_path / "chat.db"
    async with SQLiteStore(path) as store:
        await store.execute([LoadRoom(room="old", recent=0)])
        with unwritable(path):
            answers = await store.execute(
                [LoadRoom(room="old", recent=5), LoadRoom(room="new", recent=5), append(1, "old")]
            )
            # The existing room can be read; the new one cannot be created.
            assert [type(a) for a in answers] == [RoomLoaded, RoomLoadFailed, AppendFailed]
            assert answers[1] == RoomLoadFailed(room="new", reason="store unavailable")
        [room] = await store.execute([LoadRoom(room="new", recent=5)])
        assert isinstance(room, RoomLoaded)
        assert (room.room, room.head) == ("new", 0)


async def test_engine_users_get_unavailable_and_nothing_unstored_is_broadcast(
    tmp_path: Path,
) -> None:
    path = tmp_path / "chat.db"
    async with SQLiteStore(path) as store:
        driver = Driver(store)
        alice = await driver.connect("alice", "lobby")
        bob = await driver.connect("bob", "lobby")
        await driver.send(alice, "lobby", "before", client_id="a1")
        with unwritable(path):
            await driver.send(alice, "lobby", "during", client_id="a2")
            assert [e.code for e in driver.errors(alice)] == ["unavailable"]
            assert [m.text for m in driver.messages(bob)] == ["before"]
            await driver.feed(Join(conn=bob, room="new"))  # a room never stored
            assert [(e.code, e.ref) for e in driver.errors(bob)] == [("unavailable", "new")]
        await driver.send(alice, "lobby", "during", client_id="a2")  # the client retries
        assert [(a.offset, a.client_id) for a in driver.acks(alice)] == [(1, "a1"), (2, "a2")]
        assert [(m.offset, m.text) for m in driver.messages(bob)] == [(1, "before"), (2, "during")]
        await driver.feed(Join(conn=bob, room="new"))
        assert driver.errors(bob)[1:] == []
        assert [j.room for j in driver.of(bob, Members)] == ["lobby", "new"]


async def test_a_locked_database_fails_the_batch_then_recovers(tmp_path: Path) -> None:
    path = tmp_path / "chat.db"
    async with SQLiteStore(path, busy_timeout=0.05) as store:
        await store.execute([LoadRoom(room="lobby", recent=0)])
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
            assert await store.execute([append(1)]) == [
                AppendFailed(ref=1, reason="store unavailable")
            ]
        finally:
            other.execute("ROLLBACK")
            other.close()
        [ok] = await store.execute([append(2)])
        assert isinstance(ok, Appended)
        assert ok.message.offset == 1


async def test_an_old_file_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path, isolation_level=None)
    assert migrate(db, target=1) == 0
    db.execute("INSERT INTO rooms (name, epoch, head) VALUES ('lobby', 'e-old', 1)")
    db.execute(
        "INSERT INTO messages VALUES ('lobby', 1, 'e-old', 'alice', 'from v1', ?, 'c1')", (T0,)
    )
    db.close()
    async with SQLiteStore(path) as store:
        [room] = await store.execute([LoadRoom(room="lobby", recent=5)])
        assert isinstance(room, RoomLoaded)
        assert (room.epoch, room.head, [m.text for m in room.recent]) == ("e-old", 1, ["from v1"])
        [dup] = await store.execute([append(1, cid="c1")])
        assert isinstance(dup, Appended)
        assert dup.duplicate
        await store.set_retention("lobby", max_messages=10)  # a column version 2 added
    db = sqlite3.connect(path)
    assert db.execute("SELECT max(version) FROM schema_version").fetchone() == (SCHEMA_VERSION,)
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    db.close()


async def test_dm_rooms_stored_public_before_version_5_become_private(tmp_path: Path) -> None:
    path = tmp_path / "v4.db"
    db = sqlite3.connect(path, isolation_level=None)
    assert migrate(db, target=4) == 0
    for name in ("dm:alice:bob", "dm:bob:carol", "lobby"):
        db.execute("INSERT INTO rooms (name, epoch, head) VALUES (?, 'e-old', 1)", (name,))
    db.close()
    async with SQLiteStore(path) as store:
        got = {r.name: (r.private, sorted(r.allow)) for r in await store.rooms()}
    assert got == {
        "dm:alice:bob": (True, ["alice", "bob"]),
        "dm:bob:carol": (True, ["bob", "carol"]),
        "lobby": (False, []),
    }


async def test_a_newer_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    db = sqlite3.connect(path, isolation_level=None)
    migrate(db)
    db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION + 1,))
    db.close()
    with pytest.raises(RuntimeError, match="newer"):
        await SQLiteStore(path).open()


async def test_read_marks_never_move_back(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "chat.db") as store:
        await store.execute(
            [
                SavePositions(user="alice", positions=(Position(room="a", delivered=9, read=7),)),
                # A session that ends after its room was reloaded may report less.
                SavePositions(user="alice", positions=(Position(room="a", delivered=4, read=0),)),
            ]
        )
        assert await store.positions("alice") == {"a": (9, 7)}


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_in_memory_sqlite_works_on_both_backends(anyio_backend: str) -> None:
    store = open_store("sqlite://:memory:")
    assert isinstance(store, SQLiteStore)
    async with store:
        await store.execute([LoadRoom(room="lobby", recent=0)])
        answers = await store.execute([append(i) for i in range(1, 4)])
        assert [a.message.offset for a in answers if isinstance(a, Appended)] == [1, 2, 3]
        assert [r.name for r in await store.rooms()] == ["lobby"]


async def test_an_unopenable_path_is_unavailable(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "missing-dir" / "chat.db")
    with pytest.raises(StoreUnavailable):
        await store.open()
    # execute never raises for appends, even on a store that cannot open its file.
    assert await store.execute([append(1)]) == [AppendFailed(ref=1, reason="store unavailable")]
