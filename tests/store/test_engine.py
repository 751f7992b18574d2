"""A real Engine on each store: what users see survives a restart of the store."""

from __future__ import annotations

import pytest

from chatcore import Ban, DeleteMessage, Mute, Unban
from chatcore_store import create_room

from .conftest import MakeStore
from .driver import Driver

pytestmark = pytest.mark.anyio


async def test_messages_acks_and_retries_survive_a_restart(make_store: MakeStore) -> None:
    store = await make_store()
    first = Driver(store, history_window=2)  # older pages must come from the store
    alice = await first.connect("alice", "lobby")
    bob = await first.connect("bob", "lobby")
    epoch = first.welcome(alice).rooms["lobby"].epoch
    for i in range(1, 6):
        await first.send(alice, "lobby", f"hello {i}", client_id=f"m{i}")
    assert [(a.offset, a.client_id) for a in first.acks(alice)] == [
        (i, f"m{i}") for i in range(1, 6)
    ]
    assert [m.text for m in first.messages(bob)] == [f"hello {i}" for i in range(1, 6)]
    await store.close()

    # The server restarts: a new engine, the store opened again on the same database.
    second = Driver(await make_store(), seed=1, history_window=2)
    alice = await second.connect("alice", "lobby")
    carol = await second.connect("carol", "lobby")
    assert second.welcome(carol).rooms["lobby"].epoch == epoch
    page = await second.fetch(carol, "lobby")
    assert [(m.offset, m.sender, m.text) for m in page.messages] == [
        (i, "alice", f"hello {i}") for i in range(1, 6)
    ]
    # A send retried after the restart is acked with its first offset and not delivered again.
    await second.send(alice, "lobby", "hello 3", client_id="m3")
    assert [a.offset for a in second.acks(alice)] == [3]
    assert second.messages(carol) == []
    await second.send(alice, "lobby", "after the restart", client_id="m6")
    assert [(m.offset, m.epoch) for m in second.messages(carol)] == [(6, epoch)]


async def test_a_room_created_by_the_admin_call_is_private(make_store: MakeStore) -> None:
    store = await make_store()
    await create_room(store, "staff", private=True, allow=["alice"])
    driver = Driver(store)
    alice = await driver.connect("alice", "staff")
    mallory = await driver.connect("mallory", "staff")
    assert "staff" in driver.welcome(alice).rooms
    assert "staff" not in driver.welcome(mallory).rooms
    assert [e.code for e in driver.errors(mallory)] == ["forbidden"]


async def test_bans_mutes_and_deleted_messages_survive_a_restart(make_store: MakeStore) -> None:
    store = await make_store()
    first = Driver(store, history_window=2)  # a replay past the window reads the store
    alice = await first.connect("alice", "lobby")
    for i in range(1, 4):
        await first.send(alice, "lobby", f"hello {i}", client_id=f"m{i}")
    muted_until = first.now + 3600
    await first.feed(Ban(room="lobby", user="mallory"))
    await first.feed(Mute(room="lobby", user="bob", until=muted_until))
    await first.feed(Mute(room="lobby", user="carol", until=muted_until))
    await first.feed(Mute(room="lobby", user="carol", until=None))  # lifted: forgotten
    await first.feed(DeleteMessage(room="lobby", offset=2))
    await first.feed(Ban(room="lobby", user="dave"))  # banned and muted: each kept,
    await first.feed(Mute(room="lobby", user="dave", until=muted_until))
    await first.feed(Mute(room="lobby", user="erin", until=muted_until))  # in either order
    await first.feed(Ban(room="lobby", user="erin"))
    await store.close()

    second = Driver(await make_store(), seed=1, history_window=2)
    mallory = await second.connect("mallory", "lobby")
    assert "lobby" not in second.welcome(mallory).rooms
    assert [e.message for e in second.errors(mallory)] == ["banned from room lobby"]
    bob = await second.connect("bob", "lobby")
    await second.send(bob, "lobby", "let me speak", client_id="b1")
    [refused] = second.errors(bob)
    assert refused.code == "forbidden"
    assert "muted" in refused.message
    carol = await second.connect("carol", "lobby")
    await second.send(carol, "lobby", "i may", client_id="c1")
    assert [a.offset for a in second.acks(carol)] == [4]  # no gap where 2 was deleted
    page = await second.fetch(carol, "lobby")
    assert [(m.offset, m.text, m.deleted) for m in page.messages] == [
        (1, "hello 1", False),
        (2, "", True),
        (3, "hello 3", False),
        (4, "i may", False),
    ]
    # A retry of the deleted message is answered with the deleted one, not revived.
    await second.send(alice := await second.connect("alice", "lobby"), "lobby", "hello 2", "m2")
    assert [a.offset for a in second.acks(alice)] == [2]
    assert second.messages(carol) == []  # (a duplicate is not delivered again)
    for user in ("dave", "erin"):
        await second.feed(Unban(room="lobby", user=user))
        conn = await second.connect(user, "lobby")
        assert "lobby" in second.welcome(conn).rooms  # the ban is lifted...
        await second.send(conn, "lobby", "hi", client_id="x1")
        assert "muted" in second.errors(conn)[0].message  # ...the mute is not
