"""Property: the SQLite and PostgreSQL stores answer every batch exactly as
MemoryStore, the reference, does.

Random batches of appends (client ids from a small pool, so repeats happen),
room loads, history pages with random bounds, room saves, position saves,
inbox loads, retention passes and restarts of the store under test are run
against both; the answers must be equal once each store's random epoch is
replaced by a name for it (and each store keeps one epoch per room throughout).
Direct-message rooms are among the rooms, so inboxes fill, are read and empty.
"""

from __future__ import annotations

import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatcore import (
    Append,
    Appended,
    Command,
    HistoryLoaded,
    LoadHistory,
    LoadInbox,
    LoadRoom,
    Message,
    Position,
    RoomLoaded,
    SavePositions,
    SaveRoom,
)
from chatcore_store import DurableStore, MemoryStore, StorageEffect
from chatcore_store.sqlite import SQLiteStore

from .conftest import drop_schema, new_schema

T0 = 1_795_000_000_000
USER_NAMES = ["ann", "bob", "cy"]
ROOMS = st.sampled_from(["a", "b", "dm:ann:bob", "dm:ann:cy", "dm:bob:cy"])
DM_ROOMS = st.sampled_from(["dm:ann:bob", "dm:ann:cy", "dm:bob:cy"])
USERS = st.sampled_from(USER_NAMES)

effects = st.one_of(
    st.builds(
        lambda room, user, cid: ("append", room, user, cid),
        st.one_of(ROOMS, DM_ROOMS),
        USERS,
        st.one_of(st.none(), st.sampled_from(["x", "y", "z", "w"])),
    ),
    st.builds(lambda room, n: ("load", room, n), ROOMS, st.integers(0, 6)),
    st.builds(
        lambda room, after, span, limit: ("history", room, after, after + span, limit),
        ROOMS,
        st.integers(0, 12),
        st.integers(0, 12),
        st.one_of(st.none(), st.integers(0, 5)),
    ),
    st.builds(
        lambda room, private, allow: ("save", room, private, allow),
        ROOMS,
        st.booleans(),
        st.frozensets(USERS),
    ),
    st.builds(
        lambda user, room, d, r: ("positions", user, room, d, r),
        USERS,
        ROOMS,
        st.integers(0, 20),
        st.integers(0, 20),
    ),
    st.builds(lambda user, limit: ("inbox", user, limit), USERS, st.integers(0, 3)),
)
steps = st.lists(
    st.one_of(
        st.lists(effects, min_size=1, max_size=8).map(lambda b: ("batch", b)),
        st.builds(
            lambda room, keep, age: ("retention", room, keep, age),
            ROOMS,
            st.one_of(st.none(), st.integers(0, 5)),
            st.one_of(st.none(), st.integers(0, 10)),
        ),
        st.just(("restart",)),
    ),
    max_size=25,
)


class Names:
    """Gives each store's epochs stable names in order of appearance."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}
        self.by_room: dict[str, str] = {}

    def message(self, m: Message) -> Message:
        name = self.names.setdefault(m.epoch, f"e{len(self.names)}")
        assert self.by_room.setdefault(m.room, m.epoch) == m.epoch  # one epoch per room
        return replace(m, epoch=name)

    def answer(self, a: Command) -> Command:
        match a:
            case Appended():
                return replace(a, message=self.message(a.message))
            case RoomLoaded():
                self.by_room.setdefault(a.room, a.epoch)
                assert self.by_room[a.room] == a.epoch
                epoch = self.names.setdefault(a.epoch, f"e{len(self.names)}")
                return replace(a, epoch=epoch, recent=tuple(self.message(m) for m in a.recent))
            case HistoryLoaded():
                return replace(a, messages=tuple(self.message(m) for m in a.messages))
            case _:
                return a


def build(batch: list[tuple[Any, ...]], ref: int, ts: int) -> list[StorageEffect]:
    out: list[StorageEffect] = []
    for i, step in enumerate(batch):
        match step:
            case ("append", room, user, cid):
                text = f"{user} {ref + i}"
                # Server clocks step back now and then: times are not in offset order,
                # and rooms' newest messages often share a time (the inbox breaks ties).
                when = ts - (i % 2) * 90_000
                out.append(
                    Append(ref=ref + i, room=room, sender=user, text=text, ts=when, client_id=cid)
                )
            case ("load", room, n):
                out.append(LoadRoom(room=room, recent=n))
            case ("history", room, after, before, limit):
                out.append(
                    LoadHistory(ref=ref + i, room=room, after=after, before=before, limit=limit)
                )
            case ("save", room, private, allow):
                out.append(SaveRoom(room=room, private=private, allow=allow))
            case ("positions", user, room, d, r):
                out.append(
                    SavePositions(user=user, positions=(Position(room=room, delivered=d, read=r),))
                )
            case ("inbox", user, limit):
                out.append(LoadInbox(ref=ref + i, user=user, limit=limit))
    return out


OpenStore = Callable[[], Awaitable[DurableStore]]


async def answers_as_the_model(steps: list[tuple[Any, ...]], open_store: OpenStore) -> None:
    """Run ``steps`` against a store from ``open_store`` (called again for each
    restart, on the same storage) and against a MemoryStore; compare."""
    model = MemoryStore()
    store = await open_store()
    mine, theirs = Names(), Names()
    ref, now = 0, T0
    try:
        for step in steps:
            now += 60_000
            match step:
                case ("batch", batch):
                    effects = build(batch, ref, now)
                    ref += len(batch)
                    got = [mine.answer(a) for a in await store.execute(effects)]
                    want = [theirs.answer(a) for a in await model.execute(effects)]
                    assert got == want
                case ("retention", room, keep, age):
                    for s in (store, model):
                        await s.set_retention(room, max_messages=keep, max_age=age and age * 60)
                    assert await store.apply_retention(now / 1000) == await model.apply_retention(
                        now / 1000
                    )
                case ("restart",):
                    await store.close()
                    store = await open_store()
        for user in USER_NAMES:
            assert await store.positions(user) == await model.positions(user)
        got_rooms = {r.name: (r.private, r.allow, r.head, r.stored) for r in await store.rooms()}
        want_rooms = {r.name: (r.private, r.allow, r.head, r.stored) for r in await model.rooms()}
        assert got_rooms == want_rooms
    finally:
        await store.close()


@settings(max_examples=60, deadline=None)
@given(steps=steps)
def test_sqlite_answers_as_the_memory_store_does(steps: list[tuple[Any, ...]]) -> None:
    async def run(folder: Path) -> None:
        async def open_store() -> DurableStore:
            store = SQLiteStore(folder / "chat.db")
            await store.open()
            return store

        await answers_as_the_model(steps, open_store)

    with tempfile.TemporaryDirectory() as folder:
        anyio.run(run, Path(folder))


@pytest.mark.postgres
@settings(max_examples=40, deadline=None)
@given(steps=steps)
def test_postgres_answers_as_the_memory_store_does(
    pg_url: str, steps: list[tuple[Any, ...]]
) -> None:
    from chatcore_store.postgres import PostgresStore

    async def run() -> None:
        schema = new_schema()

        async def open_store() -> DurableStore:
            store = PostgresStore(pg_url, schema=schema)
            await store.open()
            return store

        try:
            await answers_as_the_model(steps, open_store)
        finally:
            await drop_schema(schema)

    anyio.run(run, backend="asyncio")  # psycopg's async connections run on asyncio
