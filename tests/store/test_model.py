"""Property: SQLiteStore answers every batch exactly as MemoryStore, the reference, does.

Random batches of appends (client ids from a small pool, so repeats happen),
room loads, history pages with random bounds, room saves, position saves,
retention passes and restarts of the SQLite store are run against both; the
answers must be equal once each store's random epoch is replaced by a name
for it (and each store keeps one epoch per room throughout).
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
from hypothesis import given, settings
from hypothesis import strategies as st

from chatcore import (
    Append,
    Appended,
    Command,
    HistoryLoaded,
    LoadHistory,
    LoadRoom,
    Message,
    Position,
    RoomLoaded,
    SavePositions,
    SaveRoom,
)
from chatcore_store import MemoryStore, StorageEffect
from chatcore_store.sqlite import SQLiteStore

T0 = 1_795_000_000_000
ROOMS = st.sampled_from(["a", "b", "c"])
USERS = st.sampled_from(["ann", "bob"])

effects = st.one_of(
    st.builds(
        lambda room, user, cid: ("append", room, user, cid),
        ROOMS,
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
                # Server clocks step back now and then: times are not in offset order.
                when = ts + (i % 3 - 1) * 90_000
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
    return out


@settings(max_examples=60, deadline=None)
@given(steps=steps)
def test_sqlite_answers_as_the_memory_store_does(steps: list[tuple[Any, ...]]) -> None:
    async def run(folder: Path) -> None:
        model = MemoryStore()
        store = SQLiteStore(folder / "chat.db")
        await store.open()
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
                        assert await store.apply_retention(
                            now / 1000
                        ) == await model.apply_retention(now / 1000)
                    case ("restart",):
                        await store.close()
                        store = SQLiteStore(folder / "chat.db")
                        await store.open()
            for user in ("ann", "bob"):
                assert await store.positions(user) == await model.positions(user)
            got_rooms = {
                r.name: (r.private, r.allow, r.head, r.stored) for r in await store.rooms()
            }
            want_rooms = {
                r.name: (r.private, r.allow, r.head, r.stored) for r in await model.rooms()
            }
            assert got_rooms == want_rooms
        finally:
            await store.close()

    with tempfile.TemporaryDirectory() as folder:
        anyio.run(run, Path(folder))
