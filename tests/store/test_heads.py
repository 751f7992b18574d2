"""``LoadHeads``: one read of many rooms' heads, on every store (memory, SQLite,
PostgreSQL in a schema of its own). Processes sharing a log probe it to learn
what the bus did not tell them."""

from __future__ import annotations

import pytest

from chatcore import Append, Appended, HeadsFailed, HeadsLoaded, LoadHeads, LoadRoom, RoomLoaded
from chatcore_store import MemoryStore, is_storage_effect

from .conftest import MakeStore

pytestmark = pytest.mark.anyio

T0 = 1_795_000_000_000


def append(ref: int, room: str) -> Append:
    return Append(ref=ref, room=room, sender="alice", text=f"t{ref}", ts=T0)


async def test_heads_of_many_rooms_in_one_answer(make_store: MakeStore) -> None:
    store = await make_store()
    loaded = await store.execute([LoadRoom(room="a", recent=0), LoadRoom(room="b", recent=0)])
    epochs = {r.room: r.epoch for r in loaded if isinstance(r, RoomLoaded)}
    answers = await store.execute([append(1, "a"), append(2, "a"), append(3, "b")])
    assert all(isinstance(a, Appended) for a in answers)
    effect = LoadHeads(ref=7, rooms=("a", "b", "never", "a"))
    assert is_storage_effect(effect)
    [answer] = await store.execute([effect])
    assert answer == HeadsLoaded(ref=7, heads={"a": (2, epochs["a"]), "b": (1, epochs["b"])})


async def test_heads_survive_a_restart(make_store: MakeStore) -> None:
    store = await make_store()
    await store.execute([LoadRoom(room="a", recent=0), append(1, "a")])
    again = await make_store()
    [answer] = await again.execute([LoadHeads(ref=1, rooms=("a",))])
    assert isinstance(answer, HeadsLoaded)
    assert answer.heads["a"][0] == 1


async def test_no_rooms_asked_no_rooms_answered(make_store: MakeStore) -> None:
    store = await make_store()
    assert await store.execute([LoadHeads(ref=3, rooms=())]) == [HeadsLoaded(ref=3, heads={})]


def test_an_outage_fails_the_probe() -> None:
    store = MemoryStore()
    store.available = False
    assert store.execute_now([LoadHeads(ref=4, rooms=("a",))]) == [HeadsFailed(ref=4)]


def test_a_lost_room_starts_a_new_life() -> None:
    store = MemoryStore()
    [loaded, _] = store.execute_now([LoadRoom(room="a", recent=0), append(1, "a")])
    assert isinstance(loaded, RoomLoaded)
    store.lose("a")
    [answer] = store.execute_now([LoadHeads(ref=1, rooms=("a",))])
    assert isinstance(answer, HeadsLoaded)
    head, epoch = answer.heads["a"]
    assert head == 0
    assert epoch != loaded.epoch
