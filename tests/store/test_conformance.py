"""One conformance suite, run against every store: MemoryStore, SQLite, PostgreSQL.

Each test states what the engine (and so a user) relies on. ``make_store()``
opened twice is a server restart on the same database.
"""

from __future__ import annotations

import anyio
import pytest

from chatcore import (
    Append,
    Appended,
    HistoryLoaded,
    InboxLoaded,
    LoadHistory,
    LoadInbox,
    LoadRoom,
    Message,
    Position,
    RoomLoaded,
    SavePositions,
    SaveRoom,
)
from chatcore_store import DurableStore, HistoryStore, MemoryStore

from .conftest import MakeStore

pytestmark = pytest.mark.anyio

T0 = 1_795_000_000_000  # ms


def append(
    ref: int, room: str = "lobby", sender: str = "alice", cid: str | None = None, ts: int = T0
) -> Append:
    return Append(ref=ref, room=room, sender=sender, text=f"text {ref}", ts=ts, client_id=cid)


async def load(store: HistoryStore, room: str = "lobby", recent: int = 10) -> RoomLoaded:
    [answer] = await store.execute([LoadRoom(room=room, recent=recent)])
    assert isinstance(answer, RoomLoaded)
    return answer


async def appended(store: HistoryStore, *effects: Append) -> list[Appended]:
    answers = await store.execute(list(effects))
    assert all(isinstance(a, Appended) for a in answers), answers
    return answers  # type: ignore[return-value]


async def page(
    store: HistoryStore,
    room: str = "lobby",
    after: int = 0,
    before: int = 10**9,
    limit: int | None = None,
) -> list[int]:
    [answer] = await store.execute(
        [LoadHistory(ref=99, room=room, after=after, before=before, limit=limit)]
    )
    assert isinstance(answer, HistoryLoaded)
    assert answer.ref == 99
    return [m.offset for m in answer.messages]


async def positions(store: HistoryStore, user: str) -> dict[str, tuple[int, int]]:
    assert isinstance(store, DurableStore)
    return await store.positions(user)


def durable(store: HistoryStore) -> DurableStore:
    assert isinstance(store, DurableStore)
    return store


async def test_a_new_room_is_public_and_empty(make_store: MakeStore) -> None:
    store = await make_store()
    room = await load(store, "fresh")
    assert (room.head, room.private, room.allow, room.recent) == (0, False, frozenset(), ())
    assert room.epoch


async def test_offsets_are_gap_free_per_room_across_batches(make_store: MakeStore) -> None:
    store = await make_store()
    await load(store, "a")
    await load(store, "b")
    first = await appended(store, append(1, "a"), append(2, "b"), append(3, "a"))
    second = await appended(store, append(4, "a"), append(5, "b"))
    offsets = [(a.ref, a.message.room, a.message.offset) for a in first + second]
    assert offsets == [(1, "a", 1), (2, "b", 1), (3, "a", 2), (4, "a", 3), (5, "b", 2)]
    assert all(not a.duplicate for a in first + second)
    assert (await load(store, "a")).head == 3
    assert await page(store, "a") == [1, 2, 3]


async def test_the_stored_message_is_what_was_appended(make_store: MakeStore) -> None:
    store = await make_store()
    room = await load(store)
    effect = Append(
        ref=7, room="lobby", sender="bob", text="héllo ✓\nline 2", ts=T0 + 5, client_id="c-1"
    )
    [answer] = await appended(store, effect)
    want = Message(
        room="lobby",
        offset=1,
        epoch=room.epoch,
        sender="bob",
        text=effect.text,
        ts=T0 + 5,
        client_id="c-1",
    )
    assert answer == Appended(message=want, ref=7)
    store = await make_store()
    assert (await load(store)).recent == (want,)


async def test_epoch_and_head_survive_a_restart(make_store: MakeStore) -> None:
    store = await make_store()
    before = await load(store, "a")
    other = await load(store, "b")
    assert before.epoch != other.epoch
    await appended(store, append(1, "a"), append(2, "a"))
    await store.close()
    store = await make_store()
    after = await load(store, "a")
    assert after.epoch == before.epoch
    assert after.head == 2
    [next_one] = await appended(store, append(3, "a"))
    assert (next_one.message.offset, next_one.message.epoch) == (3, before.epoch)


async def test_a_retried_send_is_stored_once_even_across_a_restart(make_store: MakeStore) -> None:
    store = await make_store()
    await load(store)
    [first] = await appended(store, append(1, cid="x"))
    await store.close()
    store = await make_store()
    [again] = await appended(store, append(2, cid="x"))
    assert again.duplicate
    assert again.ref == 2
    assert again.message == first.message
    assert await page(store) == [1]
    # The key is (room, sender, client id): other senders and rooms may reuse an id.
    answers = await appended(
        store, append(3, sender="bob", cid="x"), append(4, room="other", cid="x")
    )
    assert [(a.duplicate, a.message.offset) for a in answers] == [(False, 2), (False, 1)]


async def test_a_repeat_inside_one_batch_is_a_duplicate(make_store: MakeStore) -> None:
    store = await make_store()
    await load(store)
    answers = await appended(store, append(1, cid="k"), append(2), append(3, cid="k"), append(4))
    assert [(a.ref, a.message.offset, a.duplicate) for a in answers] == [
        (1, 1, False),
        (2, 2, False),
        (3, 1, True),
        (4, 3, False),
    ]


async def test_load_room_returns_the_newest_messages_ascending(make_store: MakeStore) -> None:
    store = await make_store()
    await load(store)
    await appended(store, *(append(i) for i in range(1, 8)))
    room = await load(store, recent=3)
    assert room.head == 7
    assert [m.offset for m in room.recent] == [5, 6, 7]
    assert [m.offset for m in (await load(store, recent=50)).recent] == list(range(1, 8))


async def test_history_ranges_and_limits(make_store: MakeStore) -> None:
    store = await make_store()
    await load(store)
    await appended(store, *(append(i) for i in range(1, 11)))
    assert await page(store, after=0, before=11) == list(range(1, 11))
    assert await page(store, after=3, before=7) == [4, 5, 6]  # both ends excluded
    assert await page(store, after=0, before=11, limit=3) == [8, 9, 10]  # the newest, ascending
    assert await page(store, after=0, before=5, limit=2) == [3, 4]
    assert await page(store, after=8, before=100, limit=5) == [9, 10]
    assert await page(store, after=5, before=6) == []
    assert await page(store, after=10, before=100) == []
    assert await page(store, room="nowhere") == []


async def test_private_rooms_keep_their_allow_list(make_store: MakeStore) -> None:
    store = await make_store()
    await store.execute([SaveRoom(room="staff", private=True, allow=frozenset({"alice", "bob"}))])
    room = await load(store, "staff")
    assert (room.private, room.allow, room.head) == (True, frozenset({"alice", "bob"}), 0)
    await appended(store, append(1, "staff"))
    await store.close()
    store = await make_store()
    again = await load(store, "staff")
    assert (again.private, again.allow, again.epoch) == (
        True,
        frozenset({"alice", "bob"}),
        room.epoch,
    )
    # Changing the list keeps the room's history and numbering.
    await store.execute([SaveRoom(room="staff", private=False, allow=frozenset())])
    opened = await load(store, "staff")
    assert (opened.private, opened.allow, opened.epoch, opened.head) == (
        False,
        frozenset(),
        room.epoch,
        1,
    )


async def test_a_dm_room_is_stored_private_to_its_two_users(make_store: MakeStore) -> None:
    # Created by its first message (the path every DM room takes), by a load, or
    # by a batch of appends to several new rooms: never public, whatever is saved.
    store = await make_store()
    pair = frozenset({"alice", "bob"})
    await appended(store, append(1, "dm:alice:bob"))
    await appended(store, append(2, "dm:bob:carol", "bob"), append(3, "lobby"))
    await load(store, "dm:alice:dave")
    await store.execute(
        [SaveRoom(room="dm:alice:bob", private=False, allow=frozenset({"mallory"}))]
    )
    for name, users in (
        ("dm:alice:bob", pair),
        ("dm:bob:carol", frozenset({"bob", "carol"})),
        ("dm:alice:dave", frozenset({"alice", "dave"})),
    ):
        room = await load(store, name)
        assert (room.private, room.allow) == (True, users), name
    assert (await load(store, "lobby")).private is False
    if isinstance(store, DurableStore):
        info = await store.room("dm:alice:bob")
        assert info is not None
        assert (info.private, info.allow) == (True, pair)


async def test_positions_are_saved_per_user_and_room(make_store: MakeStore) -> None:
    store = await make_store()
    await store.execute(
        [
            SavePositions(user="alice", positions=(Position(room="a", delivered=5, read=3),)),
            SavePositions(user="bob", positions=(Position(room="a", delivered=2, read=2),)),
            SavePositions(
                user="alice",
                positions=(
                    Position(room="a", delivered=9, read=7),
                    Position(room="b", delivered=1, read=0),
                ),
            ),
        ]
    )
    await store.close()
    store = await make_store()
    assert await positions(store, "alice") == {"a": (9, 7), "b": (1, 0)}
    assert await positions(store, "bob") == {"a": (2, 2)}
    assert await positions(store, "carol") == {}


async def test_a_room_loads_with_the_read_marks_stored_for_it(make_store: MakeStore) -> None:
    store = await make_store()
    await load(store)
    await appended(store, *(append(i) for i in range(1, 6)))
    await store.execute(
        [
            SavePositions(user="alice", positions=(Position(room="lobby", delivered=5, read=4),)),
            SavePositions(user="bob", positions=(Position(room="lobby", delivered=5, read=0),)),
            SavePositions(user="carol", positions=(Position(room="other", delivered=1, read=1),)),
            SavePositions(user="alice", positions=(Position(room="lobby", delivered=5, read=2),)),
        ]
    )
    assert (await load(store)).reads == {"alice": 4}  # marks only rise; no mark, no entry
    again = await make_store()  # a restart
    assert (await load(again)).reads == {"alice": 4}
    assert (await load(again, "fresh")).reads == {}


async def test_retention_by_count_cuts_the_oldest_and_keeps_numbering(
    make_store: MakeStore,
) -> None:
    store = durable(await make_store())
    epoch = (await load(store)).epoch
    await appended(store, *(append(i, cid=f"c{i}") for i in range(1, 11)))
    await load(store, "quiet")
    await appended(store, append(20, "quiet"))
    await store.set_retention("lobby", max_messages=4)
    assert await store.apply_retention(T0 / 1000) == 6
    assert await page(store) == [7, 8, 9, 10]
    assert await page(store, "quiet") == [1]  # rooms without limits keep everything
    room = await load(store)
    assert (room.head, room.epoch) == (10, epoch)
    [nxt] = await appended(store, append(11))
    assert nxt.message.offset == 11
    assert await store.apply_retention(T0 / 1000) == 1
    assert await page(store) == [8, 9, 10, 11]


async def test_retention_by_age(make_store: MakeStore) -> None:
    store = durable(await make_store())
    await load(store)
    day = 86_400_000
    await appended(store, *(append(i, ts=T0 - (10 - i) * day) for i in range(1, 11)))
    await store.set_retention("lobby", max_age=3 * 86_400)
    # Messages older than 3 days at T0: offsets 1..6 (ages 9..4 days); 7 is exactly 3 days.
    assert await store.apply_retention(T0 / 1000) == 6
    assert await page(store) == [7, 8, 9, 10]
    info = await store.room("lobby")
    assert info is not None
    assert (info.stored, info.head, info.max_age) == (4, 10, 3 * 86_400)


async def test_server_default_retention_applies_to_rooms_without_their_own(
    make_store: MakeStore,
) -> None:
    store = durable(await make_store())
    day = 86_400_000
    for room in ("lobby", "kept", "young"):
        await load(store, room)
        await appended(store, *(append(i, room, ts=T0 - (10 - i) * day) for i in range(1, 11)))
    await store.set_retention("kept", max_messages=8)  # its own count replaces the default
    await store.set_retention("young", max_age=2 * 86_400)  # its own age, the default count
    # No default: only the rooms' own limits (kept: 2 over 8; young: 7 older than 2 days).
    assert await store.apply_retention(T0 / 1000) == 2 + 7
    assert await page(store, "young") == [8, 9, 10]
    assert await page(store, "lobby") == list(range(1, 11))
    cut = await store.apply_retention(T0 / 1000, default_messages=3, default_age=4 * 86_400)
    # lobby: the newest 3 by the default count (the default age alone would keep 6..10).
    # kept: its own 8 (3..10), then 4 days of age by default: 6..10.
    # young: its own 2 days (8..10) is within the default count.
    assert await page(store, "lobby") == [8, 9, 10]
    assert await page(store, "kept") == [6, 7, 8, 9, 10]
    assert await page(store, "young") == [8, 9, 10]
    assert cut == 7 + 3
    # The defaults are not written into the rooms.
    assert [(r.max_messages, r.max_age) for r in await store.rooms()] == [
        (8, None),
        (None, None),
        (None, 2 * 86_400),
    ]
    with pytest.raises(ValueError, match="negative"):
        await store.apply_retention(T0 / 1000, default_messages=-1)


async def test_appends_go_on_while_retention_runs(make_store: MakeStore) -> None:
    store = durable(await make_store())
    if isinstance(store, MemoryStore):
        pytest.skip("MemoryStore's retention never waits, so there is nothing to interleave")
    await load(store)
    await appended(store, *(append(i) for i in range(1, 401)))
    await store.set_retention("lobby", max_messages=0)
    done: list[str] = []

    async def retention() -> None:
        await store.apply_retention(T0 / 1000)
        done.append("retention")

    async with anyio.create_task_group() as tg:
        tg.start_soon(retention)
        await anyio.sleep(0)  # let retention take the database first
        [late] = await appended(store, append(401))
        done.append("append")
    # Retention deletes in chunks and lets the append in between them.
    assert done == ["append", "retention"]
    assert late.message.offset == 401
    assert await page(store) == [401]  # the cut was set before it came


async def test_the_history_call_reads_what_load_history_reads(make_store: MakeStore) -> None:
    store = durable(await make_store())
    await load(store)
    await appended(store, *(append(i) for i in range(1, 8)))
    assert [m.offset for m in await store.history("lobby")] == list(range(1, 8))
    assert [m.offset for m in await store.history("lobby", before=5, limit=2)] == [3, 4]
    assert [m.offset for m in await store.history("lobby", after=5)] == [6, 7]
    assert await store.history("lobby", before=0) == ()
    assert await store.history("nowhere") == ()
    assert await store.room("nowhere") is None


async def test_retention_by_age_never_deletes_a_young_message(make_store: MakeStore) -> None:
    # A server's clock may step back: times are not always in offset order.
    store = durable(await make_store())
    await load(store)
    day = 86_400_000
    ages = [9, 1, 8, 1, 7]  # days, by offset
    await appended(store, *(append(i, ts=T0 - ages[i - 1] * day) for i in range(1, 6)))
    await store.set_retention("lobby", max_age=3 * 86_400)
    assert await store.apply_retention(T0 / 1000) == 1  # the front stops at the first young one
    assert await page(store) == [2, 3, 4, 5]


async def test_the_inbox_lists_direct_rooms_with_unread_messages_newest_first(
    make_store: MakeStore,
) -> None:
    store = await make_store()
    rooms = ["dm:alice:bob", "dm:bob:carol", "dm:bob_x:dave", "dm:bob:bob2", "dm:dave:xbob"]
    for i, room in enumerate(rooms):
        await load(store, room)
        await appended(store, append(i, room=room, sender="dave", ts=T0 + i))
    await load(store, "dm:bob:erin")  # bob answered erin: replying is reading
    await appended(store, append(7, room="dm:bob:erin", sender="erin", ts=T0 + 7))
    await appended(store, append(8, room="dm:bob:erin", sender="bob", ts=T0 + 8))
    await load(store, "bob")  # a room named like the user: not a DM room
    await appended(store, append(9, room="bob", ts=T0 + 99))
    # bob read everything in dm:bob:bob2, and only offset 0 of dm:bob:carol.
    await store.execute(
        [
            SavePositions(
                user="bob",
                positions=(
                    Position(room="dm:bob:bob2", delivered=1, read=1),
                    Position(room="dm:bob:carol", delivered=1, read=0),
                ),
            )
        ]
    )

    async def inbox(user: str, limit: int = 10) -> tuple[str, ...]:
        [answer] = await store.execute([LoadInbox(ref=7, user=user, limit=limit)])
        assert isinstance(answer, InboxLoaded)
        assert answer.ref == 7
        return answer.rooms

    # Not "dm:bob_x:dave" ("_" is no wildcard), not "dm:dave:xbob", not the read one.
    assert await inbox("bob") == ("dm:bob:carol", "dm:alice:bob")
    assert await inbox("bob", limit=1) == ("dm:bob:carol",)
    assert await inbox("dave") == ()  # dave sent every one of them
    assert await inbox("erin") == ("dm:bob:erin",)
    assert await inbox("nobody") == ()


async def test_the_inbox_breaks_ties_by_name_and_lists_emptied_rooms_last(
    make_store: MakeStore,
) -> None:
    store = durable(await make_store())
    for room in ("dm:bob:erin", "dm:bob:carol", "dm:alice:bob"):
        await load(store, room)
    # Retention keeps nothing of dm:bob:erin, whose head stays unread.
    await appended(store, append(1, room="dm:bob:erin", sender="erin", ts=T0 + 9))
    await store.set_retention("dm:bob:erin", max_messages=0)
    assert await store.apply_retention(T0 / 1000) == 1
    # The newest messages of the other two were stored at the same millisecond.
    await appended(store, append(2, room="dm:bob:carol", sender="carol", ts=T0))
    await appended(store, append(3, room="dm:alice:bob", sender="alice", ts=T0))
    [answer] = await store.execute([LoadInbox(ref=4, user="bob", limit=10)])
    assert answer == InboxLoaded(ref=4, rooms=("dm:alice:bob", "dm:bob:carol", "dm:bob:erin"))
