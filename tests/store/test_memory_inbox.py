"""MemoryStore answers a new session's inbox look-up from the user's own
direct-message rooms, not by reading every room of the log (each connect asks).

The store conformance suite and the model test what an inbox holds; these add
the rooms that only the memory store makes in two ways (``lose``, as a log that
lost a room's data, may make a room before any message does).
"""

from __future__ import annotations

import time

from chatcore import Append, InboxLoaded, LoadInbox
from chatcore_store import MemoryStore


def inbox(store: MemoryStore, user: str) -> tuple[str, ...]:
    [answer] = store.execute_now([LoadInbox(ref=1, user=user, limit=10)])
    assert isinstance(answer, InboxLoaded)
    return answer.rooms


def send(store: MemoryStore, room: str, sender: str, ts: int) -> None:
    store.execute_now([Append(ref=1, room=room, sender=sender, text="hi", ts=ts)])


def test_a_direct_room_made_by_a_lost_log_is_in_both_users_inboxes() -> None:
    store = MemoryStore()
    store.lose("dm:alice:bob")  # the log starts the room afresh before any message
    send(store, "dm:alice:bob", "alice", int(time.time() * 1000))
    assert inbox(store, "bob") == ("dm:alice:bob",)
    assert inbox(store, "alice") == ()  # she sent the newest


def test_other_rooms_do_not_reach_an_inbox() -> None:
    store = MemoryStore()
    for i in range(50):
        send(store, f"room{i}", "alice", 1 + i)
    send(store, "dm:bob:carol", "carol", 100)
    send(store, "dm:alice:bob", "alice", 101)
    assert inbox(store, "bob") == ("dm:alice:bob", "dm:bob:carol")
    assert inbox(store, "carol") == ()
    assert inbox(store, "nobody") == ()
